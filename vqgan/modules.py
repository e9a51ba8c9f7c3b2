"""Building blocks of the VQGAN autoencoder: residual blocks, self-attention, the encoder and the decoder.

The convolutional design of taming-transformers (Esser et al., 2021, "Taming Transformers for
High-Resolution Image Synthesis"): GroupNorm + SiLU residual blocks, strided-convolution downsampling,
nearest-neighbour + convolution upsampling, and optional single-head self-attention at the lowest
resolution. One addition for small machines: an optional pixel-(un)shuffle stem (``patch_size``), which
folds ``p x p`` pixel patches into channels before the first convolution and unfolds them after the
last, so the costly full-resolution layers run at ``1/p`` of the side at the same total downsampling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["group_norm", "ResnetBlock", "SelfAttention", "Downsample", "Upsample", "Encoder", "Decoder"]


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``."""
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv3x3 -> norm -> SiLU -> dropout -> conv3x3, plus a (1x1-projected) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)
        q, k, v = (rearrange(t, "b c h w -> b 1 (h w) c") for t in (q, k, v))  # (B, 1, h*w, C)
        h = F.scaled_dot_product_attention(q, k, v)
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height)  # (B, C, h, w)
        return x + self.proj(h)


class Downsample(nn.Module):
    """Halve the side with a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the side: nearest-neighbour interpolation, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Middle(nn.Module):
    """The lowest-resolution block: resnet, optional self-attention, resnet."""

    def __init__(self, channels: int, groups: int, dropout: float, attention: bool):
        super().__init__()
        self.block1 = ResnetBlock(channels, channels, groups, dropout)
        self.attention = SelfAttention(channels, groups) if attention else nn.Identity()
        self.block2 = ResnetBlock(channels, channels, groups, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.attention(self.block1(x)))


class Encoder(nn.Module):
    """Image (B, C, H, W) -> features (B, out_channels, H/f, W/f), f = patch_size * 2**(len(channel_mult) - 1).

    Level ``i`` runs ``num_res_blocks`` residual blocks at ``base_channels * channel_mult[i]`` channels,
    and every level but the last ends with a stride-2 downsample.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        base_channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        patch_size: int,
        attention: bool,
        groups: int,
        dropout: float,
    ):
        super().__init__()
        self.patch_size = patch_size
        widths = [base_channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(in_channels * patch_size**2, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        channels = widths[0]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(channels, width, groups, dropout))
                channels = width
            if level < len(widths) - 1:
                layers.append(Downsample(channels))
        self.down = nn.Sequential(*layers)
        self.middle = _Middle(channels, groups, dropout, attention)
        self.norm_out = group_norm(channels, groups)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pixel_unshuffle(x, self.patch_size)  # (B, C*p*p, H/p, W/p)
        h = self.middle(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features (B, in_channels, h, w) -> image (B, out_channels, h*f, w*f); the encoder's mirror.

    Levels run from the widest (lowest resolution) to the narrowest, each with ``num_res_blocks + 1``
    residual blocks (one more than the encoder, as in taming) and an upsample after all but the last.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        base_channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        patch_size: int,
        attention: bool,
        groups: int,
        dropout: float,
    ):
        super().__init__()
        self.patch_size = patch_size
        widths = [base_channels * m for m in reversed(channel_mult)]
        channels = widths[0]
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.middle = _Middle(channels, groups, dropout, attention)
        layers: list[nn.Module] = []
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks + 1):
                layers.append(ResnetBlock(channels, width, groups, dropout))
                channels = width
            if level < len(widths) - 1:
                layers.append(Upsample(channels))
        self.up = nn.Sequential(*layers)
        self.norm_out = group_norm(channels, groups)
        self.conv_out = nn.Conv2d(channels, out_channels * patch_size**2, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight of the final convolution: where the adaptive GAN weight compares gradient norms."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.middle(self.conv_in(z)))
        h = self.conv_out(F.silu(self.norm_out(h)))  # (B, C*p*p, H/p, W/p)
        return F.pixel_shuffle(h, self.patch_size)  # (B, C, H, W)
