"""The checkpoint contract: atomic files, strict loading with errors that name the part, exact resume state."""

import json
import os
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from checkpoint import CheckpointError, load_pretrained, save_pretrained
from train.loop import Run


@dataclass
class TinyConfig:
    width: int = 4


class Tiny(torch.nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.linear = torch.nn.Linear(config.width, config.width)

    def forward(self, x):
        return self.linear(x)


def test_save_load_round_trip(tmp_path):
    model = Tiny(TinyConfig())
    save_pretrained(model, model.config, tmp_path / "tiny")
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_pretrained(Tiny, TinyConfig, tmp_path / "tiny", "tiny")
    assert torch.equal(loaded.linear.weight, model.linear.weight)


def test_mismatched_config_names_the_part_and_tensor(tmp_path):
    save_pretrained(Tiny(TinyConfig(4)), TinyConfig(4), tmp_path / "tiny")
    (tmp_path / "tiny" / "config.json").write_text(json.dumps({"width": 8}))
    with pytest.raises(CheckpointError, match=r"tiny: weights do not fit config.json: linear.weight is \(4, 4\)"):
        load_pretrained(Tiny, TinyConfig, tmp_path / "tiny", "tiny")


@dataclass
class DeepConfig:
    width: int = 4
    layers: int = 2


class Deep(torch.nn.Module):
    def __init__(self, config: DeepConfig):
        super().__init__()
        self.config = config
        self.layers = torch.nn.ModuleList(torch.nn.Linear(config.width, config.width) for _ in range(config.layers))


def test_a_config_asking_for_billions_of_layers_is_refused_before_building_them(tmp_path):
    save_pretrained(Deep(DeepConfig()), DeepConfig(), tmp_path / "deep")
    (tmp_path / "deep" / "config.json").write_text(json.dumps({"width": 4, "layers": 2**31}))
    with pytest.raises(CheckpointError, match=r"deep: config.json builds more than \d+ modules, for a weights file of 4"):
        load_pretrained(Deep, DeepConfig, tmp_path / "deep", "deep")
    (tmp_path / "deep" / "config.json").write_text(json.dumps({"width": 4, "layers": 2}))
    assert len(load_pretrained(Deep, DeepConfig, tmp_path / "deep", "deep").layers) == 2


def test_unknown_config_field_is_named(tmp_path):
    save_pretrained(Tiny(TinyConfig()), TinyConfig(), tmp_path / "tiny")
    (tmp_path / "tiny" / "config.json").write_text(json.dumps({"width": 4, "depht": 2}))
    with pytest.raises(CheckpointError, match="depht"):
        load_pretrained(Tiny, TinyConfig, tmp_path / "tiny", "tiny")


def test_truncated_weights_give_a_clear_error(tmp_path):
    save_pretrained(Tiny(TinyConfig()), TinyConfig(), tmp_path / "tiny")
    weights = tmp_path / "tiny" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_pretrained(Tiny, TinyConfig, tmp_path / "tiny", "tiny")


def test_missing_part_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="^vqgan: .* is not a directory"):
        load_pretrained(Tiny, TinyConfig, tmp_path / "vqgan", "vqgan")


def test_failed_write_leaves_the_old_file(tmp_path):
    model = Tiny(TinyConfig())
    save_pretrained(model, model.config, tmp_path / "tiny")
    before = (tmp_path / "tiny" / "model.safetensors").read_bytes()
    from checkpoint import atomic_write

    def crash(tmp):
        open(tmp, "wb").write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "tiny" / "model.safetensors", crash)
    assert (tmp_path / "tiny" / "model.safetensors").read_bytes() == before
    assert not list((tmp_path / "tiny").glob("*.tmp"))


_KILLED_WRITE = """
import os, signal, sys, torch
from safetensors.torch import save_file
from checkpoint import atomic_write

def write_then_die(tmp):
    save_file({"ids": torch.zeros(1000, 64, dtype=torch.int16)}, tmp)
    os.kill(os.getpid(), signal.SIGKILL)  # killed between the write and the rename

atomic_write(sys.argv[1], write_then_die)
"""


