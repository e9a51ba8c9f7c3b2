"""Every command line answers bad input with one line and exit status 2, never a traceback: the catalogue.

Each case prepares what it needs in a temporary directory (a corrupt file, a run with a part missing or
from another run, a truncated weights file), runs the command in-process and checks the one line. A
property test feeds `sample` random Unicode, control characters and very long prompts: it never crashes.
"""

import json
import random
import shutil
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bench.__main__ as bench_cli
import bench.decode_cache as bench_decode_cache
import bench.decode_roofline as bench_decode_roofline
import bench.figure_real as bench_figure_real
import bench.mindalle as bench_mindalle
import bench.speculative as bench_speculative
import sample.__main__ as sample_cli
import train.__main__ as train_cli
from cli import UserError


def _train_folder_only(folder: Path) -> None:
    """A folder with train/ inside but no test/: it says what the layout needs."""
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n')


def _copy_run(tiny_run: Path, to: Path, without: str | None = None) -> Path:
    shutil.copytree(tiny_run, to, ignore=shutil.ignore_patterns("state", "cache", "samples", "metrics"))
    if without:
        target = to / without
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return to


def _other_vocab_run(tiny_run: Path, to: Path) -> Path:
    """A run whose tokenizer is another run's: 40 more ids than seq2seq was trained with."""
    from tokenizer import TextTokenizer

    run = _copy_run(tiny_run, to)
    vocab = TextTokenizer.load(run / "tokenizer.model").vocab_size
    texts = [f"word{i} {string.ascii_lowercase[i % 26] * (1 + i % 5)}" for i in range(3000)]
    TextTokenizer.train(texts, vocab_size=vocab + 40).save(run / "tokenizer.model")
    return run


def _same_size_other_tokenizer(tiny_run: Path, to: Path) -> Path:
    """A run whose tokenizer is another one with as many ids as the run's: check_fits cannot tell them apart."""
    from tokenizer import TextTokenizer

    run = _copy_run(tiny_run, to)
    vocab = TextTokenizer.load(run / "tokenizer.model").vocab_size
    words = ["".join(random.Random(i).choices(string.ascii_lowercase, k=7)) for i in range(3000)]
    other = TextTokenizer.train([f"{a} {b}" for a, b in zip(words, words[1:])], vocab_size=vocab)
    assert other.vocab_size == vocab
    other.save(run / "tokenizer.model")
    return run


def _truncated_weights(tiny_run: Path, to: Path) -> Path:
    run = _copy_run(tiny_run, to)
    weights = run / "vqgan" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return run


def _edited_weights(tiny_run: Path, to: Path, part: str, edit) -> Path:
    """A run whose ``part`` weights went through ``edit`` (one tensor made NaN, or turned to integers)."""
    from safetensors.torch import load_file, save_file

    run = _copy_run(tiny_run, to)
    path = run / part / "model.safetensors"
    state = load_file(path)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name] = edit(state[name])
    save_file(state, path, metadata={"format": "pt"})
    return run


def _nan(t):
    t = t.clone()
    t.view(-1)[1] = float("nan")
    return t


def _edited_config(tiny_run: Path, to: Path, part: str, edit) -> Path:
    """A run whose ``part``/config.json is ``edit(config)`` (a dict to change, or the text to write instead)."""
    run = _copy_run(tiny_run, to)
    path = run / part / "config.json"
    config = json.loads(path.read_text())
    edited = edit(config)
    path.write_text(edited if isinstance(edited, str) else json.dumps(config if edited is None else edited))
    return run


def _set(**fields):
    return lambda config: config.update(fields)


def _latest(tmp: Path, text: str) -> Path:
    """A run whose vqgan stage's latest.json holds ``text``."""
    return _write(tmp / "run" / "state" / "vqgan" / "latest.json", text)


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _folder_without_metadata(tmp: Path) -> Path:
    from PIL import Image

    (tmp / "pics").mkdir()
    Image.new("RGB", (8, 8)).save(tmp / "pics" / "a.png")
    return tmp / "pics"


