"""``python -m train scorer``: the CLIP-style scorer that sampling reranks candidates with, saved as RUN/scorer/.

Symmetric InfoNCE over the image-text pairs of each global batch with a learned temperature (CLIP,
Radford et al., 2021); AdamW, linear warmup then cosine, gradient clipping, bf16 autocast where the
device multiplies bf16 natively (``--precision auto``: CUDA, or a CPU with AMX or AVX512-BF16; fp32
elsewhere). Under torchrun every process embeds its slice and the embeddings are gathered, with gradients, so the
negatives are the whole global batch, as with one process. Identical captions in a batch count as
matches, not negatives (small vocabularies repeat them: "a red circle" twice).

Negatives. A random batch teaches what is in a picture (colour, shape, size) but rarely holds two captions
that differ only in how the same words are arranged ("a red circle above a blue square" against "a blue
circle above a red square"), so a scorer trained on it alone reads captions as bags of words. With
``--hard-negatives auto|scene|words`` (default ``none``: measured mixed) every picture also gets one caption a word or two from its own
that is false for it (data/negatives.py): on `shapes`, made from the scene (relation reversed, colours
swapped between the two objects, count changed by one, another cell, another colour or shape); on any
other data, from word swaps in the caption (an opposite, a number changed by one, two words exchanged).
The negatives join each image's softmax over texts (NegCLIP, Yuksekgonul et al., 2023); they cost a text
encoder pass each. The mode is recorded in RUN/scorer/config.json (``hard_negatives``).

Fine-tuning. ``--init-from DIR`` starts from the weights of another scorer of the same architecture and
tokenizer (a packed run's float16 weights load as fp32) with a fresh optimizer and schedule. Fine-tuned this
way on fresh scenes for 2 500 more steps, the `shapes` demo's scorer reads reversed relations (95% pairwise, at
chance after the plan's 1 500 steps) but picks worse among the decoder's candidates: clean renders never show
it the decoder's own mistakes.

The decoder's candidates. ``--rank-candidates DIR`` reads candidates that ``python -m train candidates`` drew
for training prompts and the `shapes` oracle judged, and adds to every step a listwise ranking loss
(:func:`candidate_ranking_loss`, weighted by ``--rank-weight``): for RANK_PROMPTS prompts with right and wrong
candidates, up to RANK_PER_SIDE of each, the negative log of the softmax mass of the right ones among them.
The pictures ride in the step's forward pass; which ones a step takes depends only on the seed, the step and
the process, so a resumed run takes the same. The demo's scorer is the plan's, fine-tuned so (BENCHMARKS.md).

Logged to RUN/metrics/scorer.jsonl: loss, accuracy (image-to-text top-1 within the batch), images_per_s,
and every --eval-every steps the loss and accuracy of retrieval within a fixed batch of
--heldout-examples pictures from the held-out split (for `shapes`: colour-shape pairs and relations never
seen in training), and ``heldout_pairwise``: how often a held-out picture scores its own caption above a
hard negative of it (chance 0.5; measured with the data's negatives whatever ``--hard-negatives`` is).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from checkpoint import CheckpointError, write_json
from cli import UserError
from data.negatives import MODES, hard_negative, resolve_mode
from data.sources import batches
from devices import autocast
from sample.candidates import load_candidates
from scorer import IMAGE_POOLS, TEXT_POOLS, Scorer, ScorerConfig, contrastive_loss, retrieval_accuracy
from seq2seq.evaluate import derangement
from tokenizer import TextTokenizer
from train import dist
from train.loop import (CaptionTokens, Run, Stage, StageOptions, add_common_arguments, add_model_size_argument,
                        check_pictures_held, choose_precision, cosine_schedule, optimizer_groups)


# --rank-candidates: prompts ranked a step, and at most this many right and this many wrong candidates of each
RANK_PROMPTS, RANK_PER_SIDE = 8, 4

@dataclass
class ScorerOptions(StageOptions):
    """The stage's options, one per command-line flag (``add_arguments``)."""

    steps: int = 1500
    batch_size: int = 128
    lr: float = 5e-4
    heldout_examples: int = 256
    heldout_split: str = "heldout"
    weight_decay: float = 0.1
    hard_negatives: str = "none"  # measured mixed on shapes (BENCHMARKS.md): opt in
    negatives_per_image: int = 1
    negative_weight: float = 1.0
    image_pool: str = "mean"
    text_pool: str = "mean"
    text_causal: bool = False
    init_from: str | None = None  # a scorer directory whose weights the model starts from (a fine-tune)
    rank_candidates: str | None = None  # judged candidates (python -m train candidates) to rank right over wrong
    rank_weight: float = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    o = ScorerOptions
    add_common_arguments(parser, o, heldout_help="pictures in the fixed held-out retrieval batch")
    add_model_size_argument(parser, ScorerOptions.preset, "tiny (a smoke test) | small | base (scorer/model.py PRESETS)")
    parser.add_argument("--heldout-split", default=ScorerOptions.heldout_split,
                        help="split the held-out batch comes from (default heldout)")
    parser.add_argument("--hard-negatives", default=ScorerOptions.hard_negatives, choices=MODES,
                        help="a false caption a word or two from the true one beside each picture (data/negatives.py): "
                             "scene (shapes: from the scene), words (any captions: word swaps), auto (scene on "
                             "shapes, words elsewhere), none (default: in 600 steps on shapes they helped relations "
                             "and hurt counts)")
    parser.add_argument("--negatives-per-image", type=int, default=ScorerOptions.negatives_per_image,
                        help="hard negatives drawn per picture (default 1); repeats of one are dropped")
    parser.add_argument("--negative-weight", type=float, default=ScorerOptions.negative_weight,
                        help="each hard negative counts this many times in its picture's softmax over texts "
                             "(default 1)")
    parser.add_argument("--image-pool", default=ScorerOptions.image_pool, choices=IMAGE_POOLS,
                        help="how the image tower pools its grid tokens (scorer/model.py; default "
                             f"{ScorerOptions.image_pool})")
    parser.add_argument("--text-pool", default=ScorerOptions.text_pool, choices=TEXT_POOLS,
                        help=f"how the text tower pools its tokens (default {ScorerOptions.text_pool})")
    parser.add_argument("--text-causal", action=argparse.BooleanOptionalAction, default=ScorerOptions.text_causal,
                        help="causal attention in the text tower, as CLIP's (each token reads the ones before it): "
                             "word order is read from the first step; pair with --text-pool last")
    parser.add_argument("--init-from", metavar="DIR", default=None,
                        help="start from the weights of the scorer in DIR (RUN/scorer/ of a run with the same "
                             "tokenizer, trained with the same --model-size, pools and --text-causal) instead of "
                             "a random initialisation: a fine-tune; the optimizer and schedule start afresh")
    parser.add_argument("--rank-candidates", metavar="DIR", default=None,
                        help="the decoder's candidates of training prompts judged by the oracle (`python -m train "
                             f"candidates --out DIR`): each step also ranks {RANK_PROMPTS} prompts' right candidates "
                             "above their wrong ones (shapes)")
    parser.add_argument("--rank-weight", type=float, default=ScorerOptions.rank_weight,
                        help="weight of that ranking loss beside the contrastive one (default 1)")


