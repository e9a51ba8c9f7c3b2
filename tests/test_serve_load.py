"""The load test, scaled down: 16 clients, 64 requests to a real uvicorn server on 127.0.0.1 (the tiny run),
every fourth an edit (a box redrawn on a picture sent inline), every request answered, every picture a valid
PNG, no resident-memory growth from the first 16 answers to the last 16. ``python -m serve.loadtest`` runs the full one (200 requests) on the shapes demo run."""

import pytest

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install -e '.[serve]'")

import os

from sample.pipeline import Pipeline
from serve.app import create_app
from serve.loadtest import request_bodies, run_load, serve_in_thread
from serve.schemas import Limits

MAX_GROWTH = 24 * 2**20  # bytes; a leak of a picture or a cache a request would pass this within 64 requests


@pytest.mark.slow
def test_sixteen_clients_all_answered_with_valid_pngs_and_flat_memory(tiny_run):
    app = create_app(Pipeline(tiny_run, device="cpu"), Limits(max_n=4, max_rows=128, max_queue=32))
    url, stop = serve_in_thread(app)
    try:
        run_load(url, request_bodies(16, n=4, keep=2), clients=16)  # warm up: allocator pools, first shapes
        bodies = request_bodies(64, n=4, keep=2, edit_every=4, canvas=32)
        result = run_load(url, bodies, clients=16, server_pid=os.getpid(), timeout=120)
    finally:
        stop()
    assert result.failures == []
    assert sum("init" in body for body in bodies) == 16
    assert len(result.latencies) == 64 and result.pictures == 2 * 64
    assert result.decoder["rows_per_step"] > 8  # requests really shared decode steps
    assert max(result.rss[-16:]) - max(result.rss[:16]) < MAX_GROWTH
