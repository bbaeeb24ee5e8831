// CPU kernels for decoding (AVX-512), whose results for one row never depend on the other rows.
//
// Weight-stationary products of int8 or int4 weights with activations quantized per group of 32
// (AVX-512 VNNI). Each tile of 16 weight rows by 4 inputs is loaded (and unpacked) once and
// multiplied with up to 8 activation rows whose sums stay in registers, so a batch of rows costs
// little more than one row (PyTorch's weight-only kernels read and unpack the weights again for
// every few rows). Integer sums are exact and each output is then accumulated over its groups in
// a fixed order, so a row's result never depends on the other rows of the batch. Layouts: see
// engine/avx512.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cmath>
#include <algorithm>
#include <climits>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t GROUP = 32;  // activations and int4 weights share one scale per 32 inputs
constexpr int64_t LANES = 16;  // output rows per block: one per 32-bit lane

struct Quantized {
  at::Tensor codes;  // [m, k] int8
  at::Tensor steps;  // [m, k / 32] float: an activation is code * step
  at::Tensor sums;   // [m, k / 32] int32: the codes' sum per group
};

// Symmetric int8 per group of 32 inputs: step = largest magnitude / 127.
Quantized quantize_rows(const at::Tensor& x) {
  const int64_t m = x.size(0), k = x.size(1), groups = k / GROUP;
  auto input = x.to(at::kFloat).contiguous();
  Quantized q{at::empty({m, k}, at::kChar), at::empty({m, groups}, at::kFloat),
              at::empty({m, groups}, at::kInt)};
  const float* in = input.data_ptr<float>();
  int8_t* codes = q.codes.data_ptr<int8_t>();
  float* steps = q.steps.data_ptr<float>();
  int32_t* sums = q.sums.data_ptr<int32_t>();
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* v = in + r * k + g * GROUP;
      float largest = 0.f;
      for (int64_t i = 0; i < GROUP; ++i) largest = std::max(largest, std::fabs(v[i]));
      const float step = largest / 127.f;
      const float inverse = largest > 0.f ? 127.f / largest : 0.f;
      int32_t sum = 0;
      for (int64_t i = 0; i < GROUP; ++i) {
        const int32_t c = static_cast<int32_t>(std::nearbyint(v[i] * inverse));
        codes[r * k + g * GROUP + i] = static_cast<int8_t>(c);
        sum += c;
      }
      steps[r * groups + g] = step;
      sums[r * groups + g] = sum;
    }
  }
  return q;
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t word;
  std::memcpy(&word, p, sizeof(word));
  return _mm512_set1_epi32(word);
}

// Runs `block(rows, r0)` over activation rows [r0, r0 + rows) in blocks of 8 and one of the
// rest, `rows` a compile-time constant: each block's accumulators then live in registers.
template <typename F>
inline void in_row_blocks(int64_t m, F&& block) {
  int64_t r0 = 0;
  for (; r0 + 8 <= m; r0 += 8) block(std::integral_constant<int, 8>{}, r0);
  switch (m - r0) {
    case 1: block(std::integral_constant<int, 1>{}, r0); break;
    case 2: block(std::integral_constant<int, 2>{}, r0); break;
    case 3: block(std::integral_constant<int, 3>{}, r0); break;
    case 4: block(std::integral_constant<int, 4>{}, r0); break;
    case 5: block(std::integral_constant<int, 5>{}, r0); break;
    case 6: block(std::integral_constant<int, 6>{}, r0); break;
    case 7: block(std::integral_constant<int, 7>{}, r0); break;
    default: break;
  }
}

void check(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "activations must be [rows, ", k, "]");
  TORCH_CHECK(k % GROUP == 0, "inputs must be whole groups of 32");
}

}  // namespace

