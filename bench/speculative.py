"""Speculative Jacobi decoding on a trained run: tokens per forward pass, passes per picture, speed-up.

``python -m bench.speculative`` loads a run (the shipped `shapes` demo by default), takes held-out single-
object prompts and, for each batch size and thread count, times plain cached decoding (A) and speculative
decoding with each window (B, C, ...) interleaved in one process (A, B, C, A, B, C, ...; the fastest of
``--repeats`` kept), with ``python -m sample``'s sampling defaults. It counts the decoder's forward passes
(the prefill's included: plain decoding makes one per token) and prints, per window, the image tokens kept
per pass, the passes per picture (at batch 16: per batch, which runs until its slowest row is done), the
seconds per picture and the speed-up over plain decoding, with the load average before and after.

``--quality N`` instead draws ``--n`` candidates for each of N held-out prompts of one kind with and without
speculation (window ``--window``) and prints the share of pictures the oracle (``data.oracle``) passes and
of prompts whose scorer-best candidate passes: speculation keeps the distribution, so the two should agree
within sampling noise.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time

import torch

from bench.quality import composition_scores
from cli import ArgumentParser, UserError, counts, positive_int, run_command
from data.shapes import evaluation_prompts
from sample.pipeline import Pipeline, SamplingSettings, resolve_run
from seq2seq import generate

__all__ = ["PassCounter", "main"]


class PassCounter:
    """Counts the forward passes of a model's decoder (prefill and decode steps alike) while installed."""

    def __init__(self, model):
        self.decoder, self.passes = model.decoder, 0
        self.plain = self.decoder.decode

    def __enter__(self) -> PassCounter:
        def counted(*args, **kwargs):
            self.passes += 1
            return self.plain(*args, **kwargs)

        self.decoder.decode = counted
        return self

    def __exit__(self, *exc) -> None:
        del self.decoder.decode  # the class's method again


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def speed(pipeline: Pipeline, windows: list[int], batches: list[int], threads: list[int], prompts: int,
          repeats: int, settings: SamplingSettings) -> None:
    model = pipeline.model
    text_ids, text_mask = pipeline.encode_prompts([t for t, _ in evaluation_prompts("single", prompts, seed=1)])
    options = dict(cfg_scale=settings.cfg, top_k=settings.top_k, top_p=settings.top_p,
                   temperature=settings.temperature)
    image_len = model.config.image_len

    def run(batch: int, window: int) -> tuple[float, int, float]:
        """Seconds, pictures and passes: every prompt once at batch 1, else `batch` candidates of a few."""
        chosen = range(prompts) if batch == 1 else range(max(1, prompts // batch))
        start = time.perf_counter()
        with PassCounter(model) as counter:
            for i in chosen:
                generate(model, text_ids[i : i + 1], text_mask[i : i + 1], num_candidates=batch, seeds=100 * i,
                         speculative=window, **options)
        return time.perf_counter() - start, len(chosen) * batch, counter.passes / len(chosen)

    print(f"{resolve_run(pipeline.run)}: {image_len} image tokens a picture; guidance {settings.cfg}, top-k "
          f"{settings.top_k}, top-p {settings.top_p}, temperature {settings.temperature}; {os.cpu_count()} cores")
    print(f"{'batch':>5} {'threads':>7} {'window':>6} {'tokens/pass':>11} {'passes':>7} {'s/picture':>9} "
          f"{'speed-up':>8}  load before / after")
    with torch.inference_mode():
        for batch, n_threads in itertools.product(batches, threads):
            torch.set_num_threads(n_threads)
            before = _load()
            for window in [0, *windows]:
                run(batch, window)  # warm up: allocation, kernel choice
            best = dict.fromkeys([0, *windows], math.inf)
            passes = {}
            for _ in range(repeats):
                for window in best:
                    seconds, pictures, passes[window] = run(batch, window)
                    best[window] = min(best[window], seconds / pictures)
            after = _load()
            for window in best:  # passes: a picture's at batch 1 (mean over prompts), a batch's above
                print(f"{batch:>5} {n_threads:>7} {window or 'plain':>6} {image_len / passes[window]:>11.2f} "
                      f"{passes[window]:>7.1f} {best[window]:>9.3f} {best[0] / best[window]:>7.2f}x  {before} / {after}",
                      flush=True)


def quality(pipeline: Pipeline, window: int, prompts: int, candidates: int, kind: str,
            settings: SamplingSettings) -> None:
    print(f"oracle on {prompts} held-out {kind} prompts x {candidates} candidates, guidance {settings.cfg}")
    for speculative in (0, window):
        scores = composition_scores(pipeline.run, prompts_per_kind=prompts, candidates=candidates, kinds=(kind,),
                                    device="cpu", speculative=speculative)[kind]
        print(f"speculative {speculative or 'off':>3}: pictures passing {scores['any']:.3f} "
              f"({round(scores['any'] * prompts * candidates)} of {prompts * candidates}), scorer-best passing "
              f"{scores['clip1']:.3f} ({round(scores['clip1'] * prompts)} of {prompts})", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.speculative", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a run directory or shipped run (default: the shapes demo)")
    parser.add_argument("--windows", type=counts, default=[8, 12, 16],
                        help="speculative windows, comma-separated (default 8,12,16)")
    parser.add_argument("--batches", type=counts, default=[1, 16], help="batch sizes, comma-separated (default 1,16)")
    parser.add_argument("--threads", type=counts, default=[1, 2], help="thread counts, comma-separated (default 1,2)")
    parser.add_argument("--prompts", type=positive_int, default=16, help="held-out prompts (default 16)")
    parser.add_argument("--repeats", type=positive_int, default=2, help="timed runs of each, interleaved (default 2)")
    parser.add_argument("--quality", type=positive_int, metavar="N", help="oracle scores of N prompts instead of speed")
    parser.add_argument("--window", type=int, default=16, help="the window --quality uses (default 16)")
    parser.add_argument("--n", type=positive_int, default=4, help="candidates per prompt for --quality (default 4)")
    parser.add_argument("--kind", default="single", choices=["single", "position", "relation", "count"],
                        help="prompt kind for --quality (default single)")
    parser.add_argument("--quality-threads", type=positive_int, default=1, help="CPU threads for --quality (default 1)")
    args = parser.parse_args(argv)
    return run_command(lambda: _run(args))


def _run(args) -> None:
    if any(w < 2 for w in args.windows) or args.window < 2:
        raise UserError("a speculative window drafts at least 2 tokens: give --windows/--window of 2 or more")
    pipeline = Pipeline(args.checkpoint, device="cpu", rerank=args.quality is not None)
    longest = max(args.windows + [args.window])
    if longest > pipeline.model.config.image_len:
        raise UserError(f"a window of {longest} is longer than this run's pictures of "
                        f"{pipeline.model.config.image_len} tokens")
    settings = SamplingSettings()
    if args.quality is not None:
        torch.set_num_threads(args.quality_threads)  # two threads on a loaded 2-core machine crawl
        quality(pipeline, args.window, args.quality, args.n, args.kind, settings)
        return
    speed(pipeline, args.windows, args.batches, args.threads, args.prompts, args.repeats, settings)


if __name__ == "__main__":
    sys.exit(main())
