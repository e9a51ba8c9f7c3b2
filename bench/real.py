"""Quality on any data: a run's figures on the held-out split of any ``--data``, `shapes` or a folder alike.

The `shapes` oracle (bench/quality.py) reads pictures back into objects, so it only judges `shapes`. These
figures need nothing but pictures and captions:

- **VQGAN**: PSNR (dB, the mean over pictures of each picture's PSNR) and SSIM (:func:`ssim`) of held-out
  reconstructions, beside a baseline that keeps as many numbers per picture as the codes stand for: the
  picture shrunk by the VQGAN's downsampling factor f by averaging f x f blocks, enlarged back bicubic.
- **Codebook usage**: the share of the codebook's codes that appear in the held-out pictures' codes.
- **Caption gap** (:func:`seq2seq.evaluate.caption_gap`): held-out bits per image token given each picture's own caption,
  another picture's caption and the empty caption. The gap, shuffled minus own, is how much the caption
  tells the model; near zero, the model draws the data's average picture whatever the prompt.
- **Retrieval**: pictures drawn (not reranked: reranking by the scorer would make this circular) for the
  first N distinct held-out captions, each ranked against all N captions by the run's own scorer; R@1 and
  R@5 beside chance (1/N, 5/N).
- **Pairwise** (bench/structure.py): how often the run's scorer prefers a held-out picture's own caption to
  a word-swap hard negative of it (data/negatives.py), per kind of negative; chance 50%.
- **Scorer Fréchet distance** (:func:`frechet_distance`) between generated and held-out pictures in the
  scorer's image-embedding space, with a floor: the same distance between two disjoint halves of the
  held-out pictures. It is not FID: the embedding is the run's own small scorer, not Inception, so its
  values compare runs of this project on the same data only.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from bench.structure import pairwise_captions
from cli import UserError
from data.images import from_pil
from data.sources import DEFAULT_HELDOUT_FRACTION, StreamDataset, open_dataset, texts
from sample.pipeline import Pipeline, SamplingSettings
from sample.rerank import RunScorer, resize_for_scorer
from seq2seq.evaluate import caption_gap
from vqgan.losses import psnr

__all__ = ["ssim", "frechet_distance", "retrieval_at", "heldout_examples", "distinct_captions",
           "real_scores"]

SSIM_WINDOW = 11  # the gaussian window of Wang et al. (2004): 11 x 11, sigma 1.5, K1 0.01, K2 0.03
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
CHUNK = 64  # pictures per forward pass
MAX_CAPTION_SCAN = 64  # distinct captions are looked for among at most this many examples per caption asked


# ---------------------------------------------------------------- measures


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """SSIM of each pair of pictures, (B,), for RGB pictures (B, 3, H, W) in [0, 1].

    The SSIM map under a gaussian window (valid positions only, no padding), averaged over positions and
    the three channels; dynamic range 1, so C1 = (0.01)^2 and C2 = (0.03)^2. Pictures smaller than the
    window use a window as large as the picture. Computed in float64: the variances are differences of
    nearly equal numbers.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim takes two batches of one shape (B, C, H, W), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    x, y = x.double(), y.double()
    channels = x.shape[1]
    side = min(window, x.shape[-2], x.shape[-1])
    offsets = torch.arange(side, dtype=torch.float64, device=x.device) - (side - 1) / 2
    g = torch.exp(-offsets.square() / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, side, side)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(dim=1).float()


