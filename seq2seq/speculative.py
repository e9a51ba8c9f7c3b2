"""Speculative Jacobi decoding: several image tokens per forward pass, drawn from plain sampling's distribution.

Training-free speculative Jacobi decoding (SJD; Teng et al. 2024) checked with the speculative-sampling rule
(Leviathan et al. 2023; Chen et al. 2023). A row has accepted its first ``n`` image tokens of ``S``; its window
covers tokens ``s .. s + W - 1`` with ``s = min(n, S - W)``. One cached decoder pass reads the ids at decoder
positions ``s .. s + W - 1`` (token ``s - 1``, accepted, then the drafts after it) and gives at every window
position the distribution ``p_i`` plain sampling draws token ``i`` from, given the ids before it (guidance,
temperature, top-k and top-p: :meth:`Sampler.probs`). Token ``n``'s ``p`` reads accepted ids only, so it is exact.
Drafts are checked in raster order: draft ``x_i``, drawn from ``q_i``, is accepted with probability
``min(1, p_i(x_i) / q_i(x_i))``, after which ``p_{i+1}`` reads accepted ids only and is exact too. At the first
rejection token ``i`` is drawn from ``normalize(max(0, p_i - q_i))`` and the rest of the window is dropped; if
every draft passes, the window's last token is drawn from its ``p``. For any ``q_i`` fixed before ``x_i`` is
drawn, the token so kept has law ``p_i`` exactly, so a picture has plain sampling's distribution; a pass keeps
at least one token and at most W.

Drafts: after a pass every token not accepted gets a fresh draft from this pass's ``p`` at its position (its
new ``q``), a token past the window's end from the window's last ``p``. A draft is a function of what lies
before its position and of its own noise, so no decision about an earlier position depends on it: the
condition of the rule above. Forced ids (editing: :class:`seq2seq.generate.Forcing`) are their own drafts and
are always accepted; their log-likelihood is added from the pass in which they are accepted (reading accepted
ids only).

The key/value cache: a pass writes the keys of every position it reads and starts at token ``n - 1``, the
first input that may have changed, so the slots of rejected drafts are overwritten by the next pass, and no
query reads a slot after its own position (the causal mask): what is read is always accepted.

Rows: every row keeps its own ``n`` and window (per-row positions in one batched pass), so a row's tokens,
its pass count and its noise do not depend on the other rows. Randomness: one counter uniform
(:meth:`CounterNoise.single`) per (seed, pass, position, stream) for the draft, the accept test and the
redraw, so a seed is reproducible and batch-independent; the stream differs from plain sampling's, so a seed
draws another picture than without speculation (of the same distribution).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm import tqdm

from seq2seq.filters import CounterNoise, sample_inverse_cdf
from seq2seq.model import Seq2Seq

if TYPE_CHECKING:  # seq2seq.generate imports this module
    from seq2seq.generate import Forcing, Sampler, _Previews

__all__ = ["decode_speculative", "accept_drafts", "residual", "check_window"]

STREAMS = 3  # counter uniforms per (pass, position): the draft, the accept test, the redraw
DRAFT, ACCEPT, REDRAW = range(STREAMS)


def check_window(window: int, image_len: int) -> None:
    """A ValueError unless ``window`` is 0 (off) or from 2 to the grid's ``image_len`` tokens."""
    if window != 0 and not 2 <= window <= image_len:
        raise ValueError(f"speculative window must be 0 (off) or from 2 to the grid's {image_len} tokens, "
                         f"got {window}")


def accept_drafts(uniform: Tensor, p_draft: Tensor, q_draft: Tensor) -> Tensor:
    """Which drafts pass (bool, any shape): ``uniform < p(x) / q(x)``, i.e. accepted with probability
    ``min(1, p(x) / q(x))``; written without the division, ``q(x) > 0`` for any drawn draft."""
    return uniform * q_draft < p_draft


