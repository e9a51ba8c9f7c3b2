"""Property-based fuzzing (hypothesis) of what the program reads from files and command lines: config.json,
latest.json, metadata rows and numbers on the command line. Whatever is drawn, the answer is a result or one
UserError line, never a traceback, and within a time bound per case (no hang, no allocation of what a number
asks for before it is checked)."""

import json
import shutil
import string
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli import UserError

SECONDS_PER_CASE = 30  # far above the slowest honest case (a first meta-device build imports sympy: ~4 s loaded)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

numbers = st.one_of(st.integers(0, 600), st.integers(-2**70, 2**70), st.sampled_from([0, 1, -1, 2, 3, 2**31, 2**63, 10**10]),
                    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 2))  # near real values, and far
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


class Timed:
    """Fails a case that runs past SECONDS_PER_CASE (hypothesis's own deadline would also flag slow first runs)."""

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        assert time.perf_counter() - self.start < SECONDS_PER_CASE, "a case took too long"


# ------------------------------------------------------------------------------------------- config.json

PARTS = {"vqgan": "vqgan.VQGAN", "seq2seq": "seq2seq.Seq2Seq", "scorer": "scorer.Scorer"}


def _model_class(part: str):
    import importlib

    module, name = PARTS[part].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.fixture(scope="module")
