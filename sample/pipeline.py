"""Prompts to pictures: tokenize, generate N candidates per prompt with the KV-cached decoder, decode
them with the VQGAN, score them with the CLIP-style scorer, keep the best K. Candidates are drawn, decoded
and scored in passes of at most CANDIDATES_PER_PASS, which bounds the memory a call needs whatever N is;
candidate j of a prompt has seed ``seed + j`` in any pass, so the passes change no picture.

Edits (sample/edit.py): with an ``Edit`` every candidate starts from the same picture's tokens, keeps the
marked ones and draws the rest; inpainting candidates are ranked by the scorer together with the model's
likelihood of the kept tokens that follow the hole (``likelihood_weight``). Previews: every ``preview_every``
positions the partial grids are decoded and handed to ``on_step`` (and kept as each ``Picture.frames``).
Wider or taller canvases than the run's (``size``) are drawn with a sliding window (seq2seq/canvas.py) and
scored as the mean of the scorer over canvas-sized crops at half-canvas strides.

`generate_images` is the Python API; `python -m sample` (sample/__main__.py) wraps it for the shell.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from checkpoint import (CheckpointError, check_tokenizer_digest, load_config, part_dir, read_json_or_empty,
                        read_run_record)
from cli import UserError
from data.images import from_pil, to_pil
from devices import resolve_device
from sample.edit import completion, inpainting, preview_images
from sample.output import save_picture
from sample.rerank import load_reranker
from seq2seq import Seq2Seq, Seq2SeqConfig, generate
from seq2seq.autocompile import COMPILE_MODES, CompileChoice
from seq2seq.canvas import generate_canvas
from seq2seq.evaluate import log_likelihoods
from seq2seq.generate import UNDRAWN
from tokenizer import TextTokenizer, words
from vqgan import VQGAN, VQGANConfig

__all__ = ["DEMO_RUN", "SHIPPED_RUNS", "MAX_CANDIDATES", "CANDIDATES_PER_PASS", "resolve_run", "SamplingSettings",
           "Picture", "Preview", "Pipeline", "generate_images", "make_edit"]

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
MAX_LIKELIHOOD_WEIGHT = 100.0
MAX_SEED = 2**63 - 1  # seeds are int64 tensors
MAX_SPECULATIVE = 4096  # a window of a 64 x 64 grid; the run's own grid is checked when drawing

DEMO_RUN = Path(__file__).resolve().parent / "demo_run"
# The shipped runs, reachable by name with --checkpoint NAME (a directory of that name wins).
SHIPPED_RUNS = {"shapes": DEMO_RUN, "openmoji": Path(__file__).resolve().parent / "demo_openmoji"}


def picture_side(run: Path) -> int:
    """The side in pixels of the pictures a run draws (seq2seq's grid times the VQGAN's factor), from the two
    parts' config.json alone."""
    grid = load_config(Seq2SeqConfig, run / "seq2seq", "seq2seq").grid_size
    return grid * load_config(VQGANConfig, run / "vqgan", "vqgan").downsample


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
    # Nucleus 0.8 and guidance 2 were chosen together on held-out `shapes` prompts of another seed than the
    # benchmark's (BENCHMARKS.md, issue 20): every kind drew more right candidates than at no top-p and guidance 1.5.
    top_p: float | None = 0.8
    temperature: float = 1.0
    cfg: float = 2.0
    seed: int = 0
    rerank: bool = True
    # Inpainting ranks by z(scorer) + likelihood_weight * z(likelihood of the kept tokens after the hole),
    # z-scores among a prompt's candidates; 0 ranks by the scorer alone. See BENCHMARKS.md.
    likelihood_weight: float = 1.0
    # The scorer's best ``shortlist`` candidates are re-ordered by the decoder's likelihood of their tokens
    # given the prompt; 1 ranks by the scorer alone. Chosen on held-out `shapes` prompts of another seed than
    # the benchmark's (BENCHMARKS.md, issue 20).
    shortlist: int = 4
    speculative: int = 0  # a window of W tokens verified per decoder pass (seq2seq.speculative); 0 = off

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
        if self.speculative != 0 and not 2 <= self.speculative <= MAX_SPECULATIVE:
            raise UserError(f"--speculative must be 0 (off) or a window from 2 to {MAX_SPECULATIVE} tokens, got "
                            f"{self.speculative}")
        if not 1 <= self.shortlist <= MAX_CANDIDATES:
            raise UserError(f"--shortlist must be from 1 (the scorer alone) to {MAX_CANDIDATES}, got {self.shortlist}")
        if not 0 <= self.likelihood_weight <= MAX_LIKELIHOOD_WEIGHT:
            raise UserError(f"--likelihood-weight must be from 0 to {MAX_LIKELIHOOD_WEIGHT:g}, got "
                            f"{self.likelihood_weight}")


