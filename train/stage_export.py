"""``python -m train export --data shapes --n 100 --out DIR``: examples of a ``--data`` source written as an
imagefolder (PNG files + metadata.jsonl), the format a user can bring as --data.

For ``shapes`` each row holds ``file_name``, ``text`` and the ``scene``; for any other source (``openmoji``,
a folder, files) ``file_name``, ``text`` (every caption of the row: a list where it has several) and
``group`` where the source has groups, so the exported folder splits as the source does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from checkpoint import atomic_write
from cli import UserError
from data.images import to_pil
from data.shapes import export_imagefolder
from data.sources import DEFAULT_HELDOUT_FRACTION, SPLITS, open_dataset
from train.loop import SEED_HELP, add_data_arguments, seed_number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="shapes", help="shapes | openmoji | a folder | files (default shapes)")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--n", type=int, default=100, help="how many examples (a table source: at most all its rows)")
    parser.add_argument("--split", default="train", choices=["train", "heldout"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=seed_number, default=0, help=SEED_HELP)
    add_data_arguments(parser)


def export_table(data: str, out: Path, n: int, split: str, size: int, seed: int,
                 heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> int:
    """Write the first ``n`` readable rows of ``split`` of a table source; returns how many were written."""
    assert split in SPLITS
    dataset = open_dataset(data, size, split=split, seed=seed, heldout_fraction=heldout_fraction)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(min(n, len(dataset))):
        item = dataset[index]
        if item is None:
            continue
        file_name = f"{index:06d}.png"
        picture = to_pil(item["image"])
        atomic_write(out / file_name, lambda tmp: picture.save(tmp, format="PNG"))
        cell = dataset.captions[index][dataset.decoder.text_column]
        row = {"file_name": file_name, "text": cell if isinstance(cell, list) else item["text"]}
        if dataset.groups is not None:
            row["group"] = dataset.groups[index]
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write(out / "metadata.jsonl", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8"))
    return len(lines)


def main(args: argparse.Namespace) -> None:
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.size < 16:
        raise UserError(f"--size must be >= 16, got {args.size}")
    try:
        if args.data == "shapes":
            out, written = export_imagefolder(args.out, args.n, seed=args.seed, split=args.split, size=args.size), args.n
        else:
            out = Path(args.out)
            written = export_table(args.data, out, args.n, args.split, args.size, args.seed, args.heldout_fraction)
    except OSError as e:
        raise UserError(f"cannot write {args.out}: {e.strerror}; pass a writable --out") from None
    print(f"export: {written} {args.split} examples -> {out} (use it with --data {out})")
