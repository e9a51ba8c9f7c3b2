"""``python -m train candidates``: the decoder's own candidates for training prompts, judged by the `shapes`
oracle, for a scorer to be tuned on (``python -m train scorer --rank-candidates DIR``).

For each kind of scene, ``--prompts KIND=N`` prompts of the training split (data.shapes.training_prompts: the
training colour-shape pairs and relation triples, a stream of their own, never a held-out prompt) are drawn
``--candidates`` times each with `python -m sample`'s defaults, and the oracle marks each picture right or
wrong. A scorer trained to put a prompt's right candidates above its wrong ones learns the decoder's mistakes
(melted shapes, a missing object, a wrong size) that clean renders never show it (BENCHMARKS.md, issue 20).

DIR/<kind>/ holds candidates.json (settings, prompts, verdicts) and candidates.safetensors (the pictures and
their tokens), the format of ``bench.structure --cache`` (sample/candidates.py), each kind written atomically
when it is done; a command run again with the same settings keeps the kinds already drawn and draws the rest.
`shapes` only: the oracle judges nothing else.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from checkpoint import read_run_record
from cli import UserError
from data.shapes import KINDS
from sample.candidates import (candidate_settings, draw_candidates, extend_candidates, load_candidates,
                               save_candidates)
from sample.pipeline import resolve_run

DEFAULT_PROMPTS = ("single=100", "position=150", "relation=600", "count=350")  # 18 min, one thread, demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="the `shapes` run whose decoder draws (default: the shapes demo)")
    parser.add_argument("--out", required=True, help="the folder the judged candidates go to")
    parser.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS), metavar="KIND=N",
                        help=f"training prompts per kind of scene ({', '.join(KINDS)}); default "
                             f"{' '.join(DEFAULT_PROMPTS)}")
    parser.add_argument("--candidates", type=int, default=16, help="pictures drawn per prompt (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="which training prompts, and the candidates' seeds")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def parse_prompts(items: list[str]) -> dict[str, int]:
    """``KIND=N`` items to {kind: N}, kinds in the order given; a UserError names a bad one."""
    counts: dict[str, int] = {}
    for item in items:
        kind, _, number = item.partition("=")
        if kind not in KINDS or not number.isdigit() or int(number) < 1 or kind in counts:
            raise UserError(f"--prompts takes KIND=N once per kind, KIND one of {', '.join(KINDS)} and N >= 1, "
                            f"got {item!r}")
        counts[kind] = int(number)
    return counts


def main(args: argparse.Namespace) -> None:
    counts = parse_prompts(args.prompts)
    if not 2 <= args.candidates <= 64:
        raise UserError(f"--candidates must be from 2 to 64 (right and wrong ones of a prompt are compared), got "
                        f"{args.candidates}")
    run = resolve_run(args.checkpoint)
    data = read_run_record(run, strict=True).get("data", "shapes")
    if data != "shapes":
        raise UserError(f"--checkpoint {run} was trained on --data {data}; the oracle that judges candidates knows "
                        "`shapes` scenes only")
    out = Path(args.out)
    began = time.perf_counter()
    for kind, count in counts.items():
        folder = out / kind
        record = load_candidates(folder, candidate_settings(run, count, args.candidates, args.seed, [kind],
                                                            split="train"))
        have = 0 if record is None else record["settings"]["prompts_per_kind"]
        if have >= count:
            print(f"candidates: {kind}: {count} prompts already in {folder}")
            continue

        def progress(kind: str, done: int, total: int) -> None:
            if done % 64 < 8 or done == total:
                print(f"candidates: {kind} {done}/{total} prompts ({time.perf_counter() - began:.0f} s)",
                      file=sys.stderr)

        drawn = draw_candidates(run, prompts_per_kind=count, candidates=args.candidates, seed=args.seed,
                                device=args.device, kinds=[kind], first=have, split="train", progress=progress)
        record = drawn if record is None else extend_candidates(record, drawn)
        save_candidates(record, folder)
        right = sum(map(sum, record["kinds"][kind]["right"])) / (count * args.candidates)
        print(f"candidates: {kind}: {count} prompts x {args.candidates}, {right:.1%} right -> {folder}")
