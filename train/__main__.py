"""``python -m train <stage>``: tokenizer, vqgan, seq2seq, scorer, or all of them in order; candidates, export, pack.

Each stage lives in ``train/stage_<name>.py`` with ``add_arguments(parser)`` and ``main(args)``.
Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from checkpoint import STAGE_ALIASES, stage_name
from cli import ArgumentParser, add_threads_argument, run_command, set_threads

STAGES = {
    "tokenizer": "train the sentencepiece text tokenizer -> RUN/tokenizer.model",
    "vqgan": "train the VQGAN (stage 1) -> RUN/vqgan/",
    "seq2seq": "train the text-to-image-token transformer (stage 2) -> RUN/seq2seq/",
    "scorer": "train the CLIP-style reranking scorer -> RUN/scorer/",
    "candidates": "the decoder's candidates for training prompts, judged by the shapes oracle -> DIR, for "
                  "scorer --rank-candidates",
    "all": "every stage, one after another, sized for this machine",
    "export": "write N examples of a --data source as an imagefolder (PNG + metadata.jsonl)",
    "pack": "copy the parts sampling needs, float weights in float16, into a small run directory",
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="{" + ",".join(STAGES) + "}")
    for name, help_text in STAGES.items():
        aliases = [old for old, new in STAGE_ALIASES.items() if new == name]  # names stages had before
        stage_parser = sub.add_parser(name, help=help_text, description=help_text, aliases=aliases)
        importlib.import_module(f"train.stage_{name}").add_arguments(stage_parser)
        add_threads_argument(stage_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        set_threads(args.threads)
        importlib.import_module(f"train.stage_{stage_name(args.stage)}").main(args)

    try:
        return run_command(body)
    except KeyboardInterrupt:
        print("interrupted: resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
