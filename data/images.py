"""Pictures in and out of tensors: PIL images to (3,S,S) floats in [-1,1], and back, and labelled sample grids.

Every image the models see goes through :func:`from_pil`: converted to RGB (transparency composited
on white, so a logo with an alpha channel looks as it does in a browser), centre-cropped to a square
and resized with an antialiasing filter, the preprocessing of taming-transformers and Parti.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

__all__ = ["to_rgb", "from_pil", "to_pil", "image_grid", "MARK_COLOR"]

WHITE = (255, 255, 255)
GRID_BACKGROUND = (128, 128, 128)
MARK_COLOR = (255, 0, 200)  # magenta: in no `shapes` palette entry, visible on white and grey
TEXT_COLOR = (0, 0, 0)
MAX_LABEL_LINES = 6  # a longer label (a long caption under a narrow cell) ends in "..."


def to_rgb(img: Image.Image) -> Image.Image:
    """The image in mode RGB, upright (EXIF orientation applied), any transparency composited on white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = Image.fromarray(_deep_to_8bit(np.asarray(img)))
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _deep_to_8bit(values: np.ndarray) -> np.ndarray:
    """16-bit or float greyscale as uint8: 16-bit ranges scale by 255/65535, anything else is stretched."""
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 255:
        scaled = values
    elif low >= 0 and high <= 65535:
        scaled = values / 257.0
    else:
        scaled = (values - low) * (255.0 / (high - low))
    return np.round(scaled).clip(0, 255).astype(np.uint8)


def from_pil(img: Image.Image, size: int, crop: tuple[float, float, float] | None = None) -> torch.Tensor:
    """A FloatTensor (3, size, size) in [-1, 1]: RGB, the largest centred square, resized with LANCZOS.

    ``crop = (scale, x, y)``, each in [0, 1], takes instead a square of ``scale`` times the shorter side,
    placed at fractions ``x`` and ``y`` of the room left and above it (0.5, 0.5: centred): the training
    augmentation's random crop.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    img = to_rgb(img)
    width, height = img.size
    side = min(width, height)
    fx, fy = 0.5, 0.5
    if crop is not None:
        scale, fx, fy = crop
        side = max(1, round(side * scale))
    if (width, height) != (side, side):
        left, top = int((width - side) * fx), int((height - side) * fy)  # 0.5: (width - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side != size:
        # reducing_gap first shrinks by an integer factor (a fast box filter), then LANCZOS finishes.
        img = img.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (S, S, 3)
    return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, S, S)


def to_pil(image: torch.Tensor) -> Image.Image:
    """An RGB PIL image from a tensor (3, H, W) in [-1, 1]; values outside are clipped."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"to_pil expects (3, H, W), got {tuple(image.shape)}")
    pixels = image.detach().float().cpu().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())  # (H, W, 3)


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2, marked: list[int] | None = None,
               mark_color: tuple[int, int, int] = MARK_COLOR, title: str | None = None,
               labels: Sequence[str] | None = None) -> Image.Image:
    """Tile images (N, 3, H, W) in [-1, 1] into rows of ``nrow`` on a grey background.

    ``marked`` lists cells (indices into ``images``) to frame in ``mark_color``: sampling frames the
    candidates the reranker kept. The frame fills the ``pad`` pixels around the cell and is at least two
    pixels wide, reaching into the picture when ``pad`` is smaller.

    ``title`` is written above the grid and ``labels`` (one per image, "" for none; newlines start new
    lines) under each cell, in PIL's default font (nothing to download), wrapped to the grid's and the
    cell's width; a row of cells is followed by as much room as its longest label needs. Without either
    the grid is exactly the tiles and their padding.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"image_grid expects (N, 3, H, W), got {tuple(images.shape)}")
    if nrow < 1 or pad < 0:
        raise ValueError(f"image_grid needs nrow >= 1 and pad >= 0, got nrow={nrow}, pad={pad}")
    count, _, height, width = images.shape
    marked = sorted(set(marked or []))
    if marked and not 0 <= marked[0] <= marked[-1] < count:
        raise ValueError(f"marked cells {marked} are outside the {count} images")
    if labels is not None and len(labels) != count:
        raise ValueError(f"image_grid got {len(labels)} labels for {count} images")
    columns = min(nrow, max(count, 1))
    rows = (count + columns - 1) // columns
    grid_width = columns * (width + pad) + pad
    font = ImageFont.load_default()
    line_height = _line_height(font)
    title_lines = _wrap(title, font, grid_width - 2 * max(pad, 2)) if title else []
    cell_lines = [_wrap(label, font, width) for label in labels] if labels is not None else [[]] * count
    bands = [max((len(lines) for lines in cell_lines[row * columns:(row + 1) * columns]), default=0) * line_height
             for row in range(rows)]  # room under each row for its labels
    title_height = len(title_lines) * line_height + (pad if title_lines else 0)
    tops = [title_height]  # where each row's padding ring starts: rows share a ring's side unless labels part them
    for band in bands[:-1]:
        tops.append(tops[-1] + height + pad + (band + pad if band else 0))
    grid = Image.new("RGB", (grid_width, tops[-1] + height + 2 * pad + bands[-1] if rows else title_height + pad),
                     GRID_BACKGROUND)
    for index in range(count):
        row, column = divmod(index, columns)
        grid.paste(to_pil(images[index]), (pad + column * (width + pad), pad + tops[row]))
    draw = ImageDraw.Draw(grid)
    for number, line in enumerate(title_lines):
        draw.text((max(pad, 2), pad + number * line_height), line, fill=TEXT_COLOR, font=font)
    for index, lines in enumerate(cell_lines):
        row, column = divmod(index, columns)
        for number, line in enumerate(lines):
            draw.text((pad + column * (width + pad), tops[row] + height + 2 * pad + number * line_height), line,
                      fill=TEXT_COLOR, font=font)
    frame = max(pad, 2)
    for index in marked:
        row, column = divmod(index, columns)
        left, top = column * (width + pad), tops[row]  # outer corner of the cell's padding ring
        draw.rectangle((left, top, left + width + 2 * pad - 1, top + height + 2 * pad - 1),
                       outline=mark_color, width=frame)
    return grid


def _line_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    left, top, right, bottom = font.getbbox("Ag|")
    return bottom + 2


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """``text`` broken into lines at most ``width`` pixels wide: at spaces where it can, inside a word where a
    word alone is wider; at most MAX_LABEL_LINES lines, the last one ending in "..." when text was left out."""
    lines: list[str] = []
    for paragraph in text.splitlines():
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for character in word:  # a word wider than the cell is cut where it must be
                if line and font.getlength(line + character) > width:
                    lines.append(line)
                    line = ""
                line += character
        if line:
            lines.append(line)
    if len(lines) > MAX_LABEL_LINES:
        last = lines[MAX_LABEL_LINES - 1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines = lines[:MAX_LABEL_LINES - 1] + [last + "..."]
    return lines
