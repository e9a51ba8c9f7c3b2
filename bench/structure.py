"""Does the scorer read structure? A pairwise test against hard negatives, and reranking from fixed candidates.

- **Pairwise** (Winoground-style; Thrush et al., 2022): for each held-out picture, does the scorer give its
  own caption a higher score than a hard negative of it, a caption a word or two away that is false for the
  picture (data/negatives.py)? Chance is 50%; ties count as wrong. On `shapes`, per kind of scene
  negative (relation reversed, colours swapped between the two objects, count changed by one, another
  cell, another colour or shape), on renders of held-out scenes; on any other data, per kind of word
  negative, on the held-out split's own pictures.
- **Reranking** (`shapes`): candidates are drawn once per held-out prompt with `python -m sample`'s
  defaults and judged by the oracle; then each scorer picks from the same candidates, so two scorers are
  compared on identical pictures. Per kind of scene: the share of candidates right, the scorer's pick of
  the first k (k = 1, 2, 4, ... N), and the pick of `python -m sample`'s rule for each shortlist size K:
  the scorer's best K of the N, re-ordered by the decoder's likelihood of each picture given the prompt.
  And right over wrong: for each prompt with right and wrong candidates, how often the scorer scores a right
  one above a wrong one, over every such pair (chance 50%): the pairwise test asked of the decoder's mistakes.

    python -m bench.structure --checkpoint RUN --scorer RUN/scorer --scorer OTHER/scorer --cache CANDIDATES_DIR

The candidates (pictures, prompts and the oracle's verdicts) are kept in ``--cache`` and read back when the
run, prompts, count and sampling settings match, so another scorer can be compared later on the same
pictures. Prints a markdown table and writes OUT/structure.json.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from checkpoint import CheckpointError, part_dir, write_json
from cli import ArgumentParser, UserError, add_threads_argument, run_command, set_threads
from data.images import from_pil
from data.negatives import KINDS_OF_SCENE, SCENE_KINDS, WORD_KINDS, scene_negative, word_alternatives, word_negative
from data.shapes import evaluation_prompts, render
from devices import resolve_device
from sample.candidates import (candidate_settings, draw_candidates, extend_candidates,
                               load_candidates, save_candidates)
from sample.pipeline import Pipeline, SamplingSettings, picture_side, resolve_run
from sample.rerank import load_reranker
from seq2seq.evaluate import log_likelihoods
from tokenizer import TextTokenizer

__all__ = ["pairwise_shapes", "pairwise_captions", "draw_candidates", "candidate_scores", "rerank_curves",
           "candidate_likelihoods", "shortlist_curves", "main"]

SCENE_KINDS_ORDER = ("single", "position", "relation", "count")
CHUNK = 64  # pictures per scorer pass
SHORTLISTS = (1, 2, 3, 4, 6, 8, 16)  # shortlist sizes reported (and the number of candidates)


def _prefers(scorer, images: torch.Tensor, own: Sequence[str], negatives: Sequence[str]) -> list[bool]:
    """Whether each picture scores its own caption strictly above the negative, in chunks."""
    wins = []
    for start in range(0, len(own), CHUNK):
        chunk = images[start:start + CHUNK]
        true_scores = scorer.score(chunk, own[start:start + CHUNK])
        negative_scores = scorer.score(chunk, negatives[start:start + CHUNK])
        wins += (true_scores > negative_scores).tolist()
    return wins


def _figure(wins: list[bool], examples: list[tuple[str, str]]) -> dict:
    return {"pairs": len(wins), "accuracy": sum(wins) / len(wins) if wins else None, "examples": examples[:3]}


def pairwise_shapes(scorer, *, prompts_per_kind: int = 256, size: int = 64, seed: int = 0) -> dict:
    """{negative kind: {"pairs", "accuracy", "examples"}} on renders of held-out `shapes` scenes.

    Each kind reads the held-out prompts of the scene kind it applies to (``evaluation_prompts``, the
    prompts bench's oracle figures use), each with its own negative.
    """

    results = {}
    for kind in SCENE_KINDS:
        scene_kind = next(s for s, kinds in KINDS_OF_SCENE.items() if kind in kinds)
        own, negatives, images = [], [], []
        for index, (text, scene) in enumerate(evaluation_prompts(scene_kind, prompts_per_kind, seed=seed)):
            negative = scene_negative(text, scene, kind, random.Random(f"pairwise/{seed}/{kind}/{index}"))
            if negative is not None:
                own.append(text)
                negatives.append(negative)
                images.append(from_pil(render(scene, size), size))
        wins = _prefers(scorer, torch.stack(images), own, negatives) if own else []
        results[kind] = _figure(wins, list(zip(own, negatives)))
    return results


def pairwise_captions(scorer, images: torch.Tensor, texts: Sequence[str], seed: int = 0) -> dict:
    """{word negative kind: {"pairs", "accuracy", "examples"}} for held-out pictures and their captions (any data);
    a kind counts only the captions it applies to."""
    results = {}
    for kind in WORD_KINDS:
        rows, negatives = [], []
        for index, text in enumerate(texts):
            negative = word_negative(text, random.Random(f"pairwise/{seed}/{kind}/{index}"), kind)
            if negative is not None:
                rows.append(index)
                negatives.append(negative)
        own = [texts[i] for i in rows]
        wins = _prefers(scorer, images[rows], own, negatives) if rows else []
        results[kind] = _figure(wins, list(zip(own, negatives)))
    return results


# ---------------------------------------------------------------- reranking from fixed candidates


def _stored_kinds(record: dict) -> Iterator[tuple[str, dict, range]]:
    """Each kind of scene with its entry and the rows its prompts hold in the stored tensors (kind by kind, in
    the order of ``settings["kinds"]``, the order the pictures are stored in)."""
    start = 0
    for kind in record["settings"]["kinds"]:
        entry = record["kinds"][kind]
        yield kind, entry, range(start, start + len(entry["right"]))
        start += len(entry["right"])


def _stored_prompts(record: dict) -> list[str]:
    """Each stored row's prompt, in the order the candidates are stored (kind by kind)."""
    return [p for kind in record["settings"]["kinds"] for p in record["kinds"][kind]["prompts"]]


def candidate_scores(record: dict, scorer) -> torch.Tensor:
    """(P, N) a scorer's score of every stored candidate against its prompt, a row's pictures at a time."""
    n = record["settings"]["candidates"]
    return torch.stack([scorer.score(record["images"][row].float() / 127.5 - 1, [prompt] * n)  # [-1, 1]
                        for row, prompt in enumerate(_stored_prompts(record))])


def rerank_curves(record: dict, scores: torch.Tensor) -> dict:
    """{kind: {"prompts", "any", "random1", "pick", "best_of_first": {k: share}}} for one scorer's ``scores``
    (P, N) of the candidates (:func:`candidate_scores`)."""
    return _curves(record, lambda row, prompt: scores[row].tolist())


def _curves(record: dict, score: Callable[[int, str], list[float]]) -> dict:
    """Reranking curves for ``score(row, prompt)``, the scores of the candidates of stored row ``row``."""
    n = record["settings"]["candidates"]
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32) if k < n} | {n})
    results = {}
    for kind, entry, rows in _stored_kinds(record):
        passed = dict.fromkeys(ks, 0)
        for row, prompt, right in zip(rows, entry["prompts"], entry["right"]):
            scores = score(row, prompt)
            for k in ks:
                passed[k] += right[max(range(k), key=scores.__getitem__)]
        prompts = len(entry["prompts"])
        results[kind] = {"prompts": prompts, "any": sum(map(sum, entry["right"])) / (prompts * n),
                         "random1": sum(r[0] for r in entry["right"]) / prompts, "pick": passed[n] / prompts,
                         "best_of_first": {k: v / prompts for k, v in passed.items()}}
    return results


