"""Writing pictures: safe file names from any prompt, PNG text chunks with the prompt, seed, settings and
score, a grid of all candidates with the kept ones marked, and a JSONL line per picture. Existing files
are never overwritten: a name that is taken gets a numbered suffix."""

from __future__ import annotations

import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Sequence

from PIL.PngImagePlugin import PngInfo

from checkpoint import UserError

__all__ = ["safe_stem", "prepare_out_dir", "write_prompt_results"]

MAX_STEM = 60


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
    return out


def _claim(path: Path) -> Path:
    """The first of path, path-1, path-2, ... that does not exist yet, created empty so no one else takes it."""
    candidate, k = path, 0
    while True:
        try:
            fd = os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.close(fd)
            return candidate
        except FileExistsError:
            k += 1
            candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")


def _png_info(fields: dict) -> PngInfo:
    info = PngInfo()
    for key, value in fields.items():
        info.add_itxt(key, value if isinstance(value, str) else json.dumps(value))
    return info


def write_prompt_results(out: Path, pictures: Sequence, nrow: int | None = None) -> list[dict]:
    """Write the kept pictures, a grid of all candidates (kept ones marked) and JSONL records.

    ``pictures`` are one prompt's candidates (sample.pipeline.Picture), best first. Returns the records.
    """
    import torch

    from train.images import from_pil, image_grid

    if not pictures:
        return []
    prompt = pictures[0].prompt
    base_seed = min(p.seed for p in pictures)
    stem = f"{safe_stem(prompt)}-s{base_seed}"
    records = []
    for rank, picture in enumerate(p for p in pictures if p.kept):
        path = _claim(out / f"{stem}-{rank}.png")
        fields = {"prompt": prompt, "seed": picture.seed, "score": picture.score, "settings": picture.settings,
                  "candidate": picture.candidate}
        picture.image.save(path, format="PNG", pnginfo=_png_info(fields))
        records.append({"file": path.name, **fields})
    by_candidate = sorted(pictures, key=lambda p: p.candidate)
    size = by_candidate[0].image.size[0]
    grid = image_grid(torch.stack([from_pil(p.image, size) for p in by_candidate]),
                      nrow=nrow or min(8, len(by_candidate)),
                      marked=[i for i, p in enumerate(by_candidate) if p.kept])
    grid_path = _claim(out / f"{stem}-grid.png")
    grid.save(grid_path, format="PNG", pnginfo=_png_info({"prompt": prompt, "seed": base_seed}))
    for record in records:
        record["grid"] = grid_path.name
    with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return records
