"""The user's path: `python -m train all` on shapes, then `python -m sample`, and every bad input on the way
answered with one line and exit status 2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample.__main__ as sample_cli
import train.__main__ as train_cli
from sample import generate_images


def test_train_all_writes_every_part(tiny_run):
    for part in ("tokenizer.model", "vqgan/model.safetensors", "vqgan/config.json", "seq2seq/model.safetensors",
                 "seq2seq/config.json", "scorer/model.safetensors", "scorer/config.json"):
        assert (tiny_run / part).is_file(), part
    assert sorted(json.loads((tiny_run / "all.json").read_text())["finished"]) == ["scorer", "seq2seq", "tokenizer", "vqgan"]
    metrics = [json.loads(line) for line in (tiny_run / "metrics" / "seq2seq.jsonl").read_text().splitlines()]
    assert any("heldout_bits_per_token" in m for m in metrics)
    grids = list((tiny_run / "samples" / "seq2seq").glob("step-*.png"))
    assert grids
    # Two rows of 32-pixel cells (held-out pictures above generated ones), then each column's caption.
    assert Image.open(grids[0]).size[1] > 2 * (32 + 2) + 2


def _sample(tiny_run, out, *argv) -> int:
    return sample_cli.main([*argv, "--checkpoint", str(tiny_run), "--out", str(out), "--device", "cpu"])


def test_sample_writes_kept_pictures_grid_and_metadata(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["a large red circle", "--n", "4", "--keep", "2", "--seed", "7", "--top-k", "50", "--top-p", "0.95"]
    assert _sample(tiny_run, out, *argv) == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    # Each kept picture is named by its own seed (candidate j has seed 7 + j) and printed with it.
    # 4 candidates, all on the default shortlist: best first by the decoder's likelihood, which is recorded.
    assert [r["rank"] for r in records] == [1, 2] and records[0]["likelihood"] >= records[1]["likelihood"]
    assert {r["seed"] for r in records} <= {7, 8, 9, 10}
    assert [r["file"] for r in records] == [f"a-large-red-circle-seed{r['seed']}.png" for r in records]
    assert capsys.readouterr().out.splitlines() == [
        f"{out / r['file']}  seed {r['seed']}  rank {r['rank']}  score {r['score']:.3f}  likelihood "
        f"{r['likelihood']:.3f}" for r in records]
    info = Image.open(out / records[0]["file"]).info
    assert info["prompt"] == "a large red circle" and json.loads(info["settings"])["top_k"] == 50
    assert (json.loads(info["seed"]), json.loads(info["rank"])) == (records[0]["seed"], 1)
    grid = out / "a-large-red-circle-seeds7-10-grid.png"
    assert records[0]["grid"] == grid.name
    # One row of four 32-pixel cells, with the prompt above and a label under every cell.
    width, height = Image.open(grid).size
    assert width == 4 * (32 + 2) + 2 and height > 32 + 2 * 2

    # Running again never overwrites: the repeat gets .run2 before .png, the old files untouched.
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert _sample(tiny_run, out, *argv) == 0
    assert all((out / name).read_bytes() == data for name, data in before.items())
    again = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()][2:]
    assert [r["file"] for r in again] == [f"a-large-red-circle-seed{r['seed']}.run2.png" for r in again]
    assert again[0]["grid"] == "a-large-red-circle-seeds7-10-grid.run2.png"
    # ... and the same seed gives the same picture.
    assert (out / again[0]["file"]).read_bytes() == (out / records[0]["file"]).read_bytes()


def test_a_kept_picture_is_redrawn_from_its_name(tiny_run, tmp_path, capsys):
    settings = ["--top-k", "50", "--cfg", "2"]
    assert _sample(tiny_run, tmp_path / "many", "two blue squares", "--n", "5", "--keep", "3", "--seed", "20",
                   *settings) == 0
    for line in capsys.readouterr().out.splitlines():
        path, seed = line.split("  ")[:2]
        seed = int(seed.removeprefix("seed "))
        assert Path(path).name == f"two-blue-squares-seed{seed}.png"
        assert _sample(tiny_run, tmp_path / "one", "two blue squares", "--seed", str(seed), "--n", "1",
                       *settings) == 0
        redrawn = tmp_path / "one" / Path(path).name
        assert Image.open(redrawn).tobytes() == Image.open(path).tobytes()


def test_prompts_file_is_drawn_in_batches_written_as_each_is_done(tiny_run, tmp_path, capsys, monkeypatch):
    from sample.pipeline import Pipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\na small green triangle\n")
    out = tmp_path / "out"
    real_call, calls = Pipeline.__call__, []

    def spy(self, batch, settings, **options):
        calls.append((list(batch), len(list(out.glob("*-seed*[0-9].png")))))  # pictures written before this batch
        return real_call(self, batch, settings, **options)

    monkeypatch.setattr(Pipeline, "__call__", spy)
    assert _sample(tiny_run, out, "--prompts-file", str(prompts), "--n", "2", "--keep", "1", "--batch-size", "2") == 0
    assert calls == [(["a red circle", "two blue squares"], 0), (["a small green triangle"], 2)]
    assert len(capsys.readouterr().out.splitlines()) == 3
    calls.clear()
    assert _sample(tiny_run, tmp_path / "default", "--prompts-file", str(prompts), "--n", "32", "--keep", "1") == 0
    assert [len(batch) for batch, _ in calls] == [2, 1]  # 64 // 32 prompts a batch by default


def test_grid_of_a_huge_n_shows_the_best_candidates(tiny_run, tmp_path, monkeypatch):
    import sample.output

    monkeypatch.setattr(sample.output, "GRID_CELLS", 3)
    assert _sample(tiny_run, tmp_path, "a red circle", "--n", "5", "--keep", "2") == 0
    grid = Image.open(tmp_path / "a-red-circle-seeds0-4-grid.png")
    assert grid.size[0] == 3 * (32 + 2) + 2  # three cells of five, the two kept among them
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["rank"] for r in records] == [1, 2]


def test_candidates_drawn_in_passes_are_the_same_pictures(tiny_run):
    from sample.pipeline import Pipeline, SamplingSettings

    pipeline = Pipeline(tiny_run, device="cpu")
    settings = SamplingSettings(n=5, keep=2, seed=3)
    whole = pipeline(["a red circle", "two blue squares"], settings)
    passes = pipeline(["a red circle", "two blue squares"], settings, per_pass=3)  # passes span both prompts
    for a, b in zip(whole, passes):
        a, b = sorted(a, key=lambda p: p.seed), sorted(b, key=lambda p: p.seed)
        assert [p.seed for p in a] == [p.seed for p in b] == list(range(3, 8))
        assert all(p.image.tobytes() == q.image.tobytes() for p, q in zip(a, b))
        assert [p.score for p in a] == pytest.approx([p.score for p in b], abs=1e-5)


def test_picture_save_writes_the_text_chunks_the_cli_writes(tiny_run, tmp_path):
    picture = generate_images("a large red circle", checkpoint=tiny_run, n=3, keep=1, seed=5, cfg=2.0,
                              device="cpu")[0][0]
    path = picture.save(tmp_path / "circle.png")
    info = Image.open(path).info
    assert info["prompt"] == "a large red circle" and json.loads(info["seed"]) == picture.seed
    assert json.loads(info["rank"]) == 1 and json.loads(info["score"]) == pytest.approx(picture.score)
    assert json.loads(info["settings"])["cfg"] == 2 and json.loads(info["candidate"]) == picture.candidate
    assert Image.open(path).tobytes() == picture.image.tobytes()
    # One implementation: the command line's file holds the same chunks.
    assert _sample(tiny_run, tmp_path / "cli", "a large red circle", "--n", "3", "--keep", "1", "--seed", "5",
                   "--cfg", "2") == 0
    cli = Image.open(tmp_path / "cli" / f"a-large-red-circle-seed{picture.seed}.png").info
    assert {k: cli[k] for k in ("prompt", "seed", "rank", "settings", "candidate")} == \
           {k: info[k] for k in ("prompt", "seed", "rank", "settings", "candidate")}
    with pytest.raises(ValueError, match="writes PNG"):
        picture.save(tmp_path / "circle.jpg")


def test_python_api_returns_kept_pictures_best_first(tiny_run):
    results = generate_images(["two blue squares", "a small green triangle"], checkpoint=tiny_run, n=3, keep=2,
                              device="cpu")
    assert [len(r) for r in results] == [2, 2]
    for pictures in results:  # 3 candidates, all on the default shortlist: the likeliest first
        assert pictures[0].likelihood >= pictures[1].likelihood
        assert all(p.kept and p.image.size == (32, 32) for p in pictures)
    by_scorer = generate_images("two blue squares", checkpoint=tiny_run, n=3, keep=2, device="cpu", shortlist=1)[0]
    assert by_scorer[0].score >= by_scorer[1].score and by_scorer[0].likelihood is None


def test_the_scorers_shortlist_is_ordered_by_the_decoders_likelihood(tiny_run):
    from sample.pipeline import Pipeline, SamplingSettings
    from seq2seq.evaluate import log_likelihoods

    pipeline = Pipeline(tiny_run, device="cpu")
    prompt, n, k = "a small green triangle", 8, 3
    by_scorer = pipeline([prompt], SamplingSettings(n=n, keep=n, seed=5, shortlist=1))[0]
    assert [p.score for p in by_scorer] == sorted((p.score for p in by_scorer), reverse=True)
    assert all(p.likelihood is None for p in by_scorer)
    shortlisted = pipeline([prompt], SamplingSettings(n=n, keep=2, seed=5, shortlist=k))[0]
    head = [p.candidate for p in by_scorer[:k]]
    # The decoder's likelihood of each shortlisted picture, computed here on its own, per token.
    tokens = torch.stack([p.tokens for p in by_scorer[:k]])
    fit = (log_likelihoods(pipeline.model, pipeline.tokenizer, [prompt] * k, tokens, "cpu") / tokens[0].numel())
    expected = [c for _, c in sorted(zip(fit.tolist(), head), key=lambda pair: -pair[0])]
    assert [p.candidate for p in shortlisted[:k]] == expected
    assert [p.likelihood for p in shortlisted[:k]] == pytest.approx(sorted(fit.tolist(), reverse=True), abs=1e-4)
    assert [p.candidate for p in shortlisted[k:]] == [p.candidate for p in by_scorer[k:]]  # the rest: the scorer's
    assert all(p.likelihood is None for p in shortlisted[k:])
    assert [p.rank for p in shortlisted] == list(range(1, n + 1))
    assert [p.kept for p in shortlisted] == [True, True] + [False] * (n - 2)
    assert shortlisted[0].settings["shortlist"] == k and by_scorer[0].settings["shortlist"] == 1


def test_candidate_does_not_depend_on_the_other_prompts(tiny_run):
    alone = generate_images("a purple diamond", checkpoint=tiny_run, n=2, keep=2, rerank=False, device="cpu")[0]
    batched = generate_images(["three red circles", "a purple diamond"], checkpoint=tiny_run, n=2, keep=2,
                              rerank=False, device="cpu")[1]
    for a, b in zip(alone, batched):
        assert a.seed == b.seed
        assert a.image.tobytes() == b.image.tobytes()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["", "--n", "2"], "prompt is empty"),
    (["x", "--n", "0"], "--n must be >= 1"),
    (["x", "--n", "2", "--keep", "3"], "--keep must be between 1 and --n"),
    (["x", "--top-k", "0"], "--top-k must be >= 1"),
    (["x", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["x", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["x", "--temperature", "0"], "--temperature must be > 0"),
    (["x", "--shortlist", "0"], "--shortlist must be from 1"),
    ([], "no prompt given"),
    (["x", "--prompts-file", "/nonexistent/prompts.txt"], "cannot read --prompts-file"),
])
def test_sample_bad_settings(tiny_run, tmp_path, capsys, argv, message):
    code = sample_cli.main(argv + ["--checkpoint", str(tiny_run), "--out", str(tmp_path), "--device", "cpu"])
    assert code == 2
    assert message in _one_line_error(capsys)


def test_sample_checkpoint_missing_a_part_names_it(tiny_run, tmp_path, capsys):
    broken = tmp_path / "run"
    shutil.copytree(tiny_run, broken)
    shutil.rmtree(broken / "scorer")
    assert sample_cli.main(["x", "--checkpoint", str(broken), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert _one_line_error(capsys).startswith("error: scorer:")


def test_sample_unwritable_out(tiny_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert sample_cli.main(["x", "--checkpoint", str(tiny_run), "--out", str(blocker / "sub"), "--device", "cpu"]) == 2
    assert "--out" in _one_line_error(capsys)


def test_sample_long_and_unusual_prompts_work(tiny_run, tmp_path, capsys):
    prompt = "a red circle " * 200 + "🔥\x00\u202e日本"
    with pytest.warns(UserWarning, match=r"longer than the model's \d+ text tokens; it was truncated"):
        assert sample_cli.main([prompt, "--checkpoint", str(tiny_run), "--n", "1", "--keep", "1",
                                "--out", str(tmp_path), "--device", "cpu"]) == 0
    names = [p.name for p in tmp_path.glob("*.png")]
    assert names and all(len(n) < 90 and n.isascii() for n in names)


def test_train_bad_data_is_one_line_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "train", "tokenizer", "--data", str(tmp_path / "missing"),
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_resume_of_finished_run_says_it_is_complete(tiny_run, capsys):
    assert train_cli.main(["all", "--preset", "tiny", "--size", "32", "--out", str(tiny_run), "--resume",
                           "--device", "cpu"]) == 0
    assert capsys.readouterr().out == f"all: already complete -> {tiny_run}\n"


def test_train_all_into_a_finished_run_needs_overwrite(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(tiny_run / "all.json", run / "all.json")
    argv = ["all", "--preset", "tiny", "--size", "32", "--out", str(run), "--device", "cpu"]
    assert train_cli.main(argv) == 2
    line = _one_line_error(capsys)
    assert "holds a finished run" in line and "--resume" in line and "--overwrite" in line
    assert not (run / "tokenizer.model").exists()
    # --overwrite trains the stages asked for again; the others stay listed as finished.
    assert train_cli.main([*argv, "--overwrite", "--only", "tokenizer"]) == 0
    assert (run / "tokenizer.model").is_file()
    assert sorted(json.loads((run / "all.json").read_text())["finished"]) == ["scorer", "seq2seq", "tokenizer", "vqgan"]


def _tiny_hf_clip(directory: Path) -> None:
    """A randomly initialized transformers CLIPModel and a word-level tokenizer, saved locally (no downloads)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = ["[PAD]", "[UNK]", "a", "large", "small", "red", "blue", "circle", "square"]
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", pad_token="[PAD]")
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, eos_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def test_transformers_clip_from_a_local_directory_reranks(tiny_run, tmp_path):
    _tiny_hf_clip(tmp_path / "clip")
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(tmp_path / "clip").eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "clip")
    prompt = "a large red circle"
    # shortlist=1: ranked by CLIP alone (the default shortlist re-orders its best by the decoder's likelihood).
    kept = generate_images([prompt], checkpoint=tiny_run, n=4, keep=2, reranker=tmp_path / "clip", device="cpu",
                           shortlist=1)[0]
    assert len(kept) == 2 and kept[0].score >= kept[1].score

    # The score is CLIP's cosine similarity, computed here independently from the saved picture.
    pixels = torch.from_numpy(np.asarray(kept[0].image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    pixels = torch.nn.functional.interpolate(pixels, size=32, mode="bicubic", antialias=True)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        output = model(input_ids=hf_tokenizer([prompt], return_tensors="pt").input_ids, pixel_values=(pixels - mean) / std)
    expected = torch.nn.functional.cosine_similarity(output.image_embeds, output.text_embeds).item()
    assert kept[0].score == pytest.approx(expected, abs=0.02)  # the saved PNG is 8-bit


def test_reranker_directory_without_a_model_is_one_line(tiny_run, tmp_path, capsys):
    pytest.importorskip("transformers")
    assert sample_cli.main(["x", "--checkpoint", str(tiny_run), "--n", "1", "--out", str(tmp_path / "o"),
                            "--reranker", str(tmp_path), "--device", "cpu"]) == 2
    assert "holds no config.json" in _one_line_error(capsys)


def test_pack_halves_the_weights_and_the_packed_run_samples(tiny_run, tmp_path, capsys):
    from safetensors.torch import load_file

    packed = tmp_path / "packed"
    assert train_cli.main(["pack", "--run", str(tiny_run), "--out", str(packed)]) == 0
    assert not (packed / "state").exists() and (packed / "tokenizer.model").read_bytes() == (tiny_run / "tokenizer.model").read_bytes()
    for part in ("vqgan", "seq2seq", "scorer"):
        full, half = load_file(tiny_run / part / "model.safetensors"), load_file(packed / part / "model.safetensors")
        assert full.keys() == half.keys()
        for name, tensor in full.items():
            if tensor.is_floating_point():
                assert half[name].dtype == torch.float16
                torch.testing.assert_close(half[name].float(), tensor, rtol=1e-3, atol=1e-4)
            else:
                assert torch.equal(half[name], tensor)
    kept = generate_images("a large red circle", checkpoint=packed, n=2, keep=1, device="cpu")[0]
    assert len(kept) == 1 and kept[0].score is not None
    # The packed seq2seq still records its step and the tokenizer it was trained with.
    from safetensors import safe_open

    from checkpoint import TOKENIZER_DIGEST, file_digest

    with safe_open(str(packed / "seq2seq" / "model.safetensors"), framework="pt") as f:
        assert f.metadata()[TOKENIZER_DIGEST] == file_digest(packed / "tokenizer.model") and "step" in f.metadata()


def test_pack_of_an_incomplete_run_names_what_is_missing(tmp_path, capsys):
    assert train_cli.main(["pack", "--run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "lacks tokenizer.model, vqgan/model.safetensors" in _one_line_error(capsys)


def test_a_picture_whose_write_fails_leaves_no_file_under_its_name(tmp_path, monkeypatch):
    import sample.output
    from sample.pipeline import Picture

    pictures = [Picture(Image.new("RGB", (16, 16), (200, 0, 0)), "a red square", seed, seed, 1.0 - seed, kept=seed == 0,
                        rank=seed + 1) for seed in range(2)]

    def half_then_killed(picture, tmp):
        Path(tmp).write_bytes(b"\x89PNG\r\n\x1a\n half")
        raise KeyboardInterrupt

    monkeypatch.setattr(sample.output, "_write_picture", half_then_killed)
    with pytest.raises(KeyboardInterrupt):
        sample.output.write_prompt_results(tmp_path, pictures)
    assert list(tmp_path.iterdir()) == []  # neither an empty nor a half picture under the final name, nor a temporary
    monkeypatch.undo()
    records = sample.output.write_prompt_results(tmp_path, pictures)
    assert [r["file"] for r in records] == ["a-red-square-seed0.png"]
    assert Image.open(tmp_path / "a-red-square-seed0.png").text["prompt"] == "a red square"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-red-square-seed0.png", "a-red-square-seeds0-1-grid.png",
                                                          "samples.jsonl"]


def test_pack_into_a_packed_run_needs_overwrite(tiny_run, tmp_path, capsys):
    packed = tmp_path / "packed"
    assert train_cli.main(["pack", "--run", str(tiny_run), "--out", str(packed)]) == 0
    before = (packed / "vqgan" / "model.safetensors").stat().st_mtime_ns
    assert train_cli.main(["pack", "--run", str(tiny_run), "--out", str(packed)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (packed / "vqgan" / "model.safetensors").stat().st_mtime_ns == before
    assert train_cli.main(["pack", "--run", str(tiny_run), "--out", str(packed), "--overwrite"]) == 0


def test_a_prompts_file_with_a_byte_order_mark_reads_the_first_prompt_without_it(tmp_path):
    from argparse import Namespace

    (tmp_path / "prompts.txt").write_bytes("\ufeffa red circle\r\na blue square\n".encode("utf-8"))
    assert sample_cli.read_prompts(Namespace(prompt=None, prompts_file=str(tmp_path / "prompts.txt"))) == [
        "a red circle", "a blue square"]


def test_sample_into_a_closed_pipe_stops_quietly(tiny_run, tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "sample", "a red circle", "--checkpoint", str(tiny_run), "--n", "2",
                                "--keep", "2", "--device", "cpu", "--out", str(tmp_path)],
                               cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # like `| head -0`: the reader is gone before the first line
    err = process.stderr.read().decode()
    assert process.wait() == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_run_records_its_caption_words_and_its_scorers_range(tiny_run):
    words = json.loads((tiny_run / "vocabulary.json").read_text())["words"]
    assert {"red", "circle", "square"} <= set(words) and all(isinstance(n, int) and n > 0 for n in words.values())
    assert "photo" not in words
    score_range = json.loads((tiny_run / "scorer" / "score_range.json").read_text())
    assert score_range["pictures"] > 0
    for scores in (score_range["own_caption"], score_range["other_caption"]):
        assert -1.0001 <= scores["p5"] <= scores["p50"] <= scores["p95"] <= 1.0001  # cosine similarities


def _warnings_of(pipeline, prompt: str) -> list[str]:
    import warnings

    from sample.pipeline import SamplingSettings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline([prompt], SamplingSettings(n=2, keep=1))
    return [str(w.message) for w in caught]


def test_sampling_warns_about_prompts_outside_what_the_run_learned(tiny_run):
    from sample.pipeline import Pipeline

    with pytest.warns(UserWarning, match="smoke test"):
        pipeline = Pipeline(tiny_run, device="cpu")
    assert pipeline.unknown_words("A photo of a RED dog, photo") == ["photo", "dog"]  # "of": "to the left of"
    messages = _warnings_of(pipeline, "a photo of a red dog")
    assert any("photo, dog never came in this run's training captions" in m for m in messages)
    pipeline.score_floor = 2.0  # above any cosine score: every best picture is under the floor
    assert any("no more than 95% of held-out pictures score" in m for m in _warnings_of(pipeline, "a red circle"))
    pipeline.score_floor = -2.0
    assert not any("held-out" in m or "never came" in m for m in _warnings_of(pipeline, "a red circle"))


def test_a_run_without_the_records_samples_without_those_warnings(tiny_run, tmp_path):
    import shutil

    from sample.pipeline import Pipeline

    run = tmp_path / "old"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("vocabulary.json", "score_range.json", "state"))
    pipeline = Pipeline(run, device="cpu")
    assert pipeline.vocabulary is None and pipeline.score_floor is None
    assert not any("never came" in m or "held-out" in m for m in _warnings_of(pipeline, "a photo of a dog"))


def test_half_precision_sampling_draws_pictures_and_fp32_stays_the_default(tiny_run):
    import torch

    from cli import UserError
    from sample.pipeline import Pipeline, SamplingSettings, resolve_dtype

    assert resolve_dtype("auto", torch.device("cpu")) is None  # measured slower on a CPU
    with pytest.raises(UserError, match="--dtype"):
        resolve_dtype("fp8", torch.device("cpu"))
    settings = SamplingSettings(n=2, keep=1, seed=4)
    plain = Pipeline(tiny_run, device="cpu")(["a red circle"], settings)[0]
    again = Pipeline(tiny_run, device="cpu", dtype="fp32")(["a red circle"], settings)[0]
    half = Pipeline(tiny_run, device="cpu", dtype="bf16")(["a red circle"], settings)[0]
    assert [p.image.tobytes() for p in plain] == [p.image.tobytes() for p in again]
    assert [p.image.size for p in half] == [p.image.size for p in plain] and all(p.score is not None for p in half)


def test_a_run_made_when_the_scorer_stage_was_called_clip_still_works(tiny_run, tmp_path, capsys):
    """Older runs hold the scorer in RUN/clip/, its log in metrics/clip.jsonl, its state in state/clip/ and list
    "clip" as finished: sampling, packing, `train all --resume` and the stage's own --resume read them."""
    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    (old / "scorer").rename(old / "clip")
    (old / "state" / "scorer").rename(old / "state" / "clip")
    (old / "metrics" / "scorer.jsonl").rename(old / "metrics" / "clip.jsonl")
    record = json.loads((old / "all.json").read_text())
    record["finished"] = ["clip" if s == "scorer" else s for s in record["finished"]]
    record["seconds"]["clip"] = record["seconds"].pop("scorer")
    (old / "all.json").write_text(json.dumps(record))

    new = generate_images(["a red circle"], checkpoint=tiny_run, n=2, keep=2, device="cpu")[0]
    kept = generate_images(["a red circle"], checkpoint=old, n=2, keep=2, device="cpu")[0]
    assert [p.score for p in kept] == [p.score for p in new]

    assert train_cli.main(["pack", "--run", str(old), "--out", str(tmp_path / "packed")]) == 0
    assert (tmp_path / "packed" / "scorer" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "packed" / "all.json").read_text())["finished"][-1] == "scorer"

    capsys.readouterr()
    assert train_cli.main(["all", "--preset", "tiny", "--size", "32", "--out", str(old), "--resume"]) == 0
    assert capsys.readouterr().out == f"all: already complete -> {old}\n"
    # The stage by its old name, resumed: its state and log move to today's names, and it goes on from there.
    assert train_cli.main(["clip", "--out", str(old), "--size", "32", "--model-size", "tiny", "--steps", "7",
                           "--batch-size", "8", "--save-every", "7", "--log-every", "7", "--device", "cpu",
                           "--resume"]) == 0
    assert json.loads((old / "state" / "scorer" / "latest.json").read_text())["step"] == 7
    assert not (old / "state" / "clip").exists() and (old / "metrics" / "scorer.jsonl").is_file()


def test_parts_trained_at_another_picture_size_are_refused(tiny_run, tmp_path, capsys):
    """The run's --size (RUN/all.json) must give the grid seq2seq writes, and the scorer must have been trained
    on pictures of the side the run draws: otherwise sampling would rank resized pictures without a word."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("state", "cache", "samples"))
    record = json.loads((run / "all.json").read_text())
    (run / "all.json").write_text(json.dumps({**record, "size": 64}))
    assert sample_cli.main(["a red circle", "--checkpoint", str(run), "--out", str(tmp_path / "a")]) == 2
    assert "the VQGAN makes 8x8 grids but seq2seq writes 4x4" in _one_line_error(capsys)

    (run / "all.json").write_text(json.dumps(record))
    assert train_cli.main(["scorer", "--out", str(run), "--size", "64", "--model-size", "tiny", "--steps", "1",
                           "--batch-size", "4", "--heldout-examples", "4", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert sample_cli.main(["a red circle", "--checkpoint", str(run), "--out", str(tmp_path / "b")]) == 2
    assert "scorer: the scorer reads 64x64 pictures but gets 32x32" in _one_line_error(capsys)

