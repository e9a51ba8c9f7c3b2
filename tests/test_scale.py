"""Scale out and survive: two gloo processes under torchrun train like one process with the same global
batch, and every training stage killed with SIGKILL resumes from its last checkpoint to the same end."""

import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
# fp32: two processes match one only up to rounding, and bf16 (auto on an AMX CPU) rounds each micro-batch.
TINY = ["--size", "32", "--device", "cpu", "--model-size", "tiny", "--precision", "fp32"]
STAGE_ARGS = {
    "vqgan": ["--batch-size", "8", "--eval-every", "1000", "--sample-every", "1000", "--heldout-examples", "8"],
    "seq2seq": ["--batch-size", "8", "--cache-examples", "64", "--heldout-examples", "16", "--eval-every", "1000",
                "--sample-every", "1000", "--warmup", "2"],
    "scorer": ["--batch-size", "8", "--eval-every", "1000", "--heldout-examples", "16"],
}


def _run_dir(tiny_run: Path, path: Path, parts=("tokenizer.model", "vqgan")) -> Path:
    """A fresh run directory holding copies of the earlier stages' outputs."""
    path.mkdir(parents=True)
    for part in parts:
        source = tiny_run / part
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, path / part)
    return path


def _train_argv(stage: str, out: Path, steps: int, *extra: str) -> list[str]:
    return ["-m", "train", stage, "--data", "shapes", "--out", str(out), "--steps", str(steps), "--log-every", "1",
            *TINY, *STAGE_ARGS[stage], *extra]


def _metrics(out: Path, stage: str) -> list[dict]:
    path = out / "metrics" / f"{stage}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _losses(out: Path, stage: str) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in _metrics(out, stage) if "loss" in m}


def _check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def _train_in_two_legs(out: Path, launcher: list[str], *extra: str) -> float:
    """Train seq2seq 4 steps, then resume it to 6: the second leg loads what the first saved. Wall seconds."""
    start = time.perf_counter()
    for steps, resume in ((4, []), (6, ["--resume"])):
        argv = _train_argv("seq2seq", out, steps, "--micro-batch-size", "4", "--save-every", "1000", *resume, *extra)
        _check(subprocess.run([*launcher, *argv], capture_output=True, text=True, cwd=ROOT))
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def one_process_run(tiny_run, tmp_path_factory) -> tuple[Path, float]:
    """The baseline: one process making two micro-batches of 4 per step."""
    out = _run_dir(tiny_run, tmp_path_factory.mktemp("single") / "run")
    return out, _train_in_two_legs(out, [sys.executable])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_like_one_with_the_same_global_batch(mode, one_process_run, tiny_run, tmp_path):
    single, one_s = one_process_run
    double = _run_dir(tiny_run, tmp_path / "double")
    # Two processes make one micro-batch of 4 each: the same global batch of 8 as the baseline.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two_s = _train_in_two_legs(double, launcher, *(["--fsdp"] if mode == "fsdp" else []))
    a, b = _losses(single, "seq2seq"), _losses(double, "seq2seq")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    difference = max(abs(a[s] - b[s]) for s in a)
    print(f"\n{mode}: loss difference over 6 steps (a resume after step 4): {difference:.2e}; wall time "
          f"1 process {one_s:.1f} s, 2 processes {two_s:.1f} s (two launches each, start-up included)")
    assert difference < 1e-4
    # The weights the two runs end with agree too (gradients averaged over ranks == summed micro-batches).
    wa, wb = load_file(single / "seq2seq" / "model.safetensors"), load_file(double / "seq2seq" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)
    # Only rank 0 wrote: one metrics line per step, not two.
    assert [r["step"] for r in _metrics(double, "seq2seq") if "loss" in r] == list(range(1, 7))


def _kill_after_checkpoint(argv: list[str], out: Path, stage: str, rng: random.Random) -> tuple[int, int]:
    """Start a stage, SIGKILL it at a random moment after its first checkpoint; (checkpoint step, last step run)."""
    process = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = out / "state" / stage / "latest.json"
    deadline = time.monotonic() + 120
    while not latest.is_file():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.3))
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed; give it more steps"
    checkpoint = json.loads(latest.read_text())["step"]
    return checkpoint, max(_losses(out, stage), default=0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["vqgan", "seq2seq", "scorer"])