def candidate_ranking_loss(scale: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                           groups: list[tuple[int, int, int]]) -> torch.Tensor:
    """Right candidates above wrong ones: for each prompt g, its candidates' rows ``first`` to ``first + right +
    wrong`` of ``image_embeds`` (right ones first) against its text ``text_embeds[g]``, the negative log of the
    softmax mass of the right ones among them (``scale`` times the cosine), averaged over the prompts. A
    listwise loss: it is the pick, the top of a prompt's ranking, that must be right."""
    terms = []
    for g, (first, right, wrong) in enumerate(groups):
        logits = scale * image_embeds[first:first + right + wrong] @ text_embeds[g]  # (right + wrong,)
        terms.append(torch.logsumexp(logits, 0) - torch.logsumexp(logits[:right], 0))
    return torch.stack(terms).mean()


@dataclass
class RankedCandidates:
    """Judged candidates (``python -m train candidates``): pictures (P, N, 3, S, S) uint8, verdicts (P, N), the
    prompts, and the prompts that have both right and wrong candidates (the only ones a ranking can use)."""

    images: torch.Tensor
    right: torch.Tensor
    prompts: list[str]
    mixed: list[int]

    @classmethod
    def load(cls, directory: Path, size: int) -> RankedCandidates:
        """Every candidates.json (with its candidates.safetensors) in ``directory`` or its subfolders; a UserError
        for none, for held-out prompts' candidates (a bench cache), for pictures of another size, or for too few
        prompts with both right and wrong candidates."""
        found = sorted({*directory.glob("candidates.json"), *directory.glob("*/candidates.json")})
        if not found:
            raise UserError(f"--rank-candidates {directory} holds no candidates.json; draw them with `python -m "
                            f"train candidates --out {directory}`")
        images, right, prompts = [], [], []
        for path in found:
            try:
                settings = json.loads(path.read_text())["settings"]
            except (OSError, ValueError, KeyError, TypeError):
                settings = None
            record = load_candidates(path.parent, settings) if isinstance(settings, dict) else None
            if record is None:
                raise UserError(f"--rank-candidates: cannot read the candidates in {path.parent}; draw them again "
                                "with `python -m train candidates`")
            if settings.get("split") != "train":
                raise UserError(f"--rank-candidates: {path.parent} holds candidates of held-out prompts (a bench "
                                "cache); a scorer tuned on them would be judged on what it was taught. Draw training "
                                "prompts' with `python -m train candidates`")
            if record["images"].shape[-1] != size:
                raise UserError(f"--rank-candidates: {path.parent} holds {record['images'].shape[-1]}-pixel pictures "
                                f"and this scorer reads {size}; draw them with a run of --size {size}")
            images.append(record["images"])
            right += [verdicts for kind in settings["kinds"] for verdicts in record["kinds"][kind]["right"]]
            prompts += [prompt for kind in settings["kinds"] for prompt in record["kinds"][kind]["prompts"]]
        if len({tuple(i.shape[1:]) for i in images}) > 1:
            raise UserError(f"--rank-candidates: the folders in {directory} hold different numbers of candidates a "
                            "prompt; draw them with one --candidates")
        verdicts = torch.tensor(right, dtype=torch.bool)
        mixed = [i for i, row in enumerate(verdicts.tolist()) if any(row) and not all(row)]
        if len(mixed) < RANK_PROMPTS:
            raise UserError(f"--rank-candidates: only {len(mixed)} prompts in {directory} have both right and wrong "
                            f"candidates, and a step ranks {RANK_PROMPTS}; draw more prompts")
        return cls(torch.cat(images), verdicts, prompts, mixed)

    def batch(self, rng: random.Random) -> tuple[torch.Tensor, list[str], list[tuple[int, int, int]]]:
        """RANK_PROMPTS prompts with right and wrong candidates, up to RANK_PER_SIDE of each: pictures (M, 3, S, S)
        in [-1, 1], right ones of a prompt first, the prompts, and (first row, right, wrong) per prompt."""
        pictures, texts, groups = [], [], []
        for index in rng.sample(self.mixed, RANK_PROMPTS):
            row = self.right[index].tolist()
            right = [j for j, ok in enumerate(row) if ok]
            wrong = [j for j, ok in enumerate(row) if not ok]
            right = rng.sample(right, min(RANK_PER_SIDE, len(right)))
            wrong = rng.sample(wrong, min(RANK_PER_SIDE, len(wrong)))
            groups.append((len(pictures), len(right), len(wrong)))
            pictures += [self.images[index, j] for j in right + wrong]
            texts.append(self.prompts[index])
        return torch.stack(pictures).float() / 127.5 - 1, texts, groups


