"""The VQGAN's configuration: one dataclass, saved as RUN/vqgan/config.json, with named presets.

Presets (``VQGANConfig.from_preset``):

- ``tiny``: a few thousand parameters for tests.
- ``small``: sized to train on a 2-core CPU in minutes (the ``shapes`` demo at 64 px); a 4x4
  pixel-unshuffle stem puts the first convolutions at 1/4 of the side, where they are cheap.
- ``medium``: a 2x2 stem and one more level, so the decoder's last convolutions work at half the side
  and draw one-pixel outlines better (on openmoji, 1 dB more held-out PSNR than ``small`` at step 600),
  for about 1.4x the time of ``small`` per step on a 2-core CPU: for a longer budget.
- ``base``: the taming-transformers f=8 design for GPUs and real pictures (128 base channels, two
  residual blocks per level, attention at the lowest resolution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = ["VQGANConfig", "PRESETS"]


@dataclass
class VQGANConfig:
    """Architecture of the autoencoder and its quantizer (the discriminator is a training-time module).

    The total downsampling factor is ``patch_size * 2 ** (len(channel_mult) - 1)``: the stem folds
    ``patch_size`` x ``patch_size`` patches into channels, and every level but the last halves the side.
    """

    image_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 4)  # width of each level, in units of base_channels
    num_res_blocks: int = 2  # per encoder level; the decoder has one more
    patch_size: int = 1  # pixel-unshuffle stem: 1 (none), 2 or 4
    attention: bool = True  # self-attention at the lowest resolution
    groups: int = 32  # GroupNorm groups (fewer where a width is not divisible)
    dropout: float = 0.0
    latent_channels: int = 256  # encoder output before the projection to code_dim
    codebook_size: int = 1024  # with quantizer "fsq": the product of fsq_levels
    code_dim: int = 8  # factorized codes: lookups happen in this low dimension; "fsq": len(fsq_levels)
    quantizer: str = "vq"  # "vq": a learned codebook; "fsq": finite scalar quantization, no codebook
    fsq_levels: tuple[int, ...] = ()  # values per latent channel, for quantizer "fsq"
    beta: float = 0.25  # commitment loss weight
    ema: bool = False  # EMA codebook updates instead of the codebook loss
    ema_decay: float = 0.99
    usage_window: int = 100  # training steps a code may go unused before it counts as dead
    restart_dead_codes: bool = True
    restart_noise: float = 0.01

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)  # JSON gives a list
        self.fsq_levels = tuple(int(n) for n in self.fsq_levels)
        if self.quantizer not in ("vq", "fsq"):
            raise ValueError(f"quantizer must be 'vq' or 'fsq', got {self.quantizer!r}")
        if self.quantizer == "fsq":
            if not self.fsq_levels or min(self.fsq_levels) < 2:
                raise ValueError(f"fsq_levels must be one or more ints >= 2, got {self.fsq_levels}")
            self.codebook_size = math.prod(self.fsq_levels)  # derived: the ids the levels can spell
            self.code_dim = len(self.fsq_levels)
        elif self.fsq_levels:
            raise ValueError("fsq_levels are for quantizer 'fsq' only")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        if self.patch_size < 1 or self.patch_size & (self.patch_size - 1):
            raise ValueError(f"patch_size must be a power of two, got {self.patch_size}")
        for name in ("image_channels", "base_channels", "num_res_blocks", "groups", "latent_channels",
                     "codebook_size", "code_dim", "usage_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {self.ema_decay}")

    @property
    def downsample(self) -> int:
        """Side of the image patch one code stands for."""
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)

    def with_downsample(self, downsample: int) -> VQGANConfig:
        """This config at another downsampling factor: levels are cut from, or repeat, the deepest one."""
        if downsample < self.patch_size or downsample & (downsample - 1):
            raise ValueError(
                f"downsample must be a power of two >= the patch size {self.patch_size}, got {downsample}"
            )
        levels = (downsample // self.patch_size).bit_length()  # log2(downsample / patch) + 1
        mult = self.channel_mult[:levels] + (self.channel_mult[-1],) * (levels - len(self.channel_mult))
        return replace(self, channel_mult=mult)

    @classmethod
    def from_preset(cls, name: str, *, downsample: int | None = None, **overrides) -> VQGANConfig:
        """A named preset, optionally at another ``downsample`` and with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown VQGAN preset {name!r}; choose one of {', '.join(PRESETS)}")
        config = replace(PRESETS[name], **overrides)
        return config if downsample is None else config.with_downsample(downsample)


PRESETS: dict[str, VQGANConfig] = {
    "tiny": VQGANConfig(
        base_channels=16, channel_mult=(1, 1, 2), num_res_blocks=1, patch_size=2, groups=8,
        latent_channels=16, codebook_size=64, code_dim=4, usage_window=10,
    ),
    "small": VQGANConfig(
        base_channels=64, channel_mult=(2, 2), num_res_blocks=1, patch_size=4, groups=32,
        latent_channels=128, codebook_size=1024, code_dim=8, usage_window=100,
    ),
    "medium": VQGANConfig(
        base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, patch_size=2, groups=32,
        latent_channels=128, codebook_size=1024, code_dim=8, usage_window=100,
    ),
    "base": VQGANConfig(),
}