def test_a_killed_stage_resumes_from_its_last_checkpoint_to_the_same_end(stage, tiny_run, tmp_path):
    steps, save_every = 40, 5
    parts = ("tokenizer.model",) if stage in ("vqgan", "scorer") else ("tokenizer.model", "vqgan")
    whole = _run_dir(tiny_run, tmp_path / "whole", parts)
    killed = _run_dir(tiny_run, tmp_path / "killed", parts)
    _check(subprocess.run([sys.executable, *_train_argv(stage, whole, steps, "--save-every", str(save_every))],
                          capture_output=True, text=True, cwd=ROOT))

    argv = _train_argv(stage, killed, steps, "--save-every", str(save_every))
    checkpoint, reached = _kill_after_checkpoint(argv, killed, stage, random.Random(stage))
    assert save_every <= checkpoint < steps and checkpoint % save_every == 0
    # Nothing half-written: every weights file the kill left behind loads whole.
    for path in killed.rglob("*.safetensors"):
        load_file(path)

    result = subprocess.run([sys.executable, *argv, "--resume"], capture_output=True, text=True, cwd=ROOT)
    _check(result)
    print(f"\n{stage}: killed at step {reached}, resumed from checkpoint {checkpoint}: "
          f"{reached - checkpoint} steps lost of {steps}")
    records = _metrics(killed, stage)
    assert {"step": checkpoint, "event": "resumed from checkpoint"}.items() <= next(
        r for r in records if "event" in r).items(), "the resumed run did not continue from the last checkpoint"
    # The log reads like one run: the killed run's steps past the checkpoint were dropped, each step once.
    assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))
    assert not list(killed.rglob("*.tmp")), "a temporary file of the killed run was left behind"

    # The resumed run ends where the uninterrupted one did: the same losses after the checkpoint, the same weights.
    a, b = _losses(whole, stage), _losses(killed, stage)
    for s in range(checkpoint + 1, steps + 1):
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), s
    final_a = load_file(whole / stage / "model.safetensors")
    final_b = load_file(killed / stage / "model.safetensors")
    for name in final_a:
        torch.testing.assert_close(final_b[name], final_a[name], rtol=1e-5, atol=1e-6)


def _checkpoint_weights(out: Path, stage: str, module: str) -> dict[str, torch.Tensor]:
    """The weights of ``module`` in the stage's last checkpoint (state/<stage>/latest.json's directory)."""
    pointer = json.loads((out / "state" / stage / "latest.json").read_text())
    weights = load_file(out / "state" / stage / pointer["dir"] / "modules.safetensors")
    return {k[len(module) + 1:]: v for k, v in weights.items() if k.startswith(module + ".")}


def _stale_export(out: Path, stage: str, metadata: dict | None = None) -> None:
    """What a kill between the last checkpoint and its export leaves: RUN/<stage>/ with older weights (a fresh
    model's, as at step 0)."""
    import dataclasses

    from checkpoint import save_pretrained
    from scorer import Scorer
    from seq2seq import Seq2Seq
    from vqgan import VQGAN

    model_cls = {"vqgan": VQGAN, "seq2seq": Seq2Seq, "scorer": Scorer}[stage]
    old = model_cls.from_pretrained(out / stage)
    torch.manual_seed(1234)
    fresh = model_cls(dataclasses.replace(old.config))
    save_pretrained(fresh, fresh.config, out / stage, metadata=metadata)


@pytest.mark.parametrize("stage, module, extra", [
    ("vqgan", "vqgan", []), ("scorer", "model", []), ("seq2seq", "model", ["--keep", "last"]),
    ("seq2seq", "model", ["--keep", "best"]), ("seq2seq", "ema", ["--keep", "last", "--ema", "0.9"]),
], ids=["vqgan", "scorer", "seq2seq-last", "seq2seq-best", "seq2seq-ema"])
def test_a_stage_killed_between_its_checkpoint_and_its_export_exports_again_on_resume(stage, module, extra, tiny_run,
                                                                                       tmp_path):
    import train.__main__ as train_cli

    parts = ("tokenizer.model",) if stage in ("vqgan", "scorer") else ("tokenizer.model", "vqgan")
    out = _run_dir(tiny_run, tmp_path / "run", parts)
    argv = _train_argv(stage, out, 2, "--save-every", "2", *extra)[2:]
    assert train_cli.main(argv) == 0
    _stale_export(out, stage)
    assert train_cli.main([*argv, "--resume"]) == 0  # nothing left to train
    exported, saved = load_file(out / stage / "model.safetensors"), _checkpoint_weights(out, stage, module)
    assert exported.keys() == saved.keys()
    for name in saved:
        assert torch.equal(exported[name], saved[name]), name