// x [m, k] times int8 weights stored as unsigned (code + 128) in tiles [n / 16, k / 4, 16, 4],
// with a float scale per weight row: [m, n] float.
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& scales) {
  const int64_t k = tiles.size(1) * 4, n = tiles.size(0) * LANES, m = x.size(0);
  check(x, k);
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.is_contiguous(), "bad int8 tiles");
  TORCH_CHECK(scales.numel() == n && scales.scalar_type() == at::kFloat, "bad int8 scales");
  const Quantized q = quantize_rows(x);
  auto out = at::empty({m, n}, at::kFloat);
  const int64_t groups = k / GROUP;
  const uint8_t* w = tiles.data_ptr<uint8_t>();
  const float* scale = scales.data_ptr<float>();
  const int8_t* codes = q.codes.data_ptr<int8_t>();
  const float* steps = q.steps.data_ptr<float>();
  const int32_t* sums = q.sums.data_ptr<int32_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n / LANES, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      in_row_blocks(m, [&](auto count, int64_t r0) {
        constexpr int R = decltype(count)::value;
        __m512 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t g = 0; g < groups; ++g) {
          const uint8_t* tile = w + (b * (k / 4) + g * 8) * 64;
          __m512i dot[R];  // the weights are stored plus 128: start from -128 times the sum
          for (int r = 0; r < R; ++r)
            dot[r] = _mm512_set1_epi32(-128 * sums[(r0 + r) * groups + g]);
          for (int t = 0; t < 8; ++t) {  // a tile of 16 rows by 4 inputs, for every row
            const __m512i weights = _mm512_loadu_si512(tile + t * 64);
            for (int r = 0; r < R; ++r)
              dot[r] = _mm512_dpbusd_epi32(dot[r], weights,
                                           broadcast4(codes + (r0 + r) * k + g * GROUP + 4 * t));
          }
          for (int r = 0; r < R; ++r)
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]),
                                     _mm512_set1_ps(steps[(r0 + r) * groups + g]), acc[r]);
        }
        const __m512 s = _mm512_loadu_ps(scale + b * LANES);
        for (int r = 0; r < R; ++r)
          _mm512_storeu_ps(o + (r0 + r) * n + b * LANES, _mm512_mul_ps(acc[r], s));
      });
    }
  });
  return out;
}

// x [m, k] times int4 weights (code 0..15, weight = code * step + low per group of 32 inputs):
// codes in tiles [n / 16, k / 32, 4, 64] (the low nibbles hold an even run of 4 inputs, the high
// nibbles the next), steps and lows as float16 [n / 16, k / 32, 2, 16]: [m, n] float.
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& grid) {
  const int64_t groups = tiles.size(1), k = groups * GROUP, n = tiles.size(0) * LANES;
  const int64_t m = x.size(0);
  check(x, k);
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.is_contiguous(), "bad int4 tiles");
  TORCH_CHECK(grid.scalar_type() == at::kHalf && grid.is_contiguous() &&
                  grid.numel() == n * groups * 2, "bad int4 grid");
  const Quantized q = quantize_rows(x);
  auto out = at::empty({m, n}, at::kFloat);
  const uint8_t* w = tiles.data_ptr<uint8_t>();
  const uint16_t* gr = reinterpret_cast<const uint16_t*>(grid.data_ptr<at::Half>());
  const int8_t* codes = q.codes.data_ptr<int8_t>();
  const float* steps = q.steps.data_ptr<float>();
  const int32_t* sums = q.sums.data_ptr<int32_t>();
  float* o = out.data_ptr<float>();
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  at::parallel_for(0, n / LANES, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      in_row_blocks(m, [&](auto count, int64_t r0) {
        constexpr int R = decltype(count)::value;
        __m512 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t g = 0; g < groups; ++g) {
          const uint8_t* tile = w + (b * groups + g) * 256;
          __m512i dot[R];
          for (int r = 0; r < R; ++r) dot[r] = _mm512_setzero_si512();
          for (int t = 0; t < 4; ++t) {  // 4 inputs in the low nibbles, the next 4 in the high
            const __m512i packed = _mm512_loadu_si512(tile + t * 64);
            const __m512i low = _mm512_and_si512(packed, nibble);
            const __m512i high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
            for (int r = 0; r < R; ++r) {
              const int8_t* c = codes + (r0 + r) * k + g * GROUP + 8 * t;
              dot[r] = _mm512_dpbusd_epi32(dot[r], low, broadcast4(c));
              dot[r] = _mm512_dpbusd_epi32(dot[r], high, broadcast4(c + 4));
            }
          }
          const uint16_t* cell = gr + (b * groups + g) * 2 * LANES;
          const __m512 step = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)cell));
          const __m512 low = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(cell + LANES)));
          for (int r = 0; r < R; ++r) {
            const int64_t row = r0 + r;
            const float a = steps[row * groups + g];
            // sum over the group of code * step * x + low * x
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_set1_ps(a)),
                                     step, acc[r]);
            acc[r] = _mm512_fmadd_ps(low, _mm512_set1_ps(a * sums[row * groups + g]), acc[r]);
          }
        }
        for (int r = 0; r < R; ++r) _mm512_storeu_ps(o + (r0 + r) * n + b * LANES, acc[r]);
      });
    }
  });
  return out;
}

