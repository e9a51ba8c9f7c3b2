"""Edits of a picture: completion (keep its top rows) and inpainting (redraw what a mask or a box marks).

A picture is edited in token space: the VQGAN encodes it to a grid of ids, the tokens to keep are forced
and the others are drawn in raster order (:func:`seq2seq.generate`). A token is redrawn when any pixel of
its cell is marked (white in the mask, inside the box), so a mask's edge rounds outwards to whole tokens.
Every check on what a user gives ends in a one-line :class:`cli.UserError`.

Previews: :func:`preview_images` decodes partial grids to pictures, the tokens not drawn yet in flat grey.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cli import UserError

__all__ = ["Edit", "completion", "inpainting", "read_picture", "preview_images", "NEUTRAL"]

NEUTRAL = 0.0  # mid grey in [-1, 1]: how a preview shows a token not drawn yet


@dataclass(frozen=True)
class Edit:
    """A picture to start from and, per token of its grid, whether it is kept (True) or redrawn (False)."""

    image: Image.Image  # RGB, the model's canvas size
    keep: torch.Tensor  # (h, w) bool
    record: dict = field(default_factory=dict)  # how it was asked for: {"keep_rows": R}, {"box": [...]}, ...

    @property
    def keeps_after_hole(self) -> bool:
        """Whether some kept token follows a redrawn one in raster order (inpainting, not completion)."""
        keep = self.keep.flatten()
        return bool((keep & (torch.cumsum((~keep).long(), 0) > 0)).any())

    @property
    def redraw_pixels(self) -> np.ndarray:
        """(H, W) bool: the pixels of the tokens that are redrawn (what a figure shows as the mask)."""
        token = self.image.size[0] // self.keep.shape[1]
        return np.kron((~self.keep).numpy().astype(np.uint8), np.ones((token, token), np.uint8)).astype(bool)


def read_picture(picture: str | Path | Image.Image, flag: str) -> Image.Image:
    """An RGB picture from a path or a PIL image; a file that cannot be read is one line naming ``flag``."""
    if isinstance(picture, Image.Image):
        return picture.convert("RGB")
    path = Path(picture)
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read {flag} {path}: {reason}; pass a PNG, JPEG or WebP picture") from None


def _checked_init(init: str | Path | Image.Image, canvas: int, token: int) -> Image.Image:
    image = read_picture(init, "--init")
    width, height = image.size
    if width % token or height % token:
        raise UserError(f"--init is {width}x{height} pixels, not a multiple of the {token}-pixel token size; "
                        f"crop or resize it to {canvas}x{canvas}")
    if (width, height) != (canvas, canvas):
        raise UserError(f"--init is {width}x{height} pixels but this run draws {canvas}x{canvas} pictures; resize it "
                        f"to {canvas}x{canvas}")
    return image


def completion(init: str | Path | Image.Image, keep_rows: int, *, canvas: int, token: int) -> Edit:
    """Keep the first ``keep_rows`` rows of tokens of ``init`` and draw the rest (DALL-E 1's image completion)."""
    image = _checked_init(init, canvas, token)
    grid = canvas // token
    if not 1 <= keep_rows < grid:
        raise UserError(f"--keep-rows {keep_rows} is outside the grid: keep 1 to {grid - 1} of its {grid} rows of "
                        f"{token}-pixel tokens")
    keep = torch.zeros(grid, grid, dtype=torch.bool)
    keep[:keep_rows] = True
    return Edit(image, keep, {"keep_rows": keep_rows})


def inpainting(init: str | Path | Image.Image, *, mask: str | Path | Image.Image | None = None,
               box: str | tuple[int, int, int, int] | None = None, canvas: int, token: int) -> Edit:
    """Redraw the tokens that ``mask`` (white = redraw) or ``box`` ("x0,y0,x1,y1" in pixels, x1 and y1
    excluded) touch; keep the others."""
    if (mask is None) == (box is None):
        raise UserError("inpainting takes --mask or --box, one of the two")
    image = _checked_init(init, canvas, token)
    if mask is not None:
        redraw = _mask_pixels(mask, image.size)
        record = {"mask": str(mask) if not isinstance(mask, Image.Image) else "picture"}
    else:
        redraw, record = _box_pixels(box, image.size), {"box": list(_parse_box(box))}
    if not redraw.any():
        raise UserError("--mask has nothing to redraw: paint white what to redraw, black what to keep")
    grid = canvas // token
    keep = ~torch.from_numpy(redraw.reshape(grid, token, grid, token).any(axis=(1, 3)))  # (h, w)
    return Edit(image, keep, record)


def _mask_pixels(mask: str | Path | Image.Image, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool from a mask picture: True where it is white-ish (more than half bright), to redraw."""
    if isinstance(mask, Image.Image):
        picture = mask
    else:
        picture = read_picture(mask, "--mask")
    if picture.size != size:
        raise UserError(f"--mask is {picture.size[0]}x{picture.size[1]} pixels but --init is {size[0]}x{size[1]}; "
                        "draw the mask at the picture's size")
    return np.asarray(picture.convert("L")) >= 128


def _parse_box(box: str | tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    try:
        values = tuple(int(v) for v in (box.split(",") if isinstance(box, str) else box))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise UserError(f"--box takes four whole numbers x0,y0,x1,y1 in pixels, got {box!r}")
    return values


def _box_pixels(box: str | tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    x0, y0, x1, y1 = _parse_box(box)
    width, height = size
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise UserError(f"--box {x0},{y0},{x1},{y1} is empty or leaves the {width}x{height} picture; give "
                        f"0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}")
    redraw = np.zeros((height, width), dtype=bool)
    redraw[y0:y1, x0:x1] = True
    return redraw


def preview_images(decoded: torch.Tensor, undrawn: torch.Tensor) -> torch.Tensor:
    """Pictures (B, 3, H, W) in [-1, 1] with the cells of the tokens not drawn yet, ``undrawn`` (B, h, w),
    painted flat grey."""
    token = decoded.shape[-1] // undrawn.shape[-1]
    cells = undrawn.repeat_interleave(token, 1).repeat_interleave(token, 2)[:, None]  # (B, 1, H, W)
    return decoded.masked_fill(cells.to(decoded.device), NEUTRAL)