def caption_keys(texts: list[str]) -> torch.Tensor:
    """A stable 63-bit key per caption (B,), so processes can tell identical captions apart without strings."""
    digests = [hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest() for t in texts]
    return torch.tensor([int.from_bytes(d, "little") >> 1 for d in digests], dtype=torch.long)


class _AllGather(torch.autograd.Function):
    """Every process's equally sized ``x`` stacked in rank order; backward sums the gradients of all processes.

    Each process computes the loss of the whole global batch, so the gradient reaching a process's rows is
    the sum over processes; DDP's averaging of the weight gradients then gives the one-process gradient.
    (Written out with public collectives: torch.distributed.nn.functional.all_gather is deprecated and its
    replacement is private.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = torch_dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(torch_dist.get_world_size())]
        torch_dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # (world_size * rows, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        torch_dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def _gather_rows(x: torch.Tensor, ctx: dist.Context) -> torch.Tensor:
    """Concatenate every process's rows of ``x`` in rank order (itself with one process); sizes may differ."""
    if ctx.world_size == 1:
        return x
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world_size)]
    torch_dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, max(sizes) - x.shape[0]))  # (max_rows, ...)
    parts = _AllGather.apply(padded).chunk(ctx.world_size)  # world_size x (max_rows, ...)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


SCORER = "scorer"  # the stage, its run folder RUN/scorer/, its metrics and state
SCORE_RANGE = "score_range.json"  # in RUN/scorer/: what sampling compares its best pictures' scores with


