"""``python -m bench``: how fast and how good, measured, as a markdown table and a JSON file.

    python -m bench                              # the shipped demo run, speed and quality
    python -m bench --checkpoint runs/mine --only quality
    python -m bench --only speed --device cuda --compile

Speed (bench/speed.py) times random weights at the run's sizes: decoding at ``--grid`` x ``--grid``
image tokens (default 16: 256 tokens), the VQGAN, the scorer and a training step of each trained model,
all in one process after measuring the matmul peak. Quality measures the run on the held-out split of
``--data`` (default: the data the run was trained on, as RUN/all.json records it, else `shapes`): for any
data, VQGAN PSNR and SSIM beside a downsample-and-enlarge baseline, codebook usage, the caption gap in
bits per image token, retrieval of generated pictures by the run's scorer, a scorer Fréchet distance and
the scorer's pairwise test against word-swap hard negatives (bench/real.py); for `shapes` also the
oracle's scores of the run's pictures (bench/quality.py) and the pairwise test against the scene's hard
negatives (bench/structure.py). Writes OUT/bench.json and OUT/bench.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.quality import composition_scores, heldout_bits, vqgan_scores
from bench.real import SSIM_SIGMA, SSIM_WINDOW, real_scores
from bench.speed import (card_bandwidth, data_figures, decode_figures, peak_figure, scorer_figures, training_figures,
                         vqgan_figures)
from bench.structure import pairwise_markdown, pairwise_shapes
from checkpoint import atomic_write, load_config, part_dir, read_run_record, write_json
from cli import ArgumentParser, UserError, add_threads_argument, run_command, set_threads
from data.sources import DEFAULT_HELDOUT_FRACTION
from devices import autocast_dtype, resolve_device
from sample.pipeline import SamplingSettings, resolve_run
from sample.rerank import load_reranker
from scorer import Scorer, ScorerConfig
from seq2seq import Seq2Seq, Seq2SeqConfig
from tokenizer import TextTokenizer
from vqgan import VQGAN, VQGANConfig

GOALS = {"cache_speedup": 10.0, "cpu_share_of_peak": 0.5, "gpu_bandwidth_share": 0.6, "gpu_mfu": 0.35,
         "single": 0.98, "position": 0.95, "relation": 0.90, "count": 0.85, "single_unranked": 0.90,
         **{f"pairwise_{kind}": 0.95 for kind in ("relation", "swap", "count", "position", "attribute")}}
# A share measured on fewer pictures is reported with its count, never as a goal met or not: on 32 pictures
# one picture moves it by 3 points.
MIN_PICTURES_TO_JUDGE = 100
REPORT_FILES = ("bench.json", "bench.md")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a run directory or a shipped run's name, shapes (default) or openmoji")
    parser.add_argument("--only", choices=["speed", "quality"], help="run one half")
    parser.add_argument("--out", default="bench_results", help="where bench.json and bench.md go")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--grid", type=int, default=16, help="decoding benchmark grid side (default 16: 256 tokens)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="decoding batch sizes")
    parser.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs on a GPU)")
    parser.add_argument("--bandwidth", type=float, default=None, help="the card's memory bandwidth in GB/s")
    parser.add_argument("--prompts-per-kind", type=int, default=32, help="held-out prompts per kind of scene")
    parser.add_argument("--candidates", type=int, default=16, help="candidates per prompt")
    parser.add_argument("--pairwise-prompts", type=int, default=256,
                        help="held-out `shapes` pictures per kind of hard negative in the pairwise test")
    parser.add_argument("--single-prompts", type=int, default=128,
                        help="held-out single-object prompts drawn 4 candidates each, scored without reranking")
    parser.add_argument("--data", default=None,
                        help="whose held-out split quality is measured on (default: RUN/all.json's data, else shapes)")
    parser.add_argument("--image-column", default=None, help="--data's image column (default: RUN/all.json's)")
    parser.add_argument("--text-column", default=None, help="--data's caption column (default: RUN/all.json's)")
    parser.add_argument("--size", type=int, default=None, help="picture side for quality (default: the scorer's)")
    parser.add_argument("--vqgan-pictures", type=int, default=256,
                        help="held-out pictures the VQGAN reconstructs and the scorer Fréchet distance reads")
    parser.add_argument("--gap-pictures", type=int, default=256, help="held-out pictures for the caption gap")
    parser.add_argument("--retrieval-captions", type=int, default=100,
                        help="distinct held-out captions drawn for and retrieved among")
    parser.add_argument("--retrieval-candidates", type=int, default=8,
                        help="unranked pictures drawn per caption (default 8: at 2, R@1 over 100 captions "
                             "moved by several points from one seed to another)")
    parser.add_argument("--data-batches", type=int, default=20, help="batches of 64 timed from the data layer")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_argument(parser)
    return parser


def machine(device: torch.device) -> dict:
    info = {"device": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def speed(run: Path, device: torch.device, args: argparse.Namespace) -> dict:
    seq2seq_config = _load_config(run, "seq2seq")
    vqgan_config = _load_config(run, "vqgan")
    scorer_config = _load_config(run, "scorer")
    size = scorer_config.image_size
    train_dtype = autocast_dtype(device, "auto")  # the precision `python -m train` uses on this device
    dtype = train_dtype or torch.float32
    result = {"peak_flops": peak_figure(device, dtype), "peak_dtype": str(dtype).removeprefix("torch.")}
    print(f"bench: matmul peak {result['peak_flops'] / 1e9:.0f} GFLOP/s ({result['peak_dtype']})", file=sys.stderr)

    result["data"] = data_figures(size=size, batches=args.data_batches)
    torch.manual_seed(args.seed)
    decoder = Seq2Seq(replace(seq2seq_config, grid_size=args.grid)).to(device).eval()
    if device.type == "cuda":
        decoder = decoder.to(torch.bfloat16)
    result["decode_model"] = {"parameters": decoder.num_parameters(), "image_tokens": decoder.config.image_len}
    result["decode"] = decode_figures(decoder, batches=args.batches, compile=args.compile,
                                      bandwidth=card_bandwidth(device, args.bandwidth))
    del decoder
    print("bench: decoding done", file=sys.stderr)
    vqgan = VQGAN(vqgan_config).to(device).eval()
    result["vqgan"] = vqgan_figures(vqgan, size=size)
    result["scorer"] = scorer_figures(Scorer(scorer_config).to(device).eval())
    seq2seq = Seq2Seq(seq2seq_config).to(device)
    result["training"] = training_figures(seq2seq, vqgan, peak=result["peak_flops"], size=size,
                                          amp_dtype=train_dtype)
    if train_dtype is not None and device.type == "cpu":  # the same steps in fp32, against the fp32 peak
        fp32_peak = peak_figure(device, torch.float32)
        result["training_fp32"] = {"peak_flops": fp32_peak,
                                   **training_figures(seq2seq, vqgan, peak=fp32_peak, size=size)}
    print("bench: training done", file=sys.stderr)
    return result


def _load_config(run: Path, part: str):
    """A part's config from the run, a CheckpointError naming the part where it is missing or broken."""

    return load_config({"seq2seq": Seq2SeqConfig, "vqgan": VQGANConfig, "scorer": ScorerConfig}[part], part_dir(run, part), part)