def _jsonl_without_caption(tmp: Path) -> Path:
    return _write(tmp / "rows.jsonl", "\n".join(json.dumps({"image": "a.png", "label": "x"}) for _ in range(20)))


# (tool, argv with {tmp} and {run} placeholders, what to prepare, the words the one line must hold)
CASES = [
    # train: paths and data
    ("train", "tokenizer --data {tmp}/missing --out {tmp}/out", None, "no such file or folder"),
    ("train", "vqgan --data {tmp}/pics --out {tmp}/out", _folder_without_metadata, "has no metadata.jsonl"),
    ("train", "vqgan --data {tmp}/rows.jsonl --out {tmp}/out", _jsonl_without_caption, "its columns are"),
    ("train", "vqgan --data {tmp}/empty.jsonl --out {tmp}/out", lambda t: _write(t / "empty.jsonl", ""), "empty"),
    ("train", "vqgan --data {tmp}/bad.parquet --out {tmp}/out", lambda t: _write(t / "bad.parquet", b"\x00junk" * 50),
     "cannot read"),
    ("train", "vqgan --data {tmp}/notes.txt --out {tmp}/out", lambda t: _write(t / "notes.txt", "hello"), "cannot read"),
    ("train", "tokenizer --data shapes --out /proc/tilecraft-run", None, "cannot write"),
    # train: numbers and types
    ("train", "vqgan --data shapes --out {tmp}/out --steps -1", None, "--steps: must be >= 1"),
    ("train", "vqgan --data shapes --out {tmp}/out --steps many", None, "invalid"),
    ("train", "vqgan --data shapes --out {tmp}/out --lr -0.1", None, "--lr"),
    ("train", "vqgan --data shapes --out {tmp}/out --batch-size 0", None, "--batch-size"),
    ("train", "vqgan --data shapes --out {tmp}/out --size 36 --preset tiny", None, "--size"),
    ("train", "vqgan --data shapes --out {tmp}/out --downsample 3", None, "--downsample"),
    ("train", "vqgan --data shapes --out {tmp}/out --codebook-size 1", None, "--codebook-size"),
    ("train", "vqgan --data shapes --out {tmp}/out --codebook-size 10000000000", None, "--codebook-size must be from 2"),
    ("train", "vqgan --data shapes --out {tmp}/out --batch-size 100000000", None, "--batch-size 100000000 holds"),
    ("train", "vqgan --data shapes --out {tmp}/out --disc-weight -1", None, "--disc-weight"),
    ("train", "vqgan --data shapes --out {tmp}/out --preset huge", None, "preset"),
    ("train", "seq2seq --data shapes --out {tmp}/out", None, "tokenizer.model is missing"),
    ("train", "seq2seq --data shapes --out {tmp}/out --caption-dropout 1.5", None, "--caption-dropout"),
    ("train", "vqgan --data shapes --out {tmp}/out --device cuda", None, "no CUDA device", ),
    ("train", "vqgan --data shapes --out {tmp}/out --resume", None, "no checkpoint"),
    ("train", "all --data shapes --out {tmp}/out --preset enormous", None, "--preset"),
    ("train", "all --data shapes --out {tmp}/run --preset tiny --size 32 --device cpu",
     lambda t, r: _copy_run(r, t / "run"), "holds a finished run"),
    ("train", "all --data shapes --out {tmp}/out --resume --overwrite", None, "contradict"),
    ("bench", "--checkpoint {tmp}/run --only quality", lambda t, r: _write(_copy_run(r, t / "run") / "all.json",
                                                                        "[" * 100_000), "all.json (RecursionError)"),
    ("train", "pack --run {tmp}/missing --out {tmp}/out", None, "lacks tokenizer.model"),
    ("train", "pack --run {run} --out {tmp}/run", lambda t, r: _copy_run(r, t / "run"), "already holds a run"),
    ("train", "export --data shapes --n 0 --out {tmp}/out", None, "--n must be >= 1"),
    ("train", "nonsense", None, "invalid choice"),
    ("train", "vqgan --data shapes --out {tmp}/out --heldout-examples 1000000", None,
     "--heldout-examples 1000000 holds 45.8 GiB at once"),
    ("train", "scorer --data shapes --out {tmp}/out --heldout-examples 1000000", None, "--heldout-examples 1000000 holds"),
    ("train", "seq2seq --data shapes --out {tmp}/run --size 32 --cache-examples 1000000000",
     lambda t, r: _copy_run(r, t / "run"), "--cache-examples 1000000000 holds"),
    ("train", "vqgan --data shapes --out {tmp}/out --max-pixels 0", None, "--max-pixels: must be >= 1"),
    ("train", "vqgan --data shapes --out {tmp}/out --seed 18446744073709551616", None, "--seed: must be from 0 to"),
    ("train", "all --data shapes --out {tmp}/out --seed -1", None, "--seed: must be from 0 to 4294967295"),
    ("train", "vqgan --data shapes --out {tmp}/run --resume --preset tiny",
     lambda t: _latest(t, '{"step": 3, "dir": "../../other_run/state/vqgan/step-0000003"}'),
     "does not name a checkpoint of this run"),
    ("train", "vqgan --data shapes --out {tmp}/run --resume --preset tiny", lambda t: _latest(t, '["step-0000003"]'),
     "but a list; restore it"),
    ("train", "vqgan --data shapes --out {tmp}/run --resume --preset tiny", lambda t: _latest(t, '{"step": 3, "di'),
     "latest.json is not valid JSON"),
    ("train", "vqgan --data shapes --out {tmp}/out --heldout-fraction 0", None, "--heldout-fraction"),
    ("train", "vqgan --data shapes --out {tmp}/out --heldout-fraction 1.5", None, "--heldout-fraction"),
    ("train", "vqgan --data shapes --out {tmp}/out --augment flip", None, "--augment"),
    ("train", "vqgan --data shapes --out {tmp}/out --threads 0", None, "--threads must be >= 1"),
    ("train", "seq2seq --data shapes --out {tmp}/out --keep first", None, "--keep"),
    ("train", "vqgan --data {tmp}/split --out {tmp}/out", lambda t: _train_folder_only(t / "split"), "train/ inside"),
    ("train", "tokenizer --data {tmp}/nums.jsonl --out {tmp}/out", lambda t: _write(t / "nums.jsonl", "".join(
        json.dumps({"image": f"{i}.png", "text": i}) + "\n" for i in range(20))), "no row has a text caption"),
    ("train", "vqgan --data {tmp}/cut.jsonl --out {tmp}/out", lambda t: _write(t / "cut.jsonl",
                                                                            '{"image": "a.png", "text": "a"}\n{"ima'),
     "line 2 of"),
    ("sample", "x --checkpoint {run} --threads 0", None, "--threads must be >= 1"),
    ("sample", "x --checkpoint {run} --threads 2147483648", None, "--threads must be >= 1 and at most 1024"),
    # sample: settings
    ("sample", '"" --checkpoint {run}', None, "prompt is empty"),
    ("sample", '"   " --checkpoint {run}', None, "prompt is empty"),
    ("sample", "--checkpoint {run}", None, "no prompt given"),
    ("sample", "x --checkpoint {run} --n 0", None, "--n must be >= 1"),
    ("sample", "x --checkpoint {run} --n 2 --keep 3", None, "--keep must be between 1 and --n"),
    ("sample", "x --checkpoint {run} --top-k 0", None, "--top-k must be >= 1"),
    ("sample", "x --checkpoint {run} --top-p 0", None, "--top-p must be in (0, 1]"),
    ("sample", "x --checkpoint {run} --top-p 1.01", None, "--top-p must be in (0, 1]"),
    ("sample", "x --checkpoint {run} --temperature -1", None, "--temperature must be > 0"),
    ("sample", "x --checkpoint {run} --cfg -2", None, "--cfg must be >= 0"),
    ("sample", "x --checkpoint {run} --cfg inf", None, "--cfg must be >= 0 and at most 100"),
    ("sample", "x --checkpoint {run} --cfg nan", None, "--cfg must be >= 0"),
    ("sample", "x --checkpoint {run} --cfg 1e30", None, "--cfg must be >= 0 and at most 100"),
    ("sample", "x --checkpoint {run} --temperature 1e-45", None, "--temperature must be > 0, from 0.001 to 100"),
    ("sample", "x --checkpoint {run} --temperature inf", None, "--temperature must be > 0"),
    ("sample", "x --checkpoint {run} --temperature nan", None, "--temperature must be > 0"),
    ("sample", "x --checkpoint {run} --top-p nan", None, "--top-p must be in (0, 1]"),
    ("sample", "x --checkpoint {run} --top-p inf", None, "--top-p must be in (0, 1]"),
    ("sample", "x --checkpoint {run} --n two", None, "invalid int value"),
    ("sample", "x --checkpoint {run} --speculative 1", None, "--speculative must be 0 (off) or a window from 2"),
    ("sample", "x --checkpoint {run} --speculative -4", None, "--speculative must be 0 (off) or a window from 2"),
    ("sample", "x --checkpoint {run} --speculative 100000", None, "--speculative must be 0 (off) or a window"),
    ("sample", "x --checkpoint {run} --speculative 4000", None, "longer than this run's pictures"),
    ("sample", "x --checkpoint {run} --speculative 4 --width 64", None, "drop --speculative"),
    ("sample", "x --checkpoint {run} --compile on --speculative 4", None, "one-token step over the run's own grid"),
    ("sample", "x --checkpoint {run} --compile on --width 64", None, "drop --width/--height"),
    ("sample", "x --checkpoint {run} --compile fast", None, "invalid choice: 'fast'"),
    ("sample", "x --checkpoint {run} --prompts-file {tmp}/none.txt", None, "cannot read --prompts-file"),
    ("sample", "--checkpoint {run} --prompts-file /dev/zero", None, "is not a regular file"),
    ("sample", "x --checkpoint {run} --seed 18446744073709551616", None, "--seed must be from 0 to 2**63-1"),
    ("sample", "x --checkpoint {run} --seed 9223372036854775807 --n 2", None, "(9223372036854775806)"),
    ("sample", "x --checkpoint {run} --seed -1", None, "--seed must be from 0"),
    ("sample", "--checkpoint {run} --prompts-file {tmp}/blank.txt", lambda t: _write(t / "blank.txt", "\n  \n"),
     "has no prompts"),
    ("sample", "x --checkpoint {run} --out /proc/tilecraft-out", None, "--out"),
    ("sample", "x --checkpoint {run} --out {tmp}/o", lambda t: (t / "o" / "samples.jsonl").mkdir(parents=True),
     "samples.jsonl there is a symlink or not a regular file"),
    ("sample", "x --checkpoint {run} --out {tmp}/o", lambda t: (t / "o").mkdir() or (t / "o" / "samples.jsonl").symlink_to(
        _write(t / "elsewhere.jsonl", "")), "samples.jsonl there is a symlink"),
    ("sample", "x --checkpoint {run} --n 1000000", None, "--n 1000000 candidates is more than one prompt may have"),
    ("sample", "x --checkpoint {run} --batch-size 0", None, "--batch-size must be >= 1"),
    ("sample", "x --checkpoint {run} --n 5000 --batch-size 3", None, "15000 candidates held at once"),
    # sample: checkpoints
    ("sample", "x --checkpoint {tmp}/missing", None, "is not a directory"),
    ("sample", "x --checkpoint {tmp}/run", lambda t, r: _copy_run(r, t / "run", without="scorer"), "scorer"),
    ("sample", "x --checkpoint {tmp}/run", lambda t, r: _copy_run(r, t / "run", without="seq2seq"), "seq2seq"),
    ("sample", "x --checkpoint {tmp}/run", lambda t, r: _copy_run(r, t / "run", without="tokenizer.model"), "tokenizer"),
    ("sample", "x --checkpoint {tmp}/run", lambda t, r: _other_vocab_run(r, t / "run"), "tokenizer does not fit seq2seq"),
    ("sample", "x --checkpoint {tmp}/run", lambda t, r: _same_size_other_tokenizer(r, t / "run"),
     "is not the tokenizer seq2seq was trained with"),
    ("sample", "x --checkpoint {tmp}/run", lambda t, r: _truncated_weights(r, t / "run"), "damaged or truncated"),
    ("sample", "x --checkpoint {tmp}/run", lambda t, r: _edited_weights(r, t / "run", "seq2seq", _nan),
     "holds NaN or infinite values"),
    ("sample", "x --checkpoint {tmp}/run", lambda t, r: _edited_weights(r, t / "run", "vqgan", lambda w: w.long()),
     "is torch.int64 in"),
    ("sample", "x --checkpoint {tmp}/run", lambda t, r: _edited_weights(r, t / "run", "scorer", lambda w: w * float("inf")),
     "values (a run that diverged"),
    ("sample", "x --checkpoint {run} --reranker {tmp}", None, "--reranker"),
    ("sample", "x --checkpoint {tmp}/run", lambda t, r: _edited_config(r, t / "run", "vqgan", lambda c: [c]),
     "config.json holds a list, not an object"),
    ("sample", "x --checkpoint {tmp}/run", lambda t, r: _edited_config(r, t / "run", "seq2seq", lambda c: "null"),
     "config.json holds null"),
    ("sample", "x --checkpoint {tmp}/run", lambda t, r: _edited_config(r, t / "run", "vqgan", _set(groups=4.5)),
     "gives groups = 4.5, which is not an int"),
    ("sample", "x --checkpoint {tmp}/run", lambda t, r: _edited_config(r, t / "run", "scorer", _set(heads=True)),
     "gives heads = true, which is not an int"),
    ("sample", "x --checkpoint {tmp}/run", lambda t, r: _edited_config(r, t / "run", "seq2seq", _set(rope_base=None)),
     "gives rope_base = null, which is not a float"),
    ("sample", "x --checkpoint {tmp}/run",
     lambda t, r: _edited_config(r, t / "run", "vqgan", lambda c: "[" * 100_000 + "]" * 100_000),
     "nests too deep"),
    ("sample", "x --checkpoint {tmp}/run",
     lambda t, r: _edited_config(r, t / "run", "vqgan", _set(codebook_size=10_000_000_000)),
     "but the config builds (10000000000"),
    ("sample", "x --checkpoint {tmp}/run",
     lambda t, r: _edited_config(r, t / "run", "seq2seq", _set(max_text_len=10**9)), "elements of buffers"),
    # bench
    ("bench", "--checkpoint {tmp}/missing", None, "is not a directory"),
    ("bench", "--checkpoint {run} --candidates 0", None, "must be >= 1"),
    ("bench", "--checkpoint {run} --out {tmp}/b", lambda t: (t / "b" / "bench.json").mkdir(parents=True),
     "bench.json there is not a regular file"),
    ("bench", "--checkpoint {run} --out {tmp}/b", lambda t: _write(t / "b", "a file"), "cannot write --out"),
    # the decoding benches
    ("bench.speculative", "--checkpoint {run} --windows 8,x", None, "not a comma-separated list"),
    ("bench.speculative", "--checkpoint {run} --batches 0", None, "every value must be >= 1"),
    ("bench.speculative", "--checkpoint {run} --windows 1", None, "at least 2 tokens"),
    ("bench.speculative", "--checkpoint {run} --windows 999", None, "is longer than this run's pictures"),
    ("bench.speculative", "--checkpoint {tmp}/missing", None, "is not a directory"),
    ("bench.speculative", "--checkpoint {run} --repeats 0", None, "argument --repeats: must be >= 1"),
    ("bench.mindalle", "--threads 1,,2", None, "not a comma-separated list"),
    ("bench.mindalle", "--grid 0", None, "argument --grid: must be >= 1"),
    ("bench.decode_roofline", "--dtypes float32,int8 --device cpu", None, "--dtypes takes float32, bfloat16"),
    ("bench.decode_roofline", "--grid 0", None, "argument --grid: must be >= 1"),
    ("bench.figure_real", "--n 0", None, "argument --n: must be >= 1"),
    ("bench.mindalle", "--top-k 5000", None, "more than the 1024 codes"),
    ("bench.decode_cache", "--preset huge", None, "unknown seq2seq preset"),
    ("bench.decode_cache", "--batch 0", None, "argument --batch: must be >= 1"),
]
TOOLS = {"train": train_cli.main, "sample": sample_cli.main, "bench": bench_cli.main,
         "bench.speculative": bench_speculative.main, "bench.mindalle": bench_mindalle.main,
         "bench.decode_cache": bench_decode_cache.main, "bench.decode_roofline": bench_decode_roofline.main,
         "bench.figure_real": bench_figure_real.main}