def candidate_pairwise(record: dict, scores: torch.Tensor) -> dict:
    """{kind: {"prompts", "pairs", "accuracy"}}: among the stored candidates of each prompt that has right and
    wrong ones, how often ``scores`` (P, N) put a right candidate strictly above a wrong one, over every such
    pair (chance 50%). The pairwise test of renders asks this of one word changed in a clean picture; this asks
    it of the decoder's own mistakes, which are what a pick must pass over."""
    results = {}
    for kind, entry, rows in _stored_kinds(record):
        prompts = pairs = wins = 0
        for row, right in zip(rows, entry["right"]):
            row_scores = scores[row]
            mask = torch.tensor(right, dtype=torch.bool)
            if mask.all() or not mask.any():
                continue
            prompts += 1
            above = row_scores[mask][:, None] > row_scores[~mask][None, :]  # (right, wrong)
            pairs += above.numel()
            wins += int(above.sum())
        results[kind] = {"prompts": prompts, "pairs": pairs, "accuracy": wins / pairs if pairs else None}
    return results


def candidate_likelihoods(record: dict, judge: DecoderJudge) -> torch.Tensor:
    """(P, N) log p(candidate's tokens | its prompt) in nats of every stored candidate, by the run's decoder."""
    n = record["settings"]["candidates"]
    return torch.stack([judge.log_likelihood([prompt] * n, record["tokens"][row])
                        for row, prompt in enumerate(_stored_prompts(record))])