def run_data(run: Path, args: argparse.Namespace) -> dict:
    """The data quality is measured on: ``--data``, else the ``data`` RUN/all.json records, else `shapes`.

    {"data", "from", "image_column", "text_column"}; the columns all.json records go with its own data only.
    """
    record = read_run_record(run, strict=True)
    fraction = record.get("heldout_fraction") if isinstance(record, dict) else None
    fraction = fraction if isinstance(fraction, float) and 0 < fraction < 1 else DEFAULT_HELDOUT_FRACTION
    if args.data is not None:
        return {"data": args.data, "from": "--data", "image_column": args.image_column, "text_column": args.text_column,
                "heldout_fraction": fraction}
    if isinstance(record, dict) and record.get("data"):
        return {"data": str(record["data"]), "from": "all.json",
                "image_column": args.image_column or record.get("image_column"),
                "text_column": args.text_column or record.get("text_column"), "heldout_fraction": fraction}
    return {"data": "shapes", "from": "default", "image_column": args.image_column, "text_column": args.text_column,
            "heldout_fraction": fraction}


def quality(run: Path, device: torch.device, args: argparse.Namespace) -> dict:
    size = args.size or _load_config(run, "scorer").image_size
    source = run_data(run, args)
    data = source["data"]
    result: dict = {"data": data, "data_from": source["from"]}
    # First: it checks that the data and --size fit the run before the long `shapes` figures.
    result["real"] = real_scores(run, data=data, size=size, seed=args.seed, device=str(device),
                                 pictures=args.vqgan_pictures, gap_pictures=args.gap_pictures,
                                 retrieval_captions=args.retrieval_captions,
                                 retrieval_candidates=args.retrieval_candidates,
                                 image_column=source["image_column"], text_column=source["text_column"],
                                 heldout_fraction=source["heldout_fraction"])
    result["real"]["sampling"] = _sampling_defaults()
    if data == "shapes":  # the oracle reads `shapes` pictures back into objects; nothing else
        result.update(composition=composition_scores(run, prompts_per_kind=args.prompts_per_kind,
                                                     candidates=args.candidates, seed=args.seed, device=str(device)),
                      candidates=args.candidates, sampling=_sampling_defaults())
        # Training's quality test: every one of 4 unranked candidates counts, over many prompts (the four
        # held-out colour-shape pairs differ in difficulty, so few prompts make a noisy figure).
        result["single_unranked"] = composition_scores(run, kinds=("single",), prompts_per_kind=args.single_prompts,
                                                       candidates=4, seed=args.seed, device=str(device))["single"]
        print("bench: composition done", file=sys.stderr)
        result["pairwise"] = _pairwise_shapes(run, device, args.pairwise_prompts, size, args.seed)
        result["vqgan"] = vqgan_scores(run, n=args.vqgan_pictures, size=size, device=str(device), seed=args.seed)
    result["heldout_bits_per_token"] = heldout_bits(run)
    return result


