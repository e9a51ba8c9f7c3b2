"""``python -m train all``: tokenizer, VQGAN, code cache + seq2seq, and the CLIP-style scorer, one after another.

The preset is the training plan: every stage's model size (its --model-size) and steps for the machine.
``cpu`` trains the shipped demo runs on a 2-core laptop (about 47 minutes on ``shapes``: 40 measured with
the scorer's earlier 600 steps, which took 4.8; 46 measured on ``openmoji`` in bf16; real pictures start the
VQGAN's GAN later, see ``REAL_PICTURES``), ``gpu`` is for one CUDA device, ``tiny`` is a smoke test that checks
every stage runs (a few steps each: its pictures are noise). ``auto`` picks
``gpu`` when CUDA is visible and ``cpu`` otherwise. Each stage gets its own command line built from the
preset, so ``python -m train <stage> --help`` documents every value used here, and any stage can be rerun
alone with the same options. With --resume, finished stages are skipped and a killed one continues. A run
that RUN/all.json lists as finished in every stage asked for is not trained over without --overwrite.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import torch

from checkpoint import RUN_RECORD, STAGE_ALIASES, part_dir, read_run_record, stage_name, write_json
from cli import UserError
from train.loop import PRECISION_RECORD, SEED_HELP, add_data_arguments, seed_number

# Per-stage options for each preset, as command-line flags of that stage.
PRESETS: dict[str, dict[str, list[str]]] = {
    "tiny": {
        "tokenizer": ["--vocab-size", "512", "--max-texts", "2000"],
        "vqgan": ["--model-size", "tiny", "--steps", "6", "--batch-size", "8", "--warmup", "2", "--disc-start", "3", "--save-every", "3", "--sample-every", "6",
                  "--eval-every", "6", "--log-every", "3"],
        "seq2seq": ["--model-size", "tiny", "--steps", "6", "--batch-size", "8", "--cache-examples", "64",
                    "--heldout-examples", "16", "--save-every", "3", "--sample-every", "6", "--eval-every", "6",
                    "--log-every", "3", "--warmup", "2"],
        "scorer": ["--model-size", "tiny", "--steps", "6", "--batch-size", "8", "--save-every", "3", "--log-every", "3"],
    },
    "cpu": {
        "tokenizer": ["--vocab-size", "1024"],
        "vqgan": ["--model-size", "small", "--steps", "3500", "--batch-size", "32", "--disc-start", "2500"],
        "seq2seq": ["--model-size", "small", "--steps", "3500", "--batch-size", "64", "--cache-examples", "40000",
                    "--compile", "--ema", "0.999"],
        # Causal text attention read last, scene negatives, 1 500 steps: picks of 16 on `shapes` held-out
        # prompts rose from 91.4% to 95.3% (position) and 68.8% to 81.2% (relation), none fell (BENCHMARKS.md).
        "scorer": ["--model-size", "small", "--steps", "1500", "--batch-size", "128", "--eval-every", "250",
                   "--hard-negatives", "auto", "--text-causal", "--text-pool", "last"],
    },
    "gpu": {
        "tokenizer": ["--vocab-size", "1024"],
        "vqgan": ["--model-size", "base", "--steps", "20000", "--batch-size", "64", "--workers", "8"],
        "seq2seq": ["--model-size", "base", "--steps", "20000", "--batch-size", "256", "--cache-examples", "200000",
                    "--workers", "8"],
        "scorer": ["--model-size", "small", "--steps", "5000", "--batch-size", "256", "--workers", "8"],
    },
}
# Where --data is not `shapes` (real pictures: openmoji, a folder, files), these stages' flags replace the
# preset's, measured on openmoji (BENCHMARKS.md):
# - vqgan: a squared-error term beside L1 (+0.3 dB held-out PSNR at step 600), and the GAN only in the last
#   300 steps, since it costs held-out PSNR while it sharpens; 3 500 steps hold the 20-minute budget on a CPU
#   that multiplies bf16 in hardware (AMX or AVX512-BF16; 1 700 steps did in fp32 on one without). The
#   `medium` VQGAN (or `small` with `medium`'s finer decoder) draws more per step but costs 1.6-1.9x a step,
#   a wash in a fixed time. `--betas 0.9 0.99 --lr 2e-3` gave +0.65 dB at step 600 and +0.48 dB in the whole
#   plan, but that run's seq2seq stage, on the finer codes, came out below the shipped run's in caption gap and
#   retrieval (0.51 against 0.63 bits, R@1 17.7% against 21.6%), so the plan keeps taming's betas.
# - seq2seq: 2 000 steps, since held-out loss stops falling after about 1 750 of 3 500 (the run keeps its
#   best held-out weights either way). 200 more on the pictures as they are (--augment-until) helped as a
#   continuation kept at its last step, but trained in one run of 2 200 the best held-out weights came
#   before them (BENCHMARKS.md), so they are not part of the plan.
# - scorer: the bidirectional text tower for 600 steps, as trained on openmoji (the causal 1 500-step recipe of
#   `shapes` is not measured there), with word-swap hard negatives (R@5 +5 points, pairwise +9 on openmoji).
def _changed(flags: list[str], *pairs: str) -> list[str]:
    """``flags`` with each ``--name value`` of ``pairs`` in place of that flag's value, or after them if absent."""
    flags = list(flags)
    for name, value in zip(pairs[::2], pairs[1::2]):
        if name in flags:
            flags[flags.index(name) + 1] = value
        else:
            flags += [name, value]
    return flags