def shortlist_curves(record: dict, scores: torch.Tensor, likelihoods: torch.Tensor) -> dict:
    """{kind: {"prompts", "pick": {K: share}}}: the oracle's verdict on the picture `python -m sample` keeps
    first with ``--shortlist K``, the best K candidates by the scorer's ``scores`` (P, N) re-ordered by
    ``likelihoods`` (P, N), ties in the scorer's order (K = 1: the scorer alone; K = N: the likelihood alone)."""
    n = record["settings"]["candidates"]
    sizes = sorted({k for k in SHORTLISTS if k < n} | {n})
    results = {}
    for kind, entry, rows in _stored_kinds(record):
        passed = dict.fromkeys(sizes, 0)
        for row, right in zip(rows, entry["right"]):
            merit, fit = scores[row].tolist(), likelihoods[row].tolist()
            order = sorted(range(n), key=lambda j: -merit[j])
            for k in sizes:
                passed[k] += right[max(order[:k], key=fit.__getitem__)]  # max keeps the first of equals
        results[kind] = {"prompts": len(entry["prompts"]), "pick": {k: v / len(entry["prompts"])
                                                                   for k, v in passed.items()}}
    return results


def failures(record: dict) -> dict:
    """Why candidates fail, per kind of scene: {kind: {"candidates", "right", "failing": {aspect: share of
    candidates where it fails}, "alone": {aspect: share where it is the only aspect that fails}}}, the
    aspects those the oracle checks (data.oracle.check_details: count, colour, shape, size, position, relation)."""
    results = {}
    for kind in record["settings"]["kinds"]:
        verdicts = [aspects for prompt in record["kinds"][kind]["failed"] for aspects in prompt]
        total = len(verdicts)
        names = sorted({a for aspects in verdicts for a in aspects})
        results[kind] = {"candidates": total, "right": sum(not a for a in verdicts) / total,
                         "failing": {a: sum(a in v for v in verdicts) / total for a in names},
                         "alone": {a: sum(v == [a] for v in verdicts) / total for a in names}}
    return results


# ---------------------------------------------------------------- the decoder as a judge


