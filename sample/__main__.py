"""``python -m sample "a red circle above a blue square"``: prompts to PNG files.

Draws --n candidates per prompt, keeps the best --keep by the CLIP-style scorer, and writes the kept
pictures (with the prompt, seed, settings and score in PNG text chunks), a grid of all candidates with
the kept ones marked, and samples.jsonl, under --out. Bad input ends with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from checkpoint import ArgumentParser, UserError, add_threads_argument, run_command, set_threads


def build_parser() -> argparse.ArgumentParser:
    from sample.pipeline import SamplingSettings

    parser = ArgumentParser(prog="python -m sample", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", help="what to draw")
    parser.add_argument("--prompts-file", help="one prompt a line, generated in one batch")
    parser.add_argument("--checkpoint", help="a run directory, or a shipped run's name: shapes (the default) or "
                                             "openmoji")
    parser.add_argument("--n", type=int, default=16, help="candidates per prompt (default 16)")
    parser.add_argument("--keep", type=int, default=None,
                        help="pictures kept per prompt, best by the scorer (default: 4, or --n if fewer)")
    defaults = SamplingSettings
    parser.add_argument("--top-k", type=int, default=defaults.top_k,
                        help=f"sample among the K likeliest tokens (default {defaults.top_k or 'off'})")
    parser.add_argument("--top-p", type=float, default=defaults.top_p,
                        help=f"sample among the smallest set with mass P (default {defaults.top_p or 'off'})")
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help=f"divides the logits (default {defaults.temperature:g})")
    parser.add_argument("--cfg", type=float, default=defaults.cfg,
                        help=f"classifier-free guidance scale, 1 = off (default {defaults.cfg:g})")
    parser.add_argument("--seed", type=int, default=0, help="candidate j has seed SEED+j")
    parser.add_argument("--out", default="samples", help="output directory (default ./samples)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--no-rerank", action="store_true", help="keep the first candidates, no scorer")
    parser.add_argument("--reranker", help="a local directory holding a transformers CLIPModel to rerank with")
    add_threads_argument(parser)
    return parser


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = [args.prompt] if args.prompt is not None else []
    if args.prompts_file:
        path = Path(args.prompts_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompts-file {path}: {getattr(e, 'strerror', None) or e}") from None
        prompts += [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise UserError(f"--prompts-file {path} has no prompts; write one prompt a line")
    if not prompts:
        raise UserError('no prompt given; run e.g. python -m sample "a large red circle"')
    return prompts


def run(args: argparse.Namespace) -> list[dict]:
    from sample.output import prepare_out_dir, write_prompt_results
    from sample.pipeline import Pipeline, SamplingSettings

    set_threads(args.threads)
    prompts = read_prompts(args)
    keep = args.keep if args.keep is not None else min(4, max(args.n, 1))
    settings = SamplingSettings(n=args.n, keep=keep, top_k=args.top_k, top_p=args.top_p,
                                temperature=args.temperature, cfg=args.cfg, seed=args.seed,
                                rerank=not args.no_rerank)
    out = prepare_out_dir(args.out)
    pipeline = Pipeline(args.checkpoint, device=args.device, rerank=not args.no_rerank, reranker=args.reranker)
    records = []
    for candidates in pipeline(prompts, settings, progress=True):
        written = write_prompt_results(out, candidates)
        records += written
        for record in written:
            score = "" if record["score"] is None else f"  score {record['score']:.3f}"
            print(f"{out / record['file']}{score}")
    return records


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, *rest: f"warning: {message}\n"
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