REAL_PICTURES: dict[str, dict[str, list[str]]] = {
    "cpu": {
        "vqgan": _changed(PRESETS["cpu"]["vqgan"], "--disc-start", "3200", "--mse-weight", "5"),
        "seq2seq": _changed(PRESETS["cpu"]["seq2seq"], "--steps", "2000"),
        "scorer": ["--model-size", "small", "--steps", "600", "--batch-size", "128", "--eval-every", "200",
                   "--hard-negatives", "words"],
    },
}
STAGE_ORDER = ("tokenizer", "vqgan", "seq2seq", "scorer")
SHARED = ("data", "size", "seed", "image_column", "text_column", "heldout_fraction", "augment", "balance",
          "max_pixels", "follow_symlinks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="shapes", help="shapes | a folder | *.jsonl/*.parquet/*.csv | *.tar | a hub name")
    parser.add_argument("--out", required=True, help="the run directory")
    parser.add_argument("--preset", default="auto", type=_plan, metavar="{auto,tiny,cpu,gpu}",
                        help="the training plan, every stage's model size and steps: cpu (a 2-core machine: about 47 "
                             "minutes on shapes, 46 measured on openmoji in bf16), gpu (one CUDA device), "
                             "tiny (a smoke test: 6 steps a stage, its pictures are noise); auto (default): gpu "
                             "when CUDA is visible, else cpu. A stage's own model size is its --model-size")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=seed_number, default=0, help=SEED_HELP)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--resume", action="store_true", help="skip finished stages, continue a killed one")
    parser.add_argument("--overwrite", action="store_true",
                        help="train again into an --out whose every stage asked for is finished")
    parser.add_argument("--image-column", default=None)
    parser.add_argument("--text-column", default=None)
    parser.add_argument("--only", nargs="+", type=stage_name, choices=STAGE_ORDER, default=None,
                        help="run just these stages (" + ", ".join(f"{old} is {new}" for old, new in STAGE_ALIASES.items())
                             + ", its name before)")
    add_data_arguments(parser)


def _plan(value: str) -> str:
    """``--preset``'s value; a stage's model size given here gets a line saying where it belongs."""
    if value in ("auto", *PRESETS):
        return value
    if value in ("small", "medium", "base", "large"):
        raise argparse.ArgumentTypeError(f"{value} is a model size, each stage's --model-size (python -m train "
                                         "<stage> --help); train all's --preset is the plan: auto, tiny, cpu or gpu")
    raise argparse.ArgumentTypeError(f"choose auto, tiny, cpu or gpu, not {value!r}")


def stage_argv(stage: str, preset: str, args: argparse.Namespace) -> list[str]:
    """The command line ``python -m train <stage>`` would get for this preset and these shared options."""
    argv = ["--out", str(args.out)]
    for name in SHARED:
        value = getattr(args, name)
        if value is True:  # a flag
            argv.append(f"--{name.replace('_', '-')}")
        elif value not in (None, False) and not (stage == "tokenizer" and name == "size"):
            argv += [f"--{name.replace('_', '-')}", str(value)]
    if stage != "tokenizer":
        argv += ["--device", args.device] + (["--resume"] if args.resume and _has_state(args.out, stage) else [])
    return argv + preset_flags(preset, stage, args.data)


def preset_flags(preset: str, stage: str, data: str) -> list[str]:
    """The preset's flags for ``stage``: for real pictures (any ``data`` but shapes), REAL_PICTURES' where given."""
    if data != "shapes" and stage in REAL_PICTURES.get(preset, {}):
        return REAL_PICTURES[preset][stage]
    return PRESETS[preset][stage]


def _has_state(out: str, stage: str) -> bool:
    """Whether the stage has something to --resume from: a checkpoint, or the precision it chose before one."""
    state = part_dir(Path(out) / "state", stage)
    return (state / "latest.json").is_file() or (state / PRECISION_RECORD).is_file()


def main(args: argparse.Namespace) -> None:
    preset = args.preset
    if preset == "auto":
        preset = "gpu" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    stages = args.only or STAGE_ORDER
    record_path = Path(args.out) / RUN_RECORD
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one")
    record = read_run_record(args.out)
    if set(stages) <= set(record["finished"]) and not args.overwrite:
        if args.resume:
            print(f"all: already complete -> {args.out}")
            return
        done = ", ".join(stage for stage in STAGE_ORDER if stage in record["finished"])
        raise UserError(f"--out {args.out} holds a finished run ({done}); pass --resume to keep it or --overwrite "
                        "to train it again")
    if not args.resume:  # the stages asked for start again; others (--only) stay finished
        record = {"finished": [stage for stage in record["finished"] if stage not in stages],
                  "seconds": {k: v for k, v in record["seconds"].items() if k not in stages}}
    record["preset"] = preset
    record.update({name: getattr(args, name) for name in SHARED})  # the data and split, for bench to read back
    for stage in stages:
        if args.resume and stage in record["finished"]:
            print(f"all: {stage} already finished, skipped")
            continue
        module = importlib.import_module(f"train.stage_{stage}")
        parser = argparse.ArgumentParser(prog=f"python -m train {stage}")
        module.add_arguments(parser)
        argv = stage_argv(stage, preset, args)
        print(f"all: python -m train {stage} {' '.join(argv)}")
        try:
            stage_args = parser.parse_args(argv)
        except SystemExit:
            raise UserError(f"the {preset} preset gives {stage} options it does not take") from None
        start = time.time()
        module.main(stage_args)
        record["finished"].append(stage)
        record.setdefault("seconds", {})[stage] = round(time.time() - start, 1)
        write_json(record_path, record)
    print(f"all: done in {sum(record.get('seconds', {}).values()):.0f} s -> {args.out}")
