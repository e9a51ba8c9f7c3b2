"""What every training stage shares: the training loop (:func:`fit` over a :class:`Stage`), common options,
the precision probe, the run directory's metrics log, sample grids, and checkpoints that resume exactly
(weights, optimizer, schedule, RNG, data position).

A checkpoint is a directory ``RUN/state/<stage>/step-N/`` holding ``modules.safetensors`` (every trained
module, keys prefixed by its name) and ``state.pt`` (optimizer and schedule state, RNG states, data
position; loaded with ``weights_only=True``). ``latest.json`` is rewritten to point at it only once it is
whole, and older directories are pruned after, so a run killed at any moment resumes from the last whole
checkpoint. Only rank 0 writes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from checkpoint import (CheckpointError, atomic_write, json_kind, load_torch, read_json, remove_temporaries, save_torch,
                        write_json)
from cli import UserError, positive_int
from data.images import image_grid
from data.sources import BALANCES, DEFAULT_HELDOUT_FRACTION, DEFAULT_MAX_PIXELS, open_dataset
from devices import autocast_dtype, native_bf16
from tokenizer import TextTokenizer, TruncationWarning
from train import dist

__all__ = [
    "Stage",
    "fit",
    "optimizer_groups",
    "add_common_arguments",
    "choose_precision",
    "cosine_schedule",
    "progress",
    "warn_if_not_below_steps",
    "add_data_arguments",
    "add_model_size_argument",
    "CaptionTokens",
    "seed_number",
    "check_held_in_memory",
    "check_pictures_held",
    "Run",
]


MAX_NON_FINITE = 5  # non-finite losses in a row that stop a stage
MAX_HELD_BYTES = 4 << 30  # what a stage may hold of pictures or codes at once (a held-out batch, the code cache)
CHECKPOINT_NAME = re.compile(r"step-\d{7,}")  # state/<stage>/step-N: latest.json may name nothing else


@dataclass
class StageOptions:
    """The options every training stage takes (:func:`add_common_arguments`); a stage's dataclass extends it
    with its own and may give ``steps``, ``batch_size`` and ``lr`` other defaults."""

    data: str
    out: str
    steps: int = 1000
    batch_size: int = 32
    size: int = 64
    lr: float = 1e-3
    resume: bool = False
    device: str = "auto"
    seed: int = 0
    workers: int = 0
    image_column: str | None = None
    text_column: str | None = None
    log_every: int = 50
    save_every: int = 500
    precision: str = "auto"
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
    augment: str = "crop"
    max_pixels: int = DEFAULT_MAX_PIXELS
    follow_symlinks: bool = False
    balance: str = "pictures"
    preset: str = "small"  # the model's size (--model-size)
    sample_every: int = 500
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 250
    heldout_examples: int = 64

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        """The options from a parsed command line; flags the stage does not use are left out."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    def __post_init__(self) -> None:
        """The shared options' values the parser cannot judge alone (tests and scripts build options directly)."""
        for name in ("warmup", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise UserError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        for name in ("eval_every", "heldout_examples"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def data_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`data.sources.open_dataset` these options give (split and size apart)."""
        return dict(image_column=self.image_column, text_column=self.text_column, seed=self.seed,
                    heldout_fraction=self.heldout_fraction, augment=self.augment != "none", max_pixels=self.max_pixels,
                    follow_symlinks=self.follow_symlinks, balance=self.balance)

    def dataset(self, split: str, size: int | None = None):
        """``--data`` opened at ``size`` (default ``--size``); the training split augmented unless --augment none."""
        return open_dataset(self.data, self.size if size is None else size, split=split, **self.data_options())


class _RenamedPreset(argparse.Action):
    """A stage's old ``--preset``: still read, since scripts use it, with one line naming ``--model-size``."""

    def __call__(self, parser, namespace, values, option_string=None):
        print("note: a stage's --preset is now --model-size (--preset is `train all`'s training plan: "
              "tiny, cpu or gpu)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_model_size_argument(parser: argparse.ArgumentParser, default: str, sizes: str) -> None:
    """``--model-size``: the size of the stage's model (its config presets), apart from ``train all --preset``,
    which picks every stage's model size and steps for a machine."""
    parser.add_argument("--model-size", dest="preset", default=default, metavar="SIZE",
                        help=f"the model's size: {sizes} (default {default})")
    parser.add_argument("--preset", dest="preset", action=_RenamedPreset, help=argparse.SUPPRESS)


def add_common_arguments(parser: argparse.ArgumentParser, defaults: type[StageOptions], *,
                         heldout_help: str = "held-out examples evaluated at every --eval-every") -> None:
    """Add the options every stage takes (DESIGN.md command lines), with the defaults of the stage's options
    class ``defaults`` (a :class:`StageOptions` subclass)."""
    o = defaults
    steps, batch_size, lr, size = o.steps, o.batch_size, o.lr, o.size
    log_every, save_every, sample_every, eval_every = o.log_every, o.save_every, o.sample_every, o.eval_every
    warmup, weight_decay, grad_clip, heldout_examples = o.warmup, o.weight_decay, o.grad_clip, o.heldout_examples
    parser.add_argument("--data", default="shapes",
                        help="shapes (the built-in world, default) | openmoji | a folder | *.jsonl/*.parquet/*.csv | "
                             "*.tar | a hub name")
    parser.add_argument("--out", required=True, help="the run directory")
    parser.add_argument("--steps", type=positive_int, default=steps, help=f"optimizer steps (default {steps})")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size, help=f"global batch (default {batch_size})")
    parser.add_argument("--size", type=positive_int, default=size, help=f"image side in pixels (default {size})")
    parser.add_argument("--lr", type=_positive_float, default=lr, help=f"peak learning rate (default {lr})")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to train; auto (default): CUDA when one is visible, else the CPU")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="bf16 autocast or fp32; auto (default): fp32 where the device has no native bf16, "
                             "else whichever a few timed training passes at the start find faster (a second or "
                             "so; said in one line, kept on --resume)")
    parser.add_argument("--seed", type=seed_number, default=0, help=SEED_HELP)
    parser.add_argument("--workers", type=_nonnegative_int, default=0,
                        help="DataLoader worker processes (default 0: read in the training process)")
    parser.add_argument("--image-column", default=None, help="image column of a file or hub dataset")
    parser.add_argument("--text-column", default=None, help="caption column of a file or hub dataset")
    add_data_arguments(parser)
    parser.add_argument("--log-every", type=positive_int, default=log_every,
                        help=f"steps between metrics lines (default {log_every})")
    parser.add_argument("--save-every", type=positive_int, default=save_every,
                        help=f"steps between checkpoints that --resume continues from (default {save_every})")
    parser.add_argument("--sample-every", type=positive_int, default=sample_every,
                        help=f"steps between sample grids in RUN/samples/ (default {sample_every})")
    parser.add_argument("--eval-every", type=int, default=eval_every,
                        help=f"steps between held-out evaluations (default {eval_every})")
    parser.add_argument("--heldout-examples", type=int, default=heldout_examples,
                        help=f"{heldout_help} (default {heldout_examples})")
    parser.add_argument("--warmup", type=int, default=warmup,
                        help=f"linear learning-rate warmup steps (default {warmup})")
    parser.add_argument("--weight-decay", type=float, default=weight_decay,
                        help=f"AdamW weight decay of matrices (default {weight_decay})")
    parser.add_argument("--grad-clip", type=float, default=grad_clip,
                        help=f"max gradient norm (default {grad_clip}; 0 = off)")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The held-out share and the augmentation, the same for every stage so that they see the same split."""
    parser.add_argument("--heldout-fraction", type=_fraction, default=DEFAULT_HELDOUT_FRACTION,
                        help="share of a file or folder source held out, by a hash of each row's group, file "
                             f"name or caption (default {DEFAULT_HELDOUT_FRACTION}); shapes has its own split")
    parser.add_argument("--augment", default="crop", choices=["crop", "none"],
                        help="training pictures of a file or folder source: random crops of 80-100%% of the side "
                             "(default), or none; never flips or colour changes, since captions name sides and "
                             "colours; shapes is never augmented")
    parser.add_argument("--balance", default="pictures", choices=BALANCES,
                        help="what a training epoch reads once each, for a source with a group column (openmoji "
                             "has one): every picture (default), or every group, one of its pictures at random, so "
                             "that a group of many variants is not read many times as often as a picture alone")
    parser.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                        help="pictures with more pixels are skipped and counted, not decoded (default "
                             f"{DEFAULT_MAX_PIXELS}, 8192 x 8192)")
    parser.add_argument("--follow-symlinks", action="store_true",
                        help="read pictures whose path leads outside the data folder (an absolute path, .. or a "
                             "symlink); by default they are skipped and counted")


MAX_SEED = 2**32 - 1  # seeds are mixed with positions and epochs (seed * 1_000_003 + p) into 64-bit generators
SEED_HELP = f"seed of the data order, augmentation and initialisation, 0 to {MAX_SEED} (default 0)"


def seed_number(text: str) -> int:
    """``--seed`` of a training command: an integer from 0 to MAX_SEED (argparse type)."""
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_SEED}, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def warn_if_not_below_steps(steps: int, stage: str, **points: int) -> None:
    """One line for each schedule point (a warm-up, the GAN's start) that the run never gets past."""
    for name, value in points.items():
        if value and value >= steps:
            print(f"{stage}: warning: --{name.replace('_', '-')} {value} is not below --steps {steps}, so it "
                  f"{'never starts' if name == 'disc_start' else 'never ends'}; lower it or train longer")


def check_held_in_memory(option: str, count: int, bytes_each: int) -> None:
    """A UserError, before any work, where ``count`` examples of ``bytes_each`` (``--option count``, held at once)
    would pass MAX_HELD_BYTES: ``--heldout-examples 1000000`` rendered for minutes, then ran out of memory."""
    if count * bytes_each > MAX_HELD_BYTES:
        raise UserError(f"--{option} {count} holds {count * bytes_each / 2**30:.1f} GiB at once; at most "
                        f"{MAX_HELD_BYTES // bytes_each} fit in the {MAX_HELD_BYTES >> 30} GiB a stage may hold")


def check_pictures_held(options: StageOptions, heldout_examples: int) -> None:
    """:func:`check_held_in_memory` for a stage that holds a batch and its held-out pictures, (3, S, S) fp32 each."""
    for option, count in (("batch-size", options.batch_size), ("heldout-examples", heldout_examples)):
        check_held_in_memory(option, count, 3 * options.size * options.size * 4)


PROBE_STEPS = 3  # timed forward-and-backward passes per precision, after one untimed pass each
# bf16 is kept only when its best pass takes less than this share of fp32's: where the two are within noise of
# each other, fp32 (the exact arithmetic) is chosen on every start, not whichever a noisy machine timed faster.
BF16_MARGIN = 0.9
PRECISION_RECORD = "precision.json"  # RUN/state/<stage>/precision.json: the stage's precision, once chosen


def choose_precision(run: "Run", device: torch.device, precision: str,
                     probe: Callable[[torch.dtype | None], None]) -> torch.dtype | None:
    """The autocast dtype a stage trains in, said in one line.

    ``fp32`` and ``bf16`` are taken as given. ``auto`` is fp32 where the device has no native bf16; where it has
    (CUDA, a CPU with AMX or AVX512-BF16), bf16 is not always faster: a small model's step on a CPU is bound by
    per-operation overhead and casts, and the ``tiny`` VQGAN ran about 10x slower in bf16. So ``auto`` times
    ``probe(dtype)`` (one forward and backward pass of the stage's model on a held-out batch, gradients dropped
    after) in each precision, interleaved, and keeps bf16 when its best of PROBE_STEPS is under BF16_MARGIN of
    fp32's, fp32 otherwise. A resumed run keeps
    the precision its checkpoint recorded (``run.precision``), so that resuming changes no arithmetic; every
    process of a distributed run takes rank 0's choice. The choice is written to the run as soon as it is made
    (``Run.record_precision``), so that a stage killed before its first checkpoint starts again in it on
    ``--resume`` (``Run.can_resume``) instead of probing again.
    """
    if precision != "auto" or run.precision is not None:
        dtype = autocast_dtype(device, precision if precision != "auto" else run.precision)
        run.record_precision("bf16" if dtype is not None else "fp32")
        return dtype
    if not native_bf16(device):
        run.record_precision("fp32")
        if run.is_main:
            print(f"{run.stage}: --precision auto: fp32 (this {device.type} has no native bf16)")
        return None
    seconds: dict[torch.dtype | None, float] = {None: math.inf, torch.bfloat16: math.inf}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for trial in range(PROBE_STEPS + 1):
            for dtype in seconds:
                start = time.perf_counter()
                probe(dtype)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if trial:  # the first pass of each warms caches and kernels up
                    seconds[dtype] = min(seconds[dtype], time.perf_counter() - start)
    faster = seconds[torch.bfloat16] < BF16_MARGIN * seconds[None]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = torch.tensor([int(faster)], device=device)
        torch.distributed.broadcast(flag, src=0)
        faster = bool(flag.item())
    run.record_precision("bf16" if faster else "fp32")
    if run.is_main:
        print(f"{run.stage}: --precision auto: {run.precision} (a training pass measured {seconds[None] * 1e3:.0f} ms "
              f"in fp32, {seconds[torch.bfloat16] * 1e3:.0f} ms in bf16 here; --precision fp32|bf16 fixes it)")
    return torch.bfloat16 if faster else None


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on matrices and embeddings, none on norms, biases and scalars
    (nanoGPT's rule); each group in the model's parameter order."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Stage:
    """What :func:`fit` drives: one training stage's state and the few things only the stage knows.

    A stage sets ``name``, ``options`` (a :class:`StageOptions`), ``run``, ``ctx`` and ``step`` and implements
    :meth:`next_batch`, :meth:`train_step`, :meth:`evaluate` and :meth:`checkpoint`; the other methods have
    defaults. Everything else (timing, averaging, logging, the evaluation, sample and checkpoint rhythm,
    skipped non-finite steps, the progress bar) is :func:`fit`'s, the same for every stage.
    """

    name: str
    options: StageOptions
    run: Run
    ctx: dist.Context
    step: int = 0
    skipped: int = 0  # pictures of this process that could not be read, so far
    unit: str = "images"  # what a batch's size counts, for the throughput figure ``<unit>_per_s``

    def next_batch(self) -> Any:
        """This process's share of the batch for ``self.step`` (the same again after a skipped step where the
        stage draws batches by step)."""
        raise NotImplementedError

    def batch_units(self, batch: Any) -> int:
        """How many ``unit``s the global batch holds (pictures by default)."""
        return self.options.batch_size

    def train_step(self, batch: Any) -> dict[str, torch.Tensor | float]:
        """One optimizer step; its metrics, ``loss`` among them, averaged over the processes by :func:`fit`
        only at log time. A non-finite loss must leave the weights untouched (the step is skipped)."""
        raise NotImplementedError

    def figures(self) -> dict[str, float]:
        """Values read when a metrics line is written rather than averaged over its steps (the learning rate)."""
        return {}

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def record_evaluation(self, figures: dict[str, float]) -> None:
        """What an evaluation leads to besides its log line (a stage that keeps its best weights exports them)."""
        self.run.log(self.step, **figures)

    def save_samples(self, step: int) -> None:
        """A grid of what the model makes now, in RUN/samples/<stage>/ (none by default)."""

    def checkpoint(self, step: int) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Before the first step (also when a resumed run has nothing left to train)."""

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The stage's summary after the last step: ``summary`` as :func:`fit` made it, with the stage's own."""
        return summary

    def fit(self) -> dict[str, Any]:
        return fit(self)


WARMUP_STEPS = 2  # the first steps carry allocation and warm-up cost: left out of the throughput figure


def fit(stage: Stage) -> dict[str, Any]:
    """Train ``stage`` from ``stage.step`` to ``--steps``: each step a batch and an optimizer step, timed
    together; every ``--log-every`` steps one metrics line with the metrics averaged over the steps since the
    last line and across processes, the throughput and the unreadable pictures so far; every ``--eval-every``
    an evaluation, every ``--sample-every`` a sample grid, every ``--save-every`` a checkpoint, and all three
    at the last step. A non-finite loss skips its step (:meth:`Run.non_finite`). Returns the summary: steps,
    the last line's figures, the last evaluation's, and what :meth:`Stage.finish` adds."""
    o, run = stage.options, stage.run
    stage.start()
    bar = progress(o.steps, stage.step, stage.name)
    sums: dict[str, torch.Tensor] = {}
    summed, timed, timed_units, data_time = 0, 0.0, 0, 0.0
    last: dict[str, Any] = {}
    while stage.step < o.steps:
        start = time.perf_counter()
        batch = stage.next_batch()
        loaded = time.perf_counter()
        metrics = stage.train_step(batch)
        elapsed = time.perf_counter() - start
        loss = float(metrics["loss"])
        if run.non_finite(stage.step, loss):
            continue
        stage.step += 1
        if stage.step > WARMUP_STEPS:
            timed += elapsed
            data_time += loaded - start
            timed_units += stage.batch_units(batch)
        for key, value in metrics.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            sums[key] = sums.get(key, 0.0) + value
        summed += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        at_end = stage.step == o.steps
        if stage.step % o.log_every == 0 or at_end:
            last = {key: dist.mean_across_ranks((value / summed).item(), stage.ctx) for key, value in sums.items()}
            last.update(stage.figures())
            if timed:
                last[f"{stage.unit}_per_s"] = timed_units / timed
                last["data_share"] = data_time / timed
            skipped = round(dist.mean_across_ranks(float(stage.skipped), stage.ctx) * stage.ctx.world_size)
            if skipped:  # unreadable pictures so far, all processes together
                last["skipped_images"] = skipped
            sums, summed = {}, 0
            run.log(stage.step, **last)
        if stage.step % o.eval_every == 0 or at_end:
            figures = stage.evaluate()
            last.update(figures)
            stage.record_evaluation(figures)
        if stage.step % o.sample_every == 0 or at_end:
            stage.save_samples(stage.step)
        if stage.step % o.save_every == 0 or at_end:
            stage.checkpoint(stage.step)
    bar.close()
    return stage.finish({"steps": stage.step, **last})


class CaptionTokens:
    """A stage's captions to (ids, mask), cut to the model's text length where longer: one line the first time,
    and ``cut``, the count so far, for the stage's summary, instead of a Python warning every batch."""

    def __init__(self, stage: str, tokenizer: TextTokenizer, max_length: int, device: torch.device):
        self.stage, self.tokenizer, self.max_length, self.device = stage, tokenizer, max_length, device
        self.cut = 0

    def __call__(self, texts: Sequence[str], count: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) on the device; ``count=False`` for texts that are not training captions (a probe)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TruncationWarning)
            ids, mask = self.tokenizer.batch(list(texts), max_length=self.max_length)
        cut = 0
        for w in caught:
            if isinstance(w.message, TruncationWarning):
                cut += w.message.count
            else:  # another warning: let it through as it came
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        if not count:
            cut = 0
        if cut and not self.cut and _rank() == 0:
            print(f"{self.stage}: captions longer than the model's {self.max_length} text tokens are cut to that "
                  "length; the stage's summary counts them")
        self.cut += cut
        return ids.to(self.device), mask.to(self.device)


def cosine_schedule(step: int, *, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress_ = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress_))


def progress(total: int, initial: int = 0, desc: str = "") -> tqdm:
    """A tqdm bar over optimizer steps, shown only on rank 0."""
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=_rank() != 0)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _python_state_to_tensor(random.getstate()),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_state_to_tensor(state: tuple) -> torch.Tensor:
    version, internal, gauss = state  # internal: 625 ints (624 words + position)
    assert version == 3 and gauss is None
    return torch.tensor(internal, dtype=torch.int64)


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Run:
    """One stage's view of the run directory: metrics log, sample grids, checkpoints."""

    def __init__(self, out: str | Path, stage: str):
        self.out = Path(out)
        self.stage = stage
        self.state_dir = self.out / "state" / stage
        self.is_main = _rank() == 0
        self._start = time.time()
        self._non_finite = 0  # non-finite losses in a row
        self.precision: str | None = None  # "fp32" or "bf16" once chosen (choose_precision); kept in checkpoints
        # The metrics log is started anew by a stage that does not resume: a killed attempt's lines would
        # otherwise stay in front of the new run's (load_checkpoint keeps those up to its step instead).
        self._log_mode = "w"
        if self.is_main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                probe = self.out / ".write-test"
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                raise UserError(f"cannot write the run directory {self.out}: {e.strerror}; pass a writable --out") from None
            # A run killed mid-write (a checkpoint, an export, the code cache) left temporaries; started again,
            # resumed or not, the stage clears them, so that none outlives the run.
            remove_temporaries(self.out)

    # ---------------------------------------------------------------- metrics and pictures
    def log(self, step: int, **metrics: Any) -> None:
        """Append one JSON line to RUN/metrics/<stage>.jsonl and print it above the progress bar."""
        if not self.is_main:
            return
        record = {"step": step, "time": round(time.time() - self._start, 2)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        path = self.out / "metrics" / f"{self.stage}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, self._log_mode, encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self._log_mode = "a"
        tqdm.write(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))

    def non_finite(self, step: int, loss: float) -> bool:
        """True when ``loss`` is not finite, logged, so that the caller skips the step; a UserError after
        ``MAX_NON_FINITE`` in a row (the last checkpoint stays as it was)."""
        if math.isfinite(loss):
            self._non_finite = 0
            return False
        self._non_finite += 1
        self.log(step, event="non-finite loss, step skipped", loss=loss)
        if self._non_finite >= MAX_NON_FINITE:
            raise UserError(f"{self.stage}: {self._non_finite} non-finite losses in a row at step {step}; "
                            "lower --lr; the last good checkpoint is intact")
        return True

    def save_samples(self, step: int, images: torch.Tensor, nrow: int,
                     captions: Sequence[str] | None = None) -> Path | None:
        """Write a PNG grid of ``images`` (N,3,H,W) in [-1,1] to RUN/samples/<stage>/step-N.png.

        ``captions``, one per column, are written under the bottom row, so that a grid of generated
        pictures says what each was asked to show; the rows must then be full.
        """
        if not self.is_main:
            return None

        labels = None
        if captions is not None:
            if len(captions) != nrow or len(images) % nrow:
                raise ValueError(f"save_samples needs one caption per column ({nrow}) and full rows, got "
                                 f"{len(captions)} captions for {len(images)} images")
            labels = [""] * (len(images) - nrow) + list(captions)
        path = self.out / "samples" / self.stage / f"step-{step:07d}.png"
        grid = image_grid(images.detach().float().cpu(), nrow=nrow, labels=labels)
        atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
        return path

    # ---------------------------------------------------------------- checkpoints
    def has_checkpoint(self) -> bool:
        return (self.state_dir / "latest.json").is_file()

    def record_precision(self, precision: str) -> None:
        """Take ``precision`` ("fp32" or "bf16") as the stage's, and write it to RUN/state/<stage>/precision.json
        at once (atomically), before any checkpoint: the record ``can_resume`` reads."""
        self.precision = precision
        if self.is_main:
            write_json(self.state_dir / PRECISION_RECORD, {"precision": precision})

    def can_resume(self) -> bool:
        """For ``--resume``: True when the stage has a checkpoint to load (``load_checkpoint``). A stage killed
        after choosing its precision but before its first checkpoint has only its precision record: it starts
        again at step 0 in that precision (False), as the killed attempt would have gone on. A stage that never
        got that far is a CheckpointError, as before."""
        if self.has_checkpoint():
            return True
        record = self.state_dir / PRECISION_RECORD
        data = read_json(record, f"{self.stage} checkpoint") if record.is_file() else None
        recorded = data.get("precision") if isinstance(data, dict) else None
        if recorded not in ("fp32", "bf16"):
            raise CheckpointError(f"{self.stage} checkpoint: no checkpoint in {self.state_dir}; start without --resume")
        self.precision = recorded
        if self.is_main:
            print(f"{self.stage}: --resume: stopped before its first checkpoint; starting again at step 0 in "
                  f"{recorded}, the precision it chose")
        return False

    def save_checkpoint(
        self,
        step: int,
        modules: dict[str, torch.nn.Module],
        optimizers: dict[str, Any],
        data_position: int,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Write state/<stage>/step-N/ whole, then point latest.json at it, then prune older ones."""
        if not self.is_main:
            return
        name = f"step-{step:07d}"
        directory = self.state_dir / name
        weights = {
            f"{module_name}.{key}": tensor.detach().to("cpu").clone().contiguous()
            for module_name, module in modules.items()
            for key, tensor in _unwrap(module).state_dict().items()
        }
        atomic_write(directory / "modules.safetensors", lambda tmp: save_file(weights, tmp))
        state = {
            "step": step,
            "data_position": data_position,
            "optimizers": {k: v.state_dict() for k, v in optimizers.items()},
            "rng": _rng_state(),
            "extra": {**(extra or {}), **({"precision": self.precision} if self.precision else {})},
        }
        save_torch(state, directory / "state.pt")
        write_json(self.state_dir / "latest.json", {"step": step, "dir": name})
        for old in self.state_dir.glob("step-*"):
            if old.name != name and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(
        self, modules: dict[str, torch.nn.Module], optimizers: dict[str, Any], device: torch.device | str = "cpu"
    ) -> tuple[int, int, dict[str, Any]]:
        """Restore modules, optimizers and RNG from the last whole checkpoint: (step, data_position, extra)."""
        part = f"{self.stage} checkpoint"
        latest = self.state_dir / "latest.json"
        if not latest.is_file():
            raise CheckpointError(f"{part}: no checkpoint in {self.state_dir}; start without --resume")
        directory = self.state_dir / self._latest_dir(latest, part)
        try:
            weights = load_file(str(directory / "modules.safetensors"))
        except Exception as e:
            raise CheckpointError(f"{part}: {directory} is damaged ({type(e).__name__}); start without --resume") from None
        for module_name, module in modules.items():
            prefix = module_name + "."
            sub = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
            try:
                _unwrap(module).load_state_dict(sub, strict=True)
            except RuntimeError:
                raise CheckpointError(
                    f"{part}: the saved {module_name} does not fit this configuration; "
                    "resume with the options the run started with"
                ) from None
        state = load_torch(directory / "state.pt", part)
        try:
            for name, optimizer in optimizers.items():
                optimizer.load_state_dict(state["optimizers"][name])
            _set_rng_state(state["rng"])
            step, position, extra = int(state["step"]), int(state["data_position"]), dict(state["extra"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"{part}: {directory / 'state.pt'} does not hold this stage's state "
                                  f"({type(e).__name__}: {str(e)[:100]}); start without --resume") from None
        if extra.get("precision") in ("fp32", "bf16"):
            self.precision = extra["precision"]
        if self.is_main:
            self._forget_after(step)
            self._log_mode = "a"
            self.log(step, event="resumed from checkpoint")
        return step, position, extra

    @staticmethod
    def _latest_dir(latest: Path, part: str) -> str:
        """The checkpoint directory ``latest.json`` names: ``step-N`` beside it, never a path out of the run."""
        pointer = read_json(latest, part)
        name = pointer.get("dir") if isinstance(pointer, dict) else None
        if not isinstance(name, str) or CHECKPOINT_NAME.fullmatch(name) is None:
            shown = repr(name)[:80] if isinstance(pointer, dict) else json_kind(pointer)
            raise CheckpointError(f"{part}: {latest} does not name a checkpoint of this run (step-N beside it), but "
                                  f"{shown}; restore it or start without --resume")
        return name

    def _forget_after(self, step: int) -> None:
        """Tidy up after a killed run: drop its metrics past ``step`` (its temporaries went at the stage's start)."""
        path = self.out / "metrics" / f"{self.stage}.jsonl"
        if path.is_file():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):  # a line cut short by the kill
                    continue
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept), encoding="utf-8"))


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP or torch.compile wrapper."""
    module = getattr(module, "module", module)
    return getattr(module, "_orig_mod", module)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else str(value)
    return value


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