def _argv(template: str, tmp: Path, run: Path) -> list[str]:
    import shlex

    return shlex.split(template.format(tmp=tmp, run=run))


@pytest.mark.parametrize("tool, template, prepare, words", CASES, ids=[f"{c[0]} {c[1][:48]}" for c in CASES])
def test_bad_input_gets_one_line_and_status_2(tool, template, prepare, words, tiny_run, tmp_path, capsys):
    if prepare is not None:
        prepare(tmp_path, tiny_run) if prepare.__code__.co_argcount == 2 else prepare(tmp_path)
    capsys.readouterr()
    try:
        code = TOOLS[tool](_argv(template, tmp_path, tiny_run) + (["--device", "cpu"] if tool == "sample" else []))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    assert words in lines[0]


def test_the_catalogue_is_large():
    assert len(CASES) >= 45


# ------------------------------------------------------------------------------------- sample fuzzing

@pytest.fixture(scope="module")
def pipeline(tiny_run):
    from sample.pipeline import Pipeline

    return Pipeline(tiny_run, device="cpu")


prompts = st.one_of(
    st.text(max_size=300),  # any code points: control characters, lone surrogates and all
    st.text(alphabet=st.characters(codec="utf-8"), min_size=500, max_size=5000),  # far past the text length
    st.lists(st.sampled_from(["a", "red", "circle", "\x00", "\u202e", "🔥", "\n", "日本", "𝕏", "\ufeff"]),
             max_size=400).map(" ".join),
)