class DecoderJudge:
    """The run's own decoder as a judge of pictures: the log-likelihood, in nats, of a picture's image tokens
    given a caption, log p(x | c), teacher-forced in one pass. Pairwise, a picture's own caption against a hard
    negative; reranking, three rules over one prompt's candidates: the likelihood itself, the pointwise mutual
    information log p(x | c) - log p(x | empty caption), and the posterior of the prompt among itself and its
    word alternatives (data.negatives.word_alternatives), uniform prior: log p(x | c) - logsumexp over them."""

    RULES = ("likelihood", "pmi", "posterior")

    def __init__(self, run: Path, device: str):
        pipeline = Pipeline(run, device=device, rerank=False)
        self.model, self.vqgan, self.tokenizer = pipeline.model.eval(), pipeline.vqgan, pipeline.tokenizer
        self.device = pipeline.device

    def log_likelihood(self, texts: Sequence[str], ids: torch.Tensor) -> torch.Tensor:
        """(B,) log p(ids[i] | texts[i]) in nats; ``ids`` (B, h, w) or (B, T)."""
        return log_likelihoods(self.model, self.tokenizer, texts, ids, self.device)

    @torch.inference_mode()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """A reranker's interface (sample.rerank.Reranker): pictures (B,3,H,W) in [-1,1], encoded to the run's
        tokens, scored by their log-likelihood under their prompts, (B,)."""
        return self.log_likelihood(prompts, self.vqgan.encode(images.to(self.device)))

    def ranks(self, prompt: str, ids: torch.Tensor) -> dict[str, list[float]]:
        """One prompt's candidates, their own tokens (N, h, w), scored by each of :attr:`RULES`; the
        likelihood under the prompt is computed once for all three."""
        n = len(ids)
        own = self.log_likelihood([prompt] * n, ids)
        others = [self.log_likelihood([alternative] * n, ids) for alternative in word_alternatives(prompt)]
        return {"likelihood": own.tolist(), "pmi": (own - self.log_likelihood([""] * n, ids)).tolist(),
                "posterior": (own - torch.logsumexp(torch.stack([own, *others]), 0)).tolist()}


def decoder_rerank_curves(record: dict, judge: DecoderJudge) -> dict:
    """{rule: rerank curves} for each of DecoderJudge.RULES on the candidates' own tokens, each row scored once."""
    by_row: dict[int, dict[str, list[float]]] = {}

    def scores(row: int, prompt: str, rule: str) -> list[float]:
        if row not in by_row:
            by_row[row] = judge.ranks(prompt, record["tokens"][row])
        return by_row[row][rule]

    return {rule: _curves(record, lambda row, prompt, rule=rule: scores(row, prompt, rule)) for rule in judge.RULES}


# ---------------------------------------------------------------- the command


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def pairwise_markdown(figures: dict, what: str, judge: Callable[[str, dict], str] = lambda kind, r: "–") -> list[str]:
    """The pairwise figures as a table, one row per kind of negative; ``judge`` fills the goal column."""
    lines = ["", f"Pairwise test ({what}): how often a held-out picture's own caption scores above a hard "
                 "negative of it (data/negatives.py; chance 50%, ties count as wrong):", "",
             "| negative | pairs | own caption preferred | goal | example (own -> negative) |", "|---|---|---|---|---|"]
    for kind, r in figures.items():
        example = f"{r['examples'][0][0]} -> {r['examples'][0][1]}" if r["examples"] else ""
        lines.append(f"| {kind} | {r['pairs']} | {_pct(r['accuracy'])} | {judge(kind, r)} | {example} |")
    return lines


def _rerank_markdown(curves: dict, title: str) -> list[str]:
    ks = list(next(iter(curves.values()))["best_of_first"])
    lines = ["", title, "", "| kind | prompts | candidates right | " + " | ".join(f"best of {k}" for k in ks) + " |",
             "|---|---|---|" + "---|" * len(ks)]
    for kind, r in curves.items():
        lines.append(f"| {kind} | {r['prompts']} | {_pct(r['any'])} | "
                     + " | ".join(_pct(r["best_of_first"][k]) for k in ks) + " |")
    return lines