def residual(target: Tensor, proposal: Tensor) -> Tensor:
    """What a rejected draft's token is drawn from: ``max(0, p - q)`` (..., V), unnormalized; ``p`` where that
    is all zero (``p == q``, where no draft is rejected, or no draft at all: ``q = 0``)."""
    rest = (target - proposal).clamp(min=0.0)
    return torch.where(rest.sum(-1, keepdim=True) > 0, rest, target)


def decode_speculative(model: Seq2Seq, text_ids: Tensor, text_mask: Tensor, prefix: Tensor, sampler: Sampler,
                       window: int, progress: bool = False, previews: _Previews | None = None) -> Tensor:
    """Prefill once, then one cached pass over each row's window of ``window`` tokens; returns (C, S) ids."""
    config = model.config
    total = config.image_len
    check_window(window, total)
    n_rows, start = prefix.shape
    device = prefix.device
    forcing = sampler.forcing
    both = (lambda x: torch.cat([x, x])) if sampler.guided else (lambda x: x)  # (C, ...) -> (R, ...)

    model.setup_caches(text_ids.shape[0], device=device)
    logits = model.prefill(text_ids, text_mask, both(prefix))[:, None]  # (R, 1, V): token `start`
    seq = prefix.new_zeros(n_rows, total + 1)  # (C, S + 1): decoder inputs, bos then accepted ids, then drafts
    seq[:, 0] = config.bos_id
    seq[:, 1 : start + 1] = prefix
    if forcing is not None:
        seq[:, 1:] = torch.where(forcing.keep, forcing.ids, seq[:, 1:])  # forced ids are their own drafts
    if previews is not None:
        previews(start, [prefix])
    noise = CounterNoise(sampler.seeds, 1)  # one uniform a draw: the first column's
    accepted = torch.full((n_rows,), start, device=device)  # (C,) tokens accepted per row
    first = accepted.clone()  # (C,) the token the pass's first output predicts
    probs, cond_logits = sampler.probs(logits)  # (C, 1, V)
    drafts_from = torch.zeros_like(probs)  # (C, 1, V): nothing drafted before the prefill
    done, pass_index = start, 0
    with tqdm(total=total - start, desc="decoding", unit="token", disable=not progress) as bar:
        while True:
            counter = _Counter(noise, pass_index, total)
            newly = _verify(seq, accepted, first, probs, drafts_from, counter, forcing)
            if forcing is not None:
                _add_likelihood(forcing, cond_logits, first, accepted, newly)
            accepted = newly
            least = int(accepted.min())
            if previews is not None:
                for filled in range(done + 1, least + 1):
                    previews(filled, [seq[:, 1 : filled + 1]])
            bar.update(least - done)
            done = least
            if least == total:
                return seq[:, 1:]
            # Near the grid's end every window reaches its last token: reading fewer accepted tokens again
            # changes no row's verdicts, drafts or noise (all keyed by position).
            drafts_from, positions = _draft(seq, accepted, first, probs, min(window, total - least), counter, forcing)
            first = positions[:, 0]
            pass_index += 1
            # One row (and its unconditional twin): shared positions, the cache's plain write and a shared mask.
            read_at = positions[0] if n_rows == 1 else both(positions)  # (W,) or (R, W)
            logits = model.decoder.decode(both(seq.gather(1, positions)), read_at,
                                          model.decode_length(int(positions[:, -1].max()) + 1))  # (R, W, V)
            probs, cond_logits = sampler.probs(logits)  # (C, W, V)


class _Counter:
    """The uniforms (C, N) of one pass at positions (C, N), in one of the STREAMS."""

    def __init__(self, noise: CounterNoise, pass_index: int, total: int):
        # Past plain sampling's steps (0 .. S-1), one counter per (pass, position, stream).
        self.noise, self.base = noise, total + STREAMS * pass_index * total

    def __call__(self, positions: Tensor, stream: int) -> Tensor:
        return self.noise.single(self.base + STREAMS * positions + stream)


