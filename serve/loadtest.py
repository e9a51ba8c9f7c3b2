"""``python -m serve.loadtest``: a bounded load test and benchmark of the service, on 127.0.0.1 only.

Starts ``python -m serve`` on a free port of 127.0.0.1 (or uses ``--url``, which must be a loopback address),
then, in this order: the time to the first preview of an n=4 stream on the idle service; the requests one at a
time; the same requests from ``--clients`` clients at once (with one more client measuring the time to first
preview under that load); the requests one at a time again. Each phase is bounded in count, and every request
in time (``--timeout``). Every request must be answered 200 and every picture must be a valid PNG; the
server's resident memory is read after every answer, and its growth from the first 50 answers of the
concurrent phase to its last 50 is reported. Prints one JSON object; exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import base64
import io
import ipaddress
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx
from PIL import Image, ImageDraw

from cli import ArgumentParser, UserError, run_command

__all__ = ["PROMPTS", "LoadResult", "request_bodies", "run_load", "time_to_first_preview", "serve_in_thread",
           "resident_bytes"]

PROMPTS = ["a large red circle", "a small blue square", "a green triangle above a yellow star",
           "two purple circles", "a large orange square in the top left", "a blue star left of a red triangle",
           "three yellow circles", "a small green star in the bottom right"]


def request_bodies(count: int, n: int, keep: int, edit_every: int = 0, canvas: int = 64) -> list[dict]:
    """``count`` requests: the prompts in turn, each with its own seed, the sampling defaults otherwise; with
    ``edit_every`` K, every K-th one redraws the top-left quarter of a ``canvas``-pixel picture sent inline."""
    bodies = [{"prompt": PROMPTS[i % len(PROMPTS)], "n": n, "keep": keep, "seed": 1000 * i} for i in range(count)]
    if edit_every:
        init = _start_picture(canvas)
        for body in bodies[edit_every - 1::edit_every]:
            body.update(init=init, box=[0, 0, canvas // 2, canvas // 2])
    return bodies


def _start_picture(canvas: int) -> str:
    """A picture to edit, as base64 PNG: a red disc on white."""
    image = Image.new("RGB", (canvas, canvas), "white")
    ImageDraw.Draw(image).ellipse([canvas // 4, canvas // 4, 3 * canvas // 4, 3 * canvas // 4], fill=(220, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def resident_bytes(pid: int) -> int:
    """The resident memory of process ``pid`` (Linux /proc)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class LoadResult:
    seconds: float
    latencies: list[float] = field(default_factory=list)  # in answer order
    rss: list[int] = field(default_factory=list)  # the server's, after each answer
    failures: list[str] = field(default_factory=list)
    pictures: int = 0  # valid PNGs received
    decoder: dict = field(default_factory=dict)

    def summary(self, candidates: int) -> dict:
        ordered = sorted(self.latencies)
        pct = (lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)) if ordered else None
        return {"requests": len(self.latencies), "seconds": round(self.seconds, 2),
                "requests_per_s": round(len(self.latencies) / self.seconds, 3),
                "candidates_per_s": round(candidates / self.seconds, 2),
                "p50_s": pct and pct(0.5), "p95_s": pct and pct(0.95), "failures": len(self.failures),
                "decoder": self.decoder}


def _check_answer(answer: httpx.Response, body: dict) -> tuple[int, str | None]:
    """Valid PNGs in the answer, or the reason it is not a good answer."""
    if answer.status_code != 200:
        return 0, f"status {answer.status_code}: {answer.text[:200]}"
    pictures = answer.json()["pictures"]
    if len(pictures) != body["keep"]:
        return 0, f"{len(pictures)} pictures for keep={body['keep']}"
    for picture in pictures:
        try:
            image = Image.open(io.BytesIO(base64.b64decode(picture["png_base64"], validate=True)))
            if image.format != "PNG":
                return 0, f"a {image.format} picture, not PNG"
            image.load()
        except Exception as e:  # any decoding failure is a failed check, reported as such
            return 0, f"not a valid PNG: {e}"
    return len(pictures), None