def _shortlist_markdown(curves: dict) -> list[str]:
    sizes = list(next(iter(curves.values()))["pick"])
    default = SamplingSettings.shortlist
    lines = ["", "The scorer's best K re-ordered by the decoder's likelihood, `python -m sample --shortlist K` "
                 f"(K = 1: the scorer alone; the default, K = {default}, in bold):", "",
             "| kind | prompts | " + " | ".join(f"K={k}" for k in sizes) + " |", "|---|---|" + "---|" * len(sizes)]
    for kind, r in curves.items():
        lines.append(f"| {kind} | {r['prompts']} | " + " | ".join(
            f"**{_pct(r['pick'][k])}**" if int(k) == default else _pct(r["pick"][k]) for k in sizes) + " |")
    return lines


def _candidate_pairwise_markdown(figures: dict) -> list[str]:
    lines = ["", "Right over wrong among the same candidates: for each prompt with both, how often the scorer scores "
                 "a right candidate above a wrong one, over every such pair (chance 50%):", "",
             "| kind | prompts with both | pairs | right preferred |", "|---|---|---|---|"]
    for kind, r in figures.items():
        lines.append(f"| {kind} | {r['prompts']} | {r['pairs']} | {_pct(r['accuracy'])} |")
    return lines


def markdown(report: dict) -> str:
    lines = []
    for name, figures in report["scorers"].items():
        lines += ["", f"Scorer `{name}` (hard negatives: {figures['hard_negatives']}):"]
        lines += pairwise_markdown(figures["pairwise"], "scene negatives, renders of held-out `shapes` scenes")
        if "rerank" in figures:
            lines += _rerank_markdown(figures["rerank"], "Reranking the same candidates (the oracle judges the pick):")
        if "shortlist" in figures:
            lines += _shortlist_markdown(figures["shortlist"])
        if "candidate_pairwise" in figures:
            lines += _candidate_pairwise_markdown(figures["candidate_pairwise"])
    if "failures" in report:
        aspects = sorted({a for r in report["failures"].values() for a in r["failing"]})
        lines += ["", "Why candidates fail (the oracle's aspects; 'alone': the only aspect that fails):", "",
                  "| kind | candidates | right | " + " | ".join(f"{a} (alone)" for a in aspects) + " |",
                  "|---|---|---|" + "---|" * len(aspects)]
        for kind, r in report["failures"].items():
            lines.append(f"| {kind} | {r['candidates']} | {_pct(r['right'])} | " + " | ".join(
                f"{_pct(r['failing'][a])} ({_pct(r['alone'][a])})" if a in r["failing"] else "–" for a in aspects)
                + " |")
    if "decoder" in report:
        lines += pairwise_markdown(report["decoder"]["pairwise"], "the run's decoder: log p(picture | caption), "
                                   "renders of held-out `shapes` scenes")
        for rule, curves in report["decoder"].get("rerank", {}).items():
            lines += _rerank_markdown(curves, f"Reranking by the decoder's {rule}:")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.structure", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="the run whose decoder draws the candidates (default: the shapes demo)")
    parser.add_argument("--scorer", action="append", default=None,
                        help="a scorer directory trained on the run's tokenizer (repeat to compare; default RUN/scorer)")
    parser.add_argument("--pairwise-prompts", type=int, default=256, help="held-out pictures per negative kind")
    parser.add_argument("--prompts-per-kind", type=int, default=128, help="held-out prompts per kind of scene")
    parser.add_argument("--candidates", type=int, default=16, help="candidates per prompt")
    parser.add_argument("--cfg", type=float, default=SamplingSettings.cfg,
                        help=f"classifier-free guidance scale the candidates are drawn with (default "
                             f"{SamplingSettings.cfg}, `python -m sample`'s)")
    parser.add_argument("--temperature", type=float, default=SamplingSettings.temperature,
                        help=f"sampling temperature of the candidates (default {SamplingSettings.temperature:g})")
    parser.add_argument("--top-k", type=int, default=SamplingSettings.top_k,
                        help=f"draw only among the K likeliest tokens (default {SamplingSettings.top_k or 'off'})")
    parser.add_argument("--top-p", type=float, default=SamplingSettings.top_p,
                        help=f"draw only among the smallest set of tokens with mass P (default "
                             f"{SamplingSettings.top_p or 'off'}; 1 turns it off)")
    parser.add_argument("--kinds", nargs="+", choices=SCENE_KINDS_ORDER, default=list(SCENE_KINDS_ORDER),
                        help="kinds of scene whose prompts get candidates (default all four)")
    parser.add_argument("--no-rerank", action="store_true", help="the pairwise test only, no candidates drawn")
    parser.add_argument("--decoder", action="store_true",
                        help="also judge by the run's decoder: its pairwise test, and reranking by its likelihood, "
                             "its pointwise mutual information and its posterior over the prompt's word alternatives")
    parser.add_argument("--cache", default=None, help="a folder the candidates are kept in and read back from")
    parser.add_argument("--out", default="bench_results", help="where structure.json goes")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    args.argv = argv
    return run_command(lambda: _run(args))


