"""Sampling: filters that turn logits into probabilities, and draws that need no host sync.

``filter_logits`` applies temperature, top-k and top-p, each on its own: any of them may be used without
the others (taming-transformers applies top-p only when top-k is set; here it does not depend on it).

``sample_from_probs`` draws with the exponential race: ``argmax(p_i / E_i)`` with ``E_i ~ Exp(1)`` picks
token i with probability ``p_i`` and is one device op, never a ``.item()`` (gpt-fast's
``multinomial_sample_one_no_sync``). The uniforms behind ``E_i`` come from ``counter_uniform``, a hash of
(seed, step, token index) computed with integer tensor ops: a candidate's draws depend on its own seed
only, not on the batch around it, and the whole draw can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["filter_logits", "sample_from_probs", "sample_inverse_cdf", "counter_uniform", "CounterNoise"]

_MASK32 = 0xFFFFFFFF


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> Tensor:
    """Probabilities (..., V) in fp32 from logits (..., V), after temperature, top-k and top-p in that order.

    - ``temperature``: logits are divided by it; 0 means greedy (all mass on the largest logit, the
      first one on a tie), and then top-k and top-p change nothing.
    - ``top_k``: keep the k largest logits; a token tied with the k-th largest is kept too.
    - ``top_p``: keep the smallest set of most probable tokens whose mass reaches ``top_p`` (always at
      least one), plus any token tied with the least probable one kept. Applied to the distribution
      left by top-k; 1.0 keeps everything.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs = probs.sort(dim=-1, descending=True).values  # (..., V)
        mass_before = F.pad(sorted_probs.cumsum(-1)[..., :-1], (1, 0))  # (..., V): mass of the more probable
        kept = mass_before < top_p  # a prefix of the sorted tokens, never empty
        smallest_kept = sorted_probs.masked_fill(~kept, float("inf")).amin(-1, keepdim=True)  # (..., 1)
        probs = probs.masked_fill(probs < smallest_kept, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_from_probs(probs: Tensor, uniform: Tensor) -> Tensor:
    """Token ids (...,) drawn from ``probs`` (..., V) with ``uniform`` (..., V) in (0, 1); no host sync.

    ``-log(uniform)`` is Exp(1), and the argmax of ``probs / Exp(1)`` is a draw from ``probs``. A token
    with probability 0 is never drawn.
    """
    return (probs / -torch.log(uniform)).argmax(-1)


def sample_inverse_cdf(probs: Tensor, uniform: Tensor) -> Tensor:
    """Token ids (...,) drawn from ``probs`` (..., V), unnormalized allowed, with one ``uniform`` (...) in (0, 1)
    each: the first token whose cumulative mass exceeds ``uniform`` times the total. No host sync.

    One uniform a draw instead of one a token: the draw for many positions at once (speculative decoding).
    The sum runs in fp64, so ``uniform * total`` stays below the total and a token of probability 0 is never
    drawn.
    """
    cdf = probs.double().cumsum(-1)  # (..., V)
    target = uniform.double() * cdf[..., -1]  # (...)
    return (cdf <= target[..., None]).sum(-1).clamp(max=probs.shape[-1] - 1)


def counter_uniform(seeds: Tensor, step: Tensor | int, vocab_size: int) -> Tensor:
    """Uniforms (R, vocab_size) in (0, 1), a fixed function of each row's seed, the step and the column.

    ``seeds`` (R,) are integers (taken modulo 2**64); ``step`` a scalar or (1,) integer tensor, or (R,)
    one step a row. Row r is the same whatever the other rows are, on every device. The values are
    23-bit: in [2**-24, 1 - 2**-24], so ``-log(u)`` is finite and positive. :class:`CounterNoise` gives
    the same values with the per-seed and per-column hashes made once, and many steps in one pass.
    """
    return CounterNoise(seeds, vocab_size)(step)


class CounterNoise:
    """:func:`counter_uniform` for fixed seeds (R,) and vocabulary: the seed and column hashes made once.

    Calling it with a step gives that step's uniforms (R, V); :meth:`steps` gives a run of steps in one
    pass, (R, count, V). Integer hashing and the exact conversion to floats make both equal, value for
    value, to :func:`counter_uniform`, whatever the batch or the block.
    """

    def __init__(self, seeds: Tensor, vocab_size: int):
        seeds = seeds.long()
        self.rows = seeds.numel()
        self.seed_keys = _mix32((seeds & _MASK32) ^ _mix32(((seeds >> 32) & _MASK32) + 0x632BE5AB))  # (R,)
        self.columns = _mix32(torch.arange(vocab_size, device=seeds.device) + 0x9E3779B9)  # (V,)

    def __call__(self, step: Tensor | int) -> Tensor:
        step = torch.as_tensor(step, dtype=torch.long, device=self.seed_keys.device).reshape(-1)  # (1,) or (R,)
        if step.numel() not in (1, self.rows):
            raise ValueError(f"step must be one number or one per row ({self.rows}), got {step.numel()}")
        key = _mix32(self.seed_keys ^ _step_hash(step))  # (R,) this step's key
        return _to_uniform(_mix32(key[:, None] ^ self.columns[None, :]))  # (R, V)

    def steps(self, start: int, count: int) -> Tensor:
        """The uniforms of steps ``start .. start + count - 1`` for every row: (R, count, V)."""
        step = torch.arange(start, start + count, device=self.seed_keys.device)  # (N,)
        keys = _mix32(self.seed_keys[:, None] ^ _step_hash(step)[None, :])  # (R, N)
        return _to_uniform(_mix32(keys[:, :, None] ^ self.columns[None, None, :]))  # (R, N, V)

    def single(self, steps: Tensor) -> Tensor:
        """One uniform per row and step, ``steps`` (R, N) each row's own: (R, N), the first column of each
        step's uniforms (what a draw by :func:`sample_inverse_cdf` or an accept-reject test needs)."""
        keys = _mix32(self.seed_keys[:, None] ^ _step_hash(steps.long()))  # (R, N)
        return _to_uniform(_mix32(keys ^ self.columns[0]))  # (R, N)


def _step_hash(step: Tensor) -> Tensor:
    return _mix32((step & _MASK32) + 0x85157AF5)


def _to_uniform(bits: Tensor) -> Tensor:
    """32-bit hashes to floats in (0, 1): their top 23 bits, centred in their interval (exact in fp32)."""
    return ((bits >> 9).float() + 0.5) * 2.0**-23


def _mul32(x: Tensor, constant: int) -> Tensor:
    """``x * constant mod 2**32`` for x in [0, 2**32), without int64 overflow: two 16-bit halves."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash with full avalanche (Wellons' "lowbias32"), on int64 tensors."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)
