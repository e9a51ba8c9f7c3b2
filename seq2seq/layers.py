"""Building blocks of the encoder-decoder: RMSNorm, rotary positions, the gated MLP and attention.

The attention math lives once, in :class:`Attention`; the encoder's bidirectional self-attention, the
decoder's causal self-attention and its cross-attention to the text are thin on top of it (min-dalle's
``AttentionBase``). The decoder's two attentions read their keys and values from a :class:`KVCache`
when decoding: the causal one writes each new position into it, the cross one has its keys and values
written once per prompt by :meth:`CrossAttention.fill_cache`. Rotary positions are pure functions
(RoFormer, Su et al. 2021; gpt-fast's ``precompute_freqs_cis`` / ``apply_rotary_emb``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from seq2seq.cache import KVCache

__all__ = [
    "RMSNorm",
    "rope_table",
    "apply_rope",
    "attention_product",
    "GatedMLP",
    "Attention",
    "SelfAttention",
    "CausalSelfAttention",
    "CrossAttention",
]


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), computed in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight in one kernel: the values of the five operations it replaces
        # (tests/test_decode_fast.py pins the shipped runs' tokens), 40% less time a call at decoding's sizes.
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).type_as(x)


def rope_table(length: int, head_dim: int, base: float = 10_000.0) -> Tensor:
    """Cosines and sines of the rotary angles for positions ``0..length-1``: (length, head_dim // 2, 2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (D/2,)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (T, D/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()  # (T, D/2, 2)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate each pair of channels of ``x`` (B, H, T, D) by its position's angle; ``table`` is (T, D/2, 2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, H, T, D/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = table[..., 0], table[..., 1]  # (T, D/2)
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # (B, H, T, D/2, 2)
    return rotated.flatten(-2).type_as(x)  # (B, H, T, D)


def attention_product(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout: float = 0.0) -> Tensor:
    """``softmax(q k^T / sqrt(D))`` over the keys ``mask`` allows (softmax in fp32), times ``v``: (B, H, T, D).

    Attention as two products, for the CPU: at this model's lengths (64 image tokens, a few dozen text
    tokens) PyTorch's fused CPU kernel spent over a third of a training step in its backward pass, while
    these plain products let torch.compile fuse the mask and softmax; a compiled bf16 `small` step on a
    2-core CPU went from 0.47 s to 0.30 s. A row with no allowed key attends evenly instead of giving NaN.
    """
    scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5  # (B, H, T, S)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = F.dropout(scores.softmax(-1), dropout, training=dropout > 0).to(v.dtype)
    return weights @ v


class GatedMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

        self.w13_fused: Tensor | None = None  # (2 * hidden, d_model): w1 over w3, for decoding

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))

    def fuse_for_decoding(self, dtype: torch.dtype) -> None:
        """Stack w1 and w3 into one (2 * hidden, d_model) weight in ``dtype``: one product a decode step.

        A copy of the trained weights, made again whenever decoding is set up, so checkpoints keep their
        keys and training is untouched. The stacked product gives the same values as the two products.
        """
        self.w13_fused = torch.cat([self.w1.weight, self.w3.weight]).detach().to(dtype)

    def decode(self, x: Tensor) -> Tensor:
        """:meth:`forward` without dropout, with the stacked weight of :meth:`fuse_for_decoding`."""
        gate, up = F.linear(x, self.w13_fused).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.w2(F.silu(gate) * up)