def _covariance(x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(dim=0)
    return centred.t() @ centred / max(x.shape[0] - 1, 1)


def _psd_eigenvalues(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of a matrix that is symmetric PSD up to rounding."""
    values, vectors = torch.linalg.eigh((matrix + matrix.t()) / 2)
    return values.clamp(min=0), vectors


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between gaussians fitted to two sets of embeddings (N, E) and (M, E).

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)``, all in float64. Both square
    roots are of symmetric PSD matrices, taken by eigendecomposition with negative rounding noise clamped
    to zero, so rank-deficient covariances (fewer pictures than dimensions) need no regularising. A set of
    one row has zero covariance.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(f"frechet_distance takes two non-empty (N, E) sets of one width, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    cov_a, cov_b = _covariance(a), _covariance(b)
    values, vectors = _psd_eigenvalues(cov_a)
    root_a = vectors @ torch.diag(values.sqrt()) @ vectors.t()
    cross = _psd_eigenvalues(root_a @ cov_b @ root_a)[0].sqrt().sum()
    distance = (a.mean(dim=0) - b.mean(dim=0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(float(distance), 0.0)


def retrieval_at(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, truth: torch.Tensor,
                 ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """{k: share of pictures whose true caption is among the k captions most similar to it}.

    ``image_embeddings`` (P, E) and ``text_embeddings`` (N, E) are unit vectors; ``truth`` (P,) is each
    picture's caption index. A caption that ties with the true one ranks above it (the pessimistic
    reading), so identical text embeddings, as from captions cut to the same tokens, earn nothing.
    """
    similarity = image_embeddings.float() @ text_embeddings.float().t()  # (P, N)
    true = similarity.gather(1, truth[:, None].to(similarity.device))  # (P, 1)
    rank = (similarity >= true).sum(dim=1) - 1  # other captions at least as similar as the true one
    return {k: (rank < k).float().mean().item() for k in ks}


# ---------------------------------------------------------------- held-out data


def heldout_examples(dataset, n: int) -> tuple[torch.Tensor, list[str], int]:
    """The first ``n`` readable examples in stored order (fewer if the split is smaller): pictures
    (n, 3, S, S) in [-1, 1], their captions, and how many unreadable ones were skipped on the way."""

    if isinstance(dataset, StreamDataset):  # a hub split: no indexing, only reading in order
        items = (dataset.decoder(row) for row in dataset.stream)
    else:
        items = (dataset[i] for i in range(len(dataset)))
    images, texts, skipped = [], [], 0
    for item in items:
        if item is None:
            skipped += 1
            continue
        images.append(item["image"])
        texts.append(item["text"])
        if len(images) == n:
            break
    if not images:
        raise UserError(f"none of the {skipped} held-out images of --data {getattr(dataset, 'name', '')} can be "
                        "read; check the files, or --image-column")
    return torch.stack(images), texts, skipped


def distinct_captions(dataset, n: int) -> list[str]:
    """The first ``n`` distinct non-blank captions of the split in stored order, without decoding images;
    fewer when the split (or its first ``MAX_CAPTION_SCAN * n`` examples) holds fewer."""

    limit = min(len(dataset), MAX_CAPTION_SCAN * n)
    scan = min(2 * n, limit)
    while True:  # read twice as many captions each time: `shapes` draws each caption's scene
        found = list(dict.fromkeys(c for c in texts(dataset, scan) if c.strip()))
        if len(found) >= n or scan >= limit:
            return found[:n]
        scan = min(2 * scan, limit)


# ---------------------------------------------------------------- the run


@torch.inference_mode()
def _encode(vqgan, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.cat([vqgan.encode(chunk.to(device)).cpu() for chunk in images.split(CHUNK)])


@torch.inference_mode()
def _vqgan_figures(vqgan, images: torch.Tensor, ids: torch.Tensor, device: torch.device) -> dict:
    """PSNR and SSIM of reconstructions and of the avg-pool-then-bicubic baseline; codebook usage."""

    f = vqgan.downsample
    recon = torch.cat([vqgan.decode(chunk.to(device)).cpu() for chunk in ids.split(CHUNK)])
    # Shrunk by f, the picture keeps 3 numbers per f x f block; enlarged back and clamped to the pictures'
    # range as the VQGAN's decode clamps its own.
    baseline = F.interpolate(F.avg_pool2d(images, f), size=images.shape[-2:], mode="bicubic",
                             align_corners=False).clamp(-1, 1)

    def unit(t: torch.Tensor) -> torch.Tensor:
        return (t + 1) / 2

    used = int(torch.unique(ids).numel())
    return {"pictures": len(images), "psnr": "mean over pictures of each picture's PSNR",
            "psnr_db": psnr(images, recon).item(), "ssim": ssim(unit(images), unit(recon)).mean().item(),
            "baseline": {"method": f"{f}x{f} average pooling, then bicubic back to {images.shape[-1]} px",
                         "downsample": f, "psnr_db": psnr(images, baseline).item(),
                         "ssim": ssim(unit(images), unit(baseline)).mean().item()},
            "codebook": {"pictures": len(images), "codes_used": used, "codebook_size": vqgan.codebook_size,
                         "usage": used / vqgan.codebook_size}}


@torch.inference_mode()
def _embed_images(scorer, images: torch.Tensor) -> torch.Tensor:
    """Unit image embeddings (B, E) by the run's scorer, resized as RunScorer resizes what it scores."""

    size, device = scorer.model.config.image_size, scorer.device
    return torch.cat([scorer.model.encode_image(resize_for_scorer(chunk.to(device), size)).float().cpu()
                      for chunk in images.split(CHUNK)])


@torch.inference_mode()
def _embed_texts(scorer, captions: Sequence[str]) -> torch.Tensor:
    ids, mask = scorer.tokenizer.batch(list(captions), max_length=scorer.model.config.max_text_len)
    return torch.cat([scorer.model.encode_text(i.to(scorer.device), m.to(scorer.device)).float().cpu()
                      for i, m in zip(ids.split(CHUNK), mask.split(CHUNK))])


def _generate(pipeline, captions: Sequence[str], candidates: int, seed: int, batch_prompts: int = 8) -> torch.Tensor:
    """``candidates`` unranked pictures per caption, (N * candidates, 3, S, S) in [-1, 1], caption-major:
    what `python -m sample --no-rerank` saves, read back from its 8-bit pictures."""

    settings = SamplingSettings(n=candidates, keep=candidates, seed=seed, rerank=False)
    pictures = []
    for start in range(0, len(captions), batch_prompts):
        for drawn in pipeline(list(captions[start:start + batch_prompts]), settings):
            pictures += [from_pil(p.image, p.image.width) for p in sorted(drawn, key=lambda p: p.candidate)]
    return torch.stack(pictures)


def real_scores(run: Path, *, data: str, size: int, seed: int = 0, device: str = "cpu", pictures: int = 256,
                gap_pictures: int = 256, retrieval_captions: int = 100, retrieval_candidates: int = 8,
                image_column: str | None = None, text_column: str | None = None,
                heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> dict:
    """Every figure of the module docstring for the run in ``run`` on the held-out split of ``data``.

    ``pictures`` held-out pictures serve the VQGAN, codebook and Fréchet figures, ``gap_pictures`` the
    caption gap; each is the first readable ones of the split, fewer if it holds fewer (the counts say).
    """

    pipeline = Pipeline(run, device=device, rerank=False)
    vqgan, model, tokenizer = pipeline.vqgan, pipeline.model, pipeline.tokenizer
    f, grid = vqgan.downsample, model.config.grid_size
    if size != grid * f:
        raise UserError(f"--size {size} does not fit the run: its seq2seq writes a {grid}x{grid} grid of codes, "
                        f"each {f}x{f} pixels; pass --size {grid * f}")
    dataset = open_dataset(data, size, split="heldout", image_column=image_column, text_column=text_column, seed=seed,
                           heldout_fraction=heldout_fraction)
    result: dict = {"data": data, "split": "heldout", "size": size}

    images, texts, skipped = heldout_examples(dataset, max(pictures, gap_pictures))
    result["skipped_unreadable"] = skipped
    ids = _encode(vqgan, images, pipeline.device)
    real = images[:pictures]
    result["vqgan"] = _vqgan_figures(vqgan, real, ids[:pictures], pipeline.device)
    result["codebook"] = result["vqgan"].pop("codebook")
    with warnings.catch_warnings():  # long captions are cut as in training; one warning per batch says nothing new
        warnings.simplefilter("ignore")
        result["caption_gap"] = caption_gap(model, tokenizer, texts[:gap_pictures], ids[:gap_pictures], pipeline.device)
    print("bench: VQGAN and caption gap done", file=sys.stderr)

    captions = distinct_captions(dataset, retrieval_captions)
    scorer = RunScorer(run, tokenizer, pipeline.device, pipeline.canvas_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        generated = _generate(pipeline, captions, retrieval_candidates, seed)
        text_embeddings = _embed_texts(scorer, captions)
    generated_embeddings = _embed_images(scorer, generated)
    truth = torch.arange(len(captions)).repeat_interleave(retrieval_candidates)
    recall = retrieval_at(generated_embeddings, text_embeddings, truth)
    n = len(captions)
    result["retrieval"] = {"captions": n, "captions_asked": retrieval_captions, "candidates": retrieval_candidates,
                           "pictures": len(generated), "r1": recall[1], "r5": recall[5],
                           "chance_r1": 1 / n, "chance_r5": min(5, n) / n}

    real_embeddings = _embed_images(scorer, real)
    half = len(real) // 2
    result["frechet"] = {
        "name": "scorer Fréchet distance", "generated": len(generated), "real": len(real),
        "distance": frechet_distance(generated_embeddings, real_embeddings),
        "floor": frechet_distance(real_embeddings[:half], real_embeddings[half:2 * half]) if half else None,
        "floor_pictures": half, "floor_method": "two disjoint halves of the held-out pictures"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result["pairwise"] = pairwise_captions(scorer, real, texts[:pictures], seed=seed)
    print("bench: retrieval, scorer Fréchet distance and pairwise done", file=sys.stderr)
    return result
