"""Edits, measured on a `shapes` run with the oracle (data/oracle.py), and what previews cost when off.

``python -m bench.edit`` (the shipped demo run by default) prints:

- Inpainting: held-out two-object relation scenes whose objects lie each in its own half of the canvas;
  the second object's half is erased (``--box``) and the full relation prompt asked for. The oracle's
  verdict on the kept picture of each scene, kept by: candidate 0 (random), the scorer alone, the
  likelihood of the kept tokens after the hole alone, and the two together at several weights; and the
  share of candidates whose first object's tokens came back unchanged.
- Completion: held-out single-object scenes whose object lies in the top half; the top half of the grid
  is kept (``--keep-rows``) and the scene's caption asked for; the oracle checks the kept picture.
- Wide canvas: held-out count prompts ("three blue triangles") drawn at ``--width`` pixels with the sliding
  window; the share of pictures whose every object the oracle reads as a whole shape, the share the oracle
  accepts outright (count too), and the seam: the PSNR of each window's region of the wide picture against
  a fresh VQGAN decode of that window's tokens alone.
- With ``--speed-baseline FILE`` (a copy of seq2seq/generate.py from before editing and previews, e.g.
  ``git show d0e45ac:seq2seq/generate.py > /tmp/generate_before.py``): plain sampling timed against it,
  interleaved in this process, and the ratio of the medians.
"""

from __future__ import annotations

import importlib.util
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from cli import ArgumentParser, add_threads_argument, run_command, set_threads
from data.images import from_pil
from data.oracle import UNKNOWN, check, read_objects
from data.shapes import SIZES, evaluation_prompts, render, shape_vertices
from sample.output import picture_pixels
from sample.pipeline import Pipeline, SamplingSettings, resolve_run
from seq2seq import generate
from seq2seq.canvas import generate_canvas
from vqgan.losses import psnr

__all__ = ["inpainting_cases", "completion_cases", "inpainting_scores", "completion_scores", "canvas_scores",
           "plain_sampling_ratio"]

WEIGHTS = (0.5, 1.0, 2.0)  # likelihood weights beside the scorer's z-score
EDGE = 1 / 64  # an object's outline must clear a half's border by this much (anti-aliasing)


def _extent(obj) -> tuple[float, float, float, float]:
    """An object's bounding box (x0, y0, x1, y1) in canvas fractions."""

    xs, ys = zip(*shape_vertices(obj.shape, obj.x, obj.y, SIZES[obj.size]))
    return min(xs), min(ys), max(xs), max(ys)


def _inside(obj, box: tuple[float, float, float, float]) -> bool:
    x0, y0, x1, y1 = _extent(obj)
    return box[0] + EDGE <= x0 and box[1] + EDGE <= y0 and x1 <= box[2] - EDGE and y1 <= box[3] - EDGE


# The half of the canvas the second object lies in, for "first RELATION second": (x0, y0, x1, y1) fractions.
_SECOND_HALF = {"left of": (0.5, 0, 1, 1), "right of": (0, 0, 0.5, 1), "above": (0, 0.5, 1, 1), "below": (0, 0, 1, 0.5)}


def _held_out(kind: str, n: int, seed: int, keep) -> list:
    """The first ``n`` held-out (caption, scene, extra) of ``kind`` for which ``keep(scene)`` gives an extra."""

    drawn = 4 * n
    while True:
        cases = [(text, scene, extra) for text, scene in evaluation_prompts(kind, drawn, seed=seed)
                 if (extra := keep(scene)) is not None]
        if len(cases) >= n:
            return cases[:n]
        drawn *= 2


def inpainting_cases(n: int, seed: int = 0) -> list:
    """(caption, scene, erased half) for held-out relation scenes with each object wholly in its own half."""
    def erase(scene):
        half = _SECOND_HALF[scene.relation]
        return half if _inside(scene.objects[1], half) and _inside(scene.objects[0], _other_half(half)) else None

    return _held_out("relation", n, seed, erase)