@dataclass
class Picture:
    """One candidate: its picture, the prompt, its seed, its score (None without reranking), its rank among
    the prompt's candidates (1 = best; without reranking, candidate order), kept or not. ``likelihood`` is
    the mean log-likelihood per token (nats) the ranking used: of an inpainting's kept tokens after the
    hole, or of a plain draw's tokens given the prompt for the candidates on the scorer's shortlist (None
    for the others); with previews, ``frames`` holds the partial pictures in decoding order. ``tokens``
    are its image ids.

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
    likelihood: float | None = None
    frames: list[Image.Image] | None = field(default=None, repr=False)
    tokens: torch.Tensor | None = field(default=None, repr=False)  # (h, w) the image ids it was decoded from

    def save(self, path: str | Path) -> Path:
        """Write the picture as PNG at ``path`` (overwriting it, like PIL), with the prompt, seed, settings,
        score, rank and candidate in PNG text chunks, as ``python -m sample`` writes them. Returns the path."""

        return save_picture(self, path)


@dataclass
class Preview:
    """Partial pictures of one pass: ``filled`` of ``total`` tokens known (drawn or kept), the rest grey.

    ``images[r]`` is candidate ``candidates[r]`` (its index among its prompt's) of prompt ``prompts[r]``
    (an index into the call's prompts).
    """

    filled: int
    total: int
    prompts: list[int]
    candidates: list[int]
    images: list[Image.Image]


class Pipeline:
    """The parts of a run directory, loaded once and checked to fit each other."""

    def __init__(self, checkpoint: str | Path | None = None, device: str = "auto", rerank: bool = True,
                 reranker: str | Path | None = None, dtype: str = "auto", compile: str = "auto"):

        run = resolve_run(checkpoint)
        if not run.is_dir():
            raise CheckpointError(f"--checkpoint {checkpoint} is not a directory; pass a run made by `python -m train "
                                  f"all`, or a shipped run's name ({', '.join(SHIPPED_RUNS)})")
        self.run = run
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = TextTokenizer.load(run / "tokenizer.model")
        self.vqgan = VQGAN.from_pretrained(run / "vqgan").to(self.device)
        self.model = Seq2Seq.from_pretrained(run / "seq2seq").to(self.device)
        record = read_run_record(run)
        self.model.check_fits(self.tokenizer.vocab_size, self.vqgan.codebook_size, self._trained_grid(record))
        check_tokenizer_digest(run / "tokenizer.model", run / "seq2seq" / "model.safetensors", "seq2seq")
        if compile not in COMPILE_MODES:
            raise UserError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        self.compile = CompileChoice(compile, self.device, self.model, self.dtype)
        self.scorer = None
        if rerank or reranker:  # the run's scorer must have been trained on pictures of the side drawn here
            self.scorer = load_reranker(run, self.tokenizer, self.device, self.canvas_size, reranker=reranker)
        # What the run learned, where training recorded it (older runs have neither file): the words of its
        # training captions, and its scorer's scores of held-out pictures with another picture's caption.
        if record.get("preset") == "tiny":
            warnings.warn(f"{run} was trained by `train all --preset tiny`, a smoke test of a few steps a stage: "
                          "its pictures are noise", stacklevel=2)
        vocabulary = read_json_or_empty(run / "vocabulary.json").get("words")
        self.vocabulary = vocabulary if isinstance(vocabulary, dict) else None
        self.score_floor = None
        if self.scorer is not None and reranker is None:
            other = read_json_or_empty(part_dir(run, "scorer") / "score_range.json").get("other_caption")
            floor = other.get("p95") if isinstance(other, dict) else None
            self.score_floor = float(floor) if isinstance(floor, (int, float)) else None

    def _trained_grid(self, record: dict) -> int:
        """The grid the run's VQGAN made of its training pictures: their side (``--size``, as RUN/all.json
        records it) over the VQGAN's factor. A run without the record (trained stage by stage) is checked by its
        scorer's picture side instead (load_reranker)."""
        size = record.get("size")
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return max(1, size // self.vqgan.downsample)
        return self.model.config.grid_size

    @property
    def token_size(self) -> int:
        """Pixels per token along each side."""
        return self.vqgan.downsample

    @property
    def canvas_size(self) -> int:
        """The side of the pictures this run draws, in pixels."""
        return self.model.config.grid_size * self.token_size

    def completion(self, init: str | Path | Image.Image, keep_rows: int):
        """An :class:`sample.edit.Edit` keeping the first ``keep_rows`` token rows of ``init``."""

        return completion(init, keep_rows, canvas=self.canvas_size, token=self.token_size)

    def inpainting(self, init: str | Path | Image.Image, *, mask=None, box=None):
        """An :class:`sample.edit.Edit` redrawing what ``mask`` (white) or ``box`` (x0,y0,x1,y1) marks."""

        return inpainting(init, mask=mask, box=box, canvas=self.canvas_size, token=self.token_size)

    def canvas_tokens(self, size: tuple[int, int] | None) -> tuple[int, int] | None:
        """(height, width) in tokens for a canvas of ``size`` = (width, height) pixels; None for the run's own."""
        if size is None or tuple(size) == (self.canvas_size, self.canvas_size):
            return None
        token, canvas = self.token_size, self.canvas_size
        for flag, pixels in zip(("--width", "--height"), size):
            if pixels % token:
                raise UserError(f"{flag} {pixels} is not a multiple of the {token}-pixel token size; try "
                                f"{max(canvas, pixels // token * token)}")
            if pixels < canvas:
                raise UserError(f"{flag} {pixels} is smaller than the {canvas} pixels this run draws; give {canvas} "
                                "or more")
        return size[1] // token, size[0] // token

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

    def unknown_words(self, prompt: str) -> list[str]:
        """The words of ``prompt`` that no training caption of the run holds ([] when the run did not record
        its vocabulary): the model has never seen them, so it draws from the rest of the prompt."""

        if self.vocabulary is None:
            return []
        return list(dict.fromkeys(w for w in words(prompt) if w not in self.vocabulary))

    def _warn_out_of_domain(self, prompt: str, candidates: list[Picture]) -> None:
        unknown = self.unknown_words(prompt)
        best = max(candidates, key=lambda p: float("-inf") if p.score is None else p.score)  # the scorer's best
        if unknown:
            warnings.warn(f"{_quoted(prompt)}: {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''} never came in "
                          f"this run's training captions; it draws from the words it knows (RUN/vocabulary.json "
                          f"lists them)", stacklevel=4)
        elif self.score_floor is not None and best.score is not None and best.score < self.score_floor:
            warnings.warn(f"{_quoted(prompt)}: the best picture scores {best.score:.3g}, no more than 95% of held-out "
                          f"pictures score with another picture's caption ({self.score_floor:.3g}); the run may "
                          "not have learned what it asks for", stacklevel=4)

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str], settings: SamplingSettings, progress: bool = False,
                 per_pass: int = CANDIDATES_PER_PASS, edit=None, preview_every: int | None = None,
                 on_step: Callable[[Preview], None] | None = None,
                 size: tuple[int, int] | None = None, candidates_after: int = 0) -> list[list[Picture]]:
        """All candidates of every prompt, each list sorted best first, the first ``keep`` marked kept.

        Drawn in passes of at most ``per_pass`` candidates. ``progress`` shows a bar over the decoding
        steps when one pass does it all, else over the candidates. ``edit`` (a :class:`sample.edit.Edit`)
        starts every candidate from its picture. ``preview_every`` K decodes the partial grids every K
        tokens: into each picture's ``frames``, and to ``on_step`` as they come. ``size`` (width, height) in
        pixels, multiples of the token size and at least the run's, draws larger canvases.
        ``candidates_after`` is how many candidates later calls will draw with these settings (the command
        line's later batches of prompts): ``compile="auto"`` counts them among the passes a compile serves.
        """

        if per_pass < 1:
            raise ValueError(f"per_pass must be >= 1, got {per_pass}")
        if preview_every is not None and preview_every < 1:
            raise UserError(f"--preview must be >= 1 tokens between frames, got {preview_every}")
        canvas = self.canvas_tokens(size)
        if canvas is not None and (edit is not None or preview_every):
            raise UserError("--width/--height draw a new picture: they do not combine with --init or --preview")
        if canvas is not None and settings.speculative:
            raise UserError("--width/--height draw with a sliding window, one token a pass: drop --speculative")
        if self.compile.mode == "on" and (settings.speculative or canvas is not None):
            raise UserError("--compile on compiles the one-token step over the run's own grid: drop "
                            + ("--speculative" if settings.speculative else "--width/--height"))
        if settings.speculative > self.model.config.image_len:
            raise UserError(f"--speculative {settings.speculative} is longer than this run's pictures of "
                            f"{self.model.config.image_len} tokens; give at most {self.model.config.image_len}")
        init_ids = None if edit is None else self.encode_init(edit)  # (1, h, w)
        # Text that is not valid Unicode (lone surrogates, as from undecodable command-line bytes) is
        # repaired with U+FFFD rather than refused: no prompt should stop the tool.
        prompts = [p.encode("utf-8", "surrogatepass").decode("utf-8", "replace") for p in prompts]
        text_ids, text_mask = self.encode_prompts(prompts)
        total = len(prompts) * settings.n  # rows i * n + j: candidate j of prompt i, seed + j
        one_pass = total <= per_pass
        pass_sizes = [min(per_pass, total - start) for start in range(0, total, per_pass)]
        # Only plain passes are timed for --compile auto: previews and edits add work of their own.
        timed = canvas is None and not settings.speculative and edit is None and not preview_every
        images: list[Image.Image] = []
        tokens: list[torch.Tensor] = []
        scores: list[torch.Tensor] = []
        half = torch.autocast(self.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None)
        likelihoods: list[torch.Tensor] = []
        frames: list[list[Image.Image]] = [[] for _ in range(total)] if preview_every else []
        with tqdm(total=total, desc="candidates", unit="candidate", leave=False,
                  disable=not progress or one_pass) as bar, half:
            for index, start in enumerate(range(0, total, per_pass)):
                rows = torch.arange(start, min(start + per_pass, total))
                which = rows.div(settings.n, rounding_mode="floor")  # the prompt of each row
                forced = {} if edit is None else dict(init_ids=init_ids.expand(len(rows), -1, -1), keep_mask=edit.keep)
                watch = {} if not preview_every else dict(
                    preview_every=preview_every,
                    on_step=partial(self._preview, rows, settings.n, [frames[r] for r in rows.tolist()], on_step))
                sampling = dict(seeds=(rows % settings.n + settings.seed).to(self.device),
                                temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                                cfg_scale=settings.cfg, progress=progress and one_pass)
                pass_ids, pass_mask = text_ids[which.to(self.device)], text_mask[which.to(self.device)]
                if canvas is None:
                    decoder_rows = len(rows) * (2 if settings.cfg != 1.0 else 1)
                    passes_left = pass_sizes[index:].count(len(rows)) + candidates_after // len(rows)
                    compiling = self.compile.decide(decoder_rows, passes_left) if timed else self.compile.mode == "on"
                    began = time.perf_counter()
                    image_ids, likelihood = generate(self.model, pass_ids, pass_mask, return_likelihood=True,
                                                     speculative=settings.speculative, compile=compiling, **sampling,
                                                     **forced, **watch)  # (rows, h, w), (rows,)
                    likelihoods.append(likelihood.float().cpu())
                    if timed and self.compile.mode != "off":  # .cpu() waited for the device
                        self.compile.record(decoder_rows, compiling, time.perf_counter() - began)
                else:
                    image_ids = generate_canvas(self.model, pass_ids, pass_mask, height=canvas[0], width=canvas[1],
                                                **sampling)  # (rows, H, W) tokens
                pass_images, pass_scores = self.render(image_ids, [prompts[i] for i in which.tolist()])
                images += pass_images
                if pass_scores is not None:
                    scores.append(pass_scores)
                tokens += list(image_ids.cpu())
                bar.update(len(rows))
        every_score = torch.cat(scores) if scores else None
        every_likelihood = torch.cat(likelihoods) if edit is not None and edit.keeps_after_hole else None
        record = self.settings_record(settings, edit)
        n = settings.n
        plain = edit is None and canvas is None  # the shortlist's likelihood is measured on plain draws only
        pictures = []
        for i, prompt in enumerate(prompts):
            part = slice(i * n, (i + 1) * n)
            pictures.append(self._rank(prompt, images[part], None if every_score is None else every_score[part],
                                       None if every_likelihood is None else every_likelihood[part], settings,
                                       record, tokens=torch.stack(tokens[part]) if plain else None))
            for picture in pictures[-1]:
                picture.tokens = tokens[i * n + picture.candidate]
                picture.frames = frames[i * n + picture.candidate] if frames else None
            self._warn_out_of_domain(prompt, pictures[-1])
        return pictures

    @torch.inference_mode()
    def encode_init(self, edit) -> torch.Tensor:
        """The codebook ids (1, h, w) of an :class:`sample.edit.Edit`'s picture: what its kept tokens are
        forced to; the sampling pipeline's and the service's."""
        return self.vqgan.encode(from_pil(edit.image, self.canvas_size)[None].to(self.device))

    @torch.inference_mode()
    def render(self, image_ids: torch.Tensor, prompts: Sequence[str]) -> tuple[list[Image.Image], torch.Tensor | None]:
        """Pictures of image ids (B, h, w) by the VQGAN, and each one's score (B,) against its prompt (None
        without a scorer); the sampling pipeline's and the service's."""

        prompts = list(prompts)
        # A batch of one runs other CPU kernels (about 1e-6 off), enough to turn a pixel's rounding: one picture
        # is decoded and scored beside a copy of itself, so a candidate is the same however many are drawn.
        alone = len(image_ids) == 1
        if alone:
            image_ids, prompts = image_ids.expand(2, *image_ids.shape[1:]), prompts * 2
        decoded = self.vqgan.decode(image_ids).float()  # (B, 3, H, W) in [-1, 1]
        scores = None if self.scorer is None else self._score(decoded, prompts)
        if alone:
            decoded, scores = decoded[:1], None if scores is None else scores[:1]
        return [to_pil(image) for image in decoded.cpu()], scores

    @staticmethod
    def settings_record(settings: SamplingSettings, edit=None) -> dict:
        """What a picture records of how it was drawn: the settings but the base seed, and the edit if any."""
        record = {k: v for k, v in asdict(settings).items() if k not in ("seed",)}
        if edit is not None:
            record["edit"] = edit.record
        return record

    def _score(self, pictures: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The scorer's (B,) scores; for a larger canvas, the mean over crops of the run's size."""
        side = self.canvas_size
        height, width = pictures.shape[-2:]
        if (height, width) == (side, side):
            return self.scorer.score(pictures, prompts)
        tops = sorted({*range(0, height - side + 1, side // 2), height - side})
        lefts = sorted({*range(0, width - side + 1, side // 2), width - side})
        crops = [self.scorer.score(pictures[..., top:top + side, left:left + side], prompts)
                 for top in tops for left in lefts]
        return torch.stack(crops).mean(0)

    def _preview(self, rows: torch.Tensor, n: int, frames: list[list[Image.Image]],
                 on_step: Callable[[Preview], None] | None, filled: int, grid: torch.Tensor) -> None:
        """Decode a pass's partial grids (rows, h, w), the tokens not drawn yet grey; keep and hand them out."""

        undrawn = grid == UNDRAWN
        decoded = preview_images(self.vqgan.decode(grid.clamp(min=0)).float(), undrawn)
        pictures = [to_pil(image) for image in decoded.cpu()]
        for kept, picture in zip(frames, pictures):
            kept.append(picture)
        if on_step is not None:
            on_step(Preview(filled, grid[0].numel(), rows.div(n, rounding_mode="floor").tolist(), (rows % n).tolist(),
                            pictures))

    @torch.inference_mode()
    def token_likelihood(self, prompt: str, image_ids: torch.Tensor) -> torch.Tensor:
        """(B,) mean log-likelihood per token, in nats, of image ids (B, h, w) given ``prompt``: one
        teacher-forced pass of the decoder, unguided (seq2seq.evaluate.log_likelihoods). It leaves the
        decoding caches alone."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a long prompt was already warned about when it was drawn
            sums = log_likelihoods(self.model, self.tokenizer, [prompt] * len(image_ids), image_ids, self.device)
        return sums / image_ids[0].numel()

    def _rank(self, prompt: str, images: list[Image.Image], scores: torch.Tensor | None,
              likelihoods: torch.Tensor | None, settings: SamplingSettings, record: dict,
              tokens: torch.Tensor | None = None) -> list[Picture]:
        """The candidates of one prompt, best first, the first ``keep`` marked kept. With scores: by the
        scorer; an inpainting's (``likelihoods`` given) by z(scorer) + likelihood_weight x z(likelihood); a
        plain draw's (its ``tokens`` (N, h, w) given) by the scorer, then its best ``shortlist`` re-ordered
        by :meth:`token_likelihood`, ties kept in the scorer's order."""
        pictures = [
            Picture(image, prompt, settings.seed + j, j, None if scores is None else float(scores[j]),
                    settings=record, likelihood=None if likelihoods is None else float(likelihoods[j]))
            for j, image in enumerate(images)
        ]
        if scores is not None:  # best first; without a scorer the candidates are already in random order
            merit = _standardized(scores)
            if likelihoods is not None:
                merit = merit + settings.likelihood_weight * _standardized(likelihoods)
            order = sorted(range(len(pictures)), key=lambda j: -merit[j])
            if likelihoods is None and tokens is not None and settings.shortlist > 1 and len(order) > 1:
                head = order[:settings.shortlist]
                for j, value in zip(head, self.token_likelihood(prompt, tokens[head]).tolist()):
                    pictures[j].likelihood = value
                order = sorted(head, key=lambda j: -pictures[j].likelihood) + order[len(head):]
            pictures = [pictures[j] for j in order]
        for rank, picture in enumerate(pictures, start=1):
            picture.rank = rank
            picture.kept = rank <= settings.keep
        return pictures


# --dtype: the precision the models run in (autocast; the weights stay as loaded). Measured on a 2-core
# AVX-512 CPU without AMX, 2 prompts x 16 candidates of the shapes demo: bf16 took 2.6x and fp16 4.3x the
# time of fp32, so ``auto`` is fp32 on a CPU; on CUDA, bf16 where supported, else fp16.
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """``--dtype`` to the autocast dtype (None: plain fp32)."""
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise UserError(f"--dtype must be auto, fp32, bf16 or fp16, got {name!r}")
    return DTYPES[name]


def _quoted(prompt: str, limit: int = 60) -> str:
    """A prompt as a warning names it: quoted, and cut short when long."""
    return repr(prompt if len(prompt) <= limit else prompt[:limit] + "...")


def _standardized(values: torch.Tensor) -> torch.Tensor:
    """z-scores among one prompt's candidates (zeros when they are all alike)."""
    values = values.double()
    spread = values.std(unbiased=False) if values.numel() > 1 else values.new_zeros(())
    return (values - values.mean()) / spread if spread > 0 else torch.zeros_like(values)


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
    dtype: str = "auto",
    compile: str = "auto",
    pipeline: Pipeline | None = None,
    init: str | Path | Image.Image | None = None,
    keep_rows: int | None = None,
    mask: str | Path | Image.Image | None = None,
    box: str | tuple[int, int, int, int] | None = None,
    likelihood_weight: float = SamplingSettings.likelihood_weight,
    shortlist: int = SamplingSettings.shortlist,
    speculative: int = SamplingSettings.speculative,
    preview_every: int | None = None,
    on_step: Callable[[Preview], None] | None = None,
    width: int | None = None,
    height: int | None = None,
) -> list[list[Picture]]:
    """Pictures for each prompt: the best ``keep`` of ``n`` candidates, best first, with their scores.

    >>> best = generate_images("a large red circle", n=8, keep=2)[0]
    >>> best[0].image.save("circle.png"); best[0].score

    ``reranker`` names a local directory holding a transformers ``CLIPModel`` to score with instead of
    the run's own scorer. The scorer's best ``shortlist`` candidates are re-ordered by the decoder's
    likelihood of each picture given the prompt (1: by the scorer alone; new pictures only). ``dtype``
    (auto, fp32, bf16, fp16) is the precision the models run in: auto is fp32 on a CPU (half precision is
    slower there) and bf16 or fp16 on CUDA. ``compile`` (auto, on, off) compiles the decode step: auto where
    the passes left would save more than the compile costs, by timings measured on this machine
    (:mod:`seq2seq.autocompile`). Pass a ``Pipeline`` to reuse loaded weights across calls.

    Edits start from the picture ``init`` (a path or a PIL image of the run's size): ``keep_rows`` R keeps
    its first R rows of tokens and draws the rest (completion); ``mask`` (white = redraw) or ``box``
    (x0, y0, x1, y1 in pixels) redraws what it marks (inpainting), ranked with the likelihood of what
    follows the hole at ``likelihood_weight``. ``preview_every`` K calls ``on_step(Preview)`` every K
    tokens with the partial pictures and keeps them in each picture's ``frames``. ``width`` and ``height``
    in pixels (multiples of the token size, at least the run's size) draw a larger canvas with a sliding
    window. ``speculative`` W verifies a window of W drafted tokens per decoder pass (speculative Jacobi
    decoding): pictures of the same distribution in fewer passes, other pictures for a seed than W = 0.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    settings = SamplingSettings(n=n, keep=keep, top_k=top_k, top_p=top_p, temperature=temperature, cfg=cfg,
                                seed=seed, rerank=rerank, likelihood_weight=likelihood_weight, shortlist=shortlist,
                                speculative=speculative)
    pipeline = pipeline or Pipeline(checkpoint, device=device, rerank=rerank, reranker=reranker, dtype=dtype,
                                    compile=compile)
    edit = make_edit(pipeline, init, keep_rows=keep_rows, mask=mask, box=box)
    size = None
    if width is not None or height is not None:
        size = (width or pipeline.canvas_size, height or pipeline.canvas_size)
    return [[p for p in candidates if p.kept]
            for candidates in pipeline(prompts, settings, edit=edit, preview_every=preview_every, on_step=on_step,
                                       size=size)]


def make_edit(pipeline: Pipeline, init, *, keep_rows: int | None = None, mask=None, box=None):
    """The :class:`sample.edit.Edit` that ``init`` with one of ``keep_rows``, ``mask``, ``box`` asks for, or
    None without ``init``; a UserError for any other combination."""
    given = [name for name, value in (("--keep-rows", keep_rows), ("--mask", mask), ("--box", box))
             if value is not None]
    if init is None:
        if given:
            raise UserError(f"{given[0]} edits a picture: give it with --init PICTURE")
        return None
    if len(given) != 1:
        raise UserError("--init takes one of --keep-rows R (complete), --mask MASK or --box x0,y0,x1,y1 (inpaint)"
                        + (f", not {' and '.join(given)}" if given else ""))
    if keep_rows is not None:
        return pipeline.completion(init, keep_rows)
    return pipeline.inpainting(init, mask=mask, box=box)
