"""Batch-1 decoding against the memory-bandwidth roofline: eager and compiled, on a GPU or on the CPU.

A cached decode step at batch 1 reads every decoder weight once and the filled part of the key/value
cache; nothing else it does is large. The roofline time of a step is those bytes over the memory
bandwidth; the share below is that time over the measured step time (prefill taken out). The model is
randomly initialized: speed does not depend on the weights.

On a GPU, ``python -m bench.decode_roofline --preset base`` prints, for fp32 and bf16 weights, eager and
compiled (a CUDA graph): ms per step, GB/s and the share of the roofline, and whether compiled and eager drew
the same ids, against the card's published bandwidth.

On the CPU the bandwidth is measured: the best of a few sums over a buffer far larger than the caches, on
the threads set (``--threads``). Beside tilecraft's step it times min-dalle's decoder step at the same size
(``bench.mindalle``; its step reads its weights, the state of every image position and the encoder's
output), interleaved, and prints the ceiling that bandwidth puts on the speed-up over min-dalle: min-dalle's
measured step over tilecraft's roofline step, what a step that cost nothing but its reads would reach.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

from bench.mindalle import MinDalleDecoder
from bench.speed import _step_bytes, card_bandwidth, timed
from cli import ArgumentParser, UserError, add_threads_argument, positive_int, run_command, set_threads
from devices.flops import synchronize
from seq2seq import Seq2Seq, Seq2SeqConfig, generate
from seq2seq.model import decode_length

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.decode_roofline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base", help="seq2seq preset (default base)")
    parser.add_argument("--grid", type=positive_int, default=16, help="grid side: grid**2 image tokens (default 16)")
    parser.add_argument("--bandwidth", type=float, default=None, help="the card's memory bandwidth in GB/s")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="weight dtypes, comma-separated")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto (default): CUDA when one is visible, else the CPU")
    parser.add_argument("--compile", action="store_true",
                        help="on the CPU, also time the compiled step (its first compile takes a minute or more)")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    return run_command(lambda: _run(args))


def _run(args) -> None:
    set_threads(args.threads)
    for name in args.dtypes.split(","):
        if name not in ("float32", "bfloat16", "float16"):
            raise UserError(f"--dtypes takes float32, bfloat16 and float16, comma-separated, not {name!r}")
    if args.grid > 64:
        raise UserError(f"--grid goes up to 64, got {args.grid}")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not cuda:
        raise UserError("--device cuda: no CUDA device is visible; leave --device out to measure the CPU")
    if not cuda:
        _run_cpu(args)
        return
    device = torch.device("cuda")
    bandwidth = card_bandwidth(device, args.bandwidth)
    if bandwidth is None:
        raise UserError(f"unknown card {torch.cuda.get_device_name(device)}: give --bandwidth in GB/s")
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
    _write(args.out, rows)


def _write(path: str | None, rows: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def cpu_bandwidth(megabytes: int = 512, repeat: int = 5) -> float:
    """Bytes/s this process reads from main memory on the threads set: the best of ``repeat`` sums over a
    buffer of ``megabytes``, far larger than the caches."""
    buffer = torch.ones(megabytes * 2**20 // 4)
    buffer.sum()  # touch every page
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * buffer.element_size() / best


def mindalle_step_bytes(decoder: MinDalleDecoder, text_len: int) -> float:
    """Bytes one batch-1 step of min-dalle's decoder reads: its weights but the embedding tables, every
    layer's keys and values of all image positions (it attends over all of them, masked), and the encoder's
    output it projects again in every layer."""
    tables = {id(p) for m in (decoder.embed_tokens, decoder.embed_positions) for p in m.parameters()}
    weights = sum(p.numel() * p.element_size() for p in decoder.parameters() if id(p) not in tables)
    element = decoder.lm_head.weight.element_size()
    width, layers = decoder.embed_tokens.embedding_dim, len(decoder.layers)
    return weights + layers * width * element * (2 * decoder.image_len + text_len)


def _run_cpu(args) -> None:
    """The CPU's roofline: bandwidth measured, tilecraft's step and min-dalle's at the same size, interleaved."""
    text_len = 16
    bandwidth = args.bandwidth * 1e9 if args.bandwidth else cpu_bandwidth()
    config = Seq2SeqConfig.from_preset(args.preset, grid_size=args.grid)
    top_k = min(64, config.codebook_size)
    print(f"CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}, {args.preset} preset, "
          f"{config.image_len} image tokens, batch 1, no guidance, top-k {top_k}; memory read "
          f"{bandwidth / 1e9:.1f} GB/s ({'given' if args.bandwidth else 'measured'}); "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        torch.manual_seed(0)
        ours = Seq2Seq(config).to(dtype).eval()
        theirs = MinDalleDecoder(config.d_model, config.n_heads, config.n_decoder_layers, config.mlp_hidden,
                                 config.codebook_size, config.image_len).to(dtype).eval()
        text_ids = torch.randint(4, config.text_vocab_size, (1, text_len))
        text_mask = torch.ones_like(text_ids, dtype=torch.bool)
        with torch.no_grad():
            memory = ours.encode(text_ids, text_mask)
        with torch.inference_mode():
            ours.setup_caches(1)
            prefill = timed(lambda: ours.prefill(text_ids, text_mask), torch.device("cpu"))
        systems = {"tilecraft": lambda: generate(ours, text_ids, text_mask, seeds=0, top_k=top_k),
                   "min-dalle": lambda: theirs.sample(memory, text_mask, guided=False, top_k=top_k,
                                                      generator=torch.Generator().manual_seed(0))}
        if args.compile:
            systems["tilecraft compiled"] = lambda: generate(ours, text_ids, text_mask, seeds=0, top_k=top_k,
                                                             compile=True)
        for fn in systems.values():  # warm up: allocation, kernel choice, the compile
            fn()
        seconds = dict.fromkeys(systems, math.inf)
        for _ in range(3):  # interleaved, the fastest kept
            for system, fn in systems.items():
                start = time.perf_counter()
                fn()
                seconds[system] = min(seconds[system], time.perf_counter() - start)
        step_bytes = {"tilecraft": _step_bytes(ours, 1, decode_length(text_len, config.max_text_len)),
                      "min-dalle": mindalle_step_bytes(theirs, text_len)}
        step_bytes["tilecraft compiled"] = step_bytes["tilecraft"]
        for system, total in seconds.items():
            step = (total - (0.0 if system == "min-dalle" else prefill)) / config.image_len
            row = {"dtype": name, "system": system, "ms_per_step": 1000 * step,
                   "step_mb": step_bytes[system] / 1e6, "roofline_ms": 1000 * step_bytes[system] / bandwidth,
                   "roofline_share": step_bytes[system] / step / bandwidth}
            rows.append(row)
            print(f"{name:>9} {system:>18}: {row['ms_per_step']:.2f} ms/step, {row['step_mb']:.1f} MB/step, "
                  f"roofline {row['roofline_ms']:.2f} ms/step, {row['roofline_share']:.1%} of it", flush=True)
        theirs_step = next(r for r in rows if r["dtype"] == name and r["system"] == "min-dalle")["ms_per_step"]
        ours_rows = [r for r in rows if r["dtype"] == name and r["system"].startswith("tilecraft")]
        ceiling = theirs_step / ours_rows[0]["roofline_ms"]
        measured = ", ".join(f"{r['system']} {theirs_step / r['ms_per_step']:.2f}x" for r in ours_rows)
        print(f"{name:>9}: min-dalle's step over tilecraft's, measured: {measured}; at the roofline tilecraft's step "
              f"would be at most {ceiling:.2f}x faster than min-dalle's measured one")
        ours_rows[0]["ceiling_vs_mindalle"] = ceiling
    _write(args.out, rows)


if __name__ == "__main__":
    sys.exit(main())
