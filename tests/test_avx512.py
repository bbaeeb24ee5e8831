"""The AVX-512 kernels: close to float references, every row's result independent of the other
rows of its batch (what exact speculation and batching rest on), and one-line errors for bad
input."""

import pytest
import torch

from pyagent.engine import avx512
from pyagent.engine.screened_head import ScreenedHead, int4_codes

pytestmark = pytest.mark.skipif(avx512.kernels() is None, reason="this CPU lacks AVX-512 VNNI")


def alone_equals_batched(compute, rows: int) -> bool:
    """Whether computing each row alone gives the bits the whole batch gives it."""
    batched = compute(slice(0, rows))
    return all(torch.equal(compute(slice(i, i + 1))[0], batched[i]) for i in range(rows))


@pytest.mark.parametrize(("outputs", "inputs"), [(384, 256), (1000, 64), (40, 2048)])
def test_the_int8_product_is_close_to_float_and_rows_stand_alone(outputs, inputs):
    torch.manual_seed(outputs)
    codes = torch.randint(-127, 128, (outputs, inputs), dtype=torch.int8)
    scales = torch.rand(outputs) / 100
    tiles, padded = avx512.int8_tiles(codes, scales)
    assert torch.equal(avx512.int8_codes(tiles, outputs), codes)
    assert tiles.shape[0] * 16 >= outputs and padded.shape[0] == tiles.shape[0] * 16
    x = torch.randn(33, inputs) * torch.linspace(0.01, 10, inputs)  # uneven magnitudes
    out = avx512.int8_mm(x, tiles, padded)
    exact = x @ (codes.float() * scales[:, None]).T
    assert (out[:, :outputs] - exact).norm() / exact.norm() < 0.01
    assert torch.equal(out[:, outputs:], torch.zeros_like(out[:, outputs:]))  # padding rows
    assert alone_equals_batched(lambda rows: avx512.int8_mm(x[rows], tiles, padded), 33)
    zeros = avx512.int8_mm(torch.zeros(2, inputs), tiles, padded)
    assert torch.equal(zeros, torch.zeros_like(zeros))  # an all-zero group has no NaN step


def test_the_int4_product_is_close_to_its_weights_and_rows_stand_alone():
    torch.manual_seed(1)
    weight = torch.randn(1000, 128) / 10
    codes, steps, lows = int4_codes(weight)
    tiles, grid = avx512.int4_tiles(codes, steps, lows)
    dequantized = (codes.float().view(1000, 4, 32) * steps.half().float()[..., None]
                   + lows.half().float()[..., None]).view(1000, 128)
    assert (dequantized - weight).abs().max() < 0.05
    x = torch.randn(20, 128)
    out = avx512.int4_mm(x, tiles, grid)[:, :1000]
    exact = x @ dequantized.T
    assert (out - exact).norm() / exact.norm() < 0.01
    assert alone_equals_batched(lambda rows: avx512.int4_mm(x[rows], tiles, grid), 20)


def test_the_screened_head_keeps_exact_logits_for_its_top_tokens():
    torch.manual_seed(2)
    weight = torch.randn(5000, 64)
    head = ScreenedHead(weight, top=64)
    assert head.tiled
    hidden = torch.randn(7, 64)
    logits = head(hidden)
    exact = hidden @ weight.T
    best = exact.topk(8, dim=-1).indices
    assert torch.allclose(logits.gather(1, best), exact.gather(1, best), atol=1e-4)
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    assert alone_equals_batched(lambda rows: head(hidden[rows]), 7)


def reference_attention(query, keys, values, spans, scaling):
    out = []
    for i, (start, end) in enumerate(spans.tolist()):
        group = query.shape[1] // keys.shape[1]
        k = keys[start:end].repeat_interleave(group, dim=1)  # [l, heads, dim]
        v = values[start:end].repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", query[i].double(), k.double()) * scaling
        out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v.double()))
    return torch.stack(out).float()


