"""Prompts to pictures: tokenize, generate N candidates per prompt with the KV-cached decoder, decode
them with the VQGAN, score them with the CLIP-style scorer, keep the best K. Candidates are drawn, decoded
and scored in passes of at most CANDIDATES_PER_PASS, which bounds the memory a call needs whatever N is;
candidate j of a prompt has seed ``seed + j`` in any pass, so the passes change no picture.

`generate_images` is the Python API; `python -m sample` (sample/__main__.py) wraps it for the shell.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from tqdm import tqdm

from checkpoint import CheckpointError, UserError, check_tokenizer_digest

__all__ = ["DEMO_RUN", "SHIPPED_RUNS", "MAX_CANDIDATES", "CANDIDATES_PER_PASS", "resolve_run", "SamplingSettings",
           "Picture", "Pipeline", "generate_images"]

# Candidates per prompt: each one's picture is held until the prompt's are ranked (10 000 pictures of 256 px
# are 2 GB). More is one line asking to split the work by --seed, which gives the same pictures.
MAX_CANDIDATES = 10_000
# Candidates drawn, decoded and scored at once. The decoder's KV cache grows with it (the `large` preset,
# 256 image tokens, guided, fp32: about 100 MB a candidate, so some 6 GB a pass; `small` a few MB); more
# candidates take more passes, never more memory.
CANDIDATES_PER_PASS = 64
# Sampling settings past these draw nothing a picture needs: a temperature near 0 or a huge guidance scale
# overflow the fp32 logits into NaN probabilities, a huge temperature draws uniform noise. Infinities and
# NaN fall outside too.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
MAX_CFG = 100.0
MAX_SEED = 2**63 - 1  # seeds are int64 tensors

DEMO_RUN = Path(__file__).resolve().parent / "demo_run"
# The shipped runs, reachable by name with --checkpoint NAME (a directory of that name wins).
SHIPPED_RUNS = {"shapes": DEMO_RUN, "openmoji": Path(__file__).resolve().parent / "demo_openmoji"}


def resolve_run(checkpoint: str | Path | None) -> Path:
    """A run directory: the shipped ``shapes`` demo for None, a shipped run by name, else the path itself."""
    if checkpoint is None:
        return DEMO_RUN
    path = Path(checkpoint)
    if not path.exists() and str(checkpoint) in SHIPPED_RUNS:
        return SHIPPED_RUNS[str(checkpoint)]
    return path


@dataclass(frozen=True)
class SamplingSettings:
    """How candidates are drawn and how many are kept. Validated on construction."""

    n: int = 16
    keep: int = 4
    top_k: int | None = None
    top_p: float | None = None
    temperature: float = 1.0
    cfg: float = 1.5  # measured best on held-out `shapes` prompts of another seed than the benchmark's
    seed: int = 0
    rerank: bool = True

    def __post_init__(self) -> None:
        if self.n < 1:
            raise UserError(f"--n must be >= 1, got {self.n}")
        if self.n > MAX_CANDIDATES:
            raise UserError(f"--n {self.n} candidates is more than one prompt may have (at most {MAX_CANDIDATES}, held "
                            f"in memory to rank them); split it: --seed S --n {MAX_CANDIDATES}, then --seed "
                            f"S+{MAX_CANDIDATES}, ... draws the same pictures")
        if not 1 <= self.keep <= self.n:
            raise UserError(f"--keep must be between 1 and --n ({self.n}), got {self.keep}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k must be >= 1, got {self.top_k}")
        if not 0 <= self.seed <= MAX_SEED - (self.n - 1):
            raise UserError(f"--seed must be from 0 to 2**63-1 less --n-1 ({MAX_SEED - (self.n - 1)}): candidate j "
                            f"has seed SEED+j, a 64-bit signed number; got {self.seed}")
        if self.top_p is not None and not 0 < self.top_p <= 1:  # NaN fails every comparison, so it lands here too
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            raise UserError(f"--temperature must be > 0, from {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g} (lower "
                            f"overflows the logits into NaN, higher draws noise), got {self.temperature}")
        if not 0 <= self.cfg <= MAX_CFG:
            raise UserError(f"--cfg must be >= 0 and at most {MAX_CFG:g} (1 turns guidance off; more overflows the "
                            f"logits), got {self.cfg}")


@dataclass
class Picture:
    """One candidate: its picture, the prompt, its seed, its score (None without reranking), its rank among
    the prompt's candidates (1 = best; without reranking, candidate order), kept or not.

    ``python -m sample PROMPT --seed SEED --n 1`` with the same sampling settings (top-k, top-p,
    temperature, cfg) draws it again.
    """

    image: Image.Image
    prompt: str
    seed: int
    candidate: int
    score: float | None
    kept: bool = False
    settings: dict = field(default_factory=dict)
    rank: int | None = None

    def save(self, path: str | Path) -> Path:
        """Write the picture as PNG at ``path`` (overwriting it, like PIL), with the prompt, seed, settings,
        score, rank and candidate in PNG text chunks, as ``python -m sample`` writes them. Returns the path."""
        from sample.output import save_picture

        return save_picture(self, path)


class Pipeline:
    """The parts of a run directory, loaded once and checked to fit each other."""

    def __init__(self, checkpoint: str | Path | None = None, device: str = "auto", rerank: bool = True,
                 reranker: str | Path | None = None):
        from seq2seq import Seq2Seq
        from tokenizer import TextTokenizer
        from train.loop import resolve_device
        from vqgan import VQGAN

        run = resolve_run(checkpoint)
        if not run.is_dir():
            raise CheckpointError(f"--checkpoint {checkpoint} is not a directory; pass a run made by `python -m train "
                                  f"all`, or a shipped run's name ({', '.join(SHIPPED_RUNS)})")
        self.run = run
        self.device = resolve_device(device)
        self.tokenizer = TextTokenizer.load(run / "tokenizer.model")
        self.vqgan = VQGAN.from_pretrained(run / "vqgan").to(self.device)
        self.model = Seq2Seq.from_pretrained(run / "seq2seq").to(self.device)
        self.model.check_fits(self.tokenizer.vocab_size, self.vqgan.codebook_size, self.model.config.grid_size)
        check_tokenizer_digest(run / "tokenizer.model", run / "seq2seq" / "model.safetensors", "seq2seq")
        self.scorer = None
        if reranker is not None:
            from sample.rerank import HFClipScorer

            self.scorer = HFClipScorer(reranker, self.device)
        elif rerank:
            from sample.rerank import RunScorer

            self.scorer = RunScorer(run, self.tokenizer, self.device)

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts to (ids, mask); an over-long prompt is truncated with a one-line warning naming the limit."""
        for prompt in prompts:
            if not prompt.strip():
                raise UserError('a prompt is empty; describe a picture, e.g. "a red circle above a blue square"')
        limit = self.model.config.max_text_len
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids, mask = self.tokenizer.batch(list(prompts), max_length=limit)
        if caught:
            warnings.warn(f"a prompt is longer than the model's {limit} text tokens; it was truncated", stacklevel=3)
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str], settings: SamplingSettings, progress: bool = False,
                 per_pass: int = CANDIDATES_PER_PASS) -> list[list[Picture]]:
        """All candidates of every prompt, each list sorted best first, the first ``keep`` marked kept.

        Drawn in passes of at most ``per_pass`` candidates. ``progress`` shows a bar over the decoding
        steps when one pass does it all, else over the candidates.
        """
        from seq2seq import generate
        from train.images import to_pil

        if per_pass < 1:
            raise ValueError(f"per_pass must be >= 1, got {per_pass}")
        # Text that is not valid Unicode (lone surrogates, as from undecodable command-line bytes) is
        # repaired with U+FFFD rather than refused: no prompt should stop the tool.
        prompts = [p.encode("utf-8", "surrogatepass").decode("utf-8", "replace") for p in prompts]
        text_ids, text_mask = self.encode_prompts(prompts)
        total = len(prompts) * settings.n  # rows i * n + j: candidate j of prompt i, seed + j
        one_pass = total <= per_pass
        images: list[Image.Image] = []
        scores: list[torch.Tensor] = []
        with tqdm(total=total, desc="candidates", unit="candidate", leave=False,
                  disable=not progress or one_pass) as bar:
            for start in range(0, total, per_pass):
                rows = torch.arange(start, min(start + per_pass, total))
                which = rows.div(settings.n, rounding_mode="floor")  # the prompt of each row
                image_ids = generate(
                    self.model, text_ids[which.to(self.device)], text_mask[which.to(self.device)],
                    seeds=(rows % settings.n + settings.seed).to(self.device), temperature=settings.temperature,
                    top_k=settings.top_k, top_p=settings.top_p, cfg_scale=settings.cfg,
                    progress=progress and one_pass,
                )  # (rows, h, w)
                decoded = self.vqgan.decode(image_ids).float()  # (rows, 3, H, W) in [-1, 1]
                if self.scorer is not None:
                    scores.append(self.scorer.score(decoded, [prompts[i] for i in which.tolist()]))
                images += [to_pil(image) for image in decoded.cpu()]
                bar.update(len(rows))
        every_score = torch.cat(scores) if scores else None
        n = settings.n
        return [self._rank(prompt, images[i * n:(i + 1) * n],
                           None if every_score is None else every_score[i * n:(i + 1) * n], settings)
                for i, prompt in enumerate(prompts)]

    def _rank(self, prompt: str, images: list[Image.Image], scores: torch.Tensor | None,
              settings: SamplingSettings) -> list[Picture]:
        record = {k: v for k, v in asdict(settings).items() if k not in ("seed",)}
        pictures = [
            Picture(image, prompt, settings.seed + j, j, None if scores is None else float(scores[j]),
                    settings=record)
            for j, image in enumerate(images)
        ]
        if scores is not None:  # best first; without a scorer the candidates are already in random order
            pictures.sort(key=lambda p: -p.score)
        for rank, picture in enumerate(pictures, start=1):
            picture.rank = rank
            picture.kept = rank <= settings.keep
        return pictures