def _pairwise_shapes(run: Path, device: torch.device, prompts: int, size: int, seed: int) -> dict:
    scorer = load_reranker(run, TextTokenizer.load(run / "tokenizer.model"), device, size)
    return pairwise_shapes(scorer, prompts_per_kind=prompts, size=size, seed=seed)


def _pairwise_markdown(figures: dict, what: str, goals: bool) -> list[str]:
    def judge(kind: str, r: dict) -> str:
        goal = GOALS.get(f"pairwise_{kind}") if goals else None
        return f"{_pct(goal)}: {_judged(r['accuracy'], goal, r['pairs'])}" if goal and r["pairs"] else "–"

    return pairwise_markdown(figures, what, judge)


def _sampling_defaults() -> dict:
    return {"cfg": SamplingSettings.cfg, "temperature": SamplingSettings.temperature,
            "top_k": SamplingSettings.top_k, "top_p": SamplingSettings.top_p, "shortlist": SamplingSettings.shortlist}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _goal(value: float, goal: float) -> str:
    return f"{_pct(value) if goal < 1 else f'{value:.1f}x'} (goal {_pct(goal) if goal < 1 else f'{goal:.0f}x'}: " \
           f"{'met' if value >= goal else 'not met'})"


def _judged(value: float, goal: float, pictures: int) -> str:
    """"met" or "not met" for a share of ``pictures`` pictures against ``goal``; too few pictures say so."""
    if pictures < MIN_PICTURES_TO_JUDGE:
        return f"{_pct(value)} on {pictures} pictures: too few to judge"
    return "met" if value >= goal else "not met"