namespace {

// e^x for x <= 0 (softmax after subtracting the maximum): 2^(x log2 e) as 2^n * 2^f, with 2^f
// from a degree-6 polynomial on [-0.5, 0.5] (relative error under 2e-7).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline float dot(const float* a, const float* b, int64_t dim) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  return _mm512_reduce_add_ps(acc);
}

}  // namespace

// One sequence's share of an attention call: its queries [n, heads, dim], its keys and values
// in planes of blocks [blocks, block_size, kv_heads, dim] (float, contiguous), the blocks that
// hold its slots in order (slot j is in table[j / block_size]), and its spans [n, 2] (first and
// end slot per query).
struct Part {
  const float* q;
  const float* k;
  const float* v;
  const int64_t* table;
  int64_t block_size;
  const int64_t* span;
  float* o;
  int64_t n, length;
};

constexpr int64_t TILE = 32;  // keys and values read together by all of a thread's pairs

// Where the slots [j0, j0 + TILE) of `part` start in its planes (floats), up to `stop`.
inline void locate(const Part& part, int64_t j0, int64_t stop, int64_t row, int64_t* at) {
  for (int64_t j = j0; j < std::min(j0 + TILE, stop); ++j)
    at[j - j0] = (part.table[j / part.block_size] * part.block_size + j % part.block_size) * row;
}

// The (query, head) pairs [begin, end) of one part: each sums its keys in slot order with an
// exact softmax, so its result does not depend on the other pairs; keys and values are read in
// tiles that all of these pairs use while they are in cache.
void attend_pairs(const Part& part, int64_t begin, int64_t end, int64_t heads, int64_t kv_heads,
                  int64_t dim, float scale) {
  const int64_t group = heads / kv_heads, row = kv_heads * dim;
  const int64_t* span = part.span;
  int64_t low = part.length, high = 0;
  for (int64_t t = begin; t < end; ++t) {
    low = std::min(low, span[2 * (t / heads)]);
    high = std::max(high, span[2 * (t / heads) + 1]);
  }
  const int64_t width = high - low + 16;  // scores of a pair, and its 1 / sum at the end
  std::vector<float> scores((end - begin) * width);
  auto score = [&](int64_t t) { return scores.data() + (t - begin) * width; };
  int64_t at[TILE];
  for (int64_t j0 = low; j0 < high; j0 += TILE) {  // scores, a tile of keys at a time
    locate(part, j0, high, row, at);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / heads, kv = (t % heads) / group, first = span[2 * i];
      const int64_t stop = std::min(j0 + TILE, span[2 * i + 1]);
      for (int64_t j = std::max(j0, first); j < stop; ++j)
        score(t)[j - first] = dot(part.q + t * dim, part.k + at[j - j0] + kv * dim, dim) * scale;
    }
  }
  for (int64_t t = begin; t < end; ++t) {  // softmax over each pair's own keys, unnormalized
    const int64_t count = span[2 * (t / heads) + 1] - span[2 * (t / heads)];
    float* s = score(t);
    float largest = -INFINITY;
    for (int64_t j = 0; j < count; ++j) largest = std::max(largest, s[j]);
    __m512 total = _mm512_setzero_ps();
    const __m512 top = _mm512_set1_ps(largest);
    for (int64_t j = 0; j < count; j += 16) {
      const __mmask16 lanes =
          count - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (count - j)) - 1);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, s + j), top));
      _mm512_mask_storeu_ps(s + j, lanes, e);
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(lanes, e));
    }
    s[width - 1] = 1.f / _mm512_reduce_add_ps(total);
  }
  for (int64_t t = begin; t < end; ++t)
    std::fill(part.o + t * dim, part.o + (t + 1) * dim, 0.f);
  for (int64_t j0 = low; j0 < high; j0 += TILE) {  // weighted values, a tile at a time
    locate(part, j0, high, row, at);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / heads, kv = (t % heads) / group, first = span[2 * i];
      const int64_t from = std::max(j0, first), stop = std::min(j0 + TILE, span[2 * i + 1]);
      if (from >= stop) continue;
      const float* s = score(t);
      for (int64_t d0 = 0; d0 < dim; d0 += 128) {  // 8 registers of the output at a time
        const int64_t chunks = std::min<int64_t>(128, dim - d0) / 16;
        float* ot = part.o + t * dim + d0;
        __m512 acc[8];
        for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_loadu_ps(ot + 16 * c);
        for (int64_t j = from; j < stop; ++j) {
          const __m512 p = _mm512_set1_ps(s[j - first]);
          const float* vj = part.v + at[j - j0] + kv * dim + d0;
          for (int64_t c = 0; c < chunks; ++c)
            acc[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vj + 16 * c), acc[c]);
        }
        for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(ot + 16 * c, acc[c]);
      }
    }
  }
  for (int64_t t = begin; t < end; ++t) {
    const __m512 inverse = _mm512_set1_ps(score(t)[width - 1]);
    for (int64_t d = 0; d < dim; d += 16)
      _mm512_storeu_ps(part.o + t * dim + d,
                       _mm512_mul_ps(_mm512_loadu_ps(part.o + t * dim + d), inverse));
  }
}

