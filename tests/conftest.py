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
