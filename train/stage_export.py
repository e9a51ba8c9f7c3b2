"""``python -m train export --data shapes --n 100 --out DIR``: examples of the `shapes` set written as an
imagefolder (PNG files + metadata.jsonl with file_name, text and the scene), the format a user can bring
as --data."""

from __future__ import annotations

import argparse

from checkpoint import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="shapes", help="only `shapes` can be exported")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--n", type=int, default=100, help="how many examples")
    parser.add_argument("--split", default="train", choices=["train", "heldout"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> None:
    from train.shapes import export_imagefolder

    if args.data != "shapes":
        raise UserError(f"export writes the built-in set only; pass --data shapes, not {args.data}")
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.size < 16:
        raise UserError(f"--size must be >= 16, got {args.size}")
    try:
        out = export_imagefolder(args.out, args.n, seed=args.seed, split=args.split, size=args.size)
    except OSError as e:
        raise UserError(f"cannot write {args.out}: {e.strerror}; pass a writable --out") from None
    print(f"export: {args.n} {args.split} examples -> {out} (use it with --data {out})")