// Attention of a few queries of several sequences, each query over its own run of its
// sequence's slots, in one parallel call: queries [N, heads, dim] (`counts[p]` rows per
// sequence, in order), spans [N, 2]; per sequence, key and value planes [blocks, block_size,
// kv_heads, dim] (float32, contiguous; sequences may share them) and the table of blocks that
// holds its slots. The outputs [N, heads, dim].
at::Tensor attend_spans(const at::Tensor& queries, const std::vector<at::Tensor>& keys,
                        const std::vector<at::Tensor>& values,
                        const std::vector<at::Tensor>& tables,
                        const std::vector<int64_t>& counts, const at::Tensor& spans,
                        double scaling) {
  const size_t count = counts.size();
  TORCH_CHECK(count > 0 && keys.size() == count && values.size() == count &&
                  tables.size() == count, "one key plane, value plane and table per sequence");
  TORCH_CHECK(queries.dim() == 3 && queries.scalar_type() == at::kFloat &&
                  queries.is_contiguous(), "queries must be [rows, heads, dim] float32");
  const int64_t rows = queries.size(0), heads = queries.size(1), dim = queries.size(2);
  TORCH_CHECK(spans.dim() == 2 && spans.size(0) == rows && spans.size(1) == 2 &&
                  spans.scalar_type() == at::kLong && spans.is_contiguous(),
              "spans must be [rows, 2] int64");
  auto out = at::empty({rows, heads, dim}, at::kFloat);
  std::vector<Part> parts;
  std::vector<int64_t> starts{0};  // the first (query, head) pair of each part
  int64_t first = 0;  // its first query
  for (size_t p = 0; p < count; ++p) {
    const at::Tensor &k = keys[p], &v = values[p], &table = tables[p];
    TORCH_CHECK(k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
                "attention takes float32");
    TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && table.is_contiguous() &&
                    table.scalar_type() == at::kLong && table.dim() == 1, "bad layout");
    TORCH_CHECK(k.dim() == 4 && k.size(3) == dim && v.sizes() == k.sizes() &&
                    heads % k.size(2) == 0 && dim % 16 == 0, "bad shapes");
    TORCH_CHECK(counts[p] >= 0 && first + counts[p] <= rows, "counts do not add up to the rows");
    const int64_t blocks = k.size(0), block_size = k.size(1);
    const int64_t* ids = table.data_ptr<int64_t>();
    for (int64_t b = 0; b < table.numel(); ++b)
      TORCH_CHECK(0 <= ids[b] && ids[b] < blocks, "a block id is out of range");
    const int64_t length = table.numel() * block_size;
    const int64_t* span = spans.data_ptr<int64_t>() + 2 * first;
    for (int64_t i = 0; i < counts[p]; ++i)
      TORCH_CHECK(0 <= span[2 * i] && span[2 * i] < span[2 * i + 1] &&
                      span[2 * i + 1] <= length, "a query's span is out of range");
    parts.push_back({queries.data_ptr<float>() + first * heads * dim, k.data_ptr<float>(),
                     v.data_ptr<float>(), ids, block_size, span,
                     out.data_ptr<float>() + first * heads * dim, counts[p], length});
    starts.push_back(starts.back() + counts[p] * heads);
    first += counts[p];
  }
  TORCH_CHECK(first == rows, "counts do not add up to the rows");
  const int64_t kv_heads = keys[0].size(2);
  for (const auto& k : keys) TORCH_CHECK(k.size(2) == kv_heads, "bad shapes");
  const float scale = static_cast<float>(scaling);
  at::parallel_for(0, starts.back(), 1, [&](int64_t begin, int64_t end) {
    for (size_t p = 0; p < parts.size(); ++p) {  // the parts this range of pairs overlaps
      const int64_t from = std::max(begin, starts[p]), to = std::min(end, starts[p + 1]);
      if (from < to)
        attend_pairs(parts[p], from - starts[p], to - starts[p], heads, kv_heads, dim, scale);
    }
  });
  return out;
}

