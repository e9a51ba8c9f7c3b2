"""``python -m train vqgan``: stage 1, the VQGAN (autoencoder + PatchGAN discriminator) -> RUN/vqgan/.

Two optimizers, one step each per batch: the autoencoder on L1 + perceptual + quantizer loss (+ the
adaptively weighted hinge GAN loss from --disc-start), then the discriminator on the hinge loss. AdamW
with betas (0.5, 0.9) as in taming-transformers (a short memory suits a moving GAN target), linear
warmup then cosine decay. Convolutions run in bf16 autocast where the device multiplies bf16 natively
(``--precision auto``: CUDA, or a CPU with AMX or AVX512-BF16), fp32 elsewhere; the quantizer, the losses, the
weights and the optimizer state are fp32 always (bf16 has fp32's range, so fp16's overflow NaNs cannot happen).
Held-out PSNR and codebook use are measured on a fixed batch of the "heldout" split; a grid of held-out
originals above their reconstructions is saved every --sample-every steps.

The default perceptual term is discriminator feature matching (no pretrained weights exist here);
``--perceptual-weights PATH`` to a VGG16 state dict switches to the LPIPS-style VGG distance. See
``vqgan/losses.py`` and ``vqgan/lpips.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from cli import UserError
from data.sources import batches
from devices import autocast
from train import dist
from train.loop import (Run, Stage, StageOptions, add_common_arguments, add_model_size_argument, check_pictures_held,
                        choose_precision, cosine_schedule, warn_if_not_below_steps)
from vqgan import VQGAN, VQGANConfig
from vqgan.discriminator import DISCRIMINATOR_PRESETS, PatchDiscriminator
from vqgan.losses import LossWeights, discriminator_loss, generator_loss, psnr

__all__ = ["VQGANOptions", "VQGANTrainer", "add_arguments", "main"]

MAX_CODEBOOK_SIZE = 1 << 20  # codes; the quantizer's tables grow with it, and ids are stored in int32 at most


@dataclass
class VQGANOptions(StageOptions):
    steps: int = 3500
    batch_size: int = 32
    lr: float = 1e-3
    codebook_size: int | None = None  # None: the preset's
    downsample: int | None = None  # None: the preset's (8)
    ema: bool = False
    disc_start: int = 2500
    disc_weight: float = 0.1
    mse_weight: float = 0.0
    perceptual_weight: float = 0.1
    perceptual_weights: str | None = None
    betas: tuple[float, float] = (0.5, 0.9)  # the autoencoder's Adam betas; the discriminator keeps (0.5, 0.9)
    fsq_levels: tuple[int, ...] | None = None  # finite scalar quantization with these levels instead of a codebook


def add_arguments(parser: argparse.ArgumentParser) -> None:
    o = VQGANOptions
    add_common_arguments(parser, o, heldout_help="held-out pictures whose PSNR and codebook use every evaluation measures")
    add_model_size_argument(parser, o.preset, "tiny (a smoke test) | small (CPU) | medium (CPU, finer detail, 1.4x "
                                              "the time a step) | base (GPU)")
    parser.add_argument("--codebook-size", type=int, default=None, help="codes in the codebook (preset: 1024)")
    parser.add_argument("--downsample", type=int, default=None, choices=[4, 8, 16],
                        help="pixels per code along a side (preset: 8, so 64 px -> 8x8 ids)")
    parser.add_argument("--ema", action="store_true", help="EMA codebook updates instead of the codebook loss")
    parser.add_argument("--fsq-levels", type=int, nargs="+", default=None, metavar="N",
                        help="finite scalar quantization instead of a learned codebook: one latent channel per N, "
                             "rounded to N values, prod(N) codes (e.g. 8 5 5 5: 1 000 codes; on openmoji +1.1 dB "
                             "held-out PSNR at step 600 against the codebook of 1 024, +0.05 dB by step 2 000, "
                             "BENCHMARKS.md)")
    parser.add_argument("--disc-start", type=int, default=o.disc_start,
                        help="step at which the discriminator (and feature matching) starts")
    parser.add_argument("--disc-weight", type=float, default=o.disc_weight, help="GAN loss weight (0 = no GAN)")
    parser.add_argument("--mse-weight", type=float, default=o.mse_weight,
                        help="weight of a squared-error term beside L1 (default 0; the real-pictures plan of "
                             "`train all` uses 5: +0.3 dB held-out PSNR on openmoji at step 600)")
    parser.add_argument("--betas", type=float, nargs=2, default=o.betas, metavar=("BETA1", "BETA2"),
                        help="the autoencoder's Adam betas (default 0.5 0.9, taming's, made for a GAN that runs "
                             "from early on; with the GAN in the last steps only, 0.9 0.99 and --lr 2e-3 gave "
                             "+0.48 dB held-out PSNR on openmoji after 3 500 steps, BENCHMARKS.md)")
    parser.add_argument("--perceptual-weight", type=float, default=o.perceptual_weight,
                        help="perceptual loss weight (0 = none)")
    parser.add_argument("--perceptual-weights", default=None, metavar="PATH",
                        help="VGG16 state dict (.safetensors or .pt) for the LPIPS-style perceptual loss; "
                             "without it the perceptual term is discriminator feature matching")


class VQGANTrainer(Stage):
    """The stage's state and its steps; :func:`train.loop.fit` runs them."""

    name = "vqgan"

    def __init__(self, options: VQGANOptions):
        self.options = o = options
        _check(o)
        try:
            overrides = {} if o.codebook_size is None else {"codebook_size": o.codebook_size}
            overrides["ema"] = o.ema
            if o.fsq_levels is not None:
                overrides.update(quantizer="fsq", fsq_levels=tuple(o.fsq_levels))
            self.config = VQGANConfig.from_preset(o.preset, downsample=o.downsample, **overrides)
        except ValueError as e:
            raise UserError(f"vqgan: {e}") from None
        self.ctx = dist.setup(o.device)
        self.device = self.ctx.device
        self.run = Run(o.out, self.name)
        torch.manual_seed(o.seed)
        self.model = VQGAN(self.config).to(self.device)
        self.model.grid_size(o.size)  # a --size the factor does not divide is a UserError here
        self.discriminator = PatchDiscriminator(DISCRIMINATOR_PRESETS[o.preset]).to(self.device)
        self.perceptual = None
        if o.perceptual_weights is not None:
            from vqgan.lpips import VGGPerceptual

            self.perceptual = VGGPerceptual.from_file(o.perceptual_weights).to(self.device)
        self.weights = LossWeights(mse=o.mse_weight, perceptual=o.perceptual_weight, disc=o.disc_weight,
                                  disc_start=o.disc_start)

        # The learning rate is a function of the step (set before every step), so the discriminator's
        # schedule runs in step with the autoencoder's even while the discriminator waits for --disc-start.
        self.optimizers = {
            name: torch.optim.AdamW(module.parameters(), lr=o.lr, betas=betas, weight_decay=o.weight_decay)
            for name, module, betas in (("generator", self.model, tuple(o.betas)),
                                        ("discriminator", self.discriminator, (0.5, 0.9)))
        }
        self.train_model = dist.wrap(self.model, self.ctx)
        self.train_discriminator = dist.wrap(self.discriminator, self.ctx)
        self.modules = {"vqgan": self.model, "discriminator": self.discriminator}

        self.step, self.position = 0, 0
        if o.resume and self.run.can_resume():
            self.step, self.position, extra = self.run.load_checkpoint(self.modules, self.optimizers, self.device)
            _check_same_config(extra.get("config", {}), dataclasses.asdict(self.config))
            for group in self.optimizers["generator"].param_groups:  # the command's --betas, as --lr, not the saved
                group["betas"] = tuple(o.betas)
        self.batches = batches(o.dataset("train"), o.batch_size, o.seed, start=self.position, rank=self.ctx.rank,
                               world_size=self.ctx.world_size, workers=o.workers)
        self.heldout = self._heldout_batch(o.dataset("heldout"))
        self.skipped = 0
        self.amp_dtype = choose_precision(self.run, self.device, o.precision, self._precision_probe)

    def _precision_probe(self, dtype: torch.dtype | None) -> None:
        """One autoencoder forward and backward pass on held-out images in ``dtype``; changes no state."""
        self.model.eval()  # no codebook updates or restarts
        images = self.heldout[: self.options.batch_size]
        with autocast(self.device, dtype):
            reconstructions, quantized = self.model(images)
            loss = (reconstructions.float() - images).abs().mean() + quantized.loss
        loss.backward()
        self.model.zero_grad(set_to_none=True)

    def _heldout_batch(self, dataset) -> torch.Tensor:
        """The first ``heldout_examples`` readable images of the held-out split: (N, 3, S, S)."""

        count = self.options.heldout_examples
        images = next(batches(dataset, count, self.options.seed))["image"]
        if len(images) == 0:
            raise UserError(f"vqgan: none of the first {count} held-out images of --data could be read")
        return images.to(self.device)

    def next_batch(self) -> torch.Tensor:
        """This rank's images of the next global batch that has any readable image."""
        while True:
            batch = next(self.batches)
            self.position += self.options.batch_size
            self.skipped += batch["skipped"]
            if len(batch["image"]):
                return batch["image"].to(self.device, non_blocking=True)

    def train_step(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """One autoencoder step and (from --disc-start) one discriminator step; returns detached metrics."""
        o = self.options
        lr = o.lr * cosine_schedule(self.step, warmup=o.warmup, total=o.steps)
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr
        self.model.train()
        self.discriminator.train()
        with autocast(self.device, self.amp_dtype):
            reconstructions, quantized = self.train_model(images)
            # The autoencoder's loss calls the bare discriminator with frozen weights: no wasted weight
            # gradients, and no DDP reduction for parameters that get none.
            self.discriminator.requires_grad_(False)
            loss, metrics = generator_loss(images, reconstructions, quantized.loss, discriminator=self.discriminator,
                                           last_layer=self.model.last_layer, step=self.step, weights=self.weights,
                                           perceptual=self.perceptual)
            self.discriminator.requires_grad_(True)
        if not math.isfinite(loss.item()):
            return {"loss": loss.detach()}
        _optimizer_step(loss, self.model, self.optimizers["generator"], o.grad_clip)
        with autocast(self.device, self.amp_dtype):
            d = discriminator_loss(images, reconstructions, discriminator=self.train_discriminator, step=self.step,
                                   weights=self.weights)
        if d is not None:
            _optimizer_step(d[0], self.discriminator, self.optimizers["discriminator"], o.grad_clip)
            metrics.update(d[1])
        metrics.update(loss=loss.detach(), perplexity=quantized.perplexity, codebook_usage=quantized.usage,
                       restarted_codes=torch.tensor(float(quantized.restarted)))
        return metrics

    def figures(self) -> dict[str, float]:
        return {"lr": self.optimizers["generator"].param_groups[0]["lr"]}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """PSNR, L1 and the share of codes used, on the fixed held-out batch (decoded ids, clamped)."""
        self.model.eval()
        ids, reconstructions = [], []
        for chunk in self.heldout.split(64):
            chunk_ids = self.model.encode(chunk)
            ids.append(chunk_ids)
            reconstructions.append(self.model.decode(chunk_ids))
        recon = torch.cat(reconstructions)
        ids_all = torch.cat(ids)
        return {
            "heldout_psnr": psnr(self.heldout, recon).item(),
            "heldout_l1": (self.heldout - recon).abs().mean().item(),
            "heldout_codes_used": ids_all.unique().numel() / self.model.codebook_size,
        }

    @torch.no_grad()
    def save_samples(self, step: int) -> None:
        """Eight held-out originals above their reconstructions."""
        if not self.run.is_main:
            return
        self.model.eval()
        originals = self.heldout[:8]
        self.run.save_samples(step, torch.cat([originals, self.model.decode(self.model.encode(originals))]),
                              nrow=len(originals))

    def checkpoint(self, step: int) -> None:
        self.run.save_checkpoint(step, self.modules, self.optimizers, data_position=self.position,
                                 extra={"config": dataclasses.asdict(self.config)})
        self.export()

    def export(self) -> None:
        """Write the model to RUN/vqgan/, the weights later stages and sampling read."""
        if self.run.is_main:
            self.model.save_pretrained(Path(self.options.out) / "vqgan")

    def start(self) -> None:
        # Resumed with nothing left to train: a kill between the last checkpoint and its export can have left
        # RUN/vqgan/ older than the checkpoint, so export the restored weights again (the same bytes if not).
        if self.step >= self.options.steps:
            self.export()

    def finish(self, summary: dict) -> dict:
        if "heldout_psnr" not in summary:  # resumed at the end: nothing ran, measure anyway
            summary.update(self.evaluate())
        return summary


def _optimizer_step(loss: torch.Tensor, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    grad_clip: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    optimizer.step()


def _check(o: VQGANOptions) -> None:
    """Option values the parser cannot judge alone."""
    if o.disc_start < 0:
        raise UserError(f"--disc-start must be >= 0, got {o.disc_start}")
    for name in ("disc_weight", "perceptual_weight", "mse_weight"):
        value = getattr(o, name)
        if not (value >= 0 and math.isfinite(value)):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        raise UserError(f"--betas must be two numbers in [0, 1), got {' '.join(map(str, o.betas))}")
    if o.fsq_levels is not None:
        if o.codebook_size is not None or o.ema:
            raise UserError("--fsq-levels has no codebook: leave out --codebook-size and --ema "
                            "(the levels' product is the number of codes)")
        if min(o.fsq_levels) < 2 or math.prod(o.fsq_levels) > MAX_CODEBOOK_SIZE:
            raise UserError(f"--fsq-levels must be numbers >= 2 whose product is at most {MAX_CODEBOOK_SIZE}, "
                            f"got {' '.join(map(str, o.fsq_levels))}")
    if o.codebook_size is not None and not 2 <= o.codebook_size <= MAX_CODEBOOK_SIZE:
        raise UserError(f"--codebook-size must be from 2 to {MAX_CODEBOOK_SIZE}, got {o.codebook_size}")
    check_pictures_held(o, o.heldout_examples)
    warn_if_not_below_steps(o.steps, "vqgan", disc_start=o.disc_start if o.disc_weight > 0 else 0, warmup=o.warmup)


def _check_same_config(saved: dict, current: dict) -> None:
    differs = sorted(k for k in current if saved.get(k) != current[k])
    if differs:
        raise UserError(f"vqgan: --resume with a different model ({', '.join(differs)} changed); "
                        "pass the options the run started with")


def main(args: argparse.Namespace) -> None:
    trainer = VQGANTrainer(VQGANOptions.from_args(args))
    summary = trainer.fit()
    if trainer.run.is_main:
        print(f"vqgan: {summary['steps']} steps, held-out PSNR {summary['heldout_psnr']:.2f} dB, "
              f"codebook usage {summary.get('codebook_usage', float('nan')):.1%} "
              f"-> {Path(trainer.options.out) / 'vqgan'}")
    dist.teardown(trainer.ctx)
