"""Quality, measured: the oracle's compositional score of a run's pictures on held-out `shapes` prompts.

For each kind of scene (single, position, relation, count) it draws prompts from the held-out split (colour-
shape pairs and relation triples the model never saw), generates N candidates per prompt, and reports the
share of pictures in which every stated attribute holds:

- ``any``: over all candidates (no reranking: what one unranked sample scores);
- ``random1``: keeping candidate 0 of each prompt (keeping 1 at random: the seeds are random draws);
- ``clip1``: keeping the best candidate by the run's CLIP-style scorer alone;
- ``pick``: keeping the first picture ``python -m sample`` keeps (the scorer's shortlist re-ordered by the
  decoder's likelihood, ``--shortlist``).

Also the VQGAN's reconstruction PSNR and oracle agreement on held-out renders, and the held-out bits per
image token of the transformer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from checkpoint import read_run_record
from data.images import from_pil, to_pil
from data.oracle import check
from data.shapes import Scene, evaluation_prompts, example
from sample.pipeline import Pipeline, SamplingSettings
from vqgan import VQGAN
from vqgan.losses import psnr

__all__ = ["composition_scores", "vqgan_scores", "heldout_bits"]

KINDS = ("single", "position", "relation", "count")


def composition_scores(run: Path, *, prompts_per_kind: int = 32, candidates: int = 16,
                       cfg: float = SamplingSettings.cfg, top_k: int | None = SamplingSettings.top_k,
                       top_p: float | None = SamplingSettings.top_p, temperature: float = SamplingSettings.temperature,
                       seed: int = 0, device: str = "auto", kinds=KINDS, batch_prompts: int = 8,
                       dtype: str = "auto", speculative: int = 0,
                       shortlist: int = SamplingSettings.shortlist) -> dict:
    """{kind: {"any", "random1", "clip1", "pick", "prompts", "clip1_of_first"}} over held-out prompts of each
    kind, with the sampling defaults of ``python -m sample`` unless told otherwise."""

    pipeline = Pipeline(run, device=device, rerank=True, dtype=dtype)
    settings = SamplingSettings(n=candidates, keep=1, top_k=top_k, top_p=top_p, temperature=temperature, cfg=cfg,
                                seed=seed, speculative=speculative, shortlist=shortlist)
    subsets = sorted({k for k in (1, 2, 4, 8, 16, 32) if k < candidates} | {candidates})
    results = {}
    for kind in kinds:
        prompts = evaluation_prompts(kind, prompts_per_kind, seed=seed)
        passed_any, passed_random, passed_pick = 0, 0, 0
        passed_best = dict.fromkeys(subsets, 0)  # best by the scorer among the first k candidates
        for start in range(0, len(prompts), batch_prompts):
            chunk = prompts[start:start + batch_prompts]
            for (text, scene), pictures in zip(chunk, pipeline([t for t, _ in chunk], settings)):
                by_candidate = sorted(pictures, key=lambda p: p.candidate)
                ok = [check(scene, p.image) for p in by_candidate]
                scores = [p.score for p in by_candidate]
                passed_any += sum(ok)
                passed_random += ok[0]  # candidate 0: its seed is as random a draw as any other's
                passed_pick += ok[pictures[0].candidate]  # the pipeline's rank 1
                for k in subsets:
                    passed_best[k] += ok[max(range(k), key=scores.__getitem__)]
        n = len(prompts)
        results[kind] = {"prompts": n, "any": passed_any / (n * candidates), "random1": passed_random / n,
                         "clip1": passed_best[candidates] / n, "pick": passed_pick / n,
                         "clip1_of_first": {k: v / n for k, v in passed_best.items()}}
    return results


@torch.inference_mode()
def vqgan_scores(run: Path, *, n: int = 256, size: int = 64, device: str = "cpu", seed: int = 0) -> dict:
    """PSNR (dB) of reconstructions of held-out renders, and how often the oracle reads both alike."""

    vqgan = VQGAN.from_pretrained(run / "vqgan").to(device)
    examples = [example(seed, "heldout", i, size) for i in range(n)]
    images = torch.stack([from_pil(e["image"], size) for e in examples]).to(device)
    recon = torch.cat([vqgan.decode(vqgan.encode(chunk)) for chunk in images.split(64)])
    agree = sum(check(Scene.from_dict(e["scene"]), to_pil(r.cpu())) for e, r in zip(examples, recon)) / n
    return {"psnr_db": psnr(images, recon).item(), "oracle_agreement": agree, "pictures": n}


def heldout_bits(run: Path) -> float | None:
    """Held-out bits per image token: the last value seq2seq logged, or the one a packed run's all.json keeps."""

    path = run / "metrics" / "seq2seq.jsonl"
    if path.is_file():
        values = [json.loads(line).get("heldout_bits_per_token") for line in path.read_text().splitlines()]
        values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if values:
            return values[-1]
    final = read_run_record(run).get("final")
    return final.get("heldout_bits_per_token") if isinstance(final, dict) else None