// The logits of chosen tokens, exactly: hidden [m, k] times the rows `ids` [m, top] of `weight`
// [vocabulary, k] (float32): [m, top]. Each logit is one dot product in a fixed order.
at::Tensor rescore(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& ids) {
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                  ids.scalar_type() == at::kLong, "rescoring takes float32 and int64 ids");
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous() && ids.is_contiguous(),
              "bad layout");
  const int64_t m = hidden.size(0), k = hidden.size(1), top = ids.size(1);
  const int64_t vocabulary = weight.size(0);
  TORCH_CHECK(weight.size(1) == k && k % 16 == 0 && ids.size(0) == m, "bad shapes");
  auto out = at::empty({m, top}, at::kFloat);
  const float* h = hidden.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const int64_t* id = ids.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, m * top, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t token = id[t];
      TORCH_CHECK(0 <= token && token < vocabulary, "token id out of range");
      o[t] = dot(h + (t / top) * k, w + token * k, k);
    }
  });
  return out;
}

namespace {

// A float's bits as an int32 in the floats' order (-NaN < -inf < ... < inf < NaN).
inline int32_t ordered(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits ^ ((bits >> 31) & 0x7FFFFFFF);
}

inline __m512i ordered(__m512i bits) {
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  return _mm512_xor_si512(bits, _mm512_and_si512(_mm512_srai_epi32(bits, 31), magnitude));
}

// How many of `row` ([n]) are at least `floor` (ordered).
int64_t count_at_least(const float* row, int64_t n, int32_t floor) {
  const __m512i bound = _mm512_set1_epi32(floor);
  int64_t found = 0, j = 0;
  for (; j + 16 <= n; j += 16)
    found += __builtin_popcount(
        _mm512_cmpge_epi32_mask(ordered(_mm512_loadu_si512(row + j)), bound));
  for (; j < n; ++j) found += ordered(row[j]) >= floor;
  return found;
}

// The slots of `row` ([n]) whose value is at least `floor` (ordered), in slot order, and their
// ordered values, into `ids` and `keys` (room for what `count_at_least` found, plus 16):
// AVX-512 compares and compresses, 16 at a time.
void at_least(const float* row, int64_t n, int32_t floor, int32_t* keys, int32_t* ids) {
  const __m512i bound = _mm512_set1_epi32(floor);
  __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t found = 0, j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i key = ordered(_mm512_loadu_si512(row + j));
    const __mmask16 keep = _mm512_cmpge_epi32_mask(key, bound);
    // compress in registers and store all 16 lanes (compress-stores to memory are slow on
    // some CPUs); the lanes past the kept ones are overwritten next
    _mm512_storeu_si512(keys + found, _mm512_maskz_compress_epi32(keep, key));
    _mm512_storeu_si512(ids + found, _mm512_maskz_compress_epi32(keep, index));
    found += __builtin_popcount(keep);
    index = _mm512_add_epi32(index, _mm512_set1_epi32(16));
  }
  for (; j < n; ++j) {
    const int32_t key = ordered(row[j]);
    if (key >= floor) keys[found] = key, ids[found++] = static_cast<int32_t>(j);
  }
}

