"""Writing pictures: safe file names from any prompt, PNG text chunks with the prompt, seed, settings, score
and rank, a labelled grid of the candidates with the kept ones framed, and a JSONL line per picture.

A kept picture is named by its prompt and its own seed, ``<prompt>-seed<seed>.png``, so that
``python -m sample "<prompt>" --seed <seed> --n 1`` (with the same settings) draws it again; the grid is
``<prompt>-seeds<first>-<last>-grid.png``. Existing files are never overwritten: a name that is taken gets
``.run2``, ``.run3``, ... before ``.png`` (the second, third, ... picture of that prompt and seed written here).
A picture drawn with previews gets an animated WebP of its decoding beside it, the same name with ``.webp``.
"""

from __future__ import annotations

import io
import json
import os
import re
import unicodedata
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL.PngImagePlugin import PngInfo

from checkpoint import atomic_write
from cli import UserError
from data.images import image_grid

__all__ = ["safe_stem", "prepare_out_dir", "stored_prompt", "picture_fields", "picture_pixels", "picture_png",
           "save_picture", "save_preview", "write_prompt_results"]

MAX_STEM = 60
GRID_CELLS = 256  # a grid of more candidates shows the best 256: 10 000 cells would be too big to open
FRAME_MS = 120  # how long a preview shows each frame; the last (the picture) stays FINAL_FRAME_MS
FINAL_FRAME_MS = 1500
# Characters of a prompt stored in PNG chunks and samples.jsonl: far more than the model's 64 text tokens
# read, so a 10 MB prompt is not stored three times over.
MAX_STORED_PROMPT = 4096
RECORDS = "samples.jsonl"


def safe_stem(prompt: str) -> str:
    """A file-name stem from any text: ASCII letters, digits and dashes, at most 60 characters."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii")
    stem = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:MAX_STEM].rstrip("-")
    return stem or "prompt"


def prepare_out_dir(out: str | Path) -> Path:
    """Create ``out`` if needed and check it is writable; otherwise a UserError saying so."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out}: {e.strerror}; pass a writable directory") from None
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out} is not a writable directory; pass a writable directory")
    records = out / RECORDS
    if os.path.lexists(records) and (records.is_symlink() or not records.is_file()):
        raise UserError(f"--out {out}: {RECORDS} there is a symlink or not a regular file; move it or pass "
                        "another --out")
    return out


def stored_prompt(prompt: str) -> str:
    """The prompt as files record it: its first MAX_STORED_PROMPT characters, marked where cut."""
    return prompt if len(prompt) <= MAX_STORED_PROMPT else prompt[:MAX_STORED_PROMPT] + "..."


def _save_new(path: Path, write: Callable[[str], None]) -> Path:
    """Write a file at the first of path, path.run2, path.run3, ... (before the suffix) that does not exist yet,
    whole or not at all: ``write(tmp)`` fills a temporary that takes the free name only once complete, and never
    one another process has just taken (:func:`checkpoint.atomic_write`, ``exclusive``)."""
    candidate, k = path, 1
    while True:
        if not os.path.lexists(candidate):
            try:
                atomic_write(candidate, write, exclusive=True)
                return candidate
            except FileExistsError:
                pass
        k += 1
        candidate = path.with_name(f"{path.stem}.run{k}{path.suffix}")


def _png_info(fields: dict) -> PngInfo:
    info = PngInfo()
    for key, value in fields.items():
        info.add_itxt(key, value if isinstance(value, str) else json.dumps(value))
    return info


def picture_fields(picture) -> dict:
    """What a picture's PNG text chunks and its samples.jsonl line hold: prompt, seed, rank, score, settings,
    candidate (a sample.pipeline.Picture)."""
    fields = {"prompt": stored_prompt(picture.prompt), "seed": picture.seed, "rank": picture.rank,
              "score": picture.score, "settings": picture.settings, "candidate": picture.candidate}
    if picture.likelihood is not None:
        fields["likelihood"] = picture.likelihood
    return fields