def parts(tiny_run, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """A copy of each model folder of the tiny run, and its config."""
    root = tmp_path_factory.mktemp("parts")
    found = {}
    for part in PARTS:
        shutil.copytree(tiny_run / part, root / part)
        found[part] = (root / part, json.loads((tiny_run / part / "config.json").read_text()))
    return found


@st.composite
def configs(draw, config: dict):
    """A config.json: the real one with some fields changed or added, or any JSON value at all."""
    if draw(st.integers(0, 4)) == 0:
        return draw(json_values)
    edited = dict(config)
    for name in draw(st.lists(st.sampled_from(sorted(config) + ["unknown"]), min_size=1, max_size=3)):
        edited[name] = draw(numbers if draw(st.booleans()) else json_values)
    return edited


@pytest.mark.slow
@pytest.mark.parametrize("part", list(PARTS))
@FUZZ
@given(data=st.data())
def test_any_config_json_loads_or_is_refused_in_one_line(part, parts, data):
    folder, config = parts[part]
    raw = data.draw(configs(config))
    (folder / "config.json").write_text(json.dumps(raw))
    with Timed():
        try:
            model = _model_class(part).from_pretrained(folder)
        except UserError as e:
            assert "\n" not in str(e) and "config.json" in str(e) or "weights" in str(e)
            return
    # Loaded: then it is the run's own model, the same weights whatever was drawn.
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------- latest.json

@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    from train.loop import Run

    out = tmp_path_factory.mktemp("checkpointed")
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    run = Run(out, "vqgan")
    run.save_checkpoint(4, {"m": module}, {"o": optimizer}, data_position=32)
    return run, module, optimizer


latest_values = st.one_of(
    json_values,
    st.fixed_dictionaries({"step": numbers, "dir": st.one_of(
        json_values, st.sampled_from(["step-0000004", "step-0000003", "../step-0000004", "/etc", "", ".",
                                      "step-0000004/../../..", "step-00000x4"]),
        st.text(alphabet=string.printable, max_size=30))}),
)


@pytest.mark.slow
@FUZZ
@given(value=latest_values)
def test_any_latest_json_resumes_its_own_checkpoint_or_is_refused_in_one_line(checkpointed, value):
    run, module, optimizer = checkpointed
    (run.state_dir / "latest.json").write_text(json.dumps(value))
    with Timed():
        try:
            step, position, _ = run.load_checkpoint({"m": module}, {"o": optimizer})
        except UserError as e:
            assert "\n" not in str(e)
            return
    # Only the pointer to the checkpoint beside it resumes.
    assert isinstance(value, dict) and value.get("dir") == "step-0000004" and (step, position) == (4, 32)


# ------------------------------------------------------------------------------------------- metadata rows

cells = st.one_of(json_values, st.sampled_from(["a.png", "b.png", "missing.png", "../a.png", "/dev/zero", "."]))
rows = st.one_of(
    st.fixed_dictionaries({"file_name": cells, "text": cells}),
    st.dictionaries(st.sampled_from(["file_name", "text", "image", "caption", "group", "x"]), cells, max_size=4),
    json_values,
)
lines = st.one_of(rows.map(json.dumps), st.text(max_size=30), st.binary(max_size=30))


@pytest.mark.slow
@FUZZ
@given(content=st.lists(lines, min_size=0, max_size=24))
def test_any_metadata_rows_open_and_read_or_are_refused_in_one_line(content, tmp_path_factory, monkeypatch):
    import datasets
    from PIL import Image

    from data.sources import batches, open_dataset

    folder = tmp_path_factory.mktemp("rows")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", folder / "hf-cache")
    for name in ("a.png", "b.png"):
        Image.new("RGB", (10, 10), (200, 30, 30)).save(folder / name)
    (folder / "metadata.jsonl").write_bytes(b"\n".join(c if isinstance(c, bytes) else c.encode("utf-8", "surrogatepass")
                                                       for c in content))
    with Timed():
        for split in ("train", "heldout"):
            try:
                dataset = open_dataset(str(folder), 8, split=split)
            except UserError as e:
                assert "\n" not in str(e)
                continue
            items = [dataset[i] for i in range(len(dataset))]
            assert all(item is None or item["image"].shape == (3, 8, 8) and isinstance(item["text"], str)
                       for item in items)
            batch = next(batches(dataset, 4, seed=0))
            assert batch["image"].shape[0] == len(batch["text"]) == 4 - batch["skipped"]


# ------------------------------------------------------------------------------------------- command-line numbers

number_text = st.one_of(numbers.map(str), st.sampled_from(["nan", "-inf", "1e400", "0x10", "1_000", " 3", "", "٣"]),
                        st.text(alphabet="0123456789.-+e", max_size=8))


def _one_line_status_2(main, argv, capsys) -> str:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.mark.slow
@FUZZ
@given(values=st.fixed_dictionaries({}, optional={
    name: number_text for name in ("--n", "--keep", "--top-k", "--top-p", "--temperature", "--cfg", "--seed",
                                   "--batch-size", "--threads")}))
def test_sample_numbers_are_checked_before_any_work(values, tmp_path_factory, capsys):
    import sample.__main__ as sample_cli

    out = tmp_path_factory.mktemp("out")
    argv = ["a red circle", "--checkpoint", str(out / "no-run"), "--out", str(out), "--device", "cpu"]
    argv += [f"{k}={v}" for k, v in values.items()]
    threads = torch.get_num_threads()
    with Timed():
        line = _one_line_status_2(sample_cli.main, argv, capsys)
    torch.set_num_threads(threads)
    if "no-run" in line:  # every number was right: the missing run is what is wrong
        assert "is not a directory" in line


@pytest.mark.slow
@FUZZ
@given(values=st.fixed_dictionaries({}, optional={
    name: number_text for name in ("--steps", "--batch-size", "--size", "--lr", "--seed", "--heldout-fraction",
                                   "--max-pixels", "--heldout-examples", "--save-every", "--log-every", "--codebook-size",
                                   "--warmup", "--disc-start", "--eval-every")}))
def test_training_numbers_are_checked_before_any_work(values, tmp_path_factory, capsys):
    import train.__main__ as train_cli

    out = tmp_path_factory.mktemp("out")
    # --resume into an empty run: options that pass every check end at "no checkpoint", before any training.
    argv = ["vqgan", "--data", "shapes", "--out", str(out), "--model-size", "tiny", "--device", "cpu", "--resume"]
    argv += [f"{k}={v}" for k, v in values.items()]
    with Timed():
        line = _one_line_status_2(train_cli.main, argv, capsys)
    if "no checkpoint" not in line:
        assert any(name in line for name in values) or "--size" in line, line


@pytest.mark.slow
@FUZZ
@given(text=st.one_of(json_values.map(json.dumps), st.just("[" * 100_000 + "]" * 100_000), st.text(max_size=30)))
def test_any_all_json_reads_as_a_record_of_finished_stages(text, tmp_path_factory):
    from checkpoint import read_run_record

    path = tmp_path_factory.mktemp("all") / "all.json"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    record = read_run_record(path.parent)
    assert isinstance(record["finished"], list) and isinstance(record["seconds"], dict)
