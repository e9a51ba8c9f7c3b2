"""``python -m train pack --run RUN --out DIR``: the parts sampling needs, small enough to ship.

Copies RUN/tokenizer.model and, for vqgan/, seq2seq/ and scorer/, config.json and the weights with every
floating-point tensor stored in --dtype (float16 by default: half the bytes, and loading casts back to
the model's float32). Integer buffers are kept as they are. Training state, the code cache, metrics and
sample grids stay behind; all.json comes along as the record of how the parts were trained, with the
last held-out figures the stages logged under "final", and vocabulary.json and scorer/score_range.json, what
sampling's out-of-domain warnings compare a prompt and its best score with.
This is how the shipped demo run (sample/demo_run) was made from a `python -m train all` run.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from checkpoint import CheckpointError, atomic_write, part_dir, read_run_record, write_json
from cli import UserError

PARTS = ("vqgan", "seq2seq", "scorer")
RECORDS = ("vocabulary.json", "scorer/score_range.json")  # optional: runs before them have neither
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a run directory made by `python -m train all`")
    parser.add_argument("--out", required=True, help="the directory to write (a run directory sampling can use)")
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES), help="storage type of float weights")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the weights of an --out that already holds a run")


def pack_weights(source: Path, target: Path, dtype: torch.dtype) -> int:
    """Rewrite the safetensors file ``source`` at ``target`` with float tensors in ``dtype``; returns bytes."""

    try:
        state = load_file(str(source))
        with safe_open(str(source), framework="pt") as f:
            metadata = {**(f.metadata() or {}), "format": "pt"}  # what the stage recorded (step, tokenizer digest)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"pack: {source} is damaged or truncated ({e}); retrain that stage") from None
    packed = {}
    for name, tensor in state.items():
        if tensor.is_floating_point():
            converted = tensor.to(dtype)
            if not torch.isfinite(converted).all():
                raise UserError(f"pack: {name} of {source} does not fit {dtype} (values overflow); use --dtype bfloat16")
            tensor = converted
        packed[name] = tensor.contiguous()
    atomic_write(target, lambda tmp: save_file(packed, tmp, metadata=metadata))
    return target.stat().st_size


def _record(run: Path) -> dict:
    """The run's all.json (how the parts were trained) plus the last held-out figures its stages logged."""
    record = read_run_record(run)
    final = {}
    for stage in ("vqgan", "seq2seq", "scorer", "clip"):
        path = run / "metrics" / f"{stage}.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    final.update({k: v for k, v in json.loads(line).items() if k.startswith("heldout_")})
                except ValueError:
                    continue
    return {**record, "final": final}


def main(args: argparse.Namespace) -> None:
    run, out = Path(args.run), Path(args.out)
    sources = {part: part_dir(run, part) for part in PARTS}  # an older run's scorer is in RUN/clip/
    missing = [str(p.relative_to(run)) for p in (run / "tokenizer.model", *(sources[part] / "model.safetensors" for part in PARTS),
               *(sources[part] / "config.json" for part in PARTS)) if not p.is_file()]
    if missing:
        raise UserError(f"pack: {run} lacks {', '.join(missing)}; train those stages first (python -m train all)")
    if out.resolve() == run.resolve():
        raise UserError("pack: --out must differ from --run")
    held = [p for p in ("tokenizer.model", *(f"{part}/model.safetensors" for part in PARTS)) if (out / p).exists()]
    if held and not args.overwrite:
        raise UserError(f"pack: --out {out} already holds a run ({', '.join(held)}); pass --overwrite to replace it, "
                        "or another --out")
    try:
        total = 0
        for part in PARTS:
            (out / part).mkdir(parents=True, exist_ok=True)
            total += pack_weights(sources[part] / "model.safetensors", out / part / "model.safetensors",
                                  DTYPES[args.dtype])
            atomic_write(out / part / "config.json",
                         lambda tmp, part=part: shutil.copyfile(sources[part] / "config.json", tmp))
        atomic_write(out / "tokenizer.model", lambda tmp: shutil.copyfile(run / "tokenizer.model", tmp))
        write_json(out / "all.json", _record(run))
        total += sum((out / name).stat().st_size for name in ("tokenizer.model", "all.json"))
        for name in RECORDS:  # what sampling's out-of-domain warnings read, where the run wrote it
            source = part_dir(run, Path(name).parent.name) / Path(name).name if "/" in name else run / name
            if source.is_file():
                atomic_write(out / name, lambda tmp, source=source: shutil.copyfile(source, tmp))
                total += (out / name).stat().st_size
    except OSError as e:
        raise UserError(f"pack: cannot write {out}: {e.strerror}; pass a writable --out") from None
    print(f"pack: {run} -> {out}, {total / 1e6:.1f} MB ({args.dtype} weights)")
