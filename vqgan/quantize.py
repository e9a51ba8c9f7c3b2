"""Vector quantization with factorized, l2-normalized codes, codebook-usage tracking and dead-code restarts.

The lookup follows ViT-VQGAN (Yu et al., 2022, "Vector-quantized Image Modeling with Improved VQGAN")
and LlamaGen (Sun et al., 2024): the encoder's features are projected (by the model) to a low
dimension, both they and the codebook are l2-normalized, and the nearest code is the one of highest
cosine similarity. The losses are those of VQ-VAE (van den Oord et al., 2017) in the form of taming's
``VectorQuantizer2``: a commitment term with weight ``beta`` on the encoder side and a codebook term
on the code side, with a straight-through gradient. With ``ema=True`` the codebook term is replaced by
exponential-moving-average cluster updates (VQ-VAE-2), kept in buffers and updated in place.

Codes that no latent has chosen for ``usage_window`` training steps are restarted from random latents
of the current batch plus a little noise (as in Jukebox, Dhariwal et al., 2020), so the codebook stays
in use. Under torch.distributed the usage statistics and EMA sums are reduced over ranks and restart
vectors are broadcast from rank 0, so every rank keeps the same codebook.

``ScalarQuantizer`` is the alternative without a codebook: finite scalar quantization (Mentzer et al.,
2023, "Finite Scalar Quantization: VQ-VAE Made Simple"). Each of a few latent channels is bounded and
rounded to one of ``levels[i]`` values; a code is the tuple of rounded values, its id the tuple read as a
mixed-radix number, so ``prod(levels)`` codes exist and none can die. No codebook loss, no commitment loss,
a straight-through gradient through the rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["QuantizerOutput", "FactorizedQuantizer", "ScalarQuantizer", "perplexity"]


@dataclass
class QuantizerOutput:
    """What one quantizer call returns; the losses are scalars in fp32."""

    latents: torch.Tensor  # (B, D, h, w) unit-norm codes, straight-through gradient to the encoder
    ids: torch.Tensor  # (B, h, w) int64 code ids
    loss: torch.Tensor  # commitment + codebook loss (codebook term is 0 with EMA)
    commitment_loss: torch.Tensor  # beta * |z - sg(e)|^2
    codebook_loss: torch.Tensor  # |sg(z) - e|^2
    perplexity: torch.Tensor  # exp(entropy) of this batch's code histogram
    usage: torch.Tensor  # share of codes chosen within the last usage_window training steps
    restarted: int  # dead codes restarted by this call


def perplexity(ids: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """exp(entropy) of the histogram of ``ids``: 1 when one code is used, ``codebook_size`` when all evenly."""
    counts = torch.bincount(ids.flatten(), minlength=codebook_size).float()
    probs = counts / counts.sum().clamp(min=1)
    return torch.exp(-(probs * torch.log(probs.clamp(min=1e-10))).sum())


class FactorizedQuantizer(nn.Module):
    """Nearest-code lookup on the unit sphere of a low-dimensional code space.

    Args:
        codebook_size: number of codes K.
        code_dim: dimension D of a code (the model projects features to it).
        beta: weight of the commitment loss.
        ema: update codes by exponential moving averages instead of by gradient.
        ema_decay: decay of those averages.
        usage_window: a code unused for this many training steps is dead (and counts as unused).
        restart_dead_codes: restart dead codes from the current batch's latents.
        restart_noise: standard deviation of the noise added to a restart vector.
    """

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        *,
        beta: float = 0.25,
        ema: bool = False,
        ema_decay: float = 0.99,
        usage_window: int = 100,
        restart_dead_codes: bool = True,
        restart_noise: float = 0.01,
    ):
        super().__init__()
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.beta = beta
        self.ema = ema
        self.ema_decay = ema_decay
        self.usage_window = usage_window
        self.restart_dead_codes = restart_dead_codes
        self.restart_noise = restart_noise
        embedding = F.normalize(torch.randn(codebook_size, code_dim), dim=1)
        if ema:
            self.register_buffer("embedding", embedding)
            self.register_buffer("ema_count", torch.ones(codebook_size))
            self.register_buffer("ema_sum", embedding.clone())
        else:
            self.embedding = nn.Parameter(embedding)
        # Usage statistics, persistent so that --resume continues them exactly.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.full((codebook_size,), -1, dtype=torch.long))
        self.register_buffer("last_restart", torch.zeros(codebook_size, dtype=torch.long))

    # ------------------------------------------------------------------ lookup
    def codebook(self) -> torch.Tensor:
        """The unit-norm codes (K, D) in fp32."""
        return F.normalize(self.embedding.float(), dim=1)

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Ids (B, h, w) of the codes nearest to latents ``z`` (B, D, h, w); no statistics are touched."""
        flat = F.normalize(rearrange(z.float(), "b d h w -> (b h w) d"), dim=1)  # (N, D)
        ids = self._nearest(flat, self.codebook())
        return ids.view(z.shape[0], z.shape[2], z.shape[3])

    def ids_to_latents(self, ids: torch.Tensor) -> torch.Tensor:
        """Codes for ``ids`` (B, h, w) as latents (B, D, h, w), exactly what the quantizer outputs for them."""
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
        codes = F.embedding(ids.long(), self.codebook())  # (B, h, w, D)
        return rearrange(codes, "b h w d -> b d h w")

    @staticmethod
    def _nearest(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        # For unit vectors |z - e|^2 = 2 - 2 z.e, so the nearest code has the largest dot product.
        return (flat @ codebook.t()).argmax(dim=1)  # (N,)

    # ------------------------------------------------------------------ forward
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize latents ``z`` (B, D, h, w); in training mode also update usage, EMA codes and restarts."""
        batch, _, height, width = z.shape
        with torch.autocast(z.device.type, enabled=False):
            flat = F.normalize(rearrange(z.float(), "b d h w -> (b h w) d"), dim=1)  # (N, D)
            restarted = self._restart_dead_codes(flat.detach()) if self.training and self.restart_dead_codes else 0
            codebook = self.codebook()
            ids = self._nearest(flat.detach(), codebook)
            codes = codebook[ids]  # (N, D)
            commitment_loss = self.beta * F.mse_loss(flat, codes.detach())
            if self.ema:
                codebook_loss = torch.zeros((), device=z.device)
            else:
                codebook_loss = F.mse_loss(codes, flat.detach())
            if self.training:
                self._update_statistics(flat.detach(), ids)
            # Straight-through: the value is exactly the code, the gradient flows to the encoder unchanged.
            latents = codes.detach() + (flat - flat.detach())
        latents = rearrange(latents, "(b h w) d -> b d h w", b=batch, h=height, w=width)
        return QuantizerOutput(
            latents=latents,
            ids=ids.view(batch, height, width),
            loss=commitment_loss + codebook_loss,
            commitment_loss=commitment_loss.detach(),
            codebook_loss=codebook_loss.detach(),
            perplexity=perplexity(ids, self.codebook_size),
            usage=self.usage(),
            restarted=restarted,
        )

    # ------------------------------------------------------------------ statistics
    def usage(self) -> torch.Tensor:
        """Share of codes chosen within the last ``usage_window`` training steps."""
        return _usage(self.last_used, self.step, self.usage_window)

    def dead_codes(self) -> torch.Tensor:
        """Boolean mask (K,) of codes neither chosen nor restarted within the last ``usage_window`` steps."""
        last_alive = torch.maximum(self.last_used, self.last_restart)
        return self.step - last_alive >= self.usage_window

    @torch.no_grad()
    def _update_statistics(self, flat: torch.Tensor, ids: torch.Tensor) -> None:
        counts = torch.bincount(ids, minlength=self.codebook_size).float()  # (K,)
        if self.ema:
            sums = torch.zeros_like(self.ema_sum).index_add_(0, ids, flat)  # (K, D)
            _all_reduce_sum(counts)
            _all_reduce_sum(sums)
            self.ema_count.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
            self.ema_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
            # Laplace smoothing keeps rarely chosen codes from dividing by ~0.
            total = self.ema_count.sum()
            smoothed = (self.ema_count + 1e-5) / (total + self.codebook_size * 1e-5) * total
            self.embedding.copy_(self.ema_sum / smoothed.unsqueeze(1))
        elif _distributed():
            _all_reduce_sum(counts)
        self.step.add_(1)
        self.last_used[counts > 0] = self.step

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> int:
        """Move every dead code onto a random latent of this batch (plus noise); returns how many moved."""
        dead = self.dead_codes().nonzero().squeeze(1)
        count = int(dead.numel())
        if count == 0:
            return 0
        picks = torch.randint(0, flat.shape[0], (count,), device=flat.device)
        vectors = F.normalize(flat[picks] + self.restart_noise * torch.randn_like(flat[picks]), dim=1)
        _broadcast(vectors)
        self.embedding[dead] = vectors.to(self.embedding.dtype)
        if self.ema:
            self.ema_sum[dead] = vectors
            self.ema_count[dead] = 1.0
        self.last_restart[dead] = self.step
        return count


class ScalarQuantizer(nn.Module):
    """Finite scalar quantization: channel ``i`` of a (B, len(levels), h, w) latent rounds to ``levels[i]`` values.

    A channel is squashed by tanh into ``levels[i]`` unit-wide bins and rounded; the code passed on is the
    rounded value scaled into [-1, 1]. An even level count gets a half-bin offset, so its values stay equally
    spaced (for 8 levels: -4 .. 3, over 4). Usage is tracked as ``FactorizedQuantizer`` tracks it, for the
    logs; nothing is restarted.

    Args:
        levels: values per channel, each >= 2; the codebook size is their product.
        usage_window: training steps within which a code must be chosen to count as used.
    """

    def __init__(self, levels: tuple[int, ...], *, usage_window: int = 100):
        super().__init__()
        if not levels or min(levels) < 2:
            raise ValueError(f"levels must be a non-empty tuple of ints >= 2, got {levels}")
        self.levels = tuple(int(n) for n in levels)
        self.codebook_size = math.prod(self.levels)
        self.code_dim = len(self.levels)
        self.usage_window = usage_window
        count = torch.tensor(self.levels, dtype=torch.long)
        # Constants rebuilt from the config, so not in the state dict.
        self.register_buffer("_count", count, persistent=False)
        self.register_buffer("_radix", torch.cumprod(torch.cat([count.new_ones(1), count[:-1]]), 0), persistent=False)
        self.register_buffer("_half", count // 2, persistent=False)
        # _bound's per-channel constants: half the span of the bins (a hair over, so the outer values are
        # reached), the half-bin offset of an even level count, and the shift that makes a zero latent land on it.
        half_width = (count.float() - 1) * (1 + 1e-3) / 2
        offset = (count % 2 == 0).float() * 0.5
        self.register_buffer("_half_width", half_width.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_offset", offset.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_shift", torch.atanh(offset / half_width).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.full((self.codebook_size,), -1, dtype=torch.long))

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, D, h, w) squashed so that rounding gives ``levels[i]`` integer values per channel."""
        return torch.tanh(z.float() + self._shift) * self._half_width - self._offset

    def _scale(self, rounded: torch.Tensor) -> torch.Tensor:
        return rounded / self._half.view(1, -1, 1, 1).float()

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Ids (B, h, w) of latents ``z`` (B, D, h, w); no statistics are touched."""
        return self._ids(torch.round(self._bound(z)))

    def _ids(self, rounded: torch.Tensor) -> torch.Tensor:
        """Ids (B, h, w) of rounded, bounded latents (B, D, h, w): the digits read as a mixed-radix number."""
        digits = rounded.long() + self._half.view(1, -1, 1, 1)
        return (digits * self._radix.view(1, -1, 1, 1)).sum(dim=1)

    def ids_to_latents(self, ids: torch.Tensor) -> torch.Tensor:
        """Codes for ``ids`` (B, h, w) as latents (B, D, h, w), exactly what the quantizer outputs for them."""
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
        digits = ids.long().unsqueeze(1) // self._radix.view(1, -1, 1, 1) % self._count.view(1, -1, 1, 1)
        return self._scale((digits - self._half.view(1, -1, 1, 1)).float())

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize latents ``z`` (B, D, h, w); in training mode also update the usage statistics."""
        with torch.autocast(z.device.type, enabled=False):
            bounded = self._bound(z)
            values = torch.round(bounded).detach()
            latents = self._scale(bounded + (values - bounded).detach())  # straight-through
            ids = self._ids(values)
        if self.training:
            with torch.no_grad():
                counts = torch.bincount(ids.flatten(), minlength=self.codebook_size)
                _all_reduce_sum(counts)
                self.step.add_(1)
                self.last_used[counts > 0] = self.step
        zero = torch.zeros((), device=z.device)
        return QuantizerOutput(latents=latents, ids=ids, loss=zero, commitment_loss=zero, codebook_loss=zero,
                               perplexity=perplexity(ids.flatten(), self.codebook_size), usage=self.usage(),
                               restarted=0)

    def usage(self) -> torch.Tensor:
        """Share of codes chosen within the last ``usage_window`` training steps."""
        return _usage(self.last_used, self.step, self.usage_window)


def _usage(last_used: torch.Tensor, step: torch.Tensor, window: int) -> torch.Tensor:
    """Share of codes whose last use (-1: never) lies within the last ``window`` steps before ``step``."""
    return ((last_used >= 0) & (step - last_used < window)).float().mean()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(tensor: torch.Tensor) -> None:
    if _distributed():
        dist.all_reduce(tensor)


def _broadcast(tensor: torch.Tensor) -> None:
    if _distributed():
        dist.broadcast(tensor, src=0)
