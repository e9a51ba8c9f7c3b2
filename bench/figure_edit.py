"""``python -m bench.figure_edit``: the README's edit figure, real output of a run on held-out `shapes` scenes.

One row per edit kind: completion (the top half of a single-object scene kept), inpainting (the second
object's half of a relation scene erased), a wide canvas, and the previews of one decoding. Each row shows
the input, the mask (white = redrawn) and the pictures kept (or the preview frames).

    python -m bench.figure_edit --checkpoint sample/demo_run --out docs/edit.png
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from bench.edit import completion_cases, inpainting_cases
from cli import ArgumentParser, add_threads_argument, run_command, set_threads
from data.shapes import evaluation_prompts, render
from sample.pipeline import Pipeline, SamplingSettings

__all__ = ["edit_rows", "compose"]

LABEL_WIDTH = 300
LABEL_CHARS = 46  # of PIL's default font, about 6 pixels each
GAP = 6


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m bench.figure_edit", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a `shapes` run directory (default: the shipped demo run)")
    parser.add_argument("--out", default="docs/edit.png")
    parser.add_argument("--n", type=int, default=16, help="candidates per row")
    parser.add_argument("--keep", type=int, default=4, help="pictures kept per row")
    parser.add_argument("--scale", type=int, default=2, help="pixel repeat of each picture")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_threads_argument(parser)
    return parser


def _mask_picture(edit) -> Image.Image:
    return Image.fromarray(edit.redraw_pixels.astype("uint8") * 255).convert("RGB")


def edit_rows(pipeline, n: int, keep: int, seed: int) -> list[tuple[str, list[tuple[str, Image.Image]]]]:
    """(label, [(column title, picture), ...]) per edit kind, from ``pipeline``'s run."""

    settings = SamplingSettings(n=n, keep=keep, seed=seed)
    canvas = pipeline.canvas_size
    rows = []
    text, scene, _ = completion_cases(1, seed)[0]
    edit = pipeline.completion(render(scene, canvas), pipeline.model.config.grid_size // 2)
    kept = [p for p in pipeline([text], settings, edit=edit)[0] if p.kept]
    rows.append((f"completion: top half kept\n\"{text}\"",
                 [("input", edit.image), ("mask", _mask_picture(edit))] + [(f"kept {p.rank}", p.image) for p in kept]))
    text, scene, half = inpainting_cases(1, seed)[0]
    edit = pipeline.inpainting(render(scene, canvas), box=tuple(round(v * canvas) for v in half))
    kept = [p for p in pipeline([text], settings, edit=edit)[0] if p.kept]
    rows.append((f"inpainting: second object's half\n\"{text}\"",
                 [("input", edit.image), ("mask", _mask_picture(edit))] + [(f"kept {p.rank}", p.image) for p in kept]))
    text, _ = evaluation_prompts("count", 1, seed=seed)[0]
    wide = [p for p in pipeline([text], SamplingSettings(n=max(2, n // 4), keep=2, seed=seed),
                                size=(2 * canvas, canvas))[0] if p.kept]
    rows.append((f"wide canvas, --width {2 * canvas}\n\"{text}\"", [(f"kept {p.rank}", p.image) for p in wide]))
    text, _ = evaluation_prompts("relation", 1, seed=seed)[0]
    first = pipeline([text], SamplingSettings(n=1, keep=1, seed=seed), preview_every=pipeline.model.config.grid_size)[0][0]
    frames = first.frames[:: max(1, len(first.frames) // 6)][:6] + [first.frames[-1]]
    rows.append((f"previews, --preview {pipeline.model.config.grid_size}\n\"{text}\"",
                 [("" if i < len(frames) - 1 else "final", frame) for i, frame in enumerate(frames)]))
    return rows


def compose(rows: list[tuple[str, list[tuple[str, Image.Image]]]], scale: int) -> Image.Image:
    """The rows side by side on white: the label, then each titled picture, ``scale`` times enlarged."""
    title_height = 14
    heights = [max(p.height for _, p in cells) * scale for _, cells in rows]
    widths = [sum(p.width * scale + GAP for _, p in cells) for _, cells in rows]
    image = Image.new("RGB", (LABEL_WIDTH + max(widths), sum(h + title_height + GAP for h in heights) + GAP), "white")
    draw = ImageDraw.Draw(image)
    top = GAP
    for (label, cells), height in zip(rows, heights):
        lines = [wrapped for line in label.splitlines() for wrapped in textwrap.wrap(line, LABEL_CHARS)]
        draw.multiline_text((8, top + title_height + height // 2 - 6 * len(lines)), "\n".join(lines), fill="black")
        left = LABEL_WIDTH
        for title, picture in cells:
            draw.text((left, top), title, fill="black")
            big = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
            image.paste(big, (left, top + title_height))
            draw.rectangle([left - 1, top + title_height - 1, left + big.width, top + title_height + big.height],
                           outline="#999")
            left += big.width + GAP
        top += height + title_height + GAP
    return image


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def draw() -> None:
        set_threads(args.threads)
        pipeline = Pipeline(args.checkpoint, device=args.device)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        compose(edit_rows(pipeline, args.n, args.keep, args.seed), args.scale).save(out)
        print(f"figure: completion, inpainting, wide canvas, previews -> {out}")

    return run_command(draw)


if __name__ == "__main__":
    sys.exit(main())