def run_load(url: str, bodies: list[dict], clients: int, server_pid: int | None = None,
             timeout: float = 300.0) -> LoadResult:
    """POST every body to ``url``/v1/pictures from ``clients`` threads, each taking the next body when free;
    with the decoder's figures over the run (from /readyz) in ``decoder``."""
    before = httpx.get(url + "/readyz", timeout=30).json()
    client_cpu = time.process_time()
    next_index = iter(range(len(bodies)))
    lock = threading.Lock()
    result = LoadResult(seconds=0.0)

    def client() -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                start = time.perf_counter()
                try:
                    answer = http.post("/v1/pictures", json=bodies[i])
                    count, failure = _check_answer(answer, bodies[i])
                except httpx.HTTPError as e:
                    count, failure = 0, f"no answer: {e!r}"
                elapsed = time.perf_counter() - start
                with lock:
                    result.latencies.append(elapsed)
                    result.pictures += count
                    if failure:
                        result.failures.append(failure)
                    if server_pid is not None:
                        result.rss.append(resident_bytes(server_pid))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - start
    client_cpu = time.process_time() - client_cpu
    after = httpx.get(url + "/readyz", timeout=30).json()
    steps = after["steps"] - before["steps"]
    busy = after["decode_busy_s"] - before["decode_busy_s"]
    result.decoder = {"steps": steps, "rows_per_step": round((after["rows_decoded"] - before["rows_decoded"])
                                                             / max(steps, 1), 1),
                      "ms_per_step": round(1000 * busy / max(steps, 1), 1),
                      "decode_thread_busy": round(busy / result.seconds, 3),
                      "render_thread_busy": round((after["render_busy_s"] - before["render_busy_s"]) / result.seconds,
                                                  3)}
    # Where the phase's time went, as shares of its length: each server thread on a core, and runnable but
    # waiting for one (the machine's other work); the whole server's and this load test's (its clients) CPU.
    share = lambda seconds: round(seconds / result.seconds, 3)  # noqa: E731
    result.decoder["threads"] = {
        name: {key: share(value - before["threads"][name][key]) for key, value in times.items()}
        for name, times in after["threads"].items() if name in before["threads"]}
    result.decoder["server_cores"] = share(after["process_cpu_s"] - before["process_cpu_s"])
    result.decoder["load_test_cores"] = share(client_cpu)
    return result


def _merged_decoder(results: list[LoadResult]) -> dict:
    """The decoder figures of several phases as one: steps summed, per-step figures weighted by steps, shares
    of time weighted by the phases' lengths."""
    def merge(values: list, weights: list[float]):
        if isinstance(values[0], dict):
            return {key: merge([v[key] for v in values], weights) for key in values[0] if all(key in v for v in values)}
        return round(sum(v * w for v, w in zip(values, weights)) / max(sum(weights), 1e-9), 3)

    decoders = [r.decoder for r in results]
    steps = [d["steps"] for d in decoders]
    merged = merge(decoders, [r.seconds for r in results])
    merged.update(steps=sum(steps), rows_per_step=merge([d["rows_per_step"] for d in decoders], steps),
                  ms_per_step=merge([d["ms_per_step"] for d in decoders], steps))
    return merged


def time_to_first_preview(url: str, body: dict, timeout: float = 60.0) -> tuple[float, float]:
    """Seconds from sending a stream request to its first preview event, and to its done event."""
    start = time.perf_counter()
    first = None
    with httpx.Client(base_url=url, timeout=timeout) as http:
        with http.stream("POST", "/v1/pictures/stream", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"stream answered {response.status_code}")
            for line in response.iter_lines():
                if line == "event: preview" and first is None:
                    first = time.perf_counter() - start
                elif line == "event: done":
                    return first if first is not None else float("nan"), time.perf_counter() - start
                elif line == "event: error":
                    raise RuntimeError("the stream ended with an error event")
    raise RuntimeError("the stream ended without a done event")


def serve_in_thread(app, host: str = "127.0.0.1"):
    """Run ``app`` with uvicorn on a free port of ``host`` in a thread; returns (url, stop)."""
    import uvicorn

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    url = f"http://{host}:{listener.getsockname()[1]}"
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the service did not start")
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()

    return url, stop


def _start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "serve", "--port", "0", "--max-n", str(max(args.n, 16)),
               "--max-queue", str(max(64, args.clients * 2))]
    if args.checkpoint:
        command += ["--checkpoint", args.checkpoint]
    if args.threads:
        command += ["--threads", str(args.threads)]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        if line.startswith("serving on "):
            url = line.split()[2].rstrip("/")
            threading.Thread(target=server.stderr.read, daemon=True).start()  # keep the pipe drained
            return server, url
    raise UserError(f"python -m serve did not start (exit status {server.wait()})")


