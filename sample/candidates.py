"""Candidates drawn for `shapes` prompts and judged by the oracle, kept on disk to be ranked again.

``draw_candidates`` draws each prompt's candidates with `python -m sample`'s defaults (held-out prompts for
``bench.structure``, training prompts for ``python -m train candidates``) and records the oracle's verdict on
each; ``save_candidates`` / ``load_candidates`` keep them in a folder (candidates.json: settings, prompts,
verdicts and failing aspects; candidates.safetensors: the pictures as uint8 and their image tokens), and
``extend_candidates`` appends later prompts to a record.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from checkpoint import atomic_write, write_json
from data.oracle import check_details
from data.shapes import KINDS, evaluation_prompts, training_prompts
from sample.pipeline import Pipeline, SamplingSettings

__all__ = ["TENSORS", "draw_candidates", "candidate_settings", "save_candidates", "load_candidates",
           "extend_candidates"]

TENSORS = ("images", "tokens")  # what candidates.safetensors holds


def draw_candidates(run: Path, *, prompts_per_kind: int, candidates: int, seed: int = 0,
                    device: str = "auto", kinds: Sequence[str] = KINDS, batch_prompts: int = 8,
                    first: int = 0, cfg: float = SamplingSettings.cfg,
                    temperature: float = SamplingSettings.temperature, top_k: int | None = SamplingSettings.top_k,
                    top_p: float | None = SamplingSettings.top_p, split: str = "heldout",
                    progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Candidates for held-out prompts ``first`` to ``prompts_per_kind - 1`` of each kind of scene, drawn with
    `python -m sample` defaults but the guidance scale ``cfg``, ``temperature``, ``top_k`` and ``top_p`` (prompt i
    and candidate j are the same pictures whatever ``first`` is). ``split`` "train" draws for training prompts
    instead (data.shapes.training_prompts, what `python -m train candidates` judges). ``progress(kind, done,
    total)`` hears of every batch of prompts drawn (default: a line on stderr).

    {"settings": {...}, "kinds": {kind: {"prompts": [str], "right": [[bool] * candidates]}},
     "images": uint8 tensor (prompts of all kinds, candidates, 3, S, S)}.
    """

    pipeline = Pipeline(run, device=device, rerank=False)
    settings = SamplingSettings(n=candidates, keep=candidates, seed=seed, rerank=False, cfg=cfg,
                                temperature=temperature, top_k=top_k, top_p=top_p)
    record = {"settings": candidate_settings(run, prompts_per_kind, candidates, seed, kinds, cfg, temperature, top_k,
                                             top_p, split), "kinds": {}}
    prompts_of = {"heldout": evaluation_prompts, "train": training_prompts}[split]
    images, tokens = [], []
    for kind in kinds:
        prompts = prompts_of(kind, prompts_per_kind, seed=seed)[first:]
        right, failed = [], []
        for start in range(0, len(prompts), batch_prompts):
            chunk = prompts[start:start + batch_prompts]
            for (text, scene), pictures in zip(chunk, pipeline([t for t, _ in chunk], settings)):
                by_candidate = sorted(pictures, key=lambda p: p.candidate)
                details = [check_details(scene, p.image) for p in by_candidate]
                right.append([all(d.values()) for d in details])
                failed.append([[aspect for aspect, holds in d.items() if not holds] for d in details])
                images.append(torch.stack([_to_uint8(p.image) for p in by_candidate]))
                tokens.append(torch.stack([p.tokens for p in by_candidate]).to(torch.int32))
            done = min(start + batch_prompts, len(prompts))
            if progress is None:
                print(f"bench.structure: {kind} {done}/{len(prompts)} prompts", file=sys.stderr)
            else:
                progress(kind, done, len(prompts))
        record["kinds"][kind] = {"prompts": [t for t, _ in prompts], "right": right, "failed": failed}
    record["images"] = torch.stack(images)  # (P, N, 3, S, S)
    record["tokens"] = torch.stack(tokens)  # (P, N, h, w) the decoder's ids of each candidate
    return record


def candidate_settings(run: Path, prompts_per_kind: int, candidates: int, seed: int, kinds: Sequence[str],
                       cfg: float = SamplingSettings.cfg, temperature: float = SamplingSettings.temperature,
                       top_k: int | None = SamplingSettings.top_k, top_p: float | None = SamplingSettings.top_p,
                       split: str = "heldout") -> dict:
    """What a record of candidates was drawn with, the key a folder of them is read back by; ``split`` is
    recorded only where it is not the held-out one, so bench caches drawn before it still match."""
    settings = {"format": 3, "run": str(run.resolve()), "prompts_per_kind": prompts_per_kind,
                "candidates": candidates, "seed": seed, "kinds": list(kinds), "cfg": cfg, "temperature": temperature,
                "top_k": top_k, "top_p": top_p}
    if split != "heldout":
        settings["split"] = split
    return settings


def _to_uint8(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)


def save_candidates(record: dict, directory: Path) -> None:
    """candidates.safetensors (the pictures) and candidates.json (settings, prompts, verdicts), atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "candidates.safetensors",
                 lambda tmp: save_file({k: record[k].contiguous() for k in TENSORS}, tmp))
    write_json(directory / "candidates.json", {k: v for k, v in record.items() if k not in TENSORS})


def load_candidates(directory: Path, settings: dict) -> dict | None:
    """The cached candidates when they were drawn with ``settings``, or with fewer prompts per kind and
    otherwise the same (the first prompts of a longer list); None when there are none or others."""
    try:
        record = json.loads((directory / "candidates.json").read_text())
        cached = record.get("settings", {})
        if {**cached, "prompts_per_kind": 0} != {**settings, "prompts_per_kind": 0} \
                or cached["prompts_per_kind"] > settings["prompts_per_kind"]:
            return None
        tensors = load_file(str(directory / "candidates.safetensors"))
        record.update({k: tensors[k] for k in TENSORS})
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None
    return record


def extend_candidates(record: dict, more: dict) -> dict:
    """``record`` with the later prompts of ``more`` (drawn with ``first`` = record's prompts per kind) appended."""
    kinds = record["settings"]["kinds"]
    old, new = record["settings"]["prompts_per_kind"], more["settings"]["prompts_per_kind"]
    added = new - old
    for index, kind in enumerate(kinds):
        record["kinds"][kind] = {key: record["kinds"][kind][key] + more["kinds"][kind][key]
                                 for key in ("prompts", "right", "failed")}
    return {"settings": more["settings"], "kinds": record["kinds"],
            **{k: torch.cat([part for index in range(len(kinds)) for part in (
                record[k][index * old:(index + 1) * old], more[k][index * added:(index + 1) * added])])
               for k in TENSORS}}