def test_a_killed_write_leaves_one_temporary_that_every_stage_start_removes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from checkpoint import remove_temporaries

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    target = out / "cache" / "codes-train-0123456789abcdef.safetensors"
    killed = subprocess.Popen([sys.executable, "-c", _KILLED_WRITE, str(target)], cwd=root)
    assert killed.wait() == -9 and not target.exists()
    left = list((out / "cache").iterdir())  # one entry, named after the target and the killed process
    assert len(left) == 1 and left[0].name.startswith(f".{target.name}.{killed.pid}-") and left[0].suffix == ".tmp"
    # What earlier versions left: an atomic_write file and safetensors' own temporary beside the target.
    (out / "cache" / ".codes-train-0123456789abcdef.safetensors.x1_y2z3a.tmp").write_bytes(b"half")
    (out / "cache" / ".tmpAb3dE9").write_bytes(b"half")
    # A temporary of a process that still runs (another stage writing into the same run) is left alone.
    live = out / "scorer" / f".model.safetensors.{os.getppid()}-abc123.tmp"
    live.mkdir(parents=True)
    keep = out / "metrics" / "notes.tmp"
    keep.parent.mkdir()
    keep.write_text("not a temporary of ours")
    Run(out, "vqgan")  # a stage starting, without --resume
    assert sorted(p.name for p in (out / "cache").iterdir()) == []
    assert live.is_dir() and keep.is_file()
    assert remove_temporaries(out) == 0


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_honour_the_umask(tmp_path, umask):
    from checkpoint import write_json

    old = os.umask(umask)
    try:
        model = Tiny(TinyConfig())
        save_pretrained(model, model.config, tmp_path / "tiny")
        write_json(tmp_path / "all.json", {"a": 1})
    finally:
        os.umask(old)
    for path in (tmp_path / "tiny" / "model.safetensors", tmp_path / "tiny" / "config.json", tmp_path / "all.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_run_checkpoint_restores_weights_optimizer_and_every_rng(tmp_path):
    torch.manual_seed(0)
    model = Tiny(TinyConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    run = Run(tmp_path, "tiny")
    run.save_checkpoint(7, {"model": model}, {"optimizer": optimizer}, data_position=56, extra={"best": 1.5})
    expected = (torch.rand(3), random.random(), np.random.rand())

    fresh = Tiny(TinyConfig())
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    step, position, extra = Run(tmp_path, "tiny").load_checkpoint({"model": fresh}, {"optimizer": fresh_optimizer})
    assert (step, position, extra) == (7, 56, {"best": 1.5})
    assert torch.equal(fresh.linear.weight, model.linear.weight)
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_a_new_checkpoint_replaces_the_old_only_once_whole(tmp_path):
    model = Tiny(TinyConfig())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = Run(tmp_path, "tiny")
    run.save_checkpoint(1, {"model": model}, {"optimizer": optimizer}, data_position=8)
    run.save_checkpoint(2, {"model": model}, {"optimizer": optimizer}, data_position=16)
    state = tmp_path / "state" / "tiny"
    assert sorted(p.name for p in state.iterdir()) == ["latest.json", "step-0000002"]
    assert json.loads((state / "latest.json").read_text())["step"] == 2


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device that is always full")
@pytest.mark.parametrize("writer", ["python", "torch.save", "safetensors"])
def test_a_full_disk_is_one_write_error_naming_the_file_and_the_old_file_stays(writer, tmp_path, monkeypatch):
    """Each writer reports a full disk its own way (OSError; a RuntimeError caused by one; safetensors' text)."""
    from safetensors import SafetensorError

    from checkpoint import WriteError, atomic_write, save_torch
    from cli import run_command

    target = tmp_path / "state.pt"
    target.write_bytes(b"old")

    def fill(tmp: str) -> None:
        if writer == "safetensors":  # it writes by path, so /dev/full cannot stand in: its message, as it is
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        with open("/dev/full", "wb") as full:
            if writer == "python":
                full.write(b"x" * 100_000)
                full.flush()
            else:
                torch.save({"w": torch.zeros(100_000)}, full)

    with pytest.raises(WriteError, match=f"cannot write {target}: No space left on device; free some space"):
        atomic_write(target, fill)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["state.pt"]
    assert run_command(lambda: atomic_write(target, fill)) == 2
    # Through save_torch: torch.save into its file, here one on a full disk.
    real_save = torch.save
    with open("/dev/full", "wb", buffering=0) as full:
        monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, full))
        with pytest.raises(WriteError, match="No space left on device"):
            save_torch({"w": torch.zeros(100_000)}, target)


def test_a_read_only_directory_and_other_os_errors_of_the_machine_are_one_line(tmp_path, monkeypatch, capsys):
    import errno

    from checkpoint import WriteError, atomic_write
    from cli import run_command

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(WriteError, match="Read-only file system"):
        atomic_write(tmp_path / "x", lambda tmp: open(tmp, "w").close())
    # Not the machine's fault: a bug stays a traceback.
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "y", lambda tmp: open(tmp_path / "no" / "such", "r"))

    def append_to_a_full_disk():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "metrics.jsonl"))

    assert run_command(append_to_a_full_disk) == 2
    assert capsys.readouterr().err == (f"error: No space left on device ({tmp_path / 'metrics.jsonl'}); free some "
                                       "space or make the directory writable, then run the command again (a training "
                                       "stage goes on from its last checkpoint with --resume)\n")


def test_a_stage_started_afresh_starts_its_metrics_log_afresh_and_a_resumed_one_keeps_it(tmp_path):
    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    run = Run(tmp_path, "vqgan")
    for step in (1, 2, 3):
        run.log(step, loss=1.0)
    run.save_checkpoint(2, {"m": module}, {"o": optimizer}, data_position=0)
    resumed = Run(tmp_path, "vqgan")
    resumed.load_checkpoint({"m": module}, {"o": optimizer})
    resumed.log(3, loss=2.0)
    steps = [json.loads(line) for line in (tmp_path / "metrics" / "vqgan.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("loss")) for r in steps] == [(1, 1.0), (2, 1.0), (2, None), (3, 2.0)]
    Run(tmp_path, "vqgan").log(1, loss=5.0)  # a killed first attempt's lines do not stay before a new run's
    steps = [json.loads(line) for line in (tmp_path / "metrics" / "vqgan.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in steps] == [(1, 5.0)]