def markdown(report: dict) -> str:
    lines = [f"Run: `{report['checkpoint']}` · {report['machine']['device']} · torch {report['machine']['torch']} · "
             f"{report['machine'].get('gpu', report['machine']['cpu'])}, {report['machine']['threads']} threads · "
             f"{report['seconds']:.0f} s", ""]
    s = report.get("speed")
    if s:
        gpu = report["machine"]["device"] == "cuda"
        fp32_peak = s.get("training_fp32", {}).get("peak_flops")
        peaks = f"**{s['peak_flops'] / 1e9:.0f} GFLOP/s** ({s['peak_dtype']})" + (
            f", **{fp32_peak / 1e9:.0f} GFLOP/s** (float32)" if fp32_peak else "")
        lines += [f"Matmul peak measured in this run: {peaks}.", "",
                  f"Decoding, {s['decode_model']['image_tokens']} image tokens, "
                  f"{s['decode_model']['parameters'] / 1e6:.1f} M parameters:", "",
                  "| batch | guidance | method | image tokens/s | ms/step | prefill ms | outside model | vs recompute |"
                  + (" bandwidth |" if gpu else ""),
                  "|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
        for r in s["decode"]:
            cells = [str(r["batch"]), f"cfg {r['cfg']:g}" if r["cfg"] != 1 else "off", r["method"],
                     f"{r['image_tokens_per_s']:.0f}", f"{r['ms_per_step']:.2f}",
                     f"{r['prefill_ms']:.1f}" if "prefill_ms" in r else "",
                     _pct(r["outside_model_share"]) if "outside_model_share" in r else "",
                     f"cache {r['cache_speedup']:.1f}x faster" if "cache_speedup" in r else ""]
            if gpu:
                cells.append(_pct(r["bandwidth_share"]) if "bandwidth_share" in r else "")
            lines.append("| " + " | ".join(cells) + " |")
        speedups = {r["batch"]: r["cache_speedup"] for r in s["decode"] if "cache_speedup" in r}
        if speedups:
            lines += ["", "Cache against recompute at " + "; ".join(
                f"batch {batch}: {_goal(ratio, GOALS['cache_speedup'])}" for batch, ratio in speedups.items()) + "."]
        share_goal = GOALS["gpu_mfu"] if gpu else GOALS["cpu_share_of_peak"]
        lines += ["", "| component | throughput | achieved FLOP/s | share of its dtype's peak |", "|---|---|---|---|"]
        for t, label in ((s["training"], s["peak_dtype"]), (s.get("training_fp32"), "float32")):
            if t is None:
                continue
            lines += [f"| seq2seq training, batch {t['seq2seq']['batch']}, {label} | "
                      f"{t['seq2seq']['image_tokens_per_s']:.0f} image tokens/s | "
                      f"{t['seq2seq']['achieved_flops'] / 1e9:.1f} G | "
                      f"{_goal(t['seq2seq']['share_of_peak'], share_goal)} |",
                      f"| VQGAN training, batch {t['vqgan']['batch']}, {label} | {t['vqgan']['pictures_per_s']:.1f} "
                      f"pictures/s | {t['vqgan']['achieved_flops'] / 1e9:.1f} G | "
                      f"{_pct(t['vqgan']['share_of_peak'])} |"]
        lines += [f"| VQGAN encode, batch {s['vqgan']['batch']} | {s['vqgan']['encode_pictures_per_s']:.0f} pictures/s | | |",
                  f"| VQGAN decode, batch {s['vqgan']['batch']} | {s['vqgan']['decode_pictures_per_s']:.0f} pictures/s | | |",
                  f"| scorer, batch {s['scorer']['batch']} | {s['scorer']['pictures_per_s']:.0f} pictures/s | | |"]
        lines += [f"| `shapes` data, {r['size']} px, {r['workers']} workers | {r['examples_per_s']:.0f} examples/s | | |"
                  for r in s["data"]]
    q = report.get("quality")
    if q and "composition" in q:
        c = q["composition"]
        settings = ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in q.get("sampling", {}).items() if v is not None)
        lines += ["", f"Oracle score on held-out prompts ({q['candidates']} candidates each; `python -m sample` "
                  f"defaults: {settings}):", "",
                  "| kind | prompts | candidates right | keep 1 at random | keep 1 by the scorer alone | "
                  "keep 1 as `python -m sample` does | goal |",
                  "|---|---|---|---|---|---|---|"]
        for kind, r in c.items():  # one picture kept per prompt
            goal = GOALS.get(kind)
            pick = r.get("pick", r["clip1"])  # reports written before the shortlist kept the scorer's pick
            lines.append(f"| {kind} | {r['prompts']} | {_pct(r['any'])} | {_pct(r['random1'])} | {_pct(r['clip1'])} | "
                         f"{_pct(pick)} | "
                         + (f"{_pct(goal)}: {_judged(pick, goal, r['prompts'])} |" if goal else "– |"))
        lines += ["", "Candidates right: the share of all the candidates that the oracle reads right, what one "
                      "unranked picture scores (not the best of them). `python -m sample` keeps the scorer's best "
                      "--shortlist candidates re-ordered by the decoder's likelihood of each picture given its prompt."]
        if "single_unranked" in q:
            r = q["single_unranked"]
            lines += ["", f"Single objects, {r['prompts']} held-out prompts x 4 candidates, no reranking: "
                          f"**{_pct(r['any'])}** of pictures right (goal {_pct(GOALS['single_unranked'])}: "
                          f"{_judged(r['any'], GOALS['single_unranked'], 4 * r['prompts'])})."]
        ks = list(next(iter(c.values()))["clip1_of_first"])
        lines += ["", "Keeping the scorer's best of the first k candidates:", "",
                  "| kind | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for kind, r in c.items():
            lines.append(f"| {kind} | " + " | ".join(_pct(r["clip1_of_first"][k]) for k in ks) + " |")
        if "pairwise" in q:
            lines += _pairwise_markdown(q["pairwise"], "scene negatives, renders of held-out `shapes` scenes", True)
        v = q["vqgan"]
        bits = q["heldout_bits_per_token"]
        lines += ["", f"VQGAN on {v['pictures']} held-out renders: PSNR **{v['psnr_db']:.2f} dB**, oracle reads the "
                      f"reconstruction like the original on **{_pct(v['oracle_agreement'])}**. Held-out bits per image "
                      f"token: {'n/a' if bits is None else f'{bits:.3f}'}."]
    elif q:
        bits = q["heldout_bits_per_token"]
        lines += ["", f"The `shapes` oracle does not apply to this data (`{q['data']}`): no composition, single-object "
                      f"or oracle-agreement figures. Held-out bits per image token logged in training: "
                      f"{'n/a' if bits is None else f'{bits:.3f}'}."]
    if q and "real" in q:
        lines += real_markdown(q["real"], q.get("data_from"))
    return "\n".join(lines) + "\n"


def _optional(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def real_markdown(r: dict, data_from: str | None = None) -> list[str]:
    """The generic figures (bench/real.py) as a table, each with the count it is measured on."""

    v, b, k, g, t, d = r["vqgan"], r["vqgan"]["baseline"], r["codebook"], r["caption_gap"], r["retrieval"], r["frechet"]
    source = {"all.json": ", as the run's all.json records", "default": ", the default"}.get(data_from or "", "")
    settings = ", ".join(f"{key.replace('_', '-')} {value:g}" for key, value in r.get("sampling", {}).items()
                         if value is not None)
    lines = ["", f"Figures for any data, on the held-out split of `{r['data']}`{source} ({r['size']} px"
                 + (f"; {r['skipped_unreadable']} unreadable pictures skipped" if r["skipped_unreadable"] else "")
                 + "):", "",
             "| figure | measured on | value | beside it |", "|---|---|---|---|",
             f"| VQGAN PSNR, mean of per-picture PSNR | {v['pictures']} pictures | {v['psnr_db']:.2f} dB | "
             f"baseline ({b['downsample']}x average pooling down, bicubic up): {b['psnr_db']:.2f} dB |",
             f"| VQGAN SSIM, {SSIM_WINDOW}x{SSIM_WINDOW} gaussian window (sigma {SSIM_SIGMA:g}), mean over RGB | "
             f"{v['pictures']} pictures | {v['ssim']:.3f} | baseline: {b['ssim']:.3f} |",
             f"| codebook usage | {k['pictures']} pictures | {_pct(k['usage'])} ({k['codes_used']} of "
             f"{k['codebook_size']} codes) | |",
             f"| bits per image token, own caption | {g['pictures']} pictures, {g['distinct_captions']} distinct "
             f"captions | {g['right']:.3f} | |",
             f"| bits per image token, another picture's caption | {g['pictures']} pictures | "
             f"{_optional(g['shuffled'], '.3f')} | |",
             f"| bits per image token, empty caption | {g['pictures']} pictures | {g['empty']:.3f} | |",
             f"| caption gap: another caption minus own | {g['pictures']} pictures | **{_optional(g['gap'], '.3f')}** "
             "bits per image token | |",
             f"| retrieval by the run's scorer: true caption first (R@1) | {t['pictures']} pictures of {t['captions']} "
             f"captions | **{_pct(t['r1'])}** | chance {_pct(t['chance_r1'])} |",
             f"| retrieval: true caption in the top 5 (R@5) | {t['pictures']} pictures of {t['captions']} captions | "
             f"**{_pct(t['r5'])}** | chance {_pct(t['chance_r5'])} |",
             f"| scorer Fréchet distance, generated vs held-out pictures | {d['generated']} vs {d['real']} pictures | "
             f"**{d['distance']:.4f}** | floor, {d['floor_method']}: {_optional(d['floor'], '.4f')} "
             f"({d['floor_pictures']} vs {d['floor_pictures']}) |"]
    lines += ["", f"Retrieval and the scorer Fréchet distance read {t['candidates']} pictures per caption drawn with "
                  f"`python -m sample` defaults ({settings}), not reranked. The scorer Fréchet distance is measured "
                  "in the run's own scorer's embedding space, not Inception's: it is not FID, and compares runs on the "
                  "same data only; fewer pictures make it larger, and its floor is measured on fewer."]
    if "pairwise" in r:
        lines += _pairwise_markdown(r["pairwise"], f"word negatives, held-out pictures of `{r['data']}`", False)
    if t["captions"] < t["captions_asked"]:
        lines += ["", f"The held-out split has {t['captions']} distinct captions, fewer than the "
                      f"{t['captions_asked']} asked for; retrieval uses those {t['captions']}."]
    return lines


def run(args: argparse.Namespace) -> dict:
    set_threads(args.threads)
    checkpoint = resolve_run(args.checkpoint)
    if not checkpoint.is_dir():
        raise UserError(f"--checkpoint {checkpoint} is not a directory; pass a run made by `python -m train all`")
    if min(args.grid, *args.batches, args.prompts_per_kind, args.candidates, args.single_prompts, args.vqgan_pictures,
           args.data_batches, args.pairwise_prompts) < 1:
        raise UserError("--grid, --batches, --prompts-per-kind, --candidates, --single-prompts, --vqgan-pictures, "
                        "--data-batches and --pairwise-prompts must be >= 1")
    for name in ("gap_pictures", "retrieval_captions", "retrieval_candidates", "size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    device = resolve_device(args.device)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write --out {out}: {e.strerror}") from None
    for name in REPORT_FILES:  # found out now, not after minutes of measuring
        if os.path.lexists(out / name) and not (out / name).is_file():
            raise UserError(f"--out {out}: {name} there is not a regular file; move it or pass another --out")
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"cannot write --out {out}: permission denied; pass a writable directory")
    start = time.perf_counter()
    report = {"checkpoint": str(checkpoint), "machine": machine(device), "command": "python -m bench " + " ".join(
        sys.argv[1:] if args.argv is None else args.argv)}
    if args.only in (None, "speed"):
        report["speed"] = speed(checkpoint, device, args)
    if args.only in (None, "quality"):
        report["quality"] = quality(checkpoint, device, args)
    report["seconds"] = time.perf_counter() - start
    write_json(out / "bench.json", report)
    text = markdown(report)
    atomic_write(out / "bench.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    print(text)
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