def _run(args) -> None:
    set_threads(args.threads)
    if min(args.pairwise_prompts, args.prompts_per_kind, args.candidates) < 1:
        raise UserError("--pairwise-prompts, --prompts-per-kind and --candidates must be >= 1")
    sampling = {"cfg": args.cfg, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    SamplingSettings(rerank=False, **sampling)  # one clear line for a bad value, before anything loads
    run = resolve_run(args.checkpoint)
    if not (run / "tokenizer.model").is_file():
        raise UserError(f"--checkpoint {run} holds no tokenizer.model; pass a run made by `python -m train all`")
    device = resolve_device(args.device)
    tokenizer = TextTokenizer.load(run / "tokenizer.model")
    directories = [Path(d) for d in (args.scorer or [part_dir(run, "scorer")])]
    side = picture_side(run)  # every scorer compared must read the pictures the run draws
    scorers = {}
    for directory in directories:
        if not (directory / "config.json").is_file():
            raise CheckpointError(f"--scorer {directory} holds no config.json; pass a RUN/scorer folder")
        scorers[str(directory)] = load_reranker(run, tokenizer, device, side, directory=directory)
    record = None
    if not args.no_rerank:
        settings = candidate_settings(run, args.prompts_per_kind, args.candidates, args.seed, args.kinds, **sampling)
        cache = Path(args.cache) if args.cache else None
        record = load_candidates(cache, settings) if cache else None
        have = 0 if record is None else record["settings"]["prompts_per_kind"]
        if have < args.prompts_per_kind:
            drawn = draw_candidates(run, prompts_per_kind=args.prompts_per_kind, candidates=args.candidates,
                                    seed=args.seed, device=str(device), kinds=args.kinds, first=have, **sampling)
            record = drawn if record is None else extend_candidates(record, drawn)
            if cache:
                save_candidates(record, cache)
    report = {"checkpoint": str(run), "command": "python -m bench.structure " + " ".join(
        sys.argv[1:] if args.argv is None else args.argv), "scorers": {}}
    judge = DecoderJudge(run, str(device)) if record is not None or args.decoder else None
    likelihoods = None if record is None else candidate_likelihoods(record, judge)
    for name, scorer in scorers.items():
        figures = {"hard_negatives": scorer.model.config.hard_negatives,
                   "pairwise": pairwise_shapes(scorer, prompts_per_kind=args.pairwise_prompts, size=side,
                                               seed=args.seed)}
        if record is not None:
            scores = candidate_scores(record, scorer)  # one pass of the scorer for both figures
            figures["rerank"] = rerank_curves(record, scores)
            figures["shortlist"] = shortlist_curves(record, scores, likelihoods)
            figures["candidate_pairwise"] = candidate_pairwise(record, scores)
        report["scorers"][name] = figures
    if record is not None:
        report["failures"] = failures(record)
    if args.decoder:
        report["decoder"] = {"pairwise": pairwise_shapes(judge, prompts_per_kind=args.pairwise_prompts, size=side,
                                                         seed=args.seed)}
        if record is not None:
            report["decoder"]["rerank"] = decoder_rerank_curves(record, judge)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "structure.json", report)
    print(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
