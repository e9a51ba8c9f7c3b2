"""Canvases larger than the trained grid: decoding with a sliding window (taming-transformers, Esser et al. 2021).

The model knows grids of ``g x g`` tokens (its row and column embeddings stop there). A canvas of ``H x W``
tokens, H, W >= g, is drawn in raster order; token (i, j) is drawn by the model looking at the window of
``g x g`` tokens that holds it, placed so that the token sits in its middle (clamped to the canvas):
``i0 = clamp(i - g // 2, 0, H - g)``, likewise ``j0``. Within the window the token has local position
``(i - i0) * g + (j - j0)``, and every window token before it in the window's raster order lies above it or
to its left on the canvas, so it is drawn already: the model reads them (and the text) as it would a
picture of its own size, and draws the token from its logits. Windows move, so there is no key/value cache
to reuse: every token costs one pass over at most ``g * g`` tokens.

Draws use the same per-candidate counter noise as :func:`seq2seq.generate`, keyed by the token's place on
the canvas, so a candidate depends on its seed only; at ``H = W = g`` the canvas is exactly what
``generate`` draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from seq2seq.generate import EMPTY_TEXT_IDS, Sampler, candidate_rows, candidate_seeds, conditioning
from seq2seq.model import Seq2Seq

__all__ = ["generate_canvas", "window_origin"]


def window_origin(i: int, j: int, height: int, width: int, grid: int) -> tuple[int, int]:
    """The top-left token (i0, j0) of the ``grid`` x ``grid`` window that draws canvas token (i, j)."""
    return min(max(i - grid // 2, 0), height - grid), min(max(j - grid // 2, 0), width - grid)


@torch.no_grad()
def generate_canvas(
    model: Seq2Seq,
    text_ids: Tensor,
    text_mask: Tensor,
    *,
    height: int,
    width: int,
    num_candidates: int = 1,
    seeds: int | Sequence[int] | Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float = 1.0,
    uncond_ids: Sequence[int] = EMPTY_TEXT_IDS,
    progress: bool = False,
) -> Tensor:
    """Image ids (B * num_candidates, height, width) of canvases ``height`` x ``width`` tokens, each at least
    the model's grid; the arguments as :func:`seq2seq.generate`'s."""
    grid = model.config.grid_size
    if height < grid or width < grid:
        raise ValueError(f"a canvas of {height}x{width} tokens is smaller than the model's {grid}x{grid} grid")
    text_ids, text_mask = candidate_rows(model, text_ids, text_mask, num_candidates)  # (C, L) each
    device, n_rows = text_ids.device, text_ids.shape[0]
    sampler = Sampler(candidate_seeds(seeds, n_rows, device), temperature, top_k, top_p, float(cfg_scale))
    text_ids, text_mask = conditioning(model, text_ids, text_mask, sampler, uncond_ids)  # (R, L')

    was_training = model.training
    model.eval()
    try:
        memory = model.encode(text_ids, text_mask)  # (R, L', D), once for every window
        canvas = torch.zeros(n_rows, height, width, dtype=torch.long, device=device)
        bos = canvas.new_full((n_rows, 1), model.config.bos_id)
        for position in tqdm(range(height * width), desc="decoding", unit="token", disable=not progress):
            i, j = divmod(position, width)
            i0, j0 = window_origin(i, j, height, width, grid)
            local = (i - i0) * grid + (j - j0)
            window = canvas[:, i0:i0 + grid, j0:j0 + grid].flatten(1)[:, :local]  # (C, local): drawn already
            decoder_ids = torch.cat([bos, window], dim=1)  # (C, 1 + local)
            rows = torch.cat([decoder_ids, decoder_ids]) if sampler.guided else decoder_ids
            logits = model.decode(memory, text_mask, rows)[:, -1]  # (R, V)
            canvas[:, i, j] = sampler(logits, torch.full((1,), position, device=device))
    finally:
        model.train(was_training)
    return canvas