// The `top` largest of `row` ([n], n > top): their slots in ascending order into `out`. Ties
// at the boundary go to the lower slots, so the choice depends on the row's values only. A
// strided sample sets a floor that about twice `top` values clear (a floor that too few clear
// is lowered); the values at or above it are collected in one vectorized pass and the exact cut
// is chosen among them.
void top_of_row(const float* row, int64_t n, int64_t top, int64_t* out) {
  const int64_t stride = std::max<int64_t>(1, n / 4096);
  std::vector<int32_t> sample;
  for (int64_t j = 0; j < n; j += stride) sample.push_back(ordered(row[j]));
  const int64_t size = static_cast<int64_t>(sample.size());
  int32_t floor = INT32_MIN;
  int64_t found = n;
  for (int64_t rank = 2 * top * size / n + 1; rank < size; rank *= 4) {
    std::nth_element(sample.begin(), sample.begin() + rank, sample.end(),
                     std::greater<int32_t>());
    found = count_at_least(row, n, sample[rank]);
    if (found >= top) {
      floor = sample[rank];
      break;
    }
    found = n;
  }
  thread_local std::vector<int32_t> keys, ids;  // kept: no fresh pages on every call
  if (static_cast<int64_t>(keys.size()) < found + 16) {
    keys.resize(found + 16);
    ids.resize(found + 16);
  }
  at_least(row, n, floor, keys.data(), ids.data());
  // the cut: the top-th largest (value, then lower slot first)
  std::vector<int32_t> order(found);
  for (int64_t c = 0; c < found; ++c) order[c] = static_cast<int32_t>(c);
  auto before = [&](int32_t a, int32_t b) {
    return keys[a] != keys[b] ? keys[a] > keys[b] : a < b;
  };
  std::nth_element(order.begin(), order.begin() + (top - 1), order.end(), before);
  const int32_t cut = order[top - 1];
  int64_t written = 0;
  for (int64_t c = 0; c < found; ++c)
    if (keys[c] > keys[cut] || (keys[c] == keys[cut] && c <= cut)) out[written++] = ids[c];
}

}  // namespace

// The ids of the `top` largest values of every row of `values` [m, n] (float32, rows may be
// strided), in ascending order: [m, top] int64, the same set as torch.topk (ties at the boundary: the lowest ids). A
// row is chosen on its own.
at::Tensor top_ids(const at::Tensor& values, int64_t top) {
  TORCH_CHECK(values.dim() == 2 && values.scalar_type() == at::kFloat && values.stride(1) == 1,
              "values must be [rows, n] float32, each row contiguous");
  const int64_t m = values.size(0), n = values.size(1);
  TORCH_CHECK(0 < top && top <= n, "top must be in 1..", n, ", got ", top);
  auto out = at::empty({m, top}, at::kLong);
  const float* v = values.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (top == n) {
        for (int64_t j = 0; j < n; ++j) o[r * top + j] = j;
      } else {
        top_of_row(v + r * values.stride(0), n, top, o + r * top);
      }
    }
  });
  return out;
}

// The kernels let go of the GIL while they compute, as PyTorch's own operators do: the server's
// threads can answer clients meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using released = py::call_guard<py::gil_scoped_release>;
  m.def("int8_mm", &int8_mm, "int8 weights times activations quantized per group of 32",
        released());
  m.def("int4_mm", &int4_mm, "int4 weights times activations quantized per group of 32",
        released());
  m.def("attend_spans", &attend_spans, "attention of a few queries of several sequences over "
        "their own paged keys", released());
  m.def("rescore", &rescore, "exact logits of chosen tokens", released());
  m.def("top_ids", &top_ids, "the ids of every row's largest values, in ascending order",
        released());
}
