"""PatchGAN discriminator: a grid of real/fake logits, one per overlapping image patch.

The design of pix2pix (Isola et al., 2017) as taming-transformers uses it (``NLayerDiscriminator``):
4x4 convolutions, LeakyReLU(0.2), stride 2 for the first ``layers`` convolutions and stride 1 for the
last two, widths doubling up to 8x. One change: GroupNorm instead of BatchNorm, so real and fake
batches (scored in separate calls) are normalized the same way, with no batch statistics to drift
or to synchronize across ranks. The intermediate activations are returned on request for the
feature-matching perceptual loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vqgan.modules import group_norm

__all__ = ["DiscriminatorConfig", "DISCRIMINATOR_PRESETS", "PatchDiscriminator"]


@dataclass
class DiscriminatorConfig:
    in_channels: int = 3
    channels: int = 64  # width of the first layer
    layers: int = 3  # stride-2 convolutions; the receptive field is 70 px for 3, 34 px for 2
    groups: int = 32

    def __post_init__(self) -> None:
        if self.channels < 1 or self.layers < 1:
            raise ValueError(f"channels and layers must be >= 1, got {self.channels}, {self.layers}")


DISCRIMINATOR_PRESETS: dict[str, DiscriminatorConfig] = {
    "tiny": DiscriminatorConfig(channels=8, layers=2, groups=4),
    "small": DiscriminatorConfig(channels=32, layers=2),
    "medium": DiscriminatorConfig(channels=32, layers=2),
    "base": DiscriminatorConfig(),
}


class PatchDiscriminator(nn.Module):
    """Images (B, C, H, W) -> logits (B, 1, h, w), and optionally the activation after every block."""

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        width = config.channels
        blocks = [nn.Sequential(nn.Conv2d(config.in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2))]
        for n in range(1, config.layers + 1):
            stride = 2 if n < config.layers else 1
            out = config.channels * min(2**n, 8)
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                    group_norm(out, config.groups),
                    nn.LeakyReLU(0.2),
                )
            )
            width = out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(width, 1, 4, stride=1, padding=1)
        self.apply(_init_weights)

    def forward(
        self, images: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        features = []
        h = images
        for block in self.blocks:
            h = block(h)
            features.append(h)
        logits = self.head(h)
        return (logits, features) if return_features else logits


def _init_weights(module: nn.Module) -> None:
    """DCGAN initialization, as pix2pix and taming use."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
