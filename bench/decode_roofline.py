"""Batch-1 decoding against the memory-bandwidth roofline, on a GPU: eager and compiled (CUDA graph).

A cached decode step at batch 1 reads every decoder weight once and the filled part of the key/value
cache; nothing else it does is large. The roofline time of a step is those bytes over the card's memory
bandwidth; the share below is that time over the measured step time (prefill taken out). ``python -m
bench.decode_roofline --preset base`` prints, for fp32 and bf16 weights, eager and compiled: ms per step,
GB/s and the share of the roofline, and whether compiled and eager drew the same ids. The model is randomly
initialized: speed does not depend on the weights.
"""

from __future__ import annotations

import json
import time

import torch

from devices.flops import synchronize
from bench.speed import _step_bytes, card_bandwidth, timed
from cli import ArgumentParser
from seq2seq import Seq2Seq, Seq2SeqConfig, generate

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m bench.decode_roofline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base", help="seq2seq preset (default base)")
    parser.add_argument("--grid", type=int, default=16, help="grid side: grid**2 image tokens (default 16)")
    parser.add_argument("--bandwidth", type=float, default=None, help="the card's memory bandwidth in GB/s")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="weight dtypes, comma-separated")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    device = torch.device("cuda")
    bandwidth = card_bandwidth(device, args.bandwidth)
    if bandwidth is None:
        parser.error(f"unknown card {torch.cuda.get_device_name(device)}: give --bandwidth in GB/s")
    torch.manual_seed(0)
    config = Seq2SeqConfig.from_preset(args.preset, grid_size=args.grid)
    text_ids = torch.randint(4, config.text_vocab_size, (1, 16), device=device)
    text_mask = torch.ones_like(text_ids, dtype=torch.bool)
    options = dict(seeds=0, top_k=100)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, {args.preset} preset, "
          f"{config.image_len} image tokens, roofline at {bandwidth / 1e9:.0f} GB/s")
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        model = Seq2Seq(config).to(device=device, dtype=dtype).eval()
        step_bytes = _step_bytes(model, 1)
        with torch.inference_mode():
            model.setup_caches(1)
            prefill = timed(lambda: model.prefill(text_ids, text_mask), device)
        ids = {}
        for compiled in (False, True):
            synchronize(device)
            start = time.perf_counter()
            try:
                ids[compiled] = generate(model, text_ids, text_mask, compile=compiled, **options)  # warm-up, compile
            except Exception as error:  # a compiler that fails here: say so, keep the eager figures
                print(f"{name:>9} {'compiled' if compiled else 'eager':>8}: failed: {str(error)[:300]}")
                continue
            synchronize(device)
            first = time.perf_counter() - start
            seconds = timed(lambda: generate(model, text_ids, text_mask, compile=compiled, **options), device)
            step = (seconds - prefill) / (config.image_len - 1)
            row = {"dtype": name, "compiled": compiled, "first_call_s": first, "seconds": seconds,
                   "ms_per_step": 1000 * step, "step_mb": step_bytes / 1e6, "gb_per_s": step_bytes / step / 1e9,
                   "roofline_share": step_bytes / step / bandwidth}
            rows.append(row)
            print(f"{name:>9} {'compiled' if compiled else 'eager':>8}: {row['ms_per_step']:.3f} ms/step, "
                  f"{row['step_mb']:.1f} MB/step, {row['gb_per_s']:.0f} GB/s, {row['roofline_share']:.1%} of the "
                  f"roofline (first call {first:.1f} s)", flush=True)
        if len(ids) == 2:
            same = int((ids[True] == ids[False]).sum())
            print(f"{name:>9}: compiled and eager ids equal at {same} of {ids[True].numel()} positions")
            rows[-1]["ids_equal_eager"] = same
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