def attend(query, keys, values, spans, scaling):
    """One sequence through the kernel, its keys and values [l, kv_heads, dim] as one block."""
    return avx512.attend_spans(query, [keys[None]], [values[None]], [torch.tensor([0])],
                               [query.shape[0]], spans, scaling)


def paged(tensors, block_size, blocks, generator):
    """`tensors` ([l, kv_heads, dim] each) scattered over a plane of `blocks` blocks in random
    order: the plane and each one's table."""
    plane = torch.randn(blocks, block_size, *tensors[0].shape[1:], generator=generator)
    free = torch.randperm(blocks, generator=generator).tolist()
    tables = []
    for tensor in tensors:
        table = torch.tensor([free.pop() for _ in range(-(-tensor.shape[0] // block_size))])
        flat = plane[table].flatten(0, 1)
        flat[:tensor.shape[0]] = tensor
        plane[table] = flat.view(len(table), block_size, *tensor.shape[1:])
        tables.append(table)
    return plane, tables


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 1, 256), (4, 2, 16), (2, 2, 144)])
def test_attention_over_spans_matches_softmax_and_queries_stand_alone(heads, kv_heads, dim):
    torch.manual_seed(heads + dim)
    length = 203  # not a multiple of the kernel's tiles or vectors
    query = torch.randn(9, heads, dim)
    keys, values = torch.randn(length, kv_heads, dim), torch.randn(length, kv_heads, dim)
    ends = torch.arange(length - 8, length + 1)
    spans = torch.stack([torch.tensor([0, 0, 5, 17, 100, 190, 194, 199, 202]), ends], dim=1)
    out = attend(query, keys, values, spans, dim ** -0.5)
    expected = reference_attention(query, keys, values, spans, dim ** -0.5)
    assert torch.allclose(out, expected, atol=2e-5)
    assert alone_equals_batched(
        lambda rows: attend(query[rows], keys, values, spans[rows], dim ** -0.5), 9)


def test_sequences_attended_together_get_what_they_get_alone():
    torch.manual_seed(4)
    lengths, counts = (40, 300, 7), (1, 9, 2)
    queries = [torch.randn(n, 4, 256) for n in counts]
    keys = [torch.randn(length, 1, 256) for length in lengths]
    values = [torch.randn(length, 1, 256) for length in lengths]
    spans = [torch.stack([torch.zeros(n, dtype=torch.long),
                          torch.arange(length - n + 1, length + 1)], dim=1)
             for n, length in zip(counts, lengths, strict=True)]
    together = avx512.attend_spans(torch.cat(queries), [k[None] for k in keys],
                                   [v[None] for v in values], [torch.tensor([0])] * 3,
                                   list(counts), torch.cat(spans), 0.0625).split(counts)
    for i in range(3):
        assert torch.equal(together[i], attend(queries[i], keys[i], values[i], spans[i], 0.0625))


def test_keys_read_from_blocks_through_tables_give_what_contiguous_keys_give():
    generator = torch.Generator().manual_seed(5)
    lengths, counts = (40, 300, 7, 16), (1, 9, 2, 3)
    queries = [torch.randn(n, 4, 256, generator=generator) for n in counts]
    keys = [torch.randn(length, 1, 256, generator=generator) for length in lengths]
    values = [torch.randn(length, 1, 256, generator=generator) for length in lengths]
    spans = [torch.stack([torch.arange(n) * 3, torch.arange(length - n + 1, length + 1)], dim=1)
             for n, length in zip(counts, lengths, strict=True)]
    key_plane, tables = paged(keys, 16, 40, generator)
    value_plane = torch.randn_like(key_plane)
    for table, value in zip(tables, values, strict=True):
        flat = value_plane[table].flatten(0, 1)
        flat[:value.shape[0]] = value
        value_plane[table] = flat.view(len(table), 16, 1, 256)
    out = avx512.attend_spans(torch.cat(queries), [key_plane] * 4, [value_plane] * 4, tables,
                              list(counts), torch.cat(spans), 0.0625).split(counts)
    for i in range(4):
        assert torch.equal(out[i], attend(queries[i], keys[i], values[i], spans[i], 0.0625))


def test_bad_spans_blocks_and_ids_are_refused_in_one_line():
    query, keys = torch.randn(1, 4, 16), torch.randn(10, 1, 16)
    for spans in ([[0, 11]], [[3, 3]], [[-1, 4]]):
        with pytest.raises(RuntimeError, match="a query's span is out of range"):
            attend(query, keys, keys, torch.tensor(spans), 1.0)
    plane, span = keys.view(5, 2, 1, 16), torch.tensor([[0, 1]])
    with pytest.raises(RuntimeError, match="one key plane, value plane and table per sequence"):
        avx512.attend_spans(query, [plane, plane], [plane], [torch.tensor([0])], [1], span, 1.0)
    with pytest.raises(RuntimeError, match="a block id is out of range"):
        avx512.attend_spans(query, [plane], [plane], [torch.tensor([0, 5])], [1], span, 1.0)
    with pytest.raises(RuntimeError, match="counts do not add up to the rows"):
        avx512.attend_spans(query, [plane], [plane], [torch.tensor([0])], [2], span, 1.0)
    with pytest.raises(RuntimeError, match="token id out of range"):
        avx512.rescore(torch.randn(1, 16), torch.randn(10, 16), torch.tensor([[3, 10]]))
    with pytest.raises(RuntimeError, match="top must be in 1..10, got 11"):
        avx512.top_ids(torch.randn(2, 10), 11)


def test_the_top_ids_are_torch_topk_s_in_ascending_order_and_rows_stand_alone():
    generator = torch.Generator().manual_seed(6)
    for rows, n, top in ((5, 262144, 1024), (3, 5000, 64), (2, 100, 100), (4, 37, 5)):
        values = torch.randn(rows, n, generator=generator)
        expected = values.topk(top, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(avx512.top_ids(values, top), expected)
    padded = torch.randn(3, 5008, generator=generator)[:, :5000]  # strided rows, as the head's
    assert torch.equal(avx512.top_ids(padded, 64),
                       padded.topk(64, dim=-1).indices.sort(dim=-1).values)
    values = torch.randn(6, 262144, generator=generator)
    assert alone_equals_batched(lambda rows: avx512.top_ids(values[rows], 1024), 6)


def test_the_top_ids_hold_on_rows_that_fool_the_sample():
    """The floor comes from a strided sample: rows whose sampled slots are all high, or all
    low, must still give the exact set; ties on the boundary go to the lowest ids."""
    generator = torch.Generator().manual_seed(7)
    n, top = 262144, 1024
    sampled = torch.zeros(n, dtype=torch.bool)
    sampled[::n // 4096] = True
    high = torch.randn(n, generator=generator)
    high[sampled] += 100  # the sample says a few hundred values are high
    low = torch.randn(n, generator=generator)
    low[sampled] -= 100  # the sample says nearly every value is high
    for row in (high, low):
        assert torch.equal(avx512.top_ids(row[None], top)[0],
                           row.topk(top).indices.sort().values)
    ties = torch.zeros(n)
    ties[5000:5010] = 1.0
    assert torch.equal(avx512.top_ids(ties[None], 20)[0],
                       torch.cat([torch.arange(10), torch.arange(5000, 5010)]).sort().values)
    special = torch.randn(n, generator=generator)
    special[[7, 70000]] = float("nan")
    special[[9, 90000]] = float("inf")
    chosen = avx512.top_ids(special[None], top)[0]
    assert {7, 9, 70000, 90000} <= set(chosen.tolist()) and chosen.unique().numel() == top


def test_rescoring_is_exact_and_rows_stand_alone():
    torch.manual_seed(3)
    hidden, weight = torch.randn(5, 640), torch.randn(3000, 640)
    ids = torch.randint(0, 3000, (5, 100)).sort(dim=-1).values
    out = avx512.rescore(hidden, weight, ids)
    exact = (weight[ids].double() * hidden[:, None].double()).sum(-1)
    assert torch.allclose(out.double(), exact, atol=1e-4)
    assert alone_equals_batched(lambda rows: avx512.rescore(hidden[rows], weight, ids[rows]), 5)
