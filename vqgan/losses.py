"""The VQGAN's training losses: reconstruction, perceptual, adversarial (hinge) with an adaptive weight.

Following taming-transformers' ``VQLPIPSWithDiscriminator`` (Esser et al., 2021), split into the pure
pieces (hinge losses, the adaptive weight, the start-step gate, feature matching, PSNR) and two
functions, one per optimizer: :func:`generator_loss` for the autoencoder and :func:`discriminator_loss`
for the discriminator, instead of one forward that branches on an optimizer index.

The perceptual term: with VGG16 weights supplied (``vqgan.lpips.VGGPerceptual``) it is the LPIPS-style
distance; without them, nothing pretrained is available here, so the default is discriminator feature
matching (Salimans et al., 2016; pix2pixHD, Wang et al., 2018): the L1 distance between the
discriminator's intermediate activations on the image and on its reconstruction. Those features only
mean something once the discriminator trains, so that term starts with the GAN at ``disc_start``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LossWeights",
    "hinge_d_loss",
    "hinge_g_loss",
    "adaptive_weight",
    "delayed_weight",
    "feature_matching_loss",
    "psnr",
    "generator_loss",
    "discriminator_loss",
]


@dataclass
class LossWeights:
    """Weights of the autoencoder's loss terms and the step from which the GAN (and feature matching) runs."""

    reconstruction: float = 1.0  # L1
    mse: float = 0.0  # squared error, the term PSNR measures (the real-pictures plan sets it, BENCHMARKS.md)
    perceptual: float = 1.0  # LPIPS-style with VGG weights, else discriminator feature matching
    disc: float = 0.5  # scales the adaptive weight of the generator's GAN loss
    disc_start: int = 0  # optimizer step at which the discriminator starts to train and to count
    max_adaptive_weight: float = 1e4


# ---------------------------------------------------------------------- pure pieces
def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss of the hinge GAN: -mean(fake logits)."""
    return -logits_fake.float().mean()


def adaptive_weight(
    reconstruction_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """|grad reconstruction_loss| / (|grad gan_loss| + 1e-4) at ``last_layer``, clamped to [0, max_weight].

    Balances the two terms by the size of their gradients at the decoder's last layer (taming,
    ``calculate_adaptive_weight``); the result is detached, a constant for the backward pass.
    """
    (rec_grad,) = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def delayed_weight(weight: float, step: int, start: int) -> float:
    """``weight`` from optimizer step ``start`` on, 0 before (taming's ``adopt_weight``)."""
    return weight if step >= start else 0.0


def feature_matching_loss(real_features: list[torch.Tensor], fake_features: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the L1 distance between fake and (detached) real activations."""
    if len(real_features) != len(fake_features) or not real_features:
        raise ValueError(f"need matching, non-empty feature lists, got {len(real_features)} and {len(fake_features)}")
    losses = [F.l1_loss(fake.float(), real.detach().float()) for real, fake in zip(real_features, fake_features)]
    return torch.stack(losses).mean()


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each image's PSNR in dB, for images in [-1, 1] (peak-to-peak range 2)."""
    mse = (images.float() - reconstructions.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    return (10.0 * torch.log10(4.0 / mse.clamp(min=1e-10))).mean()


# ---------------------------------------------------------------------- one function per optimizer
def generator_loss(
    images: torch.Tensor,
    reconstructions: torch.Tensor,
    quantizer_loss: torch.Tensor,
    *,
    discriminator: nn.Module,
    last_layer: torch.Tensor,
    step: int,
    weights: LossWeights,
    perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The autoencoder's loss at optimizer step ``step``: (loss, detached metrics for the log).

    L1 (+ squared error with ``weights.mse``) + perceptual + quantizer loss, plus ``disc * adaptive_weight *
    hinge_g_loss`` once the GAN has started. Gradients reach the discriminator's parameters too unless the caller
    freezes them.
    """
    l1 = F.l1_loss(reconstructions, images)
    nll = weights.reconstruction * l1
    metrics = {"l1": l1.detach(), "quantizer_loss": quantizer_loss.detach()}
    if weights.mse > 0:
        mse = F.mse_loss(reconstructions.float(), images.float())
        nll = nll + weights.mse * mse
        metrics["mse"] = mse.detach()
    if perceptual is not None and weights.perceptual > 0:
        perceptual_loss = perceptual(images, reconstructions)
        nll = nll + weights.perceptual * perceptual_loss
        metrics["perceptual"] = perceptual_loss.detach()
    gan_factor = delayed_weight(weights.disc, step, weights.disc_start)
    if gan_factor == 0.0:
        return nll + quantizer_loss, metrics

    logits_fake, fake_features = discriminator(reconstructions, return_features=True)
    if perceptual is None and weights.perceptual > 0:
        with torch.no_grad():
            _, real_features = discriminator(images, return_features=True)
        matching = feature_matching_loss(real_features, fake_features)
        nll = nll + weights.perceptual * matching
        metrics["feature_matching"] = matching.detach()
    gan_loss = hinge_g_loss(logits_fake)
    if torch.is_grad_enabled():
        balance = adaptive_weight(nll, gan_loss, last_layer, weights.max_adaptive_weight)
    else:  # evaluation: no graph to take gradients through
        balance = torch.ones((), device=gan_loss.device)
    metrics.update(gan_loss=gan_loss.detach(), adaptive_weight=balance)
    return nll + gan_factor * balance * gan_loss + quantizer_loss, metrics


def discriminator_loss(
    images: torch.Tensor,
    reconstructions: torch.Tensor,
    *,
    discriminator: nn.Module,
    step: int,
    weights: LossWeights,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """The discriminator's hinge loss on real images and detached reconstructions, or None before
    ``disc_start`` (the caller then skips the discriminator's step altogether)."""
    if delayed_weight(1.0, step, weights.disc_start) == 0.0 or weights.disc == 0:
        return None
    # One call for both halves: GroupNorm normalizes each image on its own, so this equals two calls.
    logits = discriminator(torch.cat([images, reconstructions.detach()]))
    logits_real, logits_fake = logits.chunk(2)
    loss = hinge_d_loss(logits_real, logits_fake)
    metrics = {
        "disc_loss": loss.detach(),
        "logits_real": logits_real.detach().mean(),
        "logits_fake": logits_fake.detach().mean(),
    }
    return loss, metrics
