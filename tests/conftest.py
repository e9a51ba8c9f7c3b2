"""Fixtures shared by test files: one tiny run of the whole training pipeline per session."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """`python -m train all --preset tiny` on shapes at 32 px: every part of a run, trained for a few steps."""
    import train.__main__ as train_cli

    run = tmp_path_factory.mktemp("run")
    assert train_cli.main(["all", "--preset", "tiny", "--data", "shapes", "--size", "32", "--out", str(run),
                           "--device", "cpu"]) == 0
    return run


@pytest.fixture(autouse=True, scope="session")
def compile_cache(tmp_path_factory):
    """Compiled kernels and decode timings (seq2seq.autocompile) go to a folder of the session's, never to the
    user's cache, so that tests neither read a machine's timings nor leave theirs."""
    import os

    folder = tmp_path_factory.mktemp("inductor")
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