class Attention(nn.Module):
    """Multi-head attention math shared by every attention in the model.

    Subclasses decide where queries, keys and values come from; :meth:`attend` applies an explicit
    boolean mask (True = may attend) with ``F.scaled_dot_product_attention``, or, when training on the
    CPU, with :func:`attention_product`, then the output projection.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.attn_dropout = dropout
        self.wq = nn.Linear(d_model, d_model, bias=False)
        self.wk = nn.Linear(d_model, d_model, bias=False)
        self.wv = nn.Linear(d_model, d_model, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)
        self.resid_dropout = nn.Dropout(dropout)
        self.kv_cache: KVCache | None = None
        self.qkv_fused: Tensor | None = None  # (3 * d_model, d_model): wq over wk over wv, for decoding

    def fuse_for_decoding(self, dtype: torch.dtype) -> None:
        """Stack wq, wk and wv into one (3 * d_model, d_model) weight in ``dtype``: one product a decode step.

        A copy made whenever decoding is set up, so checkpoints keep their keys (``wq.weight``, ...) and
        load unchanged, and training keeps its three products. The stacked product gives the same values.
        """
        self.qkv_fused = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight]).detach().to(dtype)

    def decode_attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """:meth:`attend` for decoding: no dropout, ``mask`` an additive bias (0 or -inf) in ``q``'s dtype."""
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).flatten(2))  # (B, T, C)

    def heads(self, x: Tensor) -> Tensor:
        return rearrange(x, "b t (h d) -> b h t d", h=self.n_heads)  # (B, H, T, D)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """Queries (B, H, T, D) over keys and values (B, H, S, D); ``mask`` broadcasts to (B, H, T, S)."""
        dropout = self.attn_dropout if self.training else 0.0
        k, v = k.to(q.dtype), v.to(q.dtype)  # a cache may hold another dtype than autocast computes in
        if q.device.type == "cpu" and q.requires_grad:  # the fused kernel is faster without a backward pass
            y = attention_product(q, k, v, mask, dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = rearrange(y, "b h t d -> b t (h d)")  # (B, T, C)
        return self.resid_dropout(self.wo(y))

    def cache(self) -> KVCache:
        if self.kv_cache is None:
            raise RuntimeError("decoding needs key/value caches: call setup_caches(batch_size) first")
        return self.kv_cache


class SelfAttention(Attention):
    """Bidirectional self-attention with rotary positions: the text encoder's."""

    def forward(self, x: Tensor, mask: Tensor, rope: Tensor) -> Tensor:
        """``x`` (B, T, C); ``mask`` (B, 1, 1, T) marks the real tokens; ``rope`` (T, D/2, 2)."""
        q = apply_rope(self.heads(self.wq(x)), rope)
        k = apply_rope(self.heads(self.wk(x)), rope)
        return self.attend(q, k, self.heads(self.wv(x)), mask)


class CausalSelfAttention(Attention):
    """The image decoder's masked self-attention: teacher-forced (:meth:`forward`) or over the cache (:meth:`decode`)."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x`` (B, T, C) attends to its own positions; ``mask`` (1, 1, T, T) is causal."""
        q, k, v = self.heads(self.wq(x)), self.heads(self.wk(x)), self.heads(self.wv(x))
        return self.attend(q, k, v, mask)

    def decode(self, x: Tensor, mask: Tensor, input_pos: Tensor, kv_len: int) -> Tensor:
        """``x`` (B, T, C) at grid positions ``input_pos`` (T,): its keys and values are written into the
        cache and the queries attend over the cache's first ``kv_len`` positions; ``mask`` (1, 1, T, kv_len),
        an additive bias, hides the positions not yet written. ``input_pos`` (B, T) gives every row its own
        positions, with ``mask`` (B, 1, T, kv_len). Needs :meth:`fuse_for_decoding`.
        """
        batch, length = x.shape[:2]
        qkv = F.linear(x, self.qkv_fused).view(batch, length, 3, self.n_heads, self.head_dim)  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
        k, v = self.cache().update(input_pos, k, v, kv_len)  # (B, H, kv_len, D)
        return self.decode_attend(q, k, v, mask)


class CrossAttention(Attention):
    """The image decoder's attention to the encoded text: given (:meth:`forward`) or cached (:meth:`decode`)."""

    def forward(self, x: Tensor, mask: Tensor, memory: Tensor) -> Tensor:
        """``x`` (B, T, C) attends to ``memory`` (B, L, C); ``mask`` (B, 1, 1, L) marks the real text tokens."""
        q = self.heads(self.wq(x))
        return self.attend(q, self.heads(self.wk(memory)), self.heads(self.wv(memory)), mask)

    def decode(self, x: Tensor, mask: Tensor, text_len: int) -> Tensor:
        """``x`` (B, T, C) attends to the cache's first ``text_len`` text positions; ``mask`` (B, 1, 1, text_len),
        an additive bias, hides the padding."""
        batch, length = x.shape[:2]
        k, v = self.cache().read(batch, text_len)  # (B, H, text_len, D)
        q = self.wq(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        return self.decode_attend(q, k, v, mask)

    def fill_cache(self, memory: Tensor, slots: Tensor | None = None) -> None:
        """Project the encoded text (B, L, C) to keys and values once per prompt and cache them: in the
        first B rows, or in the rows ``slots`` (B,)."""
        k, v = self.heads(self.wk(memory)), self.heads(self.wv(memory))
        if slots is not None:
            self.cache().write_slots(slots, k, v)
            return
        positions = torch.arange(memory.shape[1], device=memory.device)
        self.cache().update(positions, k, v)
