"""Rerankers: score each candidate picture against its prompt, all candidates in one batch.

A :class:`Reranker` takes pictures as (B,3,H,W) in [-1,1] and their prompts as strings and returns (B,) scores
on the CPU, higher for a better match. :func:`load_reranker` is how the pipeline, the command line and bench get
one: ``RunScorer``, the run's own CLIP-style scorer (RUN/scorer/) with its tokenizer, or ``HFClipScorer``, a
transformers ``CLIPModel`` saved in a local directory (the optional ``hf-clip`` extra; nothing is downloaded).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from checkpoint import CheckpointError, part_dir
from cli import UserError
from scorer import Scorer
from tokenizer import TextTokenizer

__all__ = ["Reranker", "load_reranker", "RunScorer", "HFClipScorer", "resize_for_scorer"]

# The normalization CLIP was trained with, used when the directory has no image processor config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_for_scorer(images: torch.Tensor, size: int) -> torch.Tensor:
    """Pictures (B,3,H,W) resized to the scorer's side, bicubic with antialiasing (a no-op at that side)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


class Reranker(Protocol):
    """Scores candidates against their prompts: (B,3,H,W) pictures in [-1,1] and B prompts -> (B,) on the CPU."""

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


def load_reranker(run: Path, tokenizer: TextTokenizer, device: torch.device, image_size: int,
                  reranker: str | Path | None = None, directory: Path | None = None) -> Reranker:
    """The reranker a command asked for: a transformers CLIPModel from the local directory ``reranker``, else
    the run's own scorer (RUN/scorer/, or ``directory``, another scorer trained on the run's tokenizer), which
    must have been trained on the run's tokenizer and on pictures of ``image_size``, the side it will score."""
    if reranker is not None:
        return HFClipScorer(reranker, device)
    return RunScorer(run, tokenizer, device, image_size, directory=directory)


class RunScorer:
    """The run's own scorer: RUN/scorer/ (or another scorer ``directory`` trained on the run's tokenizer) with
    RUN/tokenizer.model."""

    def __init__(self, run: Path, tokenizer: TextTokenizer, device: torch.device, image_size: int,
                 directory: Path | None = None):
        self.model = Scorer.from_pretrained(part_dir(run, "scorer") if directory is None else directory).to(device)
        self.model.check_fits(tokenizer.vocab_size, image_size)
        self.tokenizer = tokenizer
        self.device = device

    @torch.inference_mode()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        with warnings.catch_warnings():  # the pipeline has already warned about over-long prompts
            warnings.simplefilter("ignore")
            ids, mask = self.tokenizer.batch(list(prompts), max_length=self.model.config.max_text_len)
        images = resize_for_scorer(images.to(self.device), self.model.config.image_size)
        return self.model.score(images, ids.to(self.device), mask.to(self.device)).float().cpu()


class HFClipScorer:
    """A transformers CLIPModel (and its tokenizer) from a local directory."""

    def __init__(self, directory: str | Path, device: torch.device):
        try:
            from transformers import AutoTokenizer, CLIPModel
        except ImportError:
            raise UserError("--reranker needs transformers: pip install 'tilecraft[hf-clip]'") from None
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise CheckpointError(f"--reranker {directory} holds no config.json; pass a directory saved by "
                                  "CLIPModel.save_pretrained")
        try:
            self.model = CLIPModel.from_pretrained(directory, local_files_only=True).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"--reranker: cannot load a CLIPModel and tokenizer from {directory}: "
                                  f"{str(e).splitlines()[0]}") from None
        self.image_size = self.model.config.vision_config.image_size
        self.max_length = self.model.config.text_config.max_position_embeddings
        self.mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
        self.device = device

    @staticmethod
    def _features(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    @torch.inference_mode()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = (resize_for_scorer(images.to(self.device), self.image_size) + 1) / 2  # (B,3,S,S) in [0, 1]
        pixels = (pixels - self.mean) / self.std
        text = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(self.device)
        image_features = F.normalize(self._features(self.model.get_image_features(pixel_values=pixels)), dim=-1)
        text_features = F.normalize(self._features(self.model.get_text_features(**text)), dim=-1)
        return (image_features * text_features).sum(-1).float().cpu()
