"""--compile auto: the decode step is compiled where the measured timings say it pays, and nowhere it changes a
picture."""

import importlib
import json

import pytest
import torch

from sample.pipeline import Pipeline, SamplingSettings
from seq2seq import Seq2Seq, Seq2SeqConfig, generate
from seq2seq.autocompile import LOAD_SHARE, PRIORS, CompileChoice, prior_ratio


@pytest.fixture(scope="module")
def model() -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(Seq2SeqConfig.from_preset("tiny", grid_size=4, d_model=32, n_heads=2, codebook_size=32)).eval()


def choice(model, tmp_path, mode="auto") -> CompileChoice:
    return CompileChoice(mode, torch.device("cpu"), model, path=tmp_path / "timings.json")


def measured(c: CompileChoice, rows: int, timings: dict) -> None:
    """The timings file as if these had been measured for passes of ``rows`` rows."""
    c.path.parent.mkdir(parents=True, exist_ok=True)
    c.path.write_text(json.dumps({c.key: {str(rows): timings}}))


def test_auto_stays_eager_until_a_pass_is_measured_then_compiles_when_the_passes_left_repay_it(model, tmp_path,
                                                                                                capsys):
    cost, ratio = PRIORS["cpu"][1], prior_ratio(torch.device("cpu"), 32)
    c = choice(model, tmp_path)
    assert not c.decide(rows=32, passes_left=10_000)  # nothing measured: this pass measures eager
    c.record(32, compiled=False, seconds=1.0)
    # Each pass would save 1 - ratio seconds against a first call of `cost` seconds.
    needed = int(cost / (1.0 - ratio))
    assert not c.decide(rows=32, passes_left=needed - 1)
    assert c.decide(rows=32, passes_left=needed + 1) and c.decide(rows=32, passes_left=needed + 1)
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "compiling the decode step for 32 rows" in said[0] and "--compile off" in said[0]
    assert not c.decide(rows=2, passes_left=10_000)  # another batch size is another measurement


def test_the_prior_ratio_is_the_entry_of_the_most_rows_not_above_the_pass():
    cpu = torch.device("cpu")
    assert [prior_ratio(cpu, rows) for rows in (1, 2, 7, 8, 31, 32, 100, 128, 4096)] == [
        0.70, 0.70, 0.70, 0.74, 0.74, 0.87, 0.87, 0.94, 0.94]


def test_measured_compiled_timings_replace_the_priors_and_outlive_the_process(model, tmp_path):
    c = choice(model, tmp_path)
    c.record(8, compiled=False, seconds=1.0)
    c.record(8, compiled=True, seconds=50.5)  # the first call: a compile of 50 s and a pass of 0.5 s
    c.record(8, compiled=True, seconds=0.5)
    assert c.decide(8, passes_left=1)  # warm in this process: nothing left to pay
    later = choice(model, tmp_path)  # a new process loads what the compile left: 50 x LOAD_SHARE s
    assert later.timings(8) == {"eager_s": 1.0, "compiled_s": 0.5, "compile_s": 50.5}
    cost = 50.5 * LOAD_SHARE - 0.5
    assert not later.decide(8, passes_left=int(cost / 0.5)) and later.decide(8, passes_left=int(cost / 0.5) + 1)
    later.record(8, compiled=True, seconds=5.5)  # measured: the load took 5 s
    last = choice(model, tmp_path)
    assert last.timings(8)["load_s"] == 5.5
    assert not last.decide(8, passes_left=10) and last.decide(8, passes_left=11)


def test_a_compiled_step_measured_slower_is_not_chosen(model, tmp_path):
    c = choice(model, tmp_path)
    c.record(4, compiled=False, seconds=1.0)
    c.record(4, compiled=True, seconds=2.0)
    c.record(4, compiled=True, seconds=1.2)
    assert not c.decide(4, passes_left=1) and not choice(model, tmp_path).decide(4, passes_left=10_000)


