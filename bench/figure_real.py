"""``python -m bench.figure_real``: a run's pictures for captions of any data set, beside the real ones.

One row per caption: the caption, which split it comes from, the data set's own picture for it, then the
``--keep`` best of ``--n`` candidates as ``python -m sample`` keeps them (``--shortlist``). Training
captions are named with ``--train`` (each must be a caption of the training split, so the figure shows what
the run learned); held-out rows take the first ``--heldout`` distinct captions of the held-out split, one
per group of variants where the data has groups (pictures the run never saw, so the row shows how far it
generalises).

    python -m bench.figure_real --checkpoint openmoji --out docs/openmoji.png \\
        --train "red apple" "cat face" --heldout 4
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

from checkpoint import read_run_record
from cli import ArgumentParser, UserError, add_threads_argument, positive_int, run_command, set_threads
from data.images import to_pil
from data.sources import DEFAULT_HELDOUT_FRACTION, open_dataset
from sample import generate_images
from sample.pipeline import SamplingSettings, resolve_run

__all__ = ["build_parser", "main"]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m bench.figure_real", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="openmoji", help="a run directory or a shipped run's name")
    parser.add_argument("--data", default=None, help="the run's data (default: RUN/all.json's)")
    parser.add_argument("--out", default="docs/openmoji.png")
    parser.add_argument("--train", nargs="*", default=[], help="training captions to draw, each a row")
    parser.add_argument("--heldout", type=int, default=4, help="held-out captions to draw")
    parser.add_argument("--n", type=positive_int, default=16)
    parser.add_argument("--keep", type=positive_int, default=4)
    parser.add_argument("--scale", type=positive_int, default=2, help="pixel repeat of each picture")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shortlist", type=int, default=SamplingSettings.shortlist,
                        help="the scorer's best K re-ordered by the decoder's likelihood, as python -m sample's "
                             f"--shortlist (default {SamplingSettings.shortlist}; 1: the scorer alone)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_threads_argument(parser)
    return parser


def _record(run: Path) -> dict:
    return read_run_record(run)


def _pictures_by_caption(dataset) -> dict[str, int]:
    """The first row of each caption of a table dataset (rows whose caption is not text have none)."""
    rows: dict[str, int] = {}
    for index in range(len(dataset)):
        caption = dataset.caption(index)
        if caption is not None:
            rows.setdefault(caption, index)
    return rows


def _heldout_rows(dataset, count: int) -> list[int]:
    """The first ``count`` held-out rows, one per group where the table has a ``group`` column."""
    seen, rows = set(), []
    for i in range(len(dataset)):
        if len(rows) >= count:
            break
        key = dataset.groups[i] if dataset.groups is not None else i
        if key not in seen:
            seen.add(key)
            rows.append(i)
    return rows


def figure(rows: list[tuple[str, str, Image.Image, list[Image.Image]]], scale: int,
           label_width: int = 330) -> Image.Image:
    """Caption and split on the left, then the real picture, a gap, and the kept pictures."""
    side = rows[0][2].width * scale
    gap = 6
    width = label_width + (len(rows[0][3]) + 1) * (side + gap) + 3 * gap
    height = len(rows) * (side + gap) + gap + 16
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((label_width, 2), "real", fill="black")
    draw.text((label_width + side + 4 * gap, 2), "generated: the pictures python -m sample keeps", fill="black")
    for r, (caption, split, real, pictures) in enumerate(rows):
        top = 16 + gap + r * (side + gap)
        draw.text((8, top + side // 2 - 12), caption[:48], fill="black")
        draw.text((8, top + side // 2 + 2), f"({split} caption)", fill="#666")
        canvas.paste(real.resize((side, side), Image.NEAREST), (label_width, top))
        for c, picture in enumerate(pictures):
            left = label_width + (c + 1) * (side + gap) + 3 * gap
            canvas.paste(picture.resize((side, side), Image.NEAREST), (left, top))
    return canvas


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def draw() -> None:
        set_threads(args.threads)
        run = resolve_run(args.checkpoint)
        record = _record(run)
        data = args.data or record.get("data")
        if not data:
            raise UserError(f"{run}/all.json does not say what the run was trained on; pass --data")
        size = int(record.get("size", 64))
        options = dict(seed=int(record.get("seed", 0)),
                       heldout_fraction=float(record.get("heldout_fraction", DEFAULT_HELDOUT_FRACTION)))
        train, heldout = open_dataset(data, size, **options), open_dataset(data, size, split="heldout", **options)
        by_caption = _pictures_by_caption(train)
        missing = [c for c in args.train if c not in by_caption]
        if missing:
            raise UserError(f"not captions of the training split: {', '.join(missing)}; pass captions as the data "
                            "writes them (its first caption per picture)")
        chosen = [(c, "training", train[by_caption[c]]["image"]) for c in args.train]
        for i in _heldout_rows(heldout, args.heldout):
            item = heldout[i]
            chosen.append((item["text"], "held-out", item["image"]))
        kept = generate_images([c for c, _, _ in chosen], checkpoint=run, n=args.n, keep=args.keep, seed=args.seed,
                               device=args.device, shortlist=args.shortlist)
        rows = [(c, split, to_pil(image), [p.image for p in pictures])
                for (c, split, image), pictures in zip(chosen, kept)]
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        figure(rows, args.scale).save(out)
        print(f"figure: {len(rows)} captions x {args.keep} kept of {args.n} -> {out}")

    return run_command(draw)


if __name__ == "__main__":
    sys.exit(main())
