"""The key/value cache: preallocated buffers of the full length, written by position.

Decoding one image token then costs one token's worth of projections, not a pass over the whole prefix.
The buffers never grow (no ``torch.cat``), so every decode step sees tensors of the same shape and can be
compiled and captured as a CUDA graph (gpt-fast ``KVCache``). A cache holds up to ``batch_size`` rows; a
smaller batch uses its first rows. A service hands the rows out as slots (continuous batching, serve/): each
row may be at its own position, one request's rows are written wherever slots are free, and rows are moved
to keep the batch's rows first.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["KVCache"]


class KVCache(nn.Module):
    """Keys and values of one attention layer: two (batch_size, n_heads, length, head_dim) buffers.

    The buffers are not persistent: they are working memory, never part of a checkpoint.
    """

    def __init__(self, batch_size: int, n_heads: int, length: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch_size, n_heads, length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def batch_size(self) -> int:
        return self.k_cache.shape[0]

    @property
    def length(self) -> int:
        return self.k_cache.shape[2]

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, length: int | None = None) -> tuple[Tensor, Tensor]:
        """Write ``k``, ``v`` (B, H, T, D) at positions ``input_pos`` (T,), or (B, T) one row's positions a row;
        return the first B rows, the first ``length`` positions (default: all).

        The returned (B, H, length, D) views hold every position written so far up to ``length``, which
        must exceed every position written; the caller masks the positions not written yet.
        """
        batch = k.shape[0]
        if batch > self.batch_size:
            raise ValueError(f"a batch of {batch} rows does not fit a cache set up for {self.batch_size}")
        k_out, v_out = self.read(batch, length)
        if input_pos.dim() == 2:  # (B, T): each row at its own positions
            index = input_pos[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # (B, H, T, D)
            k_out.scatter_(2, index, k.to(k_out.dtype))
            v_out.scatter_(2, index, v.to(v_out.dtype))
            return k_out, v_out
        k_out.index_copy_(2, input_pos, k.to(k_out.dtype))
        v_out.index_copy_(2, input_pos, v.to(v_out.dtype))
        return k_out, v_out

    def write_slots(self, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Write ``k``, ``v`` (N, H, T, D) at positions 0..T-1 of the rows ``slots`` (N,), any rows of the cache."""
        self.k_cache[slots, :, : k.shape[2]] = k.to(self.k_cache.dtype)
        self.v_cache[slots, :, : v.shape[2]] = v.to(self.v_cache.dtype)

    def move_slots(self, source: Tensor, target: Tensor) -> None:
        """Copy whole rows ``source`` (N,) of the cache onto rows ``target`` (N,)."""
        self.k_cache[target] = self.k_cache[source]
        self.v_cache[target] = self.v_cache[source]

    def read(self, batch: int, length: int | None = None) -> tuple[Tensor, Tensor]:
        """The keys and values of the first ``batch`` rows and ``length`` positions (default all): two
        (batch, H, length, D) views."""
        if length is None:
            return self.k_cache[:batch], self.v_cache[:batch]
        return self.k_cache[:batch, :, :length], self.v_cache[:batch, :, :length]
