"""``python -m bench.figure``: the README's picture, real output of a run for held-out prompts.

One row per prompt, ``--per-kind`` prompts of each kind of scene from the held-out split (colour-shape
pairs and relation triples training never showed): the prompt, then the ``--keep`` best of ``--n``
candidates as ``python -m sample`` keeps them (``--shortlist``), each marked with whether the oracle finds
every stated attribute in it (a green bar) or not (red).

    python -m bench.figure --checkpoint sample/demo_run --out docs/demo.png
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

from cli import ArgumentParser, run_command
from data.oracle import check
from data.shapes import KINDS, evaluation_prompts
from sample import generate_images
from sample.pipeline import SamplingSettings


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m bench.figure", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a run directory (default: the shipped demo run)")
    parser.add_argument("--out", default="docs/demo.png")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--keep", type=int, default=4)
    parser.add_argument("--scale", type=int, default=2, help="pixel repeat of each picture")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shortlist", type=int, default=SamplingSettings.shortlist,
                        help="the scorer's best K re-ordered by the decoder's likelihood, as python -m sample's "
                             f"--shortlist (default {SamplingSettings.shortlist}; 1: the scorer alone)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--per-kind", type=int, default=2, help="prompts of each kind of scene")
    return parser


def figure(rows: list[tuple[str, list[tuple[Image.Image, bool]]]], scale: int, label_width: int = 400) -> Image.Image:
    side = rows[0][1][0][0].width * scale
    gap, bar = 6, 4
    width = label_width + len(rows[0][1]) * (side + gap)
    height = len(rows) * (side + bar + gap) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (prompt, pictures) in enumerate(rows):
        top = gap + r * (side + bar + gap)
        draw.text((8, top + side // 2 - 6), prompt, fill="black")
        for c, (picture, ok) in enumerate(pictures):
            left = label_width + c * (side + gap)
            canvas.paste(picture.resize((side, side), Image.NEAREST), (left, top))
            draw.rectangle([left, top + side, left + side - 1, top + side + bar - 1], fill="#2a2" if ok else "#d22")
    return canvas


def main(argv: list[str] | None = None) -> int:


    args = build_parser().parse_args(argv)
    chosen = [p for kind in KINDS for p in evaluation_prompts(kind, args.per_kind, seed=args.seed)]
    out = Path(args.out)

    def draw() -> None:
        kept = generate_images([text for text, _ in chosen], checkpoint=args.checkpoint, n=args.n, keep=args.keep,
                               seed=args.seed, device=args.device, shortlist=args.shortlist)
        rows = [(text, [(p.image, check(scene, p.image)) for p in pictures])
                for (text, scene), pictures in zip(chosen, kept)]
        out.parent.mkdir(parents=True, exist_ok=True)
        figure(rows, args.scale).save(out)
        print(f"figure: {len(rows)} prompts x {args.keep} kept of {args.n} -> {out}")

    return run_command(draw)

if __name__ == "__main__":
    sys.exit(main())
