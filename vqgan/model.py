"""The VQGAN autoencoder: images to a grid of codebook ids and back (stage 1 of tilecraft).

Esser et al., 2021 ("Taming Transformers for High-Resolution Image Synthesis") with the factorized,
l2-normalized codebook of ViT-VQGAN / LlamaGen, or finite scalar quantization (``quantizer="fsq"``).
Encoder -> 1x1 projection to ``code_dim`` -> quantizer -> 1x1 projection back -> decoder. The encoder and
decoder follow the caller's autocast (training uses bf16 where the hardware has it); the quantizer always
works in fp32, since nearest-code distances and rounding are fragile in half precision, and latents and
images are returned in fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from checkpoint import load_pretrained, save_pretrained
from cli import UserError
from vqgan.config import VQGANConfig
from vqgan.modules import Decoder, Encoder
from vqgan.quantize import FactorizedQuantizer, QuantizerOutput, ScalarQuantizer

__all__ = ["VQGAN", "PART"]

PART = "vqgan"  # the part name in checkpoint errors and the run directory


def _quantizer(config: VQGANConfig) -> FactorizedQuantizer | ScalarQuantizer:
    if config.quantizer == "fsq":
        return ScalarQuantizer(config.fsq_levels, usage_window=config.usage_window)
    options = ("beta", "ema", "ema_decay", "usage_window", "restart_dead_codes", "restart_noise")
    return FactorizedQuantizer(config.codebook_size, config.code_dim, **{k: getattr(config, k) for k in options})


class VQGAN(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] <-> code ids (B, H/f, W/f), f = ``config.downsample``."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        shape = dict(
            base_channels=config.base_channels,
            channel_mult=config.channel_mult,
            num_res_blocks=config.num_res_blocks,
            patch_size=config.patch_size,
            attention=config.attention,
            groups=config.groups,
            dropout=config.dropout,
        )
        self.encoder = Encoder(in_channels=config.image_channels, out_channels=config.latent_channels, **shape)
        self.quant_proj = nn.Conv2d(config.latent_channels, config.code_dim, 1)
        self.quantizer = _quantizer(config)
        self.post_quant_proj = nn.Conv2d(config.code_dim, config.latent_channels, 1)
        self.decoder = Decoder(in_channels=config.latent_channels, out_channels=config.image_channels, **shape)

    # ------------------------------------------------------------------ shapes
    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def downsample(self) -> int:
        return self.config.downsample

    def grid_size(self, image_size: int) -> int:
        """Side of the id grid for square images of side ``image_size``."""
        if image_size % self.downsample:
            raise UserError(
                f"image size {image_size} is not a multiple of the VQGAN's downsampling factor {self.downsample}; "
                f"pass a --size that is"
            )
        return image_size // self.downsample

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's final convolution weight, where the adaptive GAN weight compares gradients."""
        return self.decoder.last_layer

    # ------------------------------------------------------------------ training forward
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Reconstruct ``images`` (B, C, H, W): (reconstructions, not clamped; the quantizer's output)."""
        quantized = self.quantizer(self.encode_latents(images))
        return self.decode_latents(quantized.latents), quantized

    # ------------------------------------------------------------------ the latents in between
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous latents (B, code_dim, h, w) before quantization."""
        self._check_images(images)
        return self.quant_proj(self.encoder(images.float())).float()

    @torch.no_grad()
    def quantize_latents(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantized latents (B, code_dim, h, w) and their ids (B, h, w); touches no statistics."""
        ids = self.quantizer.lookup(self.encode_latents(images))
        return self.quantizer.ids_to_latents(ids), ids

    def ids_to_latents(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (B, h, w) -> quantized latents (B, code_dim, h, w)."""
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise ValueError(
                f"ids must lie in [0, {self.codebook_size}), got [{int(ids.min())}, {int(ids.max())}]; "
                "were they made with another codebook?"
            )
        return self.quantizer.ids_to_latents(ids)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Quantized latents (B, code_dim, h, w) -> images (B, C, H, W), not clamped."""
        return self.decoder(self.post_quant_proj(latents.float())).float()

    # ------------------------------------------------------------------ ids
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> ids (B, H/f, W/f), int64."""
        return self.quantizer.lookup(self.encode_latents(images))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (B, h, w) -> images (B, C, h*f, w*f) clamped to [-1, 1]."""
        return self.decode_latents(self.ids_to_latents(ids)).clamp(-1.0, 1.0)

    # ------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, directory: str | Path) -> VQGAN:
        """Load RUN/vqgan/ (config.json + model.safetensors) in eval mode; a mismatch names the part."""
        return load_pretrained(cls, VQGANConfig, directory, PART)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors to ``directory`` atomically."""
        save_pretrained(self, self.config, directory)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.config.image_channels:
            raise ValueError(
                f"images must be (B, {self.config.image_channels}, H, W), got {tuple(images.shape)}"
            )
        for side in images.shape[2:]:
            self.grid_size(side)
