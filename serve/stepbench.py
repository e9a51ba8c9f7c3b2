"""``python -m serve.stepbench``: what one scheduler step costs a row, with few rows and with many, no HTTP.

The service's throughput with many clients against one at a time is, at best, the ratio of a decode step's
cost per row with one request's rows (8 for the load test's n = 4 with guidance) to its cost with sixteen
requests' (128). This measures that ratio inside one process, the two sizes interleaved (A, B, A, B, ...)
so that both see the same load from the machine's other work: each round fills the scheduler with the load
test's requests, runs ``--steps`` steps after the admitting one and times them (wall clock and the decode
thread's CPU time), then lets them finish without timing. The decoder model's share is timed apart from the
scheduler's own work (grouping rows, sampling, bookkeeping). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch

from cli import ArgumentParser, UserError, add_threads_argument, run_command, set_threads
from sample.pipeline import Pipeline, SamplingSettings
from serve.loadtest import PROMPTS
from serve.scheduler import Job, Scheduler

__all__ = ["step_costs"]


def step_costs(pipeline: Pipeline, sizes: tuple[int, ...] = (1, 16), rounds: int = 5, steps: int = 24, n: int = 4) -> dict:
    """Per size (requests of ``n`` candidates decoded together), the median over ``rounds`` of ms a step, ms a
    row, CPU ms a step and the model's ms a step; the sizes interleaved round by round."""
    model_s = 0.0
    decode_one_token = pipeline.model.decode_one_token

    def timed_decode(*args):
        nonlocal model_s
        start = time.perf_counter()
        out = decode_one_token(*args)
        model_s += time.perf_counter() - start
        return out

    figures: dict[int, list[tuple[float, float, float, int]]] = {size: [] for size in sizes}
    with torch.inference_mode():
        scheduler = Scheduler(pipeline, max_rows=max(sizes) * 2 * n)
        scheduler.setup()
        pipeline.model.decode_one_token = timed_decode  # an instance attribute: the class's stays as it is
        try:
            for round_ in range(rounds + 1):  # round 0 warms up
                for size in sizes:
                    for i in range(size):
                        scheduler.submit(Job(PROMPTS[i % len(PROMPTS)], SamplingSettings(n=n, keep=1, seed=1000 * i),
                                             lambda *event: None))
                    scheduler.run_once()  # admits them
                    rows = scheduler.busy_rows
                    model_s, wall, cpu = 0.0, time.perf_counter(), time.thread_time()
                    for _ in range(steps):
                        scheduler.run_once()
                    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
                    if round_:
                        figures[size].append((wall / steps, cpu / steps, model_s / steps, rows))
                    while scheduler.busy_rows:
                        scheduler.run_once()
                    while not scheduler.renders.empty():  # nobody draws these pictures
                        scheduler.renders.get_nowait()
        finally:
            del pipeline.model.decode_one_token
    report = {}
    for size, runs in figures.items():
        rows = runs[0][3]
        wall, cpu, model = (statistics.median(run[k] for run in runs) * 1000 for k in range(3))
        report[f"{size}_requests"] = {"rows": rows, "ms_per_step": round(wall, 2), "ms_per_row": round(wall / rows, 3),
                                      "cpu_ms_per_step": round(cpu, 2), "model_ms_per_step": round(model, 2),
                                      "rounds": [round(run[0] * 1000, 1) for run in runs]}
    few, many = (report[f"{size}_requests"] for size in (min(sizes), max(sizes)))
    report["row_cost_ratio"] = round(few["ms_per_row"] / many["ms_per_row"], 2)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m serve.stepbench", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="the run (default: the shapes demo)")
    parser.add_argument("--requests", type=int, default=16, help="requests decoded together in the large batch")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each size, interleaved")
    parser.add_argument("--steps", type=int, default=24, help="steps timed a round")
    add_threads_argument(parser)
    return parser


def run(args: argparse.Namespace) -> dict:
    for flag, value in (("--requests", args.requests), ("--rounds", args.rounds), ("--steps", args.steps)):
        if not 1 <= value <= 1000:
            raise UserError(f"{flag} must be from 1 to 1000, got {value}")
    set_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a run's warnings about its pictures say nothing about speed here
        pipeline = Pipeline(args.checkpoint, device="cpu", rerank=False)
    load = [round(x, 2) for x in os.getloadavg()]
    report = step_costs(pipeline, (1, args.requests), args.rounds, args.steps)
    report["host"] = {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                      "load_average_start": load, "load_average_end": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