def _verify(seq: Tensor, accepted: Tensor, first: Tensor, probs: Tensor, drafts_from: Tensor, counter: _Counter,
            forcing: Forcing | None) -> Tensor:
    """Check the drafts of one pass in order, draw the token at the first rejection (or the window's last), write
    it into ``seq``; the new count of accepted tokens (C,).

    ``probs`` and ``drafts_from`` (C, T, V) are p and q of tokens ``first .. first + T - 1``; drafts sit in
    ``seq`` at tokens ``accepted .. first + T - 2``; the last token of the window has no draft.
    """
    n_rows, length, _ = probs.shape
    rows = torch.arange(n_rows, device=seq.device)
    slots = torch.arange(length, device=seq.device)
    positions = first[:, None] + slots  # (C, T) token positions
    drafts = seq.gather(1, positions + 1)  # (C, T)
    p_draft = probs.gather(2, drafts[..., None])[..., 0]  # (C, T)
    q_draft = drafts_from.gather(2, drafts[..., None])[..., 0]
    passed = accept_drafts(counter(positions, ACCEPT), p_draft, q_draft) & (slots < length - 1)  # (C, T)
    passed |= positions < accepted[:, None]  # read again only because the window stops at the grid's end
    if forcing is not None:
        passed |= forcing.keep.gather(1, positions)
    kept = passed.long().cumprod(1).sum(1)  # (C,) leading slots kept; at slot `kept` a token is drawn
    at = kept.clamp(max=length - 1)  # (C,)
    target = probs[rows, at]  # (C, V)
    proposal = drafts_from[rows, at].masked_fill((at == length - 1)[:, None], 0.0)  # the last slot: no draft
    redrawn = sample_inverse_cdf(residual(target, proposal), counter((first + at)[:, None], REDRAW)[:, 0])  # (C,)
    drawing = kept < length  # rows whose window ends in a draw
    index = (first + at + 1)[:, None]  # (C, 1)
    seq.scatter_(1, index, torch.where(drawing, redrawn, seq.gather(1, index)[:, 0])[:, None])
    return first + kept + drawing.long()


def _draft(seq: Tensor, accepted: Tensor, first: Tensor, probs: Tensor, window: int, counter: _Counter,
           forcing: Forcing | None) -> tuple[Tensor, Tensor]:
    """Fresh drafts for the next window's tokens not accepted, from this pass's ``probs`` (C, T, V) of tokens
    ``first ..`` (past its end: its last), written into ``seq``; their distributions (C, W, V) and the next
    window's token positions (C, W)."""
    total = seq.shape[1] - 1
    length = probs.shape[1]
    start = accepted.clamp(max=total - window)  # (C,)
    positions = start[:, None] + torch.arange(window, device=seq.device)  # (C, W)
    source = (positions - first[:, None]).clamp(0, length - 1)  # (C, W) this pass's slot for each
    drafts_from = probs.gather(1, source[..., None].expand(-1, -1, probs.shape[2]))  # (C, W, V)
    drafts = sample_inverse_cdf(drafts_from, counter(positions, DRAFT))  # (C, W)
    current = seq.gather(1, positions + 1)
    drafts = torch.where(positions >= accepted[:, None], drafts, current)
    if forcing is not None:
        drafts = torch.where(forcing.keep.gather(1, positions), forcing.ids.gather(1, positions), drafts)
    seq.scatter_(1, positions + 1, drafts)
    return drafts_from, positions


def _add_likelihood(forcing: Forcing, cond_logits: Tensor, first: Tensor, accepted: Tensor, newly: Tensor) -> None:
    """Add the log-likelihood of the forced ids after the hole that this pass accepted (tokens accepted ..
    newly - 1), from the conditional rows' logits (C, T, V) of tokens ``first ..`` (temperature 1, no filters)."""
    positions = first[:, None] + torch.arange(cond_logits.shape[1], device=first.device)  # (C, T)
    log_probs = cond_logits.float().log_softmax(-1).gather(2, forcing.ids.gather(1, positions)[..., None])[..., 0]
    counted = (positions >= accepted[:, None]) & (positions < newly[:, None]) & forcing.after_hole.gather(1, positions)
    forcing.log_likelihood.add_(torch.where(counted, log_probs, 0.0).sum(1))