def test_sample_repairs_text_that_is_not_unicode(pipeline):
    from sample.pipeline import SamplingSettings

    pictures = pipeline(["a red circle \udcff\ud800"], SamplingSettings(n=1, keep=1))[0]
    assert pictures[0].prompt == "a red circle \ufffd\ufffd\ufffd\ufffd\ufffd\ufffd"


def test_a_huge_prompt_is_stored_cut_to_a_few_thousand_characters(pipeline, tmp_path):
    from PIL import Image

    from sample.output import MAX_STORED_PROMPT, prepare_out_dir, write_prompt_results
    from sample.pipeline import SamplingSettings

    prompt = "a red circle " * 80_000  # 1 MB
    candidates = pipeline([prompt], SamplingSettings(n=2, keep=1))[0]
    out = prepare_out_dir(tmp_path / "out")
    (record,) = write_prompt_results(out, candidates)
    assert record["prompt"] == prompt[:MAX_STORED_PROMPT] + "..."
    assert (out / "samples.jsonl").stat().st_size < 2 * MAX_STORED_PROMPT
    for name in (record["file"], record["grid"]):
        assert Image.open(out / name).text["prompt"] == record["prompt"]
        assert (out / name).stat().st_size < 100_000


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=prompts)
def test_sample_never_crashes_on_any_prompt(pipeline, prompt, tmp_path_factory):
    from sample.output import prepare_out_dir, write_prompt_results
    from sample.pipeline import SamplingSettings

    settings_ = SamplingSettings(n=2, keep=1, cfg=1.5, seed=0)
    try:
        candidates = pipeline([prompt], settings_)[0]
    except UserError as e:  # only an empty prompt is refused, with one line
        assert not prompt.strip() and "\n" not in str(e)
        return
    assert prompt.strip() and len(candidates) == 2 and sum(p.kept for p in candidates) == 1
    out = prepare_out_dir(tmp_path_factory.mktemp("out"))
    written = write_prompt_results(out, candidates)
    for record in written:
        name = record["file"]
        assert (out / name).is_file() and name.isascii() and "/" not in name and len(name) < 120
        assert not name.startswith(".")