def _wait_ready(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise UserError(f"{url}/readyz did not answer 200 within {timeout:g} s")


def measure(url: str, args: argparse.Namespace, server_pid: int | None) -> dict:
    """The phases of the module docstring; the figures and checks as a dict."""
    canvas = httpx.get(url + "/v1/info", timeout=30).json()["model"]["canvas"]
    bodies = request_bodies(args.requests, args.n, args.keep, args.edit_every, canvas)
    sequential_bodies = bodies[: args.sequential]
    preview_body = {"prompt": PROMPTS[0], "n": 4, "keep": 1, "seed": 7}
    run_load(url, bodies[:2], 1)  # warm up: first-call costs are nobody's latency
    idle_previews = [time_to_first_preview(url, preview_body)[0] for _ in range(5)]
    half = len(sequential_bodies) // 2
    one_at_a_time = [run_load(url, sequential_bodies[:half], 1, server_pid)]

    loaded_previews: list[float] = []
    concurrent_done = threading.Event()

    def preview_while_loaded() -> None:
        while not concurrent_done.is_set():
            loaded_previews.append(time_to_first_preview(url, preview_body, timeout=args.timeout)[0])

    watcher = threading.Thread(target=preview_while_loaded)
    watcher.start()
    concurrent = run_load(url, bodies, args.clients, server_pid, args.timeout)
    concurrent_done.set()
    watcher.join()
    one_at_a_time.append(run_load(url, sequential_bodies[half:], 1, server_pid))

    sequential = LoadResult(seconds=sum(r.seconds for r in one_at_a_time),
                            latencies=[x for r in one_at_a_time for x in r.latencies],
                            failures=[x for r in one_at_a_time for x in r.failures],
                            pictures=sum(r.pictures for r in one_at_a_time),
                            decoder=_merged_decoder(one_at_a_time))
    report = {
        "load": {"clients": args.clients, "requests": args.requests, "sequential_requests": len(sequential_bodies),
                 "n": args.n, "keep": args.keep, "sampling": "the server's defaults", "edit_every": args.edit_every},
        "concurrent": concurrent.summary(args.n * len(bodies)),
        "one_at_a_time": sequential.summary(args.n * len(sequential_bodies)),
        "time_to_first_preview_n4_idle_s": {"median": round(statistics.median(idle_previews), 3),
                                            "max": round(max(idle_previews), 3)},
        "time_to_first_preview_n4_under_load_s": {
            "median": round(statistics.median(loaded_previews), 3) if loaded_previews else None,
            "max": round(max(loaded_previews), 3) if loaded_previews else None, "count": len(loaded_previews)},
    }
    report["speedup"] = round(report["concurrent"]["candidates_per_s"] / report["one_at_a_time"]["candidates_per_s"],
                              2)
    # The same ratio per second the decode thread spent on a core: what the machine's other work, which may
    # differ between the phases, does not change (the idle time of one-at-a-time decoding no longer counts).
    per_cpu = [summary["candidates_per_s"] / summary["decoder"]["threads"]["decode"]["cpu_s"]
               for summary in (report["concurrent"], report["one_at_a_time"])
               if summary["decoder"].get("threads", {}).get("decode", {}).get("cpu_s")]
    if len(per_cpu) == 2:
        report["speedup_per_decode_cpu_s"] = round(per_cpu[0] / per_cpu[1], 2)
    window = min(50, len(concurrent.rss) // 2)
    if server_pid is not None and window:
        first, last = max(concurrent.rss[:window]), max(concurrent.rss[-window:])
        report["memory"] = {"window": window, "first_max_mb": round(first / 2**20, 1),
                            "last_max_mb": round(last / 2**20, 1), "growth_mb": round((last - first) / 2**20, 1)}
    failures = concurrent.failures + sequential.failures
    report["checks"] = {
        "every_request_answered_200_with_valid_pngs": not failures
        and concurrent.pictures == args.keep * len(bodies),
        "no_memory_growth": server_pid is None or report["memory"]["growth_mb"] <= args.max_growth_mb,
    }
    report["failures"] = failures[:10]
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m serve.loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running service on a loopback address (default: start one)")
    parser.add_argument("--checkpoint", help="the run the started service loads (default: the shapes demo)")
    parser.add_argument("--threads", type=int, help="--threads of the started service")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=200, help="requests of the concurrent phase")
    parser.add_argument("--sequential", type=int, default=40, help="requests served one at a time, half before "
                                                                   "and half after the concurrent phase")
    parser.add_argument("--n", type=int, default=4, help="candidates a request")
    parser.add_argument("--keep", type=int, default=1)
    parser.add_argument("--edit-every", type=int, default=0, metavar="K",
                        help="every K-th request is an edit (a box redrawn on a picture sent inline); 0: none")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take")
    parser.add_argument("--max-growth-mb", type=float, default=32.0,
                        help="resident memory the server may gain from the first 50 answers to the last 50")
    return parser


def run(args: argparse.Namespace) -> dict:
    if not 1 <= args.clients <= 256 or not 1 <= args.requests <= 10_000 or not 0 <= args.sequential <= 10_000:
        raise UserError("--clients must be 1..256, --requests 1..10000, --sequential 0..10000")
    if args.edit_every < 0:
        raise UserError(f"--edit-every must be >= 0 (0: no edits), got {args.edit_every}")
    if not 1 <= args.keep <= args.n:
        raise UserError(f"--keep must be from 1 to --n ({args.n})")
    server = None
    if args.url:
        host = urlparse(args.url).hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise UserError(f"--url {args.url} is not on this machine; the load test only sends to 127.0.0.1")
        url, pid = args.url.rstrip("/"), None
    else:
        server, url = _start_server(args)
        pid = server.pid
    try:
        _wait_ready(url)
        report = measure(url, args, pid)
        report["host"] = {"cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
                          "server_threads": args.threads}
        print(json.dumps(report, indent=2))
        return report
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report: dict = {}

    def body() -> None:
        report.update(run(args))

    status = run_command(body)
    return status if status else (0 if all(report["checks"].values()) else 1)


if __name__ == "__main__":
    sys.exit(main())