def test_on_and_off_ignore_the_timings_and_a_damaged_file_costs_only_the_measurements(model, tmp_path):
    path = tmp_path / "timings.json"
    path.write_text("{not json")
    assert choice(model, tmp_path, "on").decide(2, 1) and not choice(model, tmp_path, "off").decide(2, 10**9)
    c = choice(model, tmp_path)
    assert c.timings(2) == {} and not c.decide(2, 10**9)
    c.record(2, compiled=False, seconds=0.25)
    assert json.loads(path.read_text())[c.key] == {"2": {"eager_s": 0.25}}
    assert list(tmp_path.iterdir()) == [path]  # written whole, no temporary file left


def test_auto_never_compiles_where_no_compiler_can_build_kernels(model, tmp_path, monkeypatch):
    import shutil

    c = choice(model, tmp_path)
    measured(c, 2, {"eager_s": 1.0, "compiled_s": 0.1, "compile_s": 1.0, "load_s": 0.2})
    assert c.decide(2, passes_left=100)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert not c.decide(2, passes_left=100)


def test_another_model_or_machine_setting_reads_none_of_these_timings(model, tmp_path):
    c = choice(model, tmp_path)
    c.record(2, compiled=False, seconds=0.25)
    other = Seq2Seq(Seq2SeqConfig.from_preset("tiny", grid_size=4, d_model=32, n_heads=2, codebook_size=16))
    assert choice(other, tmp_path).timings(2) == {}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert choice(model, tmp_path).timings(2) == {}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore:.*a smoke test of a few steps:UserWarning")
def test_the_pipeline_switches_to_the_compiled_step_midway_and_draws_the_same_pictures(tiny_run, monkeypatch,
                                                                                     compile_cache):
    calls = []

    def fake_compiled(step, device):  # the compiled path (whole-cache attention, no bucket) without a compile
        calls.append(device)
        return step

    monkeypatch.setattr(importlib.import_module("seq2seq.generate"), "compiled", fake_compiled)
    settings = SamplingSettings(n=4, keep=4, cfg=1.5, rerank=False)
    prompts = ["a red circle", "a blue square", "a small green triangle"]
    eager = Pipeline(tiny_run, device="cpu", rerank=False, compile="off")(prompts, settings, per_pass=4)
    assert calls == []
    auto = Pipeline(tiny_run, device="cpu", rerank=False)
    # As if measured here: a pass of 8 rows (4 candidates, guided) 1 s eager, 0.1 s compiled, a first call of
    # 1.1 s (1 s to load the kernels). This test's own passes are not recorded over them.
    measured(auto.compile, 8, {"eager_s": 1.0, "compiled_s": 0.1, "compile_s": 60.0, "load_s": 1.1})
    monkeypatch.setattr(auto.compile, "record", lambda rows, compiled, seconds: compiled and auto.compile.warm.add(
        rows))
    # Three passes left save 2.7 s against 1 s: compile from the first; one pass left does not pay.
    drawn = auto(prompts, settings, per_pass=4)
    assert len(calls) == 3
    assert [[p.tokens.tolist() for p in row] for row in drawn] == [[p.tokens.tolist() for p in row] for row in eager]
    calls.clear()
    auto.compile.warm.clear()
    auto(prompts[:1], settings, per_pass=4)
    assert calls == []
    auto(prompts[:1], settings, per_pass=4, candidates_after=8)  # the command line's two later prompts
    assert len(calls) == 1


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own
def test_the_compiled_step_draws_the_ids_of_the_eager_one(model):
    text_ids = torch.randint(4, model.config.text_vocab_size, (2, 5))
    text_mask = torch.ones_like(text_ids, dtype=torch.bool)
    options = dict(num_candidates=2, seeds=3, cfg_scale=1.5, top_k=10)
    assert torch.equal(generate(model, text_ids, text_mask, compile=True, **options),
                       generate(model, text_ids, text_mask, **options))
