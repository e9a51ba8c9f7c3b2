"""Generation: prompts in, N candidate grids of image ids per prompt out.

One :meth:`Seq2Seq.prefill` per batch, then one :meth:`Seq2Seq.decode_one_token` per image token over the
key/value caches (gpt-fast generate.py). Classifier-free guidance (Ho & Salimans 2022; Parti) runs the
conditional rows and the unconditional rows (the empty caption that caption dropout trained on) in one
batch and samples from ``uncond + scale * (cond - uncond)``; both rows of a candidate then read the token
drawn. Nothing in the loop waits for the device: each draw uses the candidate's seed and the step through
:func:`seq2seq.filters.counter_uniform`, so a candidate's picture depends on its seed only, not on the
batch size or its place in the batch. ``use_cache=False`` recomputes the whole prefix at every step: the
same ids, slowly; the baseline ``bench/decode_cache.py`` measures the cache against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor
from tqdm import tqdm

from seq2seq.filters import counter_uniform, filter_logits, sample_from_probs
from seq2seq.model import Seq2Seq
from tokenizer.text import EOS_ID

__all__ = ["generate", "EMPTY_TEXT_IDS"]

# The tokenizer's encoding of the empty caption, [eos]: what caption dropout feeds the model during
# training, so it is the unconditional prompt of guidance.
EMPTY_TEXT_IDS: tuple[int, ...] = (EOS_ID,)


@dataclass(frozen=True)
class Sampler:
    """Guidance, filters and per-candidate seeds: logits of every row to one id per candidate."""

    seeds: Tensor  # (C,) one per candidate
    temperature: float
    top_k: int | None
    top_p: float | None
    cfg_scale: float

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    def __call__(self, logits: Tensor, step: Tensor) -> Tensor:
        """``logits`` (C, V), or (2C, V) conditional rows then unconditional when guided; ids (C,) of ``step``."""
        logits = logits.float()
        if self.guided:
            cond, uncond = logits.chunk(2)
            logits = uncond + self.cfg_scale * (cond - uncond)  # (C, V)
        probs = filter_logits(logits, self.temperature, self.top_k, self.top_p)
        return sample_from_probs(probs, counter_uniform(self.seeds, step, logits.shape[-1]))

    def rows(self, ids: Tensor) -> Tensor:
        """The decoder input (R, 1) for every row: each candidate's id, twice when guided."""
        ids = ids[:, None]  # (C, 1)
        return torch.cat([ids, ids]) if self.guided else ids


@torch.no_grad()
def generate(
    model: Seq2Seq,
    text_ids: Tensor,
    text_mask: Tensor,
    *,
    num_candidates: int = 1,
    seeds: int | Sequence[int] | Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float = 1.0,
    uncond_ids: Sequence[int] = EMPTY_TEXT_IDS,
    prefix_ids: Tensor | None = None,
    use_cache: bool = True,
    compile: bool = False,
    progress: bool = False,
) -> Tensor:
    """Image ids (B * num_candidates, h, w) for the prompts ``text_ids`` (B, L) with ``text_mask`` (B, L).

    Candidates come prompt by prompt: rows ``i * num_candidates + j`` for prompt i.

    Args:
        seeds: one per candidate (B * num_candidates), or an int s meaning s, s+1, ...; None draws
            them from torch's global generator. The same seed gives the same candidate in any batch.
        temperature, top_k, top_p: see :func:`seq2seq.filters.filter_logits`.
        cfg_scale: classifier-free guidance scale; 1.0 is plain conditional sampling (no extra rows).
        uncond_ids: the unconditional prompt's token ids (default: the empty caption, [eos]).
        prefix_ids: (B, k) the first k ids of every prompt's pictures, in raster order (completion).
        use_cache: False recomputes the whole prefix at every step (the benchmark's baseline).
        compile: torch.compile the decode step (CUDA graphs on a GPU); pays a compile once per shape.
        progress: show a tqdm bar over the decoding steps.
    """
    config = model.config
    device = model.decoder.head.weight.device
    if text_ids.dim() != 2 or text_mask.shape != text_ids.shape:
        raise ValueError(f"text_ids and text_mask must be (B, L) alike, got {tuple(text_ids.shape)} "
                         f"and {tuple(text_mask.shape)}")
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    text_ids, text_mask = text_ids.to(device), text_mask.to(device).bool()
    if not bool(text_mask.any(1).all()):
        raise ValueError("every prompt needs at least one real token (the tokenizer's eos)")
    n_rows = text_ids.shape[0] * num_candidates
    text_ids = text_ids.repeat_interleave(num_candidates, 0)  # (C, L)
    text_mask = text_mask.repeat_interleave(num_candidates, 0)
    prefix = _candidate_prefix(prefix_ids, num_candidates, n_rows, config.codebook_size, config.image_len, device)
    sampler = Sampler(_candidate_seeds(seeds, n_rows, device), temperature, top_k, top_p, float(cfg_scale))
    if sampler.guided:
        text_ids, text_mask = _with_unconditional(text_ids, text_mask, uncond_ids)  # (2C, L')
    if text_ids.shape[1] > config.max_text_len:
        raise ValueError(f"text of {text_ids.shape[1]} tokens; the model reads at most {config.max_text_len}")

    was_training = model.training
    model.eval()
    try:
        decode = _decode_cached if use_cache else _decode_recompute
        image_ids = decode(model, text_ids, text_mask, prefix, sampler, compile, progress)
    finally:
        model.train(was_training)
    return image_ids.view(n_rows, config.grid_size, config.grid_size)


