"""Gemma 3's decoder on the paged cache in a few calls per layer.

Decoding one token of a 270M model is a few milliseconds of arithmetic, and transformers spends
about as long again in Python and small tensor operations around it: module calls, norms built
from five operations, rotary tables recomputed in every layer. `FusedGemma3` runs the same
decoder from the same weights with the projections fused (queries, keys and values in one
matrix; the MLP's gate and up in another), norms in a few calls each, the rotary tables computed
once per pass, and the paged attention of engine/attention.py in every layer.

`fuse(model)` builds it before any weight-only conversion (engine/quantize.py converts the fused
matrices like any other), and points transformers' own q/k/v and gate/up projections at slices
of the fused ones, so the model still runs through transformers (`model.generate`) on the same
weights, without a second copy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SUPPORTED = ("gemma3_text",)


class RowsOf(nn.Module):
    """Output features `start:end` of the fused projection `owner.<name>` (looked up at every
    call: a weight-only conversion replaces it)."""

    def __init__(self, owner: nn.Module, name: str, start: int, end: int):
        super().__init__()
        self.owner = [owner]  # a list: the fused projection belongs to its runner
        self.name, self.start, self.end = name, start, end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.owner[0], self.name)(x)[..., self.start:self.end]


def _cat_linear(parts: list[nn.Linear]) -> nn.Linear:
    out = sum(p.out_features for p in parts)
    fused = nn.Linear(parts[0].in_features, out, bias=parts[0].bias is not None)
    with torch.no_grad():
        fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        if fused.bias is not None:
            fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis in float32, as Gemma computes it (fewer calls than
    `F.rms_norm` on the CPU)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


def _norm_weight(norm: nn.Module) -> torch.Tensor:
    """Gemma's RMSNorm multiplies by (1 + weight), in float32."""
    return (1.0 + norm.weight.detach().float()).contiguous()


class FusedLayer(nn.Module):
    """One decoder layer: fused projections, its norms' weights, and what attention needs."""

    def __init__(self, layer: nn.Module, config: Any):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.layer_idx = attn.layer_idx  # read by the paged attention
        self.layer_type = config.layer_types[self.layer_idx]
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.eps = config.rms_norm_eps
        q, k = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv = _cat_linear([attn.q_proj, attn.k_proj, attn.v_proj])
        attn.q_proj, attn.k_proj, attn.v_proj = (RowsOf(self, "qkv", 0, q),
                                                 RowsOf(self, "qkv", q, q + k),
                                                 RowsOf(self, "qkv", q + k, q + 2 * k))
        inner = mlp.gate_proj.out_features
        self.gate_up = _cat_linear([mlp.gate_proj, mlp.up_proj])
        mlp.gate_proj = RowsOf(self, "gate_up", 0, inner)
        mlp.up_proj = RowsOf(self, "gate_up", inner, 2 * inner)
        self.owner = [layer]  # o_proj and down_proj stay where quantize() finds them
        self.act = mlp.act_fn
        self.q_size, self.k_size, self.inner = q, k, inner
        self.derive()

    def derive(self) -> None:
        """Take the norms' weights from the transformers layer (again, after they changed)."""
        layer = self.owner[0]
        attn = layer.self_attn
        self.qk_norm = torch.cat([_norm_weight(attn.q_norm).expand(self.heads, -1),
                                  _norm_weight(attn.k_norm).expand(self.kv_heads, -1)])
        self.norms = [_norm_weight(n) for n in (layer.input_layernorm,
                                                layer.post_attention_layernorm,
                                                layer.pre_feedforward_layernorm,
                                                layer.post_feedforward_layernorm)]

    def _norm(self, x: torch.Tensor, which: int) -> torch.Tensor:
        return rms_norm(x, self.norms[which], self.eps)

    def forward(self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                paged) -> torch.Tensor:
        layer = self.owner[0]
        count = hidden.shape[0]
        qkv = self.qkv(self._norm(hidden, 0))
        qk = qkv[:, :self.q_size + self.k_size].view(count, self.heads + self.kv_heads,
                                                     self.head_dim)
        qk = rms_norm(qk, self.qk_norm, self.eps)
        cos, sin = rotary
        half = self.head_dim // 2
        qk = qk * cos + torch.cat([qk[..., half:], qk[..., :half]], dim=-1) * sin
        qk = qk.to(hidden.dtype).transpose(0, 1)[None]  # [1, heads + kv_heads, n, dim]
        value = qkv[:, self.q_size + self.k_size:].view(count, self.kv_heads, self.head_dim)
        attended = paged.attend(self, qk[:, :self.heads], qk[:, self.heads:],
                                value.transpose(0, 1)[None], self.scaling)
        out = layer.self_attn.o_proj(attended.reshape(count, self.q_size))
        hidden = hidden + self._norm(out, 1)
        gate, up = self.gate_up(self._norm(hidden, 2)).split(self.inner, dim=-1)
        out = layer.mlp.down_proj(self.act(gate) * up)
        return hidden + self._norm(out, 3)


class FusedGemma3(nn.Module):
    """Gemma 3's text decoder for paged forward passes (see the module's docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        text = model.model
        self.config = model.config
        self.embed = text.embed_tokens
        self.layers = nn.ModuleList(FusedLayer(layer, self.config) for layer in text.layers)
        self.text = [text]
        self.eps = self.config.rms_norm_eps
        self.derive()
        rotary = text.rotary_emb
        self.rotary = {kind: (getattr(rotary, f"{kind}_inv_freq").float(),
                              float(getattr(rotary, f"{kind}_attention_scaling")))
                       for kind in set(self.config.layer_types)}

    def derive(self) -> None:
        """Take the norms' weights from the transformers model (again, after they changed)."""
        self.final_norm = _norm_weight(self.text[0].norm)
        for layer in self.layers:
            layer.derive()

    def _rotary(self, positions: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, and sin signed for the half rotation, as [n, 1, dim] tables."""
        inv_freq, scale = self.rotary[kind]
        freqs = positions[:, None].float() * inv_freq
        cos, sin = freqs.cos() * scale, freqs.sin() * scale
        return torch.cat([cos, cos], -1)[:, None], torch.cat([-sin, sin], -1)[:, None]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, paged) -> torch.Tensor:
        """Final hidden states ([n, hidden]) of `tokens` at `positions` on the paged cache."""
        hidden = self.embed(tokens)
        tables = {kind: self._rotary(positions, kind) for kind in self.rotary}
        for layer in self.layers:
            hidden = layer(hidden, tables[layer.layer_type], paged)
        return rms_norm(hidden, self.final_norm, self.eps)


def fuse(model: nn.Module) -> FusedGemma3 | None:
    """Fuse `model`'s decoder if it is a Gemma 3 text model (None otherwise); in place."""
    if getattr(model.config, "model_type", None) not in SUPPORTED:
        return None
    runner = FusedGemma3(model)
    model.pyagent_fused = runner
    return runner
