"""How well the model predicts held-out pictures, and how much of that it owes to the caption.

The **caption gap** is the measure that tells a text-to-image model from an unconditional one: held-out
bits per image token when each picture is given another picture's caption, minus with its own. A model
that ignores its text has a gap of zero however low its loss; one that reads the text pays for a wrong
caption. Training logs it at every evaluation; ``python -m bench`` reports it for any data set.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["log_likelihoods", "bits_per_token", "derangement", "caption_gap"]


@torch.no_grad()
def log_likelihoods(model, tokenizer, texts: Sequence[str], image_ids: torch.Tensor, device: torch.device | str,
                    batch_size: int = 128) -> torch.Tensor:
    """(N,) log p(image_ids[i] | texts[i]) in nats, teacher-forced and summed over each picture's tokens, on the
    CPU; ``image_ids`` (N, h, w) or (N, T)."""
    sums = []
    for start in range(0, len(texts), batch_size):
        text_ids, text_mask = tokenizer.batch(list(texts[start:start + batch_size]),
                                              max_length=model.config.max_text_len)
        targets = image_ids[start:start + batch_size].flatten(1).long().to(device)  # (B, T)
        logits = model(text_ids.to(device), text_mask.to(device), targets)  # (B, T, V)
        nats = F.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")  # (B, T)
        sums.append(-nats.sum(1).cpu())
    return torch.cat(sums)


def bits_per_token(model, tokenizer, texts: Sequence[str], image_ids: torch.Tensor, device: torch.device | str,
                   batch_size: int = 128) -> float:
    """Bits per image token of ``image_ids`` (N, h, w) or (N, T) given ``texts``, over all N pictures' tokens."""
    nats = -log_likelihoods(model, tokenizer, texts, image_ids, device, batch_size).double().sum().item()
    return nats / image_ids[:len(texts)].numel() / math.log(2)


def derangement(captions: Sequence[str], seed: int = 0) -> dict[str, str]:
    """Each distinct caption mapped to another one, in a fixed random order (a cycle through all of them).

    Random rather than "the next one": held-out rows often come in runs of near twins (one emoji in five
    skin tones), and a neighbour's caption would be almost right.
    """
    distinct = list(dict.fromkeys(captions))
    order = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed)).tolist()
    cycle = [distinct[i] for i in order]
    return {caption: cycle[(i + 1) % len(cycle)] for i, caption in enumerate(cycle)}


def caption_gap(model, tokenizer, texts: Sequence[str], image_ids: torch.Tensor, device: torch.device | str,
                batch_size: int = 128) -> dict:
    """Bits per image token of ``image_ids`` under each picture's own caption ("right"), another picture's
    (:func:`derangement`, "shuffled") and the empty caption ("empty", the unconditional model caption
    dropout trains); "gap" is shuffled minus right. Shuffled and gap are None with fewer than two distinct
    captions. Evaluated in eval mode; the model is left in the mode it came in."""
    if len(texts) != len(image_ids) or not len(texts):
        raise ValueError(f"caption_gap takes one caption per picture, got {len(texts)} captions and "
                         f"{len(image_ids)} pictures")
    other = derangement(texts)
    was_training = model.training
    model.eval()
    try:
        right = bits_per_token(model, tokenizer, texts, image_ids, device, batch_size)
        shuffled = bits_per_token(model, tokenizer, [other[t] for t in texts], image_ids, device, batch_size) \
            if len(other) > 1 else None
        empty = bits_per_token(model, tokenizer, [""] * len(texts), image_ids, device, batch_size)
    finally:
        model.train(was_training)
    return {"pictures": len(texts), "distinct_captions": len(other), "right": right, "shuffled": shuffled,
            "empty": empty, "gap": None if shuffled is None else shuffled - right}