def _other_half(half: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = half
    if (x0, x1) == (0, 1):  # a top or bottom half
        return (0, 0.5, 1, 1) if y0 == 0 else (0, 0, 1, 0.5)
    return (0.5, 0, 1, 1) if x0 == 0 else (0, 0, 0.5, 1)


def completion_cases(n: int, seed: int = 0) -> list:
    """(caption, scene, True) for held-out single-object scenes wholly in the top half."""
    return _held_out("single", n, seed, lambda scene: True if _inside(scene.objects[0], (0, 0, 1, 0.5)) else None)


def _first_object_cells(obj, grid: int) -> torch.Tensor:
    """(h, w) bool: the token cells the object's bounding box touches."""
    x0, y0, x1, y1 = _extent(obj)
    cells = torch.zeros(grid, grid, dtype=torch.bool)
    cells[max(0, math.floor(y0 * grid)):math.ceil(y1 * grid), max(0, math.floor(x0 * grid)):math.ceil(x1 * grid)] = True
    return cells


def _progress(part: str, done: int, total: int) -> None:
    if done % 16 == 0:
        print(f"{part}: {done}/{total}", file=sys.stderr, flush=True)


def _z(values: list[float]) -> list[float]:
    mean = statistics.fmean(values)
    spread = statistics.pstdev(values)
    return [(v - mean) / spread if spread > 0 else 0.0 for v in values]


def inpainting_scores(pipeline: Pipeline, cases: list, candidates: int, seed: int = 0) -> dict:
    """Oracle acceptance of the kept picture under each ranking, and first-object token agreement."""

    settings = SamplingSettings(n=candidates, keep=1, seed=seed)
    canvas, grid = pipeline.canvas_size, pipeline.model.config.grid_size
    rankings = ["random", "scorer", "likelihood"] + [f"scorer+{w:g}*likelihood" for w in WEIGHTS]
    accepted = dict.fromkeys(rankings, 0)
    any_ok = unchanged = candidates_seen = roundtrip_ok = seams = 0
    for done, (text, scene, half) in enumerate(cases):
        _progress("inpainting", done, len(cases))
        image = render(scene, canvas)
        box = tuple(round(v * canvas) for v in half)
        edit = pipeline.inpainting(image, box=box)
        init_ids = pipeline.vqgan.encode(from_pil(image, canvas)[None].to(pipeline.device))[0].cpu()
        roundtrip_ok += check(scene, pipeline.vqgan.decode(init_ids[None].to(pipeline.device))[0])
        pictures = sorted(pipeline([text], settings, edit=edit)[0], key=lambda p: p.candidate)
        ok = [check(scene, p.image) for p in pictures]
        cells = _first_object_cells(scene.objects[0], grid)
        unchanged += sum(torch.equal(p.tokens[cells], init_ids[cells]) for p in pictures)
        candidates_seen += len(pictures)
        any_ok += sum(ok)
        # An erased bottom half leaves no kept token after the hole: no likelihood, the scorer alone ranks.
        seam = pictures[0].likelihood is not None
        seams += seam
        z_score = _z([p.score for p in pictures])
        z_like = _z([p.likelihood for p in pictures]) if seam else [0.0] * len(pictures)
        merits = {"random": [-p.candidate for p in pictures], "scorer": z_score, "likelihood": z_like}
        for w in WEIGHTS:
            merits[f"scorer+{w:g}*likelihood"] = [a + w * b for a, b in zip(z_score, z_like)]
        for name, merit in merits.items():
            accepted[name] += ok[max(range(len(pictures)), key=merit.__getitem__)]
    n = len(cases)
    return {"scenes": n, "candidates": candidates, "kept_accepted": {k: v / n for k, v in accepted.items()},
            "any_candidate_accepted": any_ok / (n * candidates), "first_object_unchanged": unchanged / candidates_seen,
            "init_roundtrip_accepted": roundtrip_ok / n, "scenes_with_tokens_after_the_hole": seams}


def completion_scores(pipeline: Pipeline, cases: list, candidates: int, seed: int = 0) -> dict:
    """Oracle acceptance of the kept picture (by the scorer, and candidate 0) with the top half kept."""

    settings = SamplingSettings(n=candidates, keep=1, seed=seed)
    canvas, grid = pipeline.canvas_size, pipeline.model.config.grid_size
    kept_ok = random_ok = any_ok = unchanged = 0
    for done, (text, scene, _) in enumerate(cases):
        _progress("completion", done, len(cases))
        image = render(scene, canvas)
        edit = pipeline.completion(image, grid // 2)
        init_ids = pipeline.vqgan.encode(from_pil(image, canvas)[None].to(pipeline.device))[0].cpu()
        pictures = pipeline([text], settings, edit=edit)[0]
        ok = {p.candidate: check(scene, p.image) for p in pictures}
        kept_ok += ok[pictures[0].candidate]
        random_ok += ok[0]
        any_ok += sum(ok.values())
        unchanged += sum(torch.equal(p.tokens[: grid // 2], init_ids[: grid // 2]) for p in pictures)
    n = len(cases)
    return {"scenes": n, "candidates": candidates, "kept_accepted_scorer": kept_ok / n,
            "kept_accepted_random": random_ok / n, "any_candidate_accepted": any_ok / (n * candidates),
            "kept_rows_unchanged": unchanged / (n * candidates)}


def canvas_scores(pipeline: Pipeline, prompts: int, candidates: int, width: int, seed: int = 0) -> dict:
    """Objects whole, oracle acceptance and window seams of canvases ``width`` pixels wide (every candidate).

    Objects are counted one by one too: whole or not, and whether they lie past the run's own canvas (an
    object reaching right of the first ``canvas`` pixels is drawn by windows that slid). A window's seam PSNR
    is split by whether an object crosses the window's left or right edge: decoded alone, such a window
    holds part of an object without the rest, which the VQGAN decoder sees on the whole canvas.
    """

    settings = SamplingSettings(n=candidates, keep=1, seed=seed)
    grid, token = pipeline.model.config.grid_size, pipeline.token_size
    whole = accepted = pictures_seen = 0
    objects = {"inside": [0, 0], "past": [0, 0]}  # [whole, all] for objects within the first canvas / past it
    seams: dict[str, list[float]] = {"crossed": [], "clear": []}
    for done, (text, scene) in enumerate(evaluation_prompts("count", prompts, seed=seed)):
        _progress("canvas", done, prompts)
        for picture in pipeline([text], settings, size=(width, pipeline.canvas_size))[0]:
            pictures_seen += 1
            readings = read_objects(picture.image)
            whole += bool(readings) and all(r.obj.shape != UNKNOWN for r in readings)
            for reading in readings:
                tally = objects["past" if reading.box[2] > pipeline.canvas_size else "inside"]
                tally[0] += reading.obj.shape != UNKNOWN
                tally[1] += 1
            accepted += check(scene, picture.image)
            pixels = picture_pixels(picture.image)  # (3, H, W)
            for left in range(picture.tokens.shape[1] - grid + 1):
                window = picture.tokens[None, :, left:left + grid].to(pipeline.device)  # (1, g, g)
                fresh = pipeline.vqgan.decode(window).float().cpu()[0]
                edges = (left * token, (left + grid) * token)
                crossed = any(r.box[0] < edge < r.box[2] for r in readings for edge in edges)
                seams["crossed" if crossed else "clear"].append(
                    psnr(pixels[None, :, :, edges[0]:edges[1]], fresh[None]).item())
    every = seams["crossed"] + seams["clear"]
    return {"prompts": prompts, "pictures": pictures_seen, "width": width, "objects_whole": whole / pictures_seen,
            "oracle_accepts": accepted / pictures_seen, "seam_psnr_mean": statistics.fmean(every),
            "seam_psnr_min": min(every), "windows": len(every),
            "objects": {where: {"whole": w / n if n else None, "objects": n} for where, (w, n) in objects.items()},
            "seams": {kind: {"windows": len(v), "psnr_mean": statistics.fmean(v) if v else None,
                             "psnr_min": min(v) if v else None,
                             "under_20db": sum(x < 20 for x in v) / len(v) if v else None}
                      for kind, v in seams.items()}}


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _db(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} dB"


def plain_sampling_ratio(pipeline: Pipeline, baseline: Path, *, prompts: int = 8, candidates: int = 2,
                         repeats: int = 40, cfg: float = SamplingSettings.cfg) -> dict:
    """Median seconds of plain sampling with seq2seq.generate now and with the copy in ``baseline``, on the same
    prompts and seeds (both must draw the same ids), in turns in this process: now, before, now again, then
    the reverse order, and so on. "now again" against "now" is the control: how far two runs of the same
    code differ here, the resolution of the ratio."""

    spec = importlib.util.spec_from_file_location("bench_generate_before", baseline)
    before = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = before  # dataclasses look their module up there
    spec.loader.exec_module(before)
    texts = [t for t, _ in evaluation_prompts("relation", prompts)]
    text_ids, text_mask = pipeline.encode_prompts(texts)
    options = dict(num_candidates=candidates, seeds=0, cfg_scale=cfg)
    order = [("now", generate), ("before", before.generate), ("now again", generate)]
    times = {name: [] for name, _ in order}
    with torch.inference_mode():
        same = torch.equal(generate(pipeline.model, text_ids, text_mask, **options),
                           before.generate(pipeline.model, text_ids, text_mask, **options))  # also warms up
        for repeat in range(repeats):
            for name, function in order if repeat % 2 == 0 else order[::-1]:  # neither always first
                start = time.perf_counter()
                function(pipeline.model, text_ids, text_mask, **options)
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {"now_s": median["now"], "before_s": median["before"], "ratio": median["now"] / median["before"],
            "control": median["now again"] / median["now"], "same_ids": same, "repeats": repeats,
            "rows": prompts * candidates, "threads": torch.get_num_threads(), "load": os.getloadavg()}


def canvas_time_ratio(pipeline: Pipeline, width: int, *, prompts: int = 8, repeats: int = 3,
                      cfg: float = SamplingSettings.cfg) -> dict:
    """Median seconds of a canvas ``width`` pixels wide against one of the run's size, in turns, same prompts."""

    text_ids, text_mask = pipeline.encode_prompts([t for t, _ in evaluation_prompts("count", prompts)])
    grid = pipeline.model.config.grid_size
    runs = {"plain": lambda: generate(pipeline.model, text_ids, text_mask, seeds=0, cfg_scale=cfg),
            "wide": lambda: generate_canvas(pipeline.model, text_ids, text_mask, height=grid,
                                            width=width // pipeline.token_size, seeds=0, cfg_scale=cfg)}
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    plain, wide = statistics.median(times["plain"]), statistics.median(times["wide"])
    return {"plain_s": plain, "wide_s": wide, "ratio": wide / plain, "width": width, "rows": prompts}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.edit", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a `shapes` run directory or a shipped run's name (default shapes)")
    parser.add_argument("--cases", type=int, default=128, help="scenes per edit kind (default 128)")
    parser.add_argument("--candidates", type=int, default=8, help="candidates per scene (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="which held-out scenes, and the candidates' seeds")
    parser.add_argument("--only", choices=["inpainting", "completion", "canvas", "speed"], help="run one part")
    parser.add_argument("--width", type=int, default=128, help="wide canvas width in pixels (default 128)")
    parser.add_argument("--canvas-prompts", type=int, default=16,
                        help="held-out count prompts drawn wide, --candidates each (default 16)")
    parser.add_argument("--speed-baseline", type=Path, help="a copy of seq2seq/generate.py to time plain sampling "
                                                            "against")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    return run_command(lambda: _run(args))


def _run(args) -> int:
    set_threads(args.threads)
    pipeline = Pipeline(resolve_run(args.checkpoint), device=args.device)
    print(f"{pipeline.run}, {pipeline.device}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    if args.only in (None, "inpainting"):
        result = inpainting_scores(pipeline, inpainting_cases(args.cases, args.seed), args.candidates, args.seed)
        print(f"inpainting, {result['scenes']} relation scenes, second object's half erased, {result['candidates']} "
              f"candidates each; oracle accepts the kept picture, kept by:")
        for name, share in result["kept_accepted"].items():
            print(f"  {name:24s} {share:6.1%}")
        print(f"  any candidate            {result['any_candidate_accepted']:6.1%}")
        print(f"  the init's VQGAN round trip (ceiling) {result['init_roundtrip_accepted']:6.1%}")
        print(f"first object's tokens unchanged: {result['first_object_unchanged']:.1%} of candidates; "
              f"{result['scenes_with_tokens_after_the_hole']} scenes have kept tokens after the hole (the others: "
              "an erased bottom half, ranked by the scorer alone)")
    if args.only in (None, "completion"):
        result = completion_scores(pipeline, completion_cases(args.cases, args.seed), args.candidates, args.seed)
        print(f"completion, {result['scenes']} single-object scenes in the top half, top half kept, "
              f"{result['candidates']} candidates each; oracle accepts the kept picture: "
              f"{result['kept_accepted_scorer']:.1%} (by the scorer), {result['kept_accepted_random']:.1%} "
              f"(candidate 0), any candidate {result['any_candidate_accepted']:.1%}; kept rows unchanged "
              f"{result['kept_rows_unchanged']:.1%}")
    if args.only in (None, "canvas"):
        result = canvas_scores(pipeline, args.canvas_prompts, args.candidates, args.width, args.seed)
        print(f"wide canvas, {result['pictures']} pictures {result['width']} px wide ({result['prompts']} held-out "
              f"count prompts): every object whole {result['objects_whole']:.1%}, oracle accepts "
              f"{result['oracle_accepts']:.1%}; window vs fresh decode PSNR mean {result['seam_psnr_mean']:.1f} dB, "
              f"min {result['seam_psnr_min']:.1f} dB over {result['windows']} windows")
        for where, r in result["objects"].items():
            print(f"  objects {where} the first {pipeline.canvas_size} px: {r['objects']}, whole "
                  f"{_share(r['whole'])}")
        for kind, r in result["seams"].items():
            print(f"  windows an object {'crosses the edge of' if kind == 'crossed' else 'does not cross'}: "
                  f"{r['windows']}, PSNR mean {_db(r['psnr_mean'])}, min {_db(r['psnr_min'])}, under 20 dB "
                  f"{_share(r['under_20db'])}")
    if args.only in (None, "speed"):
        result = canvas_time_ratio(pipeline, args.width)
        print(f"wide canvas time, {result['rows']} candidates: {result['width']} px wide {result['wide_s']:.2f} s, "
              f"the run's size {result['plain_s']:.2f} s: {result['ratio']:.1f}x")
    if args.speed_baseline is not None and args.only in (None, "speed"):
        result = plain_sampling_ratio(pipeline, args.speed_baseline)
        print(f"plain sampling, {result['rows']} candidates, medians of {result['repeats']} runs in turns: now "
              f"{result['now_s']:.3f} s, before {result['before_s']:.3f} s, ratio {result['ratio']:.3f} (control, now "
              f"again / now: {result['control']:.3f}); same ids: {result['same_ids']}; {result['threads']} threads, "
              f"load {result['load'][0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