def generate_images(
    prompts: str | Sequence[str],
    checkpoint: str | Path | None = None,
    *,
    n: int = 16,
    keep: int = 4,
    top_k: int | None = SamplingSettings.top_k,
    top_p: float | None = SamplingSettings.top_p,
    temperature: float = SamplingSettings.temperature,
    cfg: float = SamplingSettings.cfg,
    seed: int = 0,
    rerank: bool = True,
    reranker: str | Path | None = None,
    device: str = "auto",
    pipeline: Pipeline | None = None,
) -> list[list[Picture]]:
    """Pictures for each prompt: the best ``keep`` of ``n`` candidates, best first, with their scores.

    >>> best = generate_images("a large red circle", n=8, keep=2)[0]
    >>> best[0].image.save("circle.png"); best[0].score

    ``reranker`` names a local directory holding a transformers ``CLIPModel`` to score with instead of
    the run's own scorer. Pass a ``Pipeline`` to reuse loaded weights across calls.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    settings = SamplingSettings(n=n, keep=keep, top_k=top_k, top_p=top_p, temperature=temperature, cfg=cfg,
                                seed=seed, rerank=rerank)
    pipeline = pipeline or Pipeline(checkpoint, device=device, rerank=rerank, reranker=reranker)
    return [[p for p in candidates if p.kept] for candidates in pipeline(prompts, settings)]