@torch.no_grad()
def score_range(model: Scorer, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, wrong_ids: torch.Tensor,
                wrong_mask: torch.Tensor) -> dict:
    """Quantiles of the scorer's scores of held-out pictures with their own captions and with another picture's
    caption (a fixed derangement): a generated picture that scores no better than the wrong pairs do was likely
    asked for something the run never learned."""
    model.eval()
    right, wrong = [], []
    for start in range(0, len(images), 256):
        chunk = slice(start, start + 256)
        right.append(model.score(images[chunk], ids[chunk], mask[chunk]).float().cpu())
        wrong.append(model.score(images[chunk], wrong_ids[chunk], wrong_mask[chunk]).float().cpu())
    right, wrong = torch.cat(right), torch.cat(wrong)
    quantiles = torch.tensor([0.05, 0.5, 0.95])

    def named(scores: torch.Tensor) -> dict:
        return {f"p{round(q * 100)}": round(v, 4) for q, v in zip(quantiles.tolist(), scores.quantile(quantiles).tolist())}

    return {"pictures": len(right), "own_caption": named(right), "other_caption": named(wrong)}


class _Embed(nn.Module):
    """The training forward: both embeddings and the scale, so that several processes can gather them."""

    def __init__(self, scorer: Scorer):
        super().__init__()
        self.scorer = scorer

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor):
        return self.scorer.encode_image(images), self.scorer.encode_text(text_ids, text_mask), self.scorer.scale


