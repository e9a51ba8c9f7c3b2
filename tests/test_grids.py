"""Labelled grids: sampling's grid says the prompt and each kept picture's rank, score and seed; training's
sample grids caption each column."""

import numpy as np
import pytest
import torch
from PIL import Image

from data.images import GRID_BACKGROUND, MARK_COLOR, MAX_LABEL_LINES, TEXT_COLOR, _wrap, image_grid
from train.loop import Run


def _text_rows(grid: Image.Image, top: int, bottom: int) -> int:
    """Pixels of text colour in rows top..bottom-1."""
    pixels = np.asarray(grid)[top:bottom]
    return int((np.abs(pixels.astype(int) - TEXT_COLOR).sum(-1) < 200).sum())


def test_title_above_and_labels_under_the_cells():
    images = torch.ones(3, 3, 16, 16)  # white cells
    bare = image_grid(images, nrow=3)
    grid = image_grid(images, nrow=3, marked=[1], title="a large red circle", labels=["#1 0.312\nseed 9", "", "x"])
    assert grid.size[0] == bare.size[0] and grid.size[1] > bare.size[1]
    column = np.asarray(grid)[:, 2]  # down through cell 0
    white = [y for y in range(len(column)) if (column[y] == 255).all()]
    top, bottom = white[0], white[-1] + 1
    assert bottom - top == 16 and top > 2
    assert _text_rows(grid, 0, top - 2) > 0  # the prompt is written above the cells
    assert grid.getpixel((18, top - 2)) == MARK_COLOR  # cell 1's frame moved down with its cell
    assert _text_rows(grid, bottom + 2, grid.size[1]) > 0  # the labels under them
    assert grid.getpixel((grid.size[0] - 1, grid.size[1] - 1)) == GRID_BACKGROUND


def test_labels_wrap_to_the_cell_and_stop_after_a_few_lines():
    from PIL import ImageFont

    font = ImageFont.load_default()
    lines = _wrap("a small blue square to the left of a yellow triangle", font, 64)
    assert len(lines) > 1 and all(font.getlength(line) <= 64 for line in lines)
    assert " ".join(lines) == "a small blue square to the left of a yellow triangle"
    assert all(font.getlength(line) <= 12 for line in _wrap("unbreakable", font, 12))  # cut inside the word
    long = _wrap("word " * 200, font, 40)
    assert len(long) == MAX_LABEL_LINES and long[-1].endswith("...")


def test_training_sample_grids_caption_each_column(tmp_path):
    run = Run(tmp_path, "seq2seq")
    images = torch.zeros(4, 3, 8, 8)
    plain = Image.open(run.save_samples(1, images, nrow=2))
    captioned = Image.open(run.save_samples(2, images, nrow=2, captions=["a red circle", "two blue squares"]))
    assert captioned.size[0] == plain.size[0] and captioned.size[1] > plain.size[1]
    assert _text_rows(captioned, plain.size[1], captioned.size[1]) > 0  # under the bottom row
    with pytest.raises(ValueError, match="one caption per column"):
        run.save_samples(3, images, nrow=2, captions=["only one"])