def test_seq2seq_keep_best_keeps_an_earlier_best_export_and_replaces_a_lost_one_with_a_line(tiny_run, tmp_path,
                                                                                           monkeypatch, capsys):
    import train.__main__ as train_cli
    from train.stage_seq2seq import Seq2SeqTrainer

    out = _run_dir(tiny_run, tmp_path / "run")
    # The held-out loss is best at step 2 and worse at step 4: the export is step 2's, the checkpoint step 4's.
    monkeypatch.setattr(Seq2SeqTrainer, "evaluate", lambda self: {"heldout_bits_per_token": float(self.step),
                                                                  "heldout_bits_no_caption": 9.0})
    argv = _train_argv("seq2seq", out, 4, "--save-every", "2", "--eval-every", "2", "--keep", "best")[2:]
    assert train_cli.main(argv) == 0
    best = (out / "seq2seq" / "model.safetensors").read_bytes()
    assert train_cli.main([*argv, "--resume"]) == 0
    assert (out / "seq2seq" / "model.safetensors").read_bytes() == best  # the best export stays as it was

    for lose in ("delete", "other step"):
        if lose == "delete":
            shutil.rmtree(out / "seq2seq")
        else:
            _stale_export(out, "seq2seq", metadata={"step": "3"})
        capsys.readouterr()
        assert train_cli.main([*argv, "--resume"]) == 0
        assert "not step 2's" in capsys.readouterr().out
        exported, saved = load_file(out / "seq2seq" / "model.safetensors"), _checkpoint_weights(out, "seq2seq", "model")
        assert all(torch.equal(exported[name], saved[name]) for name in saved)
        events = [r for r in _metrics(out, "seq2seq") if r.get("event", "").startswith("exported the last")]
        assert events[-1]["step"] == 4 and events[-1]["heldout_bits_per_token"] == 4.0


def test_non_finite_losses_are_skipped_then_stop_the_run_with_the_checkpoint_intact(tiny_run, tmp_path, capsys,
                                                                                    monkeypatch):
    import train.__main__ as train_cli
    from train.stage_vqgan import VQGANTrainer

    out = _run_dir(tiny_run, tmp_path / "run", ("tokenizer.model",))
    real_step, calls = VQGANTrainer.train_step, []

    def step_then_diverge(self, images):
        calls.append(self.step)
        metrics = real_step(self, images)
        if len(calls) == 4:  # one bad step among good ones is skipped and training goes on
            return {"loss": torch.tensor(float("nan"))}
        return metrics if len(calls) < 8 else {"loss": torch.tensor(float("inf"))}

    monkeypatch.setattr(VQGANTrainer, "train_step", step_then_diverge)
    argv = ["vqgan", "--data", "shapes", "--out", str(out), "--steps", "40", "--save-every", "3", "--log-every", "1",
            *TINY, *STAGE_ARGS["vqgan"]]
    assert train_cli.main(argv) == 2
    err = re.findall(r"error: .*", capsys.readouterr().err)  # after the unfinished progress bar
    assert err == ["error: vqgan: 5 non-finite losses in a row at step 6; lower --lr; the last good checkpoint is intact"]
    events = [r for r in _metrics(out, "vqgan") if "event" in r]
    assert [r["step"] for r in events] == [3, 6, 6, 6, 6, 6]  # logged at the steps done so far
    assert [r["step"] for r in _metrics(out, "vqgan") if "l1" in r] == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "state" / "vqgan" / "latest.json").read_text())["step"] == 6
    load_file(out / "vqgan" / "model.safetensors")