def save_picture(picture, path: str | Path) -> Path:
    """Write ``picture`` (a sample.pipeline.Picture) as PNG at ``path`` with :func:`picture_fields` in its
    text chunks (each a string; numbers, None and the settings as JSON), atomically: a reader never sees half
    a picture. Other suffixes than .png are refused: the chunks are PNG's."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"Picture.save writes PNG (its text chunks hold the prompt, seed and settings); name the "
                         f"file *.png, not {path.name}, or use picture.image.save for other formats")
    atomic_write(path, partial(_write_picture, picture))
    return path


def picture_png(picture) -> bytes:
    """``picture`` (a sample.pipeline.Picture) as PNG bytes with :func:`picture_fields` in its text chunks,
    as :func:`save_picture` writes it (the service's downloads)."""
    buffer = io.BytesIO()
    picture.image.save(buffer, format="PNG", pnginfo=_png_info(picture_fields(picture)))
    return buffer.getvalue()


def _write_picture(picture, tmp: str) -> None:
    picture.image.save(tmp, format="PNG", pnginfo=_png_info(picture_fields(picture)))


def save_preview(frames: Sequence, path: str | Path) -> Path:
    """Write ``frames`` (PIL pictures, the decoding in order) as a looping, lossless animated WebP at ``path``,
    atomically. Returns the path."""
    path = Path(path)
    atomic_write(path, partial(_write_preview, frames))
    return path


def _write_preview(frames: Sequence, tmp: str) -> None:
    durations = [FRAME_MS] * (len(frames) - 1) + [FINAL_FRAME_MS]
    frames[0].save(tmp, format="WEBP", save_all=True, append_images=list(frames[1:]), duration=durations, loop=0,
                   lossless=True)


def picture_pixels(image):
    """A (3, H, W) tensor in [-1, 1] from an RGB picture of any shape (a wide canvas is not cropped)."""

    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)


def _label(picture) -> str:
    """A grid cell's label: every candidate's seed, and a kept one's rank and score above it."""
    if not picture.kept:
        return f"seed {picture.seed}"
    score = "" if picture.score is None else f", {picture.score:.3f}"
    return f"rank {picture.rank}{score}\nseed {picture.seed}"


def write_prompt_results(out: Path, pictures: Sequence, nrow: int | None = None) -> list[dict]:
    """Write the kept pictures, a labelled grid of the candidates (kept ones framed) and JSONL records.

    ``pictures`` are one prompt's candidates (sample.pipeline.Picture), best first. Returns the records,
    best first, each with the file's name (``file``, relative to ``out``) and the grid's (``grid``).
    """


    if not pictures:
        return []
    prompt = pictures[0].prompt
    stem = safe_stem(prompt)
    records = []
    for picture in (p for p in pictures if p.kept):
        path = _save_new(out / f"{stem}-seed{picture.seed}.png", partial(_write_picture, picture))
        records.append({"file": path.name, **picture_fields(picture)})
        if picture.frames:
            preview = _save_new(path.with_suffix(".webp"), partial(_write_preview, picture.frames))
            records[-1]["preview"] = preview.name
    first, last = min(p.seed for p in pictures), max(p.seed for p in pictures)
    shown = sorted(pictures[:GRID_CELLS], key=lambda p: p.candidate)  # the best ones, when --n is huge
    title = stored_prompt(prompt)
    title = title if len(shown) == len(pictures) else f"{title}\n(the best {len(shown)} of {len(pictures)})"
    grid = image_grid(torch.stack([picture_pixels(p.image) for p in shown]), nrow=nrow or min(8, len(shown)),
                      marked=[i for i, p in enumerate(shown) if p.kept], title=title,
                      labels=[_label(p) for p in shown])
    seeds = f"seeds{first}-{last}" if last > first else f"seed{first}"
    info = _png_info({"prompt": stored_prompt(prompt), "seed": first, "candidates": len(pictures),
                      "settings": pictures[0].settings})
    grid_path = _save_new(out / f"{stem}-{seeds}-grid.png", lambda tmp: grid.save(tmp, format="PNG", pnginfo=info))
    for record in records:
        record["grid"] = grid_path.name
    # Appended to only as a file of its own: never through a symlink to somewhere else.
    descriptor = os.open(out / RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    with open(descriptor, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return records
