"""``python -m train seq2seq``: stage 2, the text-to-image-token transformer, trained on cached codes.

Teacher forcing with cross-entropy over the VQGAN's grid ids in raster order; captions dropped to the
empty text about 10% of the time so classifier-free guidance has an unconditional model to push against.
AdamW, linear warmup then cosine, gradient clipping, bf16 autocast where the device multiplies bf16
natively (``--precision auto``: CUDA, or a CPU with AMX or AVX512-BF16; fp32 elsewhere), an optional EMA of
the weights. Held-out loss is reported in bits per image token.
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from checkpoint import TOKENIZER_DIGEST, file_digest, save_pretrained
from cli import UserError
from devices import autocast
from devices.flops import count_flops, matmul_peak_flops
from seq2seq import Seq2Seq, Seq2SeqConfig, generate
from seq2seq.evaluate import caption_gap
from seq2seq.generate import can_compile
from seq2seq.model import image_token_loss
from tokenizer import TextTokenizer
from train import codes, dist
from train.codes import epoch_batch_indices
from train.loop import (CaptionTokens, Run, Stage, StageOptions, add_common_arguments, add_model_size_argument,
                        check_held_in_memory, choose_precision, cosine_schedule, optimizer_groups,
                        warn_if_not_below_steps)
from vqgan import VQGAN


@dataclass
class Seq2SeqOptions(StageOptions):
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    micro_batch_size: int | None = None
    cache_examples: int = 30_000
    heldout_examples: int = 512
    caption_dropout: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.05
    ema: float = 0.0
    sample_cfg: float = 1.5  # python -m sample's default
    compile: bool = False
    fsdp: bool = False
    dropout: float | None = None  # None: the preset's
    keep: str = "best"
    augment_until: int | None = None  # None: --augment's crops to the last step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    o = Seq2SeqOptions
    add_common_arguments(parser, o, heldout_help="held-out pictures whose bits per image token and caption gap "
                                                 "every evaluation measures")
    add_model_size_argument(parser, Seq2SeqOptions.preset, "tiny (a smoke test) | small | base | large")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="examples per process per forward; the global batch is reached by accumulation")
    parser.add_argument("--cache-examples", type=int, default=Seq2SeqOptions.cache_examples,
                        help="training examples encoded into the code cache")
    parser.add_argument("--caption-dropout", type=float, default=Seq2SeqOptions.caption_dropout)
    parser.add_argument("--ema", type=float, default=Seq2SeqOptions.ema,
                        help="EMA decay of the weights (0 = off), warmed up over the first steps")
    parser.add_argument("--sample-cfg", type=float, default=Seq2SeqOptions.sample_cfg)
    parser.add_argument("--dropout", type=float, default=None,
                        help="dropout in every block (default: the preset's, 0 for tiny and small, 0.1 above)")
    parser.add_argument("--keep", default=Seq2SeqOptions.keep, choices=["best", "last"],
                        help="what RUN/seq2seq/ holds: the weights (the average with --ema) of the evaluation "
                             "with the lowest held-out loss (default), or of the last step")
    parser.add_argument("--augment-until", type=int, default=None, metavar="STEP",
                        help="with --augment crop on a folder or file source: crops until this step, then the pictures "
                             "as they are (one version of each, the first caption) to the last step, so the model "
                             "also learns to draw them whole (default: crops to the last step)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training model")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun, shard weights, gradients and optimizer state over the processes "
                             "(FSDP2 fully_shard) instead of copying the model to each (DDP)")


def _can_compile(device: torch.device) -> bool:
    """torch.compile needs a C++ compiler to build CPU kernels; without one, say so and train uncompiled."""

    if not can_compile(device):
        print("seq2seq: --compile needs a C++ compiler for CPU kernels and none is on PATH; training uncompiled")
        return False
    return True


def ema_decay(decay: float, step: int) -> float:
    """The EMA decay at 0-based ``step``: ``min(decay, (1 + step) / (10 + step))``.

    The warm-up (TensorFlow's ``num_updates`` rule) lets the average forget the random initial weights within
    the first few hundred steps; a fixed 0.999 would still hold 3% of them after 3 500 steps.
    """
    return min(decay, (1 + step) / (10 + step))


class Seq2SeqTrainer(Stage):
    """The stage's state and its steps; :func:`train.loop.fit` runs them."""

    name = "seq2seq"
    unit = "tokens"

    def __init__(self, options: Seq2SeqOptions):
        if not 0 <= options.caption_dropout < 1:
            raise UserError(f"--caption-dropout must be in [0, 1), got {options.caption_dropout}")
        if not 0 <= options.ema < 1:
            raise UserError(f"--ema must be in [0, 1), got {options.ema}")
        if options.fsdp and options.ema:
            raise UserError("--ema keeps a whole copy of the model on every process; drop it or --fsdp")
        warn_if_not_below_steps(options.steps, "seq2seq", warmup=options.warmup)
        self.options = o = options
        self.ctx = dist.setup(o.device, fsdp=o.fsdp)
        self.device = self.ctx.device
        self.run = Run(o.out, self.name)
        out = Path(o.out)
        if not (out / "tokenizer.model").is_file():
            raise UserError(f"{out / 'tokenizer.model'} is missing; run `python -m train tokenizer --out {out}` first")
        if not (out / "vqgan").is_dir():
            raise UserError(f"{out / 'vqgan'} is missing; run `python -m train vqgan --out {out}` first")
        self.tokenizer = TextTokenizer.load(out / "tokenizer.model")
        self.vqgan = VQGAN.from_pretrained(out / "vqgan").to(self.device)
        codes_each = 8 * (o.size // self.vqgan.downsample) ** 2  # one picture's int64 codes
        for option in ("cache-examples", "heldout-examples"):
            check_held_in_memory(option, getattr(o, option.replace("-", "_")), codes_each)
        cache_options = dict(data=o.data, size=o.size, seed=o.seed, device=self.device, workers=o.workers,
                             image_column=o.image_column, text_column=o.text_column,
                             heldout_fraction=o.heldout_fraction, augment=o.augment != "none",
                             max_pixels=o.max_pixels, follow_symlinks=o.follow_symlinks, balance=o.balance)
        self.whole_from = self._whole_from()
        with dist.main_first(self.ctx):
            self.train_codes = codes.load_or_build(out, self.vqgan, split="train", limit=o.cache_examples, **cache_options)
            # The pictures as they are, read from --augment-until on: one version each, encoded once.
            self.whole_codes = None if self.whole_from is None else codes.load_or_build(
                out, self.vqgan, split="train", limit=o.cache_examples, **{**cache_options, "augment": False})
            self.heldout_codes = codes.load_or_build(out, self.vqgan, split="heldout", limit=o.heldout_examples,
                                                     **cache_options)
        grid = int(math.isqrt(self.train_codes.image_ids.shape[1]))
        overrides = {} if o.dropout is None else {"dropout": o.dropout}
        try:
            self.config = Seq2SeqConfig.from_preset(o.preset, text_vocab_size=self.tokenizer.vocab_size,
                                                    codebook_size=self.vqgan.codebook_size, grid_size=grid, **overrides)
        except ValueError as e:
            raise UserError(f"seq2seq: {e}") from None
        self._warn_about_passes()
        self.captions = CaptionTokens("seq2seq", self.tokenizer, self.config.max_text_len, self.device)
        torch.manual_seed(o.seed)
        self.model = Seq2Seq(self.config).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if o.ema else None
        # Wrapped before the optimizer is built: FSDP2 replaces the parameters with their shards.
        self.train_model = dist.wrap(self.model, self.ctx)
        self.optimizer = torch.optim.AdamW(optimizer_groups(self.model, o.weight_decay), lr=o.lr, betas=(0.9, 0.95),
                                           fused=self.device.type == "cuda")
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_schedule(s, warmup=o.warmup, total=o.steps))
        if o.compile and _can_compile(self.device):
            self.train_model = torch.compile(self.train_model)
        self.micro_batches = dist.micro_batches(o.batch_size, o.micro_batch_size, self.ctx)
        self.step = 0
        self.best = math.inf  # the lowest held-out bits per token an evaluation has seen (--keep best)
        self.best_step: int | None = None  # the step of that evaluation (None: none yet, or an older checkpoint)
        modules = {"model": self.model, **({"ema": self.ema} if self.ema is not None else {})}
        self.modules, self.optimizers = modules, {"optimizer": self.optimizer, "schedule": self.schedule}
        if self.ctx.fsdp:  # checkpoints hold whole tensors, the same files as without --fsdp
            self.modules = {"model": dist.FullModelState(self.model)}
            self.optimizers = {"optimizer": dist.FullOptimizerState(self.model, self.optimizer),
                               "schedule": self.schedule}
        if o.resume and self.run.can_resume():
            self.step, _, extra = self.run.load_checkpoint(self.modules, self.optimizers, self.device)
            self.best = extra.get("best", math.inf)
            self.best_step = extra.get("best_step")
        self.amp_dtype = choose_precision(self.run, self.device, o.precision, self._precision_probe)

    def _precision_probe(self, dtype: torch.dtype | None) -> None:
        """One forward and backward pass of a micro-batch of held-out pairs in ``dtype``; changes no state."""
        rows = max(1, self.options.batch_size // self.ctx.world_size // self.micro_batches)
        text_ids, text_mask = self.captions(self.heldout_codes.texts[:rows], count=False)
        image_ids = self.heldout_codes.image_ids[:rows].to(self.device)
        self.model.eval()  # no dropout
        with autocast(self.device, dtype):
            loss = self.model.loss(text_ids, text_mask, image_ids)
        loss.backward()
        self.model.zero_grad(set_to_none=True)

    def _whole_from(self) -> int | None:
        """The step from which training reads whole pictures (--augment-until), or None: crops throughout."""
        o = self.options
        if o.augment_until is None:
            return None
        if not 0 <= o.augment_until < o.steps:
            raise UserError(f"--augment-until {o.augment_until} is not a step of this run: give 0 to {o.steps - 1}, "
                            "or leave it out to train on crops to the last step")
        if o.augment == "none" or o.data == "shapes":
            why = "shapes is never augmented" if o.data == "shapes" else "--augment none"
            print(f"seq2seq: note: --augment-until does nothing here ({why})")
            return None
        return o.augment_until

    def _warn_about_passes(self) -> None:
        """Say so when the run will see each picture many times: small data that a model this size memorises."""
        o, pictures = self.options, self.train_codes.pictures
        if pictures is None or not self.run.is_main:
            return
        passes = o.steps * o.batch_size / pictures
        if passes > 20:
            versions = len(self.train_codes) / pictures
            print(f"seq2seq: note: {o.steps} steps x {o.batch_size} make {passes:.0f} passes over {pictures} pictures "
                  f"({versions:.1f} cached versions of each, --augment {o.augment}); the held-out loss will show "
                  f"when it starts to memorise them, and --keep {o.keep} "
                  + ("saves the weights from before that" if o.keep == "best" else "saves the last step anyway"))

    def text_batch(self, texts: list[str], drop: torch.Tensor | None = None):
        """Token ids and mask for ``texts``; captions where ``drop`` is True become empty (caption dropout)."""
        if drop is not None:
            texts = ["" if d else t for t, d in zip(texts, drop.tolist())]
        return self.captions(texts)

    def global_batch(self, step: int) -> tuple[list[str], torch.Tensor]:
        """This rank's share of the global batch for ``step``; the same on resume and at any world size."""

        o = self.options
        cache, position = self.train_codes, step * o.batch_size
        if self.whole_codes is not None and step >= self.whole_from:
            cache, position = self.whole_codes, (step - self.whole_from) * o.batch_size
        indices = epoch_batch_indices(len(cache), o.batch_size, o.seed, position)
        indices = indices[self.ctx.rank::self.ctx.world_size]
        texts = [cache.texts[i] for i in indices.tolist()]
        return texts, cache.image_ids[indices]

    def batch_at(self, step: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """This rank's captions, image ids and caption-dropout flags of the global batch for ``step``."""
        o = self.options
        texts, image_ids = self.global_batch(step)
        # Drawn for the whole global batch, then sliced like it: the same captions drop at any world size.
        dropout = torch.Generator().manual_seed(o.seed * 7919 + step)
        drop = (torch.rand(o.batch_size, generator=dropout) < o.caption_dropout)[self.ctx.rank::self.ctx.world_size]
        return texts, image_ids, drop

    def next_batch(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        return self.batch_at(self.step)

    def batch_units(self, batch) -> int:
        """Image tokens in a global batch: every batch has the same count."""
        return self.options.batch_size * self.config.grid_size**2

    def train_step(self, batch: tuple[list[str], torch.Tensor, torch.Tensor]) -> dict[str, float]:
        o = self.options
        texts, image_ids, drop = batch
        text_ids, text_mask = self.text_batch(texts, drop)
        image_ids = image_ids.to(self.device)
        self.model.train()
        total = 0.0
        chunks = list(zip(text_ids.tensor_split(self.micro_batches), text_mask.tensor_split(self.micro_batches),
                          image_ids.tensor_split(self.micro_batches)))
        for i, (t_ids, t_mask, i_ids) in enumerate(chunks):
            with dist.no_sync_unless_last(self.train_model, i == len(chunks) - 1, self.ctx):
                with autocast(self.device, self.amp_dtype):
                    logits = self.train_model(t_ids, t_mask, i_ids)  # (b, T, V); DDP and FSDP wrap forward
                loss = image_token_loss(logits, i_ids)
                (loss * len(i_ids) / len(image_ids)).backward()
            total += loss.item() * len(i_ids) / len(image_ids)
        loss_value = dist.mean_across_ranks(total, self.ctx)
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            return {"loss": loss_value}
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            decay = ema_decay(o.ema, self.step)
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.model.parameters()):
                    e.lerp_(p, 1 - decay)
        return {"loss": loss_value}

    def figures(self) -> dict[str, float]:
        return {"lr": self.schedule.get_last_lr()[0]}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out bits per image token and the caption gap (:func:`seq2seq.evaluate.caption_gap`) of the model
        that is saved."""
        gap = caption_gap(self.ema or self.model, self.tokenizer, self.heldout_codes.texts,
                          self.heldout_codes.image_ids, self.device)
        figures = {"heldout_bits_per_token": gap["right"], "heldout_bits_no_caption": gap["empty"]}
        if gap["gap"] is not None:
            figures.update(heldout_bits_shuffled_caption=gap["shuffled"], caption_gap=gap["gap"])
        return figures

    def whole_model(self):
        """The model to sample from and save: under --fsdp a whole copy gathered on rank 0 (None elsewhere)."""
        if not self.ctx.fsdp:
            return self.ema or self.model

        state = dist.FullModelState(self.model).gather().state_dict()  # every rank takes part
        if not self.run.is_main:
            return None
        whole = Seq2Seq(self.config).to(self.device)
        whole.load_state_dict(state)
        return whole

    @torch.no_grad()
    def save_samples(self, step: int) -> None:
        """Eight held-out pictures above what the model draws for their captions, each column captioned."""
        if not (self.run.is_main or self.ctx.fsdp):  # under --fsdp every rank takes part in the gather
            return

        model = self.whole_model()
        if model is None:
            return
        model.eval()
        grid = self.config.grid_size
        texts = self.heldout_codes.texts[:8]
        text_ids, text_mask = self.text_batch(texts)
        seeds = torch.arange(len(texts), device=self.device)
        generated = generate(model, text_ids, text_mask, seeds=seeds, cfg_scale=self.options.sample_cfg)
        originals = self.heldout_codes.image_ids[:8].view(-1, grid, grid).to(self.device)
        images = self.vqgan.decode(torch.cat([originals, generated]))
        self.run.save_samples(step, images, nrow=len(texts), captions=list(texts))

    def count_step_flops(self) -> int:
        """FLOPs of one global batch's forward and backward, counted on a side run that changes no state."""

        texts, image_ids = self.global_batch(self.step)
        text_ids, text_mask = self.text_batch(texts)
        image_ids = image_ids.to(self.device)

        def forward_backward() -> None:
            self.model.loss(text_ids, text_mask, image_ids).backward()

        rng = torch.get_rng_state()
        flops = count_flops(forward_backward)  # this process's share
        torch.set_rng_state(rng)
        self.optimizer.zero_grad(set_to_none=True)
        return flops

    def checkpoint(self, step: int) -> None:
        if self.ctx.fsdp:  # gather the whole tensors, every rank taking part
            self.modules["model"].gather()
            self.optimizers["optimizer"].gather()
        self.run.save_checkpoint(step, self.modules, self.optimizers, data_position=step * self.options.batch_size,
                                 extra={"best": self.best, "best_step": self.best_step})
        if self.options.keep == "last":
            self.export()

    def export(self) -> None:
        """Write the model sampling uses to RUN/seq2seq/ (the average with --ema), the step in the weights'
        metadata, so that a resumed run can tell which evaluation's weights the export holds."""
        if self.run.is_main:
            model = self.ema or self.model
            state = self.modules["model"].state_dict() if self.ctx.fsdp else None
            out = Path(self.options.out)
            save_pretrained(model, self.config, out / "seq2seq", state=state,
                            metadata={"step": str(self.step), TOKENIZER_DIGEST: file_digest(out / "tokenizer.model")})

    def export_at_end(self) -> None:
        """Make RUN/seq2seq/ hold what it should once training is over, whatever a kill did to it.

        Called when a resumed run had nothing left to train, or when the export is missing. A kill between the
        last checkpoint and its export leaves the export older than the checkpoint: under --keep last, or when
        the checkpoint's own step set the best held-out value, the restored weights are the ones to export,
        and are exported again. Under --keep best from an earlier evaluation the checkpoint does not hold
        those weights: an export that records that evaluation's step (or records none, from an older
        version) stays; a missing one, or one from another step, is replaced by the restored weights,
        evaluated, with a line saying so, rather than left stale.
        """
        o = self.options
        directory = Path(o.out) / "seq2seq"
        if o.keep == "best" and self.best == math.inf:  # no evaluation yet (an older checkpoint): do one now
            self.record_evaluation(self.evaluate())
            return
        if o.keep == "best" and self.best_step != self.step:
            exported = _exported_step(directory)
            if exported is not None and (exported == "unknown" or exported == str(self.best_step)):
                return
            figures = self.evaluate()
            note = (f"{directory} is missing or unreadable" if exported is None
                    else f"{directory} holds the weights of step {exported}")
            best = f"step {self.best_step}'s" if self.best_step is not None else "the best evaluation's"
            if self.run.is_main:
                tqdm.write(f"seq2seq: {note}, not {best} (the best held-out loss, {self.best:.4f} bits per token), "
                           f"and the checkpoint keeps only step {self.step}'s; exporting those "
                           f"({figures['heldout_bits_per_token']:.4f} bits per token)")
            self.run.log(self.step, event="exported the last weights: the best were lost", **figures)
        if self.ctx.fsdp:  # every rank takes part in the gather
            self.modules["model"].gather()
        self.export()

    def record_evaluation(self, figures: dict[str, float]) -> None:
        """Log an evaluation; under --keep best, export the weights when they are the best yet."""
        bits = figures["heldout_bits_per_token"]
        improved = bits < self.best
        if improved:
            self.best, self.best_step = bits, self.step
        if self.options.keep == "best" and improved:
            if self.ctx.fsdp:
                self.modules["model"].gather()
            self.export()
        self.run.log(self.step, **figures, **({"kept": True} if self.options.keep == "best" and improved else {}))

    def start(self) -> None:
        o = self.options
        self.resumed_at_end = self.step >= o.steps
        self.flops_per_step = None
        if self.step < o.steps:
            self.flops_per_step = self.count_step_flops()
            if o.compile and self.run.is_main:
                tqdm.write("seq2seq: compiling the training step; the first step takes a minute or more (longer on "
                           "a busy machine), then steps run faster")

    def finish(self, summary: dict) -> dict:
        o = self.options
        if self.resumed_at_end or not (Path(o.out) / "seq2seq" / "model.safetensors").is_file():
            self.export_at_end()
        if o.keep == "best":
            summary["best_heldout_bits_per_token"] = self.best
        if self.captions.cut:  # counted since this process started (a resumed run: since the resume)
            summary["captions_cut"] = self.captions.cut
        rate = summary.get(f"{self.unit}_per_s")
        if rate and self.flops_per_step:
            peak = matmul_peak_flops(self.device, self.amp_dtype or torch.float32)
            achieved = self.flops_per_step * rate / self.batch_units(None)  # steps a second times FLOPs a step
            summary.update(achieved_flops=achieved, peak_flops=peak, share_of_peak=achieved / peak)
            self.run.log(self.step, **{k: summary[k] for k in ("achieved_flops", "peak_flops", "share_of_peak")})
        return summary


def _exported_step(directory: Path) -> str | None:
    """The step an export of :meth:`Seq2SeqTrainer.export` records: None where the weights are missing or
    unreadable, "unknown" where they record none (written by an older version)."""

    try:
        with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
            return (f.metadata() or {}).get("step", "unknown")
    except Exception:  # noqa: BLE001 - missing, truncated or not safetensors: all mean "no usable export"
        return None


def main(args: argparse.Namespace) -> None:
    options = Seq2SeqOptions.from_args(args)
    trainer = Seq2SeqTrainer(options)
    summary = trainer.fit()
    if trainer.run.is_main:
        print("seq2seq: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    dist.teardown(trainer.ctx)