class ScorerTrainer(Stage):
    """The stage's state and its steps; :func:`train.loop.fit` runs them."""

    name = SCORER

    def __init__(self, options: ScorerOptions):
        self.options = o = options
        if o.negatives_per_image < 1:
            raise UserError(f"--negatives-per-image must be >= 1, got {o.negatives_per_image}")
        if not (o.negative_weight > 0 and math.isfinite(o.negative_weight)):
            raise UserError(f"--negative-weight must be a positive number, got {o.negative_weight}")
        check_pictures_held(o, o.heldout_examples)
        out = Path(o.out)
        if not (out / "tokenizer.model").is_file():
            raise UserError(f"{out / 'tokenizer.model'} is missing; run `python -m train tokenizer --out {out}` first")
        self.ctx = dist.setup(o.device)
        self.device = self.ctx.device
        if o.resume:
            _rename_older_state(out)
        self.run = Run(out, SCORER)
        self.tokenizer = TextTokenizer.load(out / "tokenizer.model")
        self.negatives = resolve_mode(o.hard_negatives, o.data)
        try:
            self.config = ScorerConfig.from_preset(o.preset, text_vocab_size=self.tokenizer.vocab_size, image_size=o.size,
                                                   hard_negatives=self.negatives, image_pool=o.image_pool,
                                                   text_pool=o.text_pool, text_causal=o.text_causal)
        except ValueError as e:
            raise UserError(f"scorer: {e}") from None
        if o.batch_size % self.ctx.world_size:
            raise UserError(f"--batch-size {o.batch_size} must be divisible by the {self.ctx.world_size} processes")

        torch.manual_seed(o.seed)
        self.model = Scorer(self.config).to(self.device)
        if o.init_from is not None:
            self._init_from(Path(o.init_from))
        self.optimizer = torch.optim.AdamW(optimizer_groups(self.model, o.weight_decay), lr=o.lr, betas=(0.9, 0.98),
                                           eps=1e-6, fused=self.device.type == "cuda")
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_schedule(s, warmup=o.warmup, total=o.steps))
        self.train_model = dist.wrap(_Embed(self.model), self.ctx)
        self.step, self.skipped = 0, 0
        self.captions = CaptionTokens("scorer", self.tokenizer, self.config.max_text_len, self.device)
        self.modules = {"model": self.model}
        self.optimizers = {"optimizer": self.optimizer, "schedule": self.schedule}
        if o.resume and self.run.can_resume():
            self.step, _, _ = self.run.load_checkpoint(self.modules, self.optimizers, self.device)

        self.dataset = o.dataset("train")
        self.batches = batches(self.dataset, o.batch_size, o.seed, start=self.step * o.batch_size,
                               rank=self.ctx.rank, world_size=self.ctx.world_size, workers=o.workers)
        self.heldout_images, self.heldout_texts, self.heldout_negatives = self._heldout_batch(o.dataset(o.heldout_split))
        self.ranked = None
        if o.rank_candidates is not None:
            if not (o.rank_weight > 0 and math.isfinite(o.rank_weight)):
                raise UserError(f"--rank-weight must be a positive number, got {o.rank_weight}")
            self.ranked = RankedCandidates.load(Path(o.rank_candidates), o.size)
        self.amp_dtype = choose_precision(self.run, self.device, o.precision, self._precision_probe)

    def _init_from(self, directory: Path) -> None:
        """Load ``directory``'s scorer weights into the model (fp32, whatever they were saved in), after checking
        that its architecture is the one this command's flags build; a UserError names what differs."""
        try:
            source = Scorer.from_pretrained(directory)
            source.check_fits(self.tokenizer.vocab_size, self.options.size)
        except CheckpointError as e:
            raise UserError(f"--init-from {directory}: {e}") from None
        ours, theirs = asdict(self.config), asdict(source.config)
        differs = sorted(k for k in ours if k != "hard_negatives" and ours[k] != theirs[k])
        if differs:
            shown = ", ".join(f"{k} {theirs[k]!r} (here {ours[k]!r})" for k in differs)
            raise UserError(f"--init-from {directory} holds a scorer built otherwise: {shown}; pass the --model-size, "
                            "--image-pool, --text-pool and --text-causal it was trained with")
        self.model.load_state_dict({k: v.float() for k, v in source.state_dict().items()})
        if self.run.is_main:
            print(f"scorer: starting from the weights of {directory}")

    def _precision_probe(self, dtype: torch.dtype | None) -> None:
        """One forward and backward pass of held-out pairs in ``dtype``; changes no state."""
        rows = max(2, self.options.batch_size // self.ctx.world_size)
        text_ids, text_mask = self.captions(self.heldout_texts[:rows], count=False)
        self.model.eval()
        with autocast(self.device, dtype):
            image_embeds = self.model.encode_image(self.heldout_images[:rows].to(self.device))
            text_embeds = self.model.encode_text(text_ids, text_mask)
        (image_embeds.float() @ text_embeds.float().T).logsumexp(-1).mean().backward()
        self.model.zero_grad(set_to_none=True)

    def _heldout_batch(self, dataset) -> tuple[torch.Tensor, list[str], list[str | None]]:
        """The first --heldout-examples readable pictures of the held-out split, the same at every evaluation,
        their captions, and a hard negative of each caption (None where none applies)."""

        wanted = min(self.options.heldout_examples, len(dataset))  # batches() wraps around a short split
        images, texts, scenes, read = [], [], [], 0
        for batch in batches(dataset, min(256, wanted), seed=self.options.seed):
            images.append(batch["image"])
            texts += batch["text"]
            scenes += batch.get("scene", [None] * len(batch["text"]))
            read += len(batch["text"]) + batch["skipped"]
            if read >= wanted:
                break
        if len(texts) < 2:
            raise UserError(f"--data {self.options.data}: the {self.options.heldout_split} split has fewer than "
                            "2 readable pictures; retrieval needs at least 2")
        n = min(len(texts), wanted)
        rng, mode = random.Random(f"heldout/{self.options.seed}"), resolve_mode("auto", self.options.data)
        negatives = [hard_negative(text, scene, rng, mode) for text, scene in zip(texts[:n], scenes[:n])]
        return torch.cat(images)[:n], texts[:n], negatives

    def text_batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions to (ids, mask) on the device; over-long ones are cut and counted (CaptionTokens)."""
        return self.captions(texts)

    def _negatives(self, batch: dict) -> list[str]:
        """This process's hard negatives for a batch: up to --negatives-per-image distinct ones per picture where
        any applies, drawn from a generator fixed by the seed, step and rank, so a resumed run draws the same."""
        rng = random.Random(f"{self.options.seed}/{self.step}/{self.ctx.rank}")
        scenes = batch.get("scene", [None] * len(batch["text"]))
        negatives = []
        for text, scene in zip(batch["text"], scenes):
            made = (hard_negative(text, scene, rng, self.negatives) for _ in range(self.options.negatives_per_image))
            negatives += dict.fromkeys(negative for negative in made if negative is not None)
        return negatives

    def next_batch(self) -> dict:
        batch = next(self.batches)
        self.skipped += batch["skipped"]
        return batch

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimizer step on this process's slice of a global batch: its loss and in-batch accuracy."""
        o = self.options
        images = batch["image"].to(self.device)
        negatives = self._negatives(batch)
        texts = batch["text"] + negatives
        rows, ranked = len(batch["text"]), None
        if self.ranked is not None:  # the ranked candidates ride in the same forward pass, after the batch
            ranked = self.ranked.batch(random.Random(f"rank/{o.seed}/{self.step}/{self.ctx.rank}"))
            images = torch.cat([images, ranked[0].to(self.device)])
            texts = texts + ranked[1]
        text_ids, text_mask = self.text_batch(texts)
        self.model.train()
        with autocast(self.device, self.amp_dtype):
            image_embeds, text_embeds, scale = self.train_model(images, text_ids, text_mask)
        rank_loss = None
        if ranked is not None:
            texts_in_batch = rows + len(negatives)
            rank_loss = candidate_ranking_loss(scale.float(), image_embeds[rows:].float(),
                                               text_embeds[texts_in_batch:].float(), ranked[2])
            image_embeds, text_embeds = image_embeds[:rows], text_embeds[:texts_in_batch]
        image_embeds = _gather_rows(image_embeds.float(), self.ctx)  # (B, E)
        negative_embeds = _gather_rows(text_embeds[rows:].float(), self.ctx)  # (N, E)
        text_embeds = torch.cat([_gather_rows(text_embeds[:rows].float(), self.ctx), negative_embeds])  # (B + N, E)
        keys = _gather_rows(caption_keys(batch["text"]).to(self.device), self.ctx)  # (B,)
        negative_keys = _gather_rows(caption_keys(negatives).to(self.device), self.ctx)  # (N,)
        # A negative made for one picture can be another picture's own caption: that pair is a match.
        positives = keys[:, None] == torch.cat([keys, negative_keys])[None, :]  # (B, B + N)
        logits = scale.float() * image_embeds @ text_embeds.t()  # (B, B + N)
        b = keys.shape[0]
        if o.negative_weight != 1.0:  # w copies of a column in a softmax add log(w) to its logit
            logits = torch.cat([logits[:, :b], logits[:, b:] + math.log(o.negative_weight)], dim=1)
        loss = contrastive_loss(logits, positives)
        extra = {}
        if rank_loss is not None:
            extra["rank_loss"] = rank_loss.item()
            loss = loss + o.rank_weight * rank_loss
        loss.backward()
        loss_value, accuracy = loss.item(), retrieval_accuracy(logits[:, :b], positives[:, :b])
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            return {"loss": loss_value, "accuracy": accuracy, **extra}
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_value, "accuracy": accuracy, **extra}

    def figures(self) -> dict[str, float]:
        return {"lr": self.schedule.get_last_lr()[0], "scale": self.model.scale.item()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and image-to-text top-1 accuracy of retrieval within the fixed held-out batch, and how often a
        picture scores its own caption above its hard negative."""
        self.model.eval()
        image_embeds, text_embeds = [], []
        for start in range(0, len(self.heldout_texts), 256):
            images = self.heldout_images[start:start + 256].to(self.device)
            text_ids, text_mask = self.captions(self.heldout_texts[start:start + 256], count=False)
            image_embeds.append(self.model.encode_image(images).float())
            text_embeds.append(self.model.encode_text(text_ids, text_mask).float())
        image_embeds, text_embeds = torch.cat(image_embeds), torch.cat(text_embeds)  # (N, E) each
        logits = self.model.scale.float() * image_embeds @ text_embeds.t()  # (N, N)
        keys = caption_keys(self.heldout_texts).to(self.device)
        positives = keys[:, None] == keys[None, :]  # (N, N)
        figures = {"heldout_loss": contrastive_loss(logits, positives).item(),
                   "heldout_accuracy": retrieval_accuracy(logits, positives)}
        rows = [i for i, negative in enumerate(self.heldout_negatives) if negative is not None]
        if rows:
            text_ids, text_mask = self.captions([self.heldout_negatives[i] for i in rows], count=False)
            negative_embeds = self.model.encode_text(text_ids, text_mask).float()  # (M, E)
            own = (image_embeds[rows] * text_embeds[rows]).sum(-1)  # (M,)
            figures["heldout_pairwise"] = (own > (image_embeds[rows] * negative_embeds).sum(-1)).float().mean().item()
        return figures

    def checkpoint(self, step: int) -> None:
        self.run.save_checkpoint(step, self.modules, self.optimizers, data_position=step * self.options.batch_size)
        self.export()

    def export(self) -> None:
        """Write the scorer to RUN/scorer/, the weights sampling reranks with, and beside them the range of its
        scores on held-out pictures (:func:`score_range`), which sampling compares its best pictures with."""
        if self.run.is_main:
            self.model.save_pretrained(Path(self.options.out) / SCORER)
            texts = self.heldout_texts
            wrong = derangement(texts)
            ids, mask = self.captions(texts, count=False)
            wrong_ids, wrong_mask = self.captions([wrong[t] for t in texts], count=False)
            write_json(Path(self.options.out) / SCORER / SCORE_RANGE,
                       score_range(self.model, self.heldout_images.to(self.device), ids, mask, wrong_ids, wrong_mask))

    def start(self) -> None:
        # Resumed with nothing left to train: a kill between the last checkpoint and its export can have left
        # RUN/scorer/ older than the checkpoint, so export the restored weights again.
        if self.step >= self.options.steps:
            self.export()

    def finish(self, summary: dict) -> dict:
        return {**summary, **({"captions_cut": self.captions.cut} if self.captions.cut else {})}


def _rename_older_state(out: Path) -> None:
    """A run made when this stage was called ``clip`` keeps its checkpoints in state/clip/ and its log in
    metrics/clip.jsonl: renamed once, so that --resume continues it under today's names."""
    for old, new in ((out / "state" / "clip", out / "state" / SCORER),
                     (out / "metrics" / "clip.jsonl", out / "metrics" / f"{SCORER}.jsonl")):
        if old.exists() and not new.exists():
            old.rename(new)


def main(args: argparse.Namespace) -> None:
    trainer = ScorerTrainer(ScorerOptions.from_args(args))
    summary = trainer.fit()
    if trainer.run.is_main:
        print("scorer: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
              + f" -> {Path(trainer.options.out) / SCORER}")
    dist.teardown(trainer.ctx)