def _decode_cached(model: Seq2Seq, text_ids: Tensor, text_mask: Tensor, prefix: Tensor, sampler: Sampler,
                   compile: bool, progress: bool) -> Tensor:
    """Prefill once, then one cached decode step per token; returns (C, h * w)."""
    device = text_ids.device
    start, total = prefix.shape[1], model.config.image_len
    model.setup_caches(text_ids.shape[0], device=device)
    logits = model.prefill(text_ids, text_mask, torch.cat([prefix, prefix]) if sampler.guided else prefix)
    input_pos = torch.tensor([start], device=device)  # the position whose id is drawn next
    ids = sampler(logits, input_pos)
    generated = [prefix, ids[:, None]]
    step = partial(_next_id, model, sampler)
    if compile:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        step = torch.compile(step, mode=mode, fullgraph=True)
    for _ in tqdm(range(start + 1, total), desc="decoding", unit="token", disable=not progress):
        input_pos += 1
        ids = step(ids, input_pos).clone()  # clone: a CUDA graph reuses its output buffer
        generated.append(ids[:, None])
    return torch.cat(generated, dim=1)


def _next_id(model: Seq2Seq, sampler: Sampler, ids: Tensor, input_pos: Tensor) -> Tensor:
    """Read the candidates' last ids (C,) at decoder position ``input_pos``; draw image token ``input_pos``."""
    return sampler(model.decode_one_token(sampler.rows(ids), input_pos), input_pos)


def _decode_recompute(model: Seq2Seq, text_ids: Tensor, text_mask: Tensor, prefix: Tensor, sampler: Sampler,
                      compile: bool, progress: bool) -> Tensor:
    """The baseline: encode once, then run the decoder over the whole prefix for every token."""
    start, total = prefix.shape[1], model.config.image_len
    memory = model.encode(text_ids, text_mask)
    bos = prefix.new_full((prefix.shape[0], 1), model.config.bos_id)
    decoder_ids = torch.cat([bos, prefix], dim=1)  # (C, 1 + k)
    for position in tqdm(range(start, total), desc="decoding", unit="token", disable=not progress):
        rows = torch.cat([decoder_ids, decoder_ids]) if sampler.guided else decoder_ids
        logits = model.decode(memory, text_mask, rows)[:, -1]  # (R, V)
        ids = sampler(logits, torch.full((1,), position, device=prefix.device))
        decoder_ids = torch.cat([decoder_ids, ids[:, None]], dim=1)
    return decoder_ids[:, 1:]


def _candidate_seeds(seeds: int | Sequence[int] | Tensor | None, n_rows: int, device: torch.device) -> Tensor:
    if seeds is None:
        return torch.randint(0, 2**62, (n_rows,)).to(device)
    if isinstance(seeds, int):
        return torch.arange(seeds, seeds + n_rows, device=device)
    seeds = torch.as_tensor(seeds, dtype=torch.long).flatten().to(device)
    if seeds.numel() != n_rows:
        raise ValueError(f"{seeds.numel()} seeds for {n_rows} candidates; give one per candidate or one int")
    return seeds


def _candidate_prefix(prefix_ids: Tensor | None, num_candidates: int, n_rows: int, codebook_size: int,
                      image_len: int, device: torch.device) -> Tensor:
    """The given first ids of every candidate (C, k), k = 0 when none are given."""
    if prefix_ids is None:
        return torch.zeros(n_rows, 0, dtype=torch.long, device=device)
    prefix = prefix_ids.to(device=device, dtype=torch.long).flatten(1)  # (B, k)
    if prefix.shape[0] * num_candidates != n_rows:
        raise ValueError(f"prefix_ids has {prefix.shape[0]} rows for {n_rows // num_candidates} prompts")
    if prefix.shape[1] >= image_len:
        raise ValueError(f"a prefix of {prefix.shape[1]} ids leaves nothing of the {image_len} to generate")
    if prefix.numel() and not bool(((prefix >= 0) & (prefix < codebook_size)).all()):
        raise ValueError(f"prefix_ids must be codebook ids in [0, {codebook_size})")
    return prefix.repeat_interleave(num_candidates, 0)


def _with_unconditional(text_ids: Tensor, text_mask: Tensor, uncond_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Append one unconditional row per conditional row, padding both to a common length: (2C, L')."""
    uncond = torch.as_tensor(list(uncond_ids), dtype=torch.long, device=text_ids.device)  # (U,)
    if uncond.numel() == 0:
        raise ValueError("uncond_ids is empty; the empty caption encodes to [eos]")
    rows, length = text_ids.shape[0], max(text_ids.shape[1], uncond.numel())
    ids = text_ids.new_zeros(2 * rows, length)  # (2C, L'), 0 is the tokenizer's pad id
    mask = text_mask.new_zeros(2 * rows, length)
    ids[:rows, : text_ids.shape[1]] = text_ids
    mask[:rows, : text_ids.shape[1]] = text_mask
    ids[rows:, : uncond.numel()] = uncond
    mask[rows:, : uncond.numel()] = True
    return ids, mask