def test_precision_auto_is_bf16_only_where_the_hardware_multiplies_it():
    from cli import UserError
    from devices import autocast, autocast_dtype, native_bf16

    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16
    assert autocast_dtype(cpu, "auto") is (torch.bfloat16 if native_bf16(cpu) else None)
    with pytest.raises(UserError, match="--precision"):
        autocast_dtype(cpu, "fp16")
    layer, x = torch.nn.Linear(4, 4), torch.randn(2, 4)
    with autocast(cpu, None):
        assert layer(x).dtype == torch.float32
    with autocast(cpu, torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


@pytest.mark.parametrize("amx, avx512_bf16, expected",
                         [(True, False, True), (False, True, True), (False, False, False)])
def test_native_bf16_on_a_cpu_is_amx_or_avx512_bf16(monkeypatch, amx, avx512_bf16, expected):
    from devices import native_bf16

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert native_bf16(torch.device("cpu")) is expected
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the probe: AMX alone decides
    assert native_bf16(torch.device("cpu")) is amx


def _timed_probe(slow: torch.dtype | None, calls: list):
    def probe(dtype):
        calls.append(dtype)
        if dtype is slow:
            time.sleep(0.02)
    return probe


@pytest.mark.parametrize("slow", [torch.bfloat16, None])
def test_precision_auto_takes_what_a_probe_measures_faster(monkeypatch, tmp_path, slow):
    from train import loop

    monkeypatch.setattr(loop, "native_bf16", lambda device: True)
    run, calls = loop.Run(tmp_path, "vqgan"), []
    chosen = loop.choose_precision(run, torch.device("cpu"), "auto", _timed_probe(slow, calls))
    assert chosen is (None if slow is torch.bfloat16 else torch.bfloat16)
    assert run.precision == ("fp32" if slow is torch.bfloat16 else "bf16")
    assert calls.count(None) == calls.count(torch.bfloat16) == loop.PROBE_STEPS + 1  # interleaved, warm-up first
    assert calls[:2] in ([None, torch.bfloat16], [torch.bfloat16, None])


def test_precision_auto_keeps_fp32_when_bf16_is_not_clearly_faster(monkeypatch, tmp_path):
    """bf16 must beat fp32 by more than BF16_MARGIN: a near tie is fp32, the same on every start."""
    from train import loop

    monkeypatch.setattr(loop, "native_bf16", lambda device: True)
    fp32, bf16 = 0.010, 0.0095  # bf16 5% faster: within a noisy machine's spread
    assert loop.BF16_MARGIN < 0.95
    clock = [0.0]

    def probe(dtype):
        clock[0] += bf16 if dtype is torch.bfloat16 else fp32

    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
    run = loop.Run(tmp_path, "vqgan")
    assert loop.choose_precision(run, torch.device("cpu"), "auto", probe) is None and run.precision == "fp32"
    bf16 = 0.010 * loop.BF16_MARGIN / 2  # twice the margin's speed-up: bf16
    assert loop.choose_precision(loop.Run(tmp_path, "seq2seq"), torch.device("cpu"), "auto", probe) is torch.bfloat16


def test_a_resumed_run_keeps_the_precision_its_checkpoint_recorded(monkeypatch, tmp_path):
    from train import loop

    monkeypatch.setattr(loop, "native_bf16", lambda device: True)
    layer = torch.nn.Linear(2, 2)
    first = loop.Run(tmp_path, "scorer")
    assert loop.choose_precision(first, torch.device("cpu"), "auto", _timed_probe(None, [])) is torch.bfloat16
    first.save_checkpoint(1, {"layer": layer}, {}, data_position=8)

    resumed = loop.Run(tmp_path, "scorer")
    resumed.load_checkpoint({"layer": layer}, {})
    calls = []  # bf16 would now measure slower: the recorded choice stands, unprobed
    assert loop.choose_precision(resumed, torch.device("cpu"), "auto", _timed_probe(torch.bfloat16, calls)) is torch.bfloat16
    assert calls == []
    # An explicit --precision wins over the record, and is what the next checkpoint records.
    assert loop.choose_precision(resumed, torch.device("cpu"), "fp32", _timed_probe(None, calls)) is None
    assert resumed.precision == "fp32" and calls == []


def test_the_precision_is_recorded_when_chosen_and_read_back_by_a_resume_without_a_checkpoint(monkeypatch, tmp_path):
    from checkpoint import CheckpointError
    from train import loop
    from train.stage_all import _has_state

    monkeypatch.setattr(loop, "native_bf16", lambda device: True)
    assert not _has_state(str(tmp_path), "scorer")
    with pytest.raises(CheckpointError, match="start without --resume"):
        loop.Run(tmp_path, "scorer").can_resume()
    first = loop.Run(tmp_path, "scorer")
    assert loop.choose_precision(first, torch.device("cpu"), "auto", _timed_probe(None, [])) is torch.bfloat16
    assert json.loads((tmp_path / "state" / "scorer" / loop.PRECISION_RECORD).read_text()) == {"precision": "bf16"}
    assert _has_state(str(tmp_path), "scorer")  # train all --resume passes --resume to the stage

    again, calls = loop.Run(tmp_path, "scorer"), []  # killed before any checkpoint, started with --resume
    assert again.can_resume() is False and again.precision == "bf16"
    chosen = loop.choose_precision(again, torch.device("cpu"), "auto", _timed_probe(torch.bfloat16, calls))
    assert chosen is torch.bfloat16
    assert calls == []  # bf16 would now measure slower: not probed again
    first.save_checkpoint(1, {"layer": torch.nn.Linear(2, 2)}, {}, data_position=8)
    assert loop.Run(tmp_path, "scorer").can_resume() is True
    (tmp_path / "state" / "vqgan").mkdir(parents=True)
    (tmp_path / "state" / "vqgan" / loop.PRECISION_RECORD).write_text('["bf16"]')  # not a record
    with pytest.raises(CheckpointError, match="start without --resume"):
        loop.Run(tmp_path, "vqgan").can_resume()


def test_the_vqgan_precision_probe_changes_no_state(tmp_path):
    from train.stage_vqgan import VQGANOptions, VQGANTrainer

    trainer = VQGANTrainer(VQGANOptions(data="shapes", out=str(tmp_path), size=32, device="cpu", precision="fp32",
                                        preset="tiny", steps=2, batch_size=4, heldout_examples=4, warmup=1,
                                        disc_start=1))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rng = torch.get_rng_state()
    for dtype in (None, torch.bfloat16):
        trainer._precision_probe(dtype)
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert all(p.grad is None for p in trainer.model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
