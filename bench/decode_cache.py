"""Decoding speed: the key/value cache against recomputing the whole prefix at every step.

``python -m bench.decode_cache`` generates one grid of image ids (16 x 16 = 256 tokens by default) for a
batch of prompts both ways with the same seeds, in one run, the two ways alternating ``--repeats`` times
(the fastest of each kept, so a loaded machine slows both alike), and prints both times and their ratio. The
model is randomly initialized: speed does not depend on the weights.

``--profile`` instead profiles one cached generation with torch.profiler and prints the milliseconds per
decoding step and the operators that take the most time, per step (self time, calls per step): where a
step's time goes.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from cli import ArgumentParser, UserError, positive_int, run_command
from devices.flops import synchronize
from seq2seq import Seq2Seq, Seq2SeqConfig, generate

__all__ = ["time_generate", "profile_generate", "main"]


def time_generate(model: Seq2Seq, text_ids: torch.Tensor, text_mask: torch.Tensor, **options) -> tuple[float, torch.Tensor]:
    """Seconds for one :func:`seq2seq.generate` call, and its ids."""
    device = text_ids.device
    synchronize(device)
    start = time.perf_counter()
    ids = generate(model, text_ids, text_mask, **options)
    synchronize(device)
    return time.perf_counter() - start, ids


def profile_generate(model: Seq2Seq, text_ids: torch.Tensor, text_mask: torch.Tensor, top: int = 12,
                     **options) -> str:
    """A report of one cached generation under torch.profiler: ms per step and the top operators per step."""
    time_generate(model, text_ids, text_mask, **options)  # warm up
    plain_s, _ = time_generate(model, text_ids, text_mask, **options)
    steps = model.config.image_len
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled_s, _ = time_generate(model, text_ids, text_mask, **options)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_us = sum(e.self_cpu_time_total for e in events)
    lines = [f"{1000 * plain_s / steps:.2f} ms per step unprofiled ({1000 * profiled_s / steps:.2f} profiled); "
             f"{sum(e.count for e in events) / steps:.0f} operator calls per step",
             f"{'operator':<52} {'ms/step':>8} {'share':>6} {'calls/step':>10}"]
    for e in events[:top]:
        lines.append(f"{e.key[:52]:<52} {e.self_cpu_time_total / 1000 / steps:>8.3f} "
                     f"{e.self_cpu_time_total / total_us:>6.1%} {e.count / steps:>10.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.decode_cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help="seq2seq preset (default small)")
    parser.add_argument("--grid", type=positive_int, default=16, help="grid side: grid**2 image tokens (default 16)")
    parser.add_argument("--batch", type=positive_int, default=8, help="prompts generated together (default 8)")
    parser.add_argument("--text-len", type=positive_int, default=16, help="prompt length in tokens (default 16)")
    parser.add_argument("--cfg", type=float, default=1.0, help="guidance scale; != 1 doubles the rows")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the cached decode step")
    parser.add_argument("--top-k", type=positive_int, default=100, help="top-k of the draws (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=positive_int, default=2,
                        help="timed runs of each way, alternating (default 2)")
    parser.add_argument("--profile", action="store_true", help="profile the cached generation instead")
    args = parser.parse_args(argv)
    return run_command(lambda: _run(args))


def _run(args) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; use --device cpu")
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    config = _config(args.preset, args.grid)
    if args.text_len > config.max_text_len or args.top_k > config.codebook_size:
        raise UserError(f"--text-len goes up to {config.max_text_len} and --top-k up to {config.codebook_size} "
                        f"for the {args.preset} preset")
    model = Seq2Seq(config).to(device).eval()
    text_ids = torch.randint(4, config.text_vocab_size, (args.batch, args.text_len), device=device)
    text_mask = torch.ones_like(text_ids, dtype=torch.bool)
    options = dict(seeds=args.seed, cfg_scale=args.cfg, top_k=args.top_k)
    print(f"{args.preset} preset, {model.num_parameters() / 1e6:.1f} M parameters, {config.image_len} image tokens, "
          f"batch {args.batch}, cfg {args.cfg}, {device.type} with {torch.get_num_threads()} threads")
    if args.profile:
        print(profile_generate(model, text_ids, text_mask, compile=args.compile, **options))
        return

    # Warm up the cached path (allocation, kernel selection, compilation) on one short prompt.
    time_generate(model, text_ids[:1], text_mask[:1], compile=args.compile, **options)
    cached_s = recompute_s = float("inf")
    for _ in range(args.repeats):
        seconds, cached_ids = time_generate(model, text_ids, text_mask, compile=args.compile, **options)
        cached_s = min(cached_s, seconds)
        seconds, recompute_ids = time_generate(model, text_ids, text_mask, use_cache=False, **options)
        recompute_s = min(recompute_s, seconds)
    print(f"with the cache:      {cached_s:8.2f} s  ({1000 * cached_s / config.image_len:7.2f} ms per token step)")
    print(f"recomputing prefix:  {recompute_s:8.2f} s  ({1000 * recompute_s / config.image_len:7.2f} ms per token step)")
    differing = int((cached_ids != recompute_ids).sum())
    print(f"speed-up: {recompute_s / cached_s:.1f}x; ids differing between the two: {differing} of {cached_ids.numel()}")


def _config(preset: str, grid: int) -> Seq2SeqConfig:
    """The preset's config at ``grid``; an unknown preset is a UserError."""
    try:
        return Seq2SeqConfig.from_preset(preset, grid_size=grid)
    except (KeyError, ValueError) as e:
        raise UserError(f"--preset {preset}: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
