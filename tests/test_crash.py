"""Crash consistency, as SQLite tests it: ``train all --preset tiny`` stopped at each of its writes resumes to
the run an uninterrupted one ends with.

One uninterrupted run copies its directory at every rename of a finished file into the run (every
:func:`checkpoint.atomic_write`), just before the rename: each copy is what a kill at that moment leaves on
disk, the temporary folder of the write in progress included. Each copy is then resumed with
``train all --resume`` and compared with the uninterrupted run, file by file: weights and optimizer state by
content (safetensors orders its header's metadata freely, pickles their dictionaries), everything else byte
for byte, the metrics by their losses. A second test makes a write fail as a full disk does: one line,
status 2, and ``--resume`` ends in the same run.
"""

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import train.__main__ as train_cli

ARGV = ["all", "--preset", "tiny", "--data", "shapes", "--size", "32", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def fp32_everywhere():
    """Every run here trains in fp32. Each test compares runs started apart, and where a stage starts afresh
    (stopped before it recorded its precision, or a disk full at that write) ``--precision auto`` probes
    again; on a CPU with native bf16 a noisy machine could time the two precisions the other way round,
    which is a different run, not a broken resume (the probe has its own tests in test_scale.py)."""
    from train import loop

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "native_bf16", lambda device: False)
        yield


def _digest(tensor: torch.Tensor) -> str:
    return f"{tensor.dtype}{tuple(tensor.shape)}" + hashlib.sha256(tensor.contiguous().view(-1).view(torch.uint8)
                                                                      .numpy().tobytes()).hexdigest()[:16]


def _plain(value):
    """A loaded state as nested plain values, each tensor by a digest of its bytes."""
    if isinstance(value, torch.Tensor):
        return _digest(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def contents(run: Path) -> dict[str, object]:
    """Every file of ``run`` by what it holds (see the module doc)."""
    found = {}
    for path in sorted(run.rglob("*")):
        if not path.is_file():
            continue
        name = str(path.relative_to(run))
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                found[name] = (f.metadata(), {k: _digest(f.get_tensor(k)) for k in f.keys()})
        elif path.suffix == ".pt":
            found[name] = _plain(torch.load(path, weights_only=True))
        elif name == "all.json":
            found[name] = {k: v for k, v in json.loads(path.read_text()).items() if k != "seconds"}
        elif path.parent.name == "metrics":  # times differ; what was trained at each step must not
            records = [json.loads(line) for line in path.read_text().splitlines()]
            found[name] = [(r["step"], r["loss"]) for r in records if "loss" in r]
        else:
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _differences(expected: dict, run: Path) -> list[str]:
    found = contents(run)
    return sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))


@pytest.fixture(scope="module")
def stopped_runs(tmp_path_factory) -> tuple[Path, list[Path]]:
    """The uninterrupted run and a copy of its directory as it stood before each of its renames."""
    root = tmp_path_factory.mktemp("crash")
    run, copies = root / "run", []
    real_replace = os.replace

    def copy_then_replace(source, target, *args, **kwargs):
        if Path(target).is_relative_to(run):
            copies.append(root / f"stop-{len(copies) + 1:03d}")
            shutil.copytree(run, copies[-1], symlinks=True)
        return real_replace(source, target, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", copy_then_replace)
        assert train_cli.main([*ARGV, "--out", str(run)]) == 0
    return run, copies


@pytest.mark.slow
def test_train_all_stopped_at_any_write_resumes_to_the_same_run(stopped_runs, capsys):
    run, copies = stopped_runs
    expected = contents(run)
    assert len(copies) >= 30  # every checkpoint file, export, cache, grid and log rewrite of four stages
    # Some copies hold the write in progress, a temporary folder beside its target.
    assert any(p.name.endswith(".tmp") for copy in copies for p in copy.rglob(".*"))
    failed = {}
    for copy in copies:
        code = train_cli.main([*ARGV, "--out", str(copy), "--resume"])
        differences = _differences(expected, copy)
        if code or differences:
            failed[copy.name] = (code, differences)
    capsys.readouterr()
    assert not failed, f"resumed runs that differ from the uninterrupted one (exit status, files): {failed}"


@pytest.mark.slow
@pytest.mark.parametrize("write", ["state/vqgan/step-0000003/state.pt", "codes-train", "seq2seq/model.safetensors",
                                   "all.json"])
def test_a_disk_that_fills_up_mid_run_ends_it_with_one_line_and_resume_finishes_it(write, stopped_runs, tmp_path,
                                                                                   capsys):
    """The first write into the run whose target holds ``write`` fails with ENOSPC, as on a full disk."""
    expected = contents(stopped_runs[0])
    run = tmp_path / "run"
    real_replace = os.replace

    def fill_up(source, target, *args, **kwargs):
        if Path(target).is_relative_to(run) and write in str(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(source, target, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", fill_up)
        capsys.readouterr()
        assert train_cli.main([*ARGV, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    lines = re.findall(r"error: .*", err)  # it may follow an unfinished progress bar
    assert "Traceback" not in err and len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    assert "No space left on device" in lines[0] and "--resume" in lines[0]
    assert not [p for p in run.rglob(".*") if p.name.endswith(".tmp")], "the failed write left its temporary"
    assert train_cli.main([*ARGV, "--out", str(run), "--resume"]) == 0
    assert _differences(expected, run) == []
