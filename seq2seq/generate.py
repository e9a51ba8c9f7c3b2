"""Generation: prompts in, N candidate grids of image ids per prompt out.

One :meth:`Seq2Seq.prefill` per batch, then one :meth:`Seq2Seq.decode_one_token` per image token over the
key/value caches (gpt-fast generate.py). Classifier-free guidance (Ho & Salimans 2022; Parti) runs the
conditional rows and the unconditional rows (the empty caption that caption dropout trained on) in one
batch and samples from ``uncond + scale * (cond - uncond)``; both rows of a candidate then read the token
drawn. Nothing in the loop waits for the device: each draw uses the candidate's seed and the step through
:func:`seq2seq.filters.counter_uniform`, so a candidate's picture depends on its seed only, not on the
batch size or its place in the batch. ``use_cache=False`` recomputes the whole prefix at every step: the
same ids, slowly; the baseline ``bench/decode_cache.py`` measures the cache against.

Editing (DALL-E 1's image completion; inpainting): ``init_ids`` with ``keep_mask`` gives ids that are forced
rather than drawn. The leading run of forced ids is read in the one prefill pass; after it every position is
decoded in raster order, and a forced one replaces the draw (its draw is made and discarded, so the draws of
the other positions stay a function of the seed). A causal model never sees what follows a hole while it
fills it, so :class:`Forcing` also sums each candidate's log-likelihood of the forced ids after the hole:
a seam that breaks the rest of the picture scores low. ``on_step`` hands out the partial grid every few
positions (previews); without it the loop is the plain one.

``speculative=W`` hands the decoding to :func:`seq2seq.speculative.decode_speculative`: a window of W drafted
tokens verified per cached pass, the same distribution in fewer passes, from another random stream.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from seq2seq.filters import CounterNoise, filter_logits, sample_from_probs
from seq2seq.model import Seq2Seq
from seq2seq.speculative import check_window, decode_speculative
from tokenizer.text import EOS_ID

__all__ = ["generate", "EMPTY_TEXT_IDS", "Forcing", "UNDRAWN"]

# The tokenizer's encoding of the empty caption, [eos]: what caption dropout feeds the model during
# training, so it is the unconditional prompt of guidance.
EMPTY_TEXT_IDS: tuple[int, ...] = (EOS_ID,)
# What a preview grid holds where no id is known yet.
UNDRAWN = -1


@dataclass(frozen=True)
class Forcing:
    """Ids given rather than drawn, per candidate, and the log-likelihood of those that follow the hole.

    ``after_hole`` marks the forced positions past a candidate's first drawn one; ``log_likelihood`` (C,)
    sums, over them, the log-probability the conditional rows gave the forced id (temperature 1, no
    filters, no guidance: the model's own likelihood).
    """

    ids: Tensor  # (C, S) given ids (any value where not kept)
    keep: Tensor  # (C, S) True where the id is given
    after_hole: Tensor  # (C, S)
    log_likelihood: Tensor  # (C,) fp32, summed as decoding goes

    @classmethod
    def from_mask(cls, ids: Tensor, keep: Tensor) -> Forcing:
        drawn_before = torch.cumsum((~keep).long(), dim=1) > 0  # (C, S): some position up to here is drawn
        return cls(ids, keep, keep & drawn_before, torch.zeros(ids.shape[0], device=ids.device))

    @property
    def prefix_len(self) -> int:
        """The longest run of forced positions at the start of every candidate's grid (read in the prefill)."""
        return int(self.keep.long().cumprod(1).sum(1).min())

    def __call__(self, drawn: Tensor, cond_logits: Tensor, step: Tensor) -> Tensor:
        """The ids (C,) of position ``step`` (1,): the given id where forced, else the one drawn."""
        given = self.ids.index_select(1, step)[:, 0]  # (C,)
        log_probs = cond_logits.float().log_softmax(-1).gather(1, given[:, None])[:, 0]  # (C,)
        self.log_likelihood.add_(torch.where(self.after_hole.index_select(1, step)[:, 0], log_probs, 0.0))
        return torch.where(self.keep.index_select(1, step)[:, 0], given, drawn)


@dataclass(frozen=True)
class Sampler:
    """Guidance, filters and per-candidate seeds: logits of every row to one id per candidate."""

    seeds: Tensor  # (C,) one per candidate
    temperature: float
    top_k: int | None
    top_p: float | None
    cfg_scale: float
    forcing: Forcing | None = None
    noise: dict[int, CounterNoise] = field(default_factory=dict, repr=False, compare=False)  # by vocabulary size, made once

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    def noise_for(self, vocab_size: int) -> CounterNoise:
        """The candidates' counter noise over ``vocab_size`` columns (the seed and column hashes made once)."""
        if vocab_size not in self.noise:
            self.noise[vocab_size] = CounterNoise(self.seeds, vocab_size)
        return self.noise[vocab_size]

    def __call__(self, logits: Tensor, step: Tensor, uniform: Tensor | None = None) -> Tensor:
        """``logits`` (C, V), or (2C, V) conditional rows then unconditional when guided; ids (C,) of ``step``.

        ``uniform`` (C, V), the step's noise made ahead (:meth:`CounterNoise.steps`), saves hashing it here.
        """
        probs, cond_logits = self.probs(logits)
        if uniform is None:
            uniform = self.noise_for(logits.shape[-1])(step)
        ids = sample_from_probs(probs, uniform)
        return ids if self.forcing is None else self.forcing(ids, cond_logits, step)

    def probs(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """What plain sampling draws from: ``logits`` (R, ..., V), conditional rows then unconditional when
        guided, to probabilities (C, ..., V) after guidance and the filters; and the conditional rows' logits."""
        logits = cond_logits = logits.float()
        if self.guided:
            cond_logits, uncond = logits.chunk(2)
            logits = uncond + self.cfg_scale * (cond_logits - uncond)  # (C, ..., V)
        return filter_logits(logits, self.temperature, self.top_k, self.top_p), cond_logits

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
    init_ids: Tensor | None = None,
    keep_mask: Tensor | None = None,
    on_step: Callable[[int, Tensor], None] | None = None,
    preview_every: int = 8,
    return_likelihood: bool = False,
    use_cache: bool = True,
    compile: bool = False,
    speculative: int = 0,
    progress: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Image ids (B * num_candidates, h, w) for the prompts ``text_ids`` (B, L) with ``text_mask`` (B, L).

    Candidates come prompt by prompt: rows ``i * num_candidates + j`` for prompt i.

    Args:
        seeds: one per candidate (B * num_candidates), or an int s meaning s, s+1, ...; None draws
            them from torch's global generator. The same seed gives the same candidate in any batch.
        temperature, top_k, top_p: see :func:`seq2seq.filters.filter_logits`.
        cfg_scale: classifier-free guidance scale; 1.0 is plain conditional sampling (no extra rows).
        uncond_ids: the unconditional prompt's token ids (default: the empty caption, [eos]).
        prefix_ids: (B, k) the first k ids of every prompt's pictures, in raster order (completion); the
            same as ``init_ids`` with the first k positions kept.
        init_ids, keep_mask: (B, h, w) codebook ids of each prompt's picture and (B, h, w) or (h, w) bools,
            True where the id is kept (forced) rather than drawn: completion and inpainting. Where not
            kept, ``init_ids`` may hold anything. The prefill reads the kept run that starts every grid
            of the batch, so candidates drawn under one keep mask depend on their seeds only.
        on_step: called as ``on_step(filled, grid)`` after the forced prefix and then every
            ``preview_every`` positions and at the last, with ``grid`` (C, h, w) holding the ids known so
            far (drawn, or forced anywhere) and ``UNDRAWN`` elsewhere.
        return_likelihood: also return (C,) the mean log-likelihood per forced id after the hole (0.0
            where none follows it): ``(ids, likelihood)``.
        use_cache: False recomputes the whole prefix at every step (the benchmark's baseline).
        compile: torch.compile the decode step (CUDA graphs on a GPU), see :func:`compiled`: the first run
            pays a compile per batch size, later runs load it. Off by default: on a 2-core CPU the `small`
            step compiled runs 1.4x eager at batch 1 but loading it costs 8 s a process (BENCHMARKS.md).
        speculative: a window of W >= 2 tokens verified per decoder pass (speculative Jacobi decoding,
            :mod:`seq2seq.speculative`): the same distribution in fewer passes, another picture for the same
            seed than plain sampling; 0 (default) decodes one token a pass. Needs the cache, not ``compile``.
        progress: show a tqdm bar over the decoding steps.
    """
    config = model.config
    text_ids, text_mask = candidate_rows(model, text_ids, text_mask, num_candidates)  # (C, L) each
    device, n_rows = text_ids.device, text_ids.shape[0]
    if prefix_ids is not None:
        if init_ids is not None:
            raise ValueError("give prefix_ids or init_ids with keep_mask, not both")
        init_ids, keep_mask = _prefix_as_mask(prefix_ids, config.image_len)
    forcing = _candidate_forcing(init_ids, keep_mask, num_candidates, n_rows, config.codebook_size,
                                 config.image_len, device)
    prefix = forcing.ids[:, : forcing.prefix_len] if forcing is not None else text_ids.new_zeros(n_rows, 0)
    if preview_every < 1:
        raise ValueError(f"preview_every must be >= 1, got {preview_every}")
    check_window(speculative, config.image_len)
    if speculative and (compile or not use_cache):
        raise ValueError("speculative decoding runs over the cache, eagerly: not with compile or use_cache=False")
    previews = None if on_step is None else _Previews(on_step, preview_every, prefix.shape[1], forcing, n_rows,
                                                      config.grid_size)
    sampler = Sampler(candidate_seeds(seeds, n_rows, device), temperature, top_k, top_p, float(cfg_scale), forcing)
    text_ids, text_mask = conditioning(model, text_ids, text_mask, sampler, uncond_ids)  # (R, L')

    was_training = model.training
    model.eval()
    try:
        if speculative:
            image_ids = decode_speculative(model, text_ids, text_mask, prefix, sampler, speculative, progress, previews)
        else:
            decode = _decode_cached if use_cache else _decode_recompute
            image_ids = decode(model, text_ids, text_mask, prefix, sampler, compile, progress, previews)
    finally:
        model.train(was_training)
    image_ids = image_ids.view(n_rows, config.grid_size, config.grid_size)
    if not return_likelihood:
        return image_ids
    if forcing is None:
        return image_ids, torch.zeros(n_rows, device=device)
    return image_ids, forcing.log_likelihood / forcing.after_hole.sum(1).clamp(min=1)


def candidate_rows(model: Seq2Seq, text_ids: Tensor, text_mask: Tensor, num_candidates: int) -> tuple[Tensor, Tensor]:
    """The prompts (B, L), checked, on the model's device, each repeated for its ``num_candidates`` candidates:
    (C, L) ids and bool mask, rows ``i * num_candidates + j`` for prompt i (:func:`generate` and the canvas)."""
    if text_ids.dim() != 2 or text_mask.shape != text_ids.shape:
        raise ValueError(f"text_ids and text_mask must be (B, L) alike, got {tuple(text_ids.shape)} "
                         f"and {tuple(text_mask.shape)}")
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    device = model.decoder.head.weight.device
    text_ids, text_mask = text_ids.to(device), text_mask.to(device).bool()
    if not bool(text_mask.any(1).all()):
        raise ValueError("every prompt needs at least one real token (the tokenizer's eos)")
    return text_ids.repeat_interleave(num_candidates, 0), text_mask.repeat_interleave(num_candidates, 0)


def conditioning(model: Seq2Seq, text_ids: Tensor, text_mask: Tensor, sampler: Sampler,
                 uncond_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The text the decoder reads: the candidates' rows, and under guidance the unconditional rows after them
    (:func:`with_unconditional`); longer than the model reads is a ValueError."""
    if sampler.guided:
        text_ids, text_mask = with_unconditional(text_ids, text_mask, uncond_ids)  # (2C, L')
    if text_ids.shape[1] > model.config.max_text_len:
        raise ValueError(f"text of {text_ids.shape[1]} tokens; the model reads at most {model.config.max_text_len}")
    return text_ids, text_mask


# Decoding hashes the draws' noise for this many steps at a time, in one pass (see CounterNoise.steps).
NOISE_BLOCK = 32


def _decode_cached(model: Seq2Seq, text_ids: Tensor, text_mask: Tensor, prefix: Tensor, sampler: Sampler,
                   compile: bool, progress: bool, previews: _Previews | None = None) -> Tensor:
    """Prefill once, then one cached decode step per token; returns (C, h * w).

    What every step shares is made before the loop: the caches and stacked projections (setup_caches),
    the positions, the output buffer, and the noise NOISE_BLOCK steps at a time. Eager steps attend over
    the filled part of the cache (a bucket of 16 positions); a compiled step keeps one shape, the whole cache.
    """
    device = text_ids.device
    start, total = prefix.shape[1], model.config.image_len
    model.setup_caches(text_ids.shape[0], device=device)
    logits = model.prefill(text_ids, text_mask, torch.cat([prefix, prefix]) if sampler.guided else prefix)
    out = prefix.new_empty(prefix.shape[0], total)  # (C, S)
    out[:, :start] = prefix
    if previews is not None:
        previews(start, [prefix])
    positions = torch.arange(total, device=device)
    noise = sampler.noise_for(model.config.codebook_size)
    step = partial(_next_id, model, sampler)
    if compile:
        step = compiled(step, device)
    ids = sampler(logits, positions[start : start + 1])
    out[:, start] = ids
    if previews is not None:
        previews(start + 1, [out[:, : start + 1]])
    for position in tqdm(range(start + 1, total), desc="decoding", unit="token", disable=not progress):
        if (position - start - 1) % NOISE_BLOCK == 0:
            block = noise.steps(position, min(NOISE_BLOCK, total - position))  # (C, N, V)
        uniform = block[:, (position - start - 1) % NOISE_BLOCK]  # (C, V)
        kv_len = None if compile else model.decode_length(position + 1)
        ids = step(ids, positions[position : position + 1], uniform, kv_len).clone()  # a CUDA graph reuses its output
        out[:, position] = ids
        if previews is not None:
            previews(position + 1, [out[:, : position + 1]])
    return out


# Where torch.compile keeps the kernels it builds, between runs, unless TORCHINDUCTOR_CACHE_DIR names a place:
# measured on a 2-core CPU, the `small` step's first compile took 70 s and a later process loaded it in 8 s.
COMPILE_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tilecraft" / "inductor"


def compile_cache() -> Path:
    """Where compiled kernels are kept: ``$TORCHINDUCTOR_CACHE_DIR``, else :data:`COMPILE_CACHE`."""
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or COMPILE_CACHE)


def can_compile(device: torch.device) -> bool:
    """False where torch.compile cannot build kernels: CPU kernels need a C++ compiler on PATH."""
    return device.type != "cpu" or any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++", "cl"))


def compiled(step: Callable, device: torch.device) -> Callable:
    """``step`` under torch.compile (a CUDA graph on a GPU), its kernels kept in :func:`compile_cache`.

    One graph per batch size (static shapes: each runs at full speed, each compiled once and then loaded
    from the cache). Where no C++ compiler exists to build CPU kernels, says so in one line and returns
    ``step`` uncompiled.
    """
    if not can_compile(device):
        print("seq2seq: compiling the decode step needs a C++ compiler for CPU kernels and none is on PATH; "
              "decoding uncompiled", file=sys.stderr)
        return step
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(COMPILE_CACHE))
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return torch.compile(step, mode=mode, fullgraph=True, dynamic=False)


def _next_id(model: Seq2Seq, sampler: Sampler, ids: Tensor, input_pos: Tensor, uniform: Tensor,
             kv_len: int | None) -> Tensor:
    """Read the candidates' last ids (C,) at decoder position ``input_pos``; draw image token ``input_pos``."""
    return sampler(model.decode_one_token(sampler.rows(ids), input_pos, kv_len), input_pos, uniform)


def _decode_recompute(model: Seq2Seq, text_ids: Tensor, text_mask: Tensor, prefix: Tensor, sampler: Sampler,
                      compile: bool, progress: bool, previews: _Previews | None = None) -> Tensor:
    """The baseline: encode once, then run the decoder over the whole prefix for every token."""
    start, total = prefix.shape[1], model.config.image_len
    memory = model.encode(text_ids, text_mask)
    bos = prefix.new_full((prefix.shape[0], 1), model.config.bos_id)
    decoder_ids = torch.cat([bos, prefix], dim=1)  # (C, 1 + k)
    if previews is not None:
        previews(start, [prefix])
    for position in tqdm(range(start, total), desc="decoding", unit="token", disable=not progress):
        rows = torch.cat([decoder_ids, decoder_ids]) if sampler.guided else decoder_ids
        logits = model.decode(memory, text_mask, rows)[:, -1]  # (R, V)
        ids = sampler(logits, torch.full((1,), position, device=prefix.device))
        decoder_ids = torch.cat([decoder_ids, ids[:, None]], dim=1)
        if previews is not None:
            previews(position + 1, [decoder_ids[:, 1:]])
    return decoder_ids[:, 1:]


def candidate_seeds(seeds: int | Sequence[int] | Tensor | None, n_rows: int, device: torch.device) -> Tensor:
    if seeds is None:
        return torch.randint(0, 2**62, (n_rows,)).to(device)
    if isinstance(seeds, int):
        return torch.arange(seeds, seeds + n_rows, device=device)
    seeds = torch.as_tensor(seeds, dtype=torch.long).flatten().to(device)
    if seeds.numel() != n_rows:
        raise ValueError(f"{seeds.numel()} seeds for {n_rows} candidates; give one per candidate or one int")
    return seeds


def _prefix_as_mask(prefix_ids: Tensor, image_len: int) -> tuple[Tensor, Tensor]:
    """``prefix_ids`` (B, k) as init ids (B, S) with a keep mask (S,) whose first k positions are True."""
    prefix = prefix_ids.flatten(1)  # (B, k)
    k = prefix.shape[1]
    if k >= image_len:
        raise ValueError(f"a prefix of {k} ids leaves nothing of the {image_len} to generate")
    init = torch.cat([prefix, prefix.new_zeros(prefix.shape[0], image_len - k)], dim=1)  # (B, S)
    return init, torch.arange(image_len, device=prefix.device) < k


def _candidate_forcing(init_ids: Tensor | None, keep_mask: Tensor | None, num_candidates: int, n_rows: int,
                       codebook_size: int, image_len: int, device: torch.device) -> Forcing | None:
    """Every candidate's given ids and keep mask, (C, S) each; None when nothing is given."""
    if (init_ids is None) != (keep_mask is None):
        raise ValueError("init_ids and keep_mask go together")
    if init_ids is None:
        return None
    ids = init_ids.to(device=device, dtype=torch.long).flatten(1)  # (B, S)
    keep = keep_mask.to(device=device, dtype=torch.bool).reshape(-1, image_len)  # (B, S), or (1, S) for all
    keep = keep.expand(ids.shape[0], -1)
    if ids.shape[1] != image_len or keep.shape != ids.shape:
        raise ValueError(f"init_ids {tuple(init_ids.shape)} and keep_mask {tuple(keep_mask.shape)} must hold the "
                         f"grid's {image_len} positions for each prompt")
    if ids.shape[0] * num_candidates != n_rows:
        raise ValueError(f"init_ids has {ids.shape[0]} rows for {n_rows // num_candidates} prompts")
    if bool(keep.all(1).any()):
        raise ValueError("keep_mask keeps every position of a grid: nothing is left to generate")
    if not bool(((ids >= 0) & (ids < codebook_size) | ~keep).all()):
        raise ValueError(f"kept ids must be codebook ids in [0, {codebook_size})")
    ids = ids.masked_fill(~keep, 0)  # what is not kept is never read
    return Forcing.from_mask(ids.repeat_interleave(num_candidates, 0), keep.repeat_interleave(num_candidates, 0))


class _Previews:
    """Hands the partial grids to ``on_step``: after the forced prefix, every ``every`` positions, and the last."""

    def __init__(self, on_step: Callable[[int, Tensor], None], every: int, start: int, forcing: Forcing | None,
                 n_rows: int, grid_size: int):
        self.on_step, self.every, self.start, self.grid_size = on_step, every, start, grid_size
        self.total = grid_size * grid_size
        self.pending = (torch.full((n_rows, self.total), UNDRAWN, dtype=torch.long) if forcing is None
                        else forcing.ids.masked_fill(~forcing.keep, UNDRAWN))  # (C, S): known before drawing

    def __call__(self, filled: int, known: list[Tensor]) -> None:
        """``filled`` positions are known: ``known`` (pieces of (C, ...) along positions) holds them."""
        if (filled - self.start) % self.every and filled != self.total:
            return
        grid = self.pending.to(known[0].device).clone()
        grid[:, :filled] = torch.cat(known, dim=1)
        self.on_step(filled, grid.view(-1, self.grid_size, self.grid_size))  # (C, h, w)


def with_unconditional(text_ids: Tensor, text_mask: Tensor, uncond_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
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
