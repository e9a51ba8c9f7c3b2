"""Editing and watching: forced tokens (completion, inpainting), the likelihood after the hole, previews,
the edit options of `python -m sample` and the Python API, and their bad input."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample.__main__ as sample_cli
from cli import UserError
from seq2seq import Seq2Seq, Seq2SeqConfig, generate
from seq2seq.generate import UNDRAWN

# ------------------------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def model() -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(Seq2SeqConfig.from_preset("tiny")).eval()


def _text(config: Seq2SeqConfig, lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, config.text_vocab_size, (len(lengths), max(lengths)), generator=g)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask


def _picture(config: Seq2SeqConfig, batch: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.codebook_size, (batch, config.grid_size, config.grid_size), generator=g)


def _hole(config: Seq2SeqConfig) -> torch.Tensor:
    """A keep mask (h, w) with a 2x3 hole in the middle: kept tokens before and after it."""
    keep = torch.ones(config.grid_size, config.grid_size, dtype=torch.bool)
    keep[1:3, 1:4] = False
    return keep


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_kept_tokens_come_back_and_the_cache_agrees_with_recomputing(model, cfg_scale):
    config = model.config
    text_ids, text_mask = _text(config, [5, 3])
    init, keep = _picture(config, 2), _hole(config)
    options = dict(num_candidates=3, seeds=7, top_k=20, cfg_scale=cfg_scale, init_ids=init, keep_mask=keep,
                   return_likelihood=True)
    ids, likelihood = generate(model, text_ids, text_mask, **options)
    expected = init.repeat_interleave(3, 0)
    assert torch.equal(ids[:, keep], expected[:, keep])
    assert not torch.equal(ids[:, ~keep], expected[:, ~keep])  # the hole is drawn, not copied
    slow_ids, slow_likelihood = generate(model, text_ids, text_mask, use_cache=False, **options)
    assert torch.equal(ids, slow_ids)
    torch.testing.assert_close(likelihood, slow_likelihood, atol=1e-4, rtol=0)


def test_the_likelihood_is_the_models_own_over_the_tokens_after_the_hole(model):
    config = model.config
    text_ids, text_mask = _text(config, [6])
    keep = _hole(config)
    ids, likelihood = generate(model, text_ids, text_mask, num_candidates=4, seeds=3, cfg_scale=3.0,
                               init_ids=_picture(config, 1), keep_mask=keep, return_likelihood=True)
    with torch.no_grad():  # teacher forcing over each finished grid, conditional rows only
        log_probs = model(text_ids.expand(4, -1), text_mask.expand(4, -1), ids).log_softmax(-1)  # (4, S, V)
    per_token = log_probs.gather(-1, ids.flatten(1)[..., None])[..., 0]  # (4, S)
    after = keep.flatten() & (torch.arange(config.image_len) > int((~keep.flatten()).nonzero()[0]))
    torch.testing.assert_close(likelihood, per_token[:, after].mean(1), atol=1e-4, rtol=0)
    assert len(set(likelihood.tolist())) == 4  # each candidate's own seam


def test_the_forced_prefix_is_read_in_one_pass(model, monkeypatch):
    config = model.config
    text_ids, text_mask = _text(config, [4])
    keep = torch.zeros(config.grid_size, config.grid_size, dtype=torch.bool)
    keep[:3] = True  # completion: the first three rows
    passes = []
    decode = type(model.decoder).decode  # the cached decoding pass
    monkeypatch.setattr(type(model.decoder), "decode",
                        lambda self, input_ids, *args, **kw: passes.append(input_ids.shape[1]) or
                        decode(self, input_ids, *args, **kw))
    ids = generate(model, text_ids, text_mask, seeds=1, init_ids=_picture(config, 1), keep_mask=keep)
    prefix = 3 * config.grid_size
    assert passes == [1 + prefix] + [1] * (config.image_len - prefix - 1)
    assert torch.equal(ids[0, :3], _picture(config, 1)[0, :3])


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_an_edited_candidate_depends_on_its_seed_only(model, cfg_scale):
    config = model.config
    text_ids, text_mask = _text(config, [3, 8, 5])
    init, keep = _picture(config, 3), _hole(config)
    batch = generate(model, text_ids, text_mask, num_candidates=2, seeds=100, top_k=10, cfg_scale=cfg_scale,
                     init_ids=init, keep_mask=keep)
    for row in (0, 3, 5):
        prompt = row // 2
        length = int(text_mask[prompt].sum())
        alone = generate(model, text_ids[prompt:prompt + 1, :length], text_mask[prompt:prompt + 1, :length],
                         seeds=[100 + row], top_k=10, cfg_scale=cfg_scale, init_ids=init[prompt:prompt + 1],
                         keep_mask=keep)
        assert torch.equal(alone[0], batch[row])
    assert len({tuple(ids.flatten().tolist()) for ids in batch}) == 6


def test_prefix_ids_is_completion_by_mask(model):
    config = model.config
    text_ids, text_mask = _text(config, [5])
    init = _picture(config, 1)
    keep = torch.arange(config.image_len).view(config.grid_size, -1) < 2 * config.grid_size
    by_prefix = generate(model, text_ids, text_mask, num_candidates=2, seeds=4, cfg_scale=2.0,
                         prefix_ids=init.flatten(1)[:, :2 * config.grid_size])
    assert torch.equal(by_prefix, generate(model, text_ids, text_mask, num_candidates=2, seeds=4, cfg_scale=2.0,
                                           init_ids=init, keep_mask=keep))


def test_previews_show_known_tokens_and_change_nothing(model):
    config = model.config
    text_ids, text_mask = _text(config, [4])
    init, keep = _picture(config, 1), _hole(config)
    grids = []
    ids = generate(model, text_ids, text_mask, num_candidates=2, seeds=9, cfg_scale=2.0, init_ids=init,
                   keep_mask=keep, on_step=lambda filled, grid: grids.append((filled, grid.clone())), preview_every=5)
    assert torch.equal(ids, generate(model, text_ids, text_mask, num_candidates=2, seeds=9, cfg_scale=2.0,
                                     init_ids=init, keep_mask=keep))
    start = config.grid_size + 1  # the kept run before the hole
    filled = [f for f, _ in grids]
    assert filled[0] == start and filled[-1] == config.image_len and len(filled) == len(set(filled))
    assert all((f - start) % 5 == 0 for f in filled[:-1])
    for count, grid in grids:
        flat, final = grid.flatten(1), ids.flatten(1)
        assert torch.equal(flat[:, :count], final[:, :count])  # everything up to here as it ends
        later = torch.arange(config.image_len) >= count
        assert torch.equal(flat[:, later & keep.flatten()], final[:, later & keep.flatten()])  # kept: shown at once
        assert bool((flat[:, later & ~keep.flatten()] == UNDRAWN).all())
    plain = []
    generate(model, text_ids, text_mask, seeds=9, on_step=lambda filled, grid: plain.append(grid), preview_every=100)
    assert bool((plain[0] == UNDRAWN).all()) and len(plain) == 2  # nothing known yet, then the whole grid


def test_generate_refuses_a_mask_that_keeps_everything(model):
    config = model.config
    text_ids, text_mask = _text(config, [4])
    everything = torch.ones(config.grid_size, config.grid_size, dtype=torch.bool)
    with pytest.raises(ValueError, match="nothing is left to generate"):
        generate(model, text_ids, text_mask, init_ids=_picture(config, 1), keep_mask=everything)
    with pytest.raises(ValueError, match="go together"):
        generate(model, text_ids, text_mask, init_ids=_picture(config, 1))
    with pytest.raises(ValueError, match="codebook ids"):
        generate(model, text_ids, text_mask, init_ids=_picture(config, 1) + config.codebook_size,
                 keep_mask=_hole(config))


def test_a_canvas_of_the_trained_size_is_what_generate_draws(model):
    from seq2seq.canvas import generate_canvas

    config = model.config
    text_ids, text_mask = _text(config, [5, 2])
    options = dict(num_candidates=2, seeds=3, top_k=10, cfg_scale=2.0)
    assert torch.equal(generate_canvas(model, text_ids, text_mask, height=config.grid_size, width=config.grid_size,
                                       **options), generate(model, text_ids, text_mask, **options))


def test_a_wide_canvas_reads_windows_of_drawn_tokens_and_depends_on_its_seed_only(model, monkeypatch):
    from seq2seq.canvas import generate_canvas, window_origin

    config = model.config
    g = config.grid_size
    height, width = g + 1, 2 * g + 1
    text_ids, text_mask = _text(config, [5, 3])
    seen = []
    decode = type(model).decode
    monkeypatch.setattr(type(model), "decode", lambda self, memory, mask, ids: seen.append(ids.clone()) or
                        decode(self, memory, mask, ids))
    canvas = generate_canvas(model, text_ids, text_mask, height=height, width=width, num_candidates=2, seeds=8)
    monkeypatch.undo()
    assert canvas.shape == (4, height, width) and len(seen) == height * width
    for position in (0, g + 2, height * width - 1):  # the window's tokens before this one, as drawn
        i, j = divmod(position, width)
        i0, j0 = window_origin(i, j, height, width, g)
        assert 0 <= i - i0 < g and 0 <= j - j0 < g
        local = (i - i0) * g + (j - j0)
        assert torch.equal(seen[position][:, 1:], canvas[:, i0:i0 + g, j0:j0 + g].flatten(1)[:, :local])
    alone = generate_canvas(model, text_ids[1:], text_mask[1:], height=height, width=width, seeds=[11])
    assert torch.equal(alone[0], canvas[3])
    with pytest.raises(ValueError, match="smaller than the model's"):
        generate_canvas(model, text_ids, text_mask, height=g - 1, width=width)


# ------------------------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def pipeline(tiny_run):
    from sample.pipeline import Pipeline

    return Pipeline(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def scene_picture(pipeline, tmp_path_factory) -> Path:
    """A `shapes` render of the run's size: a relation scene, one object in each half."""
    from data.shapes import evaluation_prompts, render

    _, scene = evaluation_prompts("relation", 1)[0]
    path = tmp_path_factory.mktemp("init") / "scene.png"
    render(scene, pipeline.canvas_size).save(path)
    return path


def test_masks_round_outwards_to_whole_tokens(pipeline, scene_picture):
    token, canvas = pipeline.token_size, pipeline.canvas_size
    edit = pipeline.inpainting(scene_picture, box=(token + 1, 0, 2 * token + 1, 1))  # touches two tokens of row 0
    assert (~edit.keep).nonzero().tolist() == [[0, 1], [0, 2]]
    mask = Image.new("L", (canvas, canvas))
    mask.putpixel((canvas - 1, canvas - 1), 255)
    assert (~pipeline.inpainting(scene_picture, mask=mask).keep).nonzero().tolist() == [[canvas // token - 1] * 2]
    assert pipeline.completion(scene_picture, 2).keep.sum() == 2 * canvas // token
    assert edit.redraw_pixels.shape == (canvas, canvas) and edit.redraw_pixels.sum() == 2 * token * token


def test_inpainting_keeps_tokens_redraws_the_hole_and_ranks_by_both(pipeline, scene_picture):
    from data.images import from_pil
    from sample.pipeline import SamplingSettings

    half = pipeline.canvas_size // 2
    edit = pipeline.inpainting(scene_picture, box=(half, 0, 2 * half, 2 * half))  # the right half
    settings = SamplingSettings(n=6, keep=2, seed=3)
    pictures = pipeline(["a red circle left of a blue square"], settings, edit=edit)[0]
    init_ids = pipeline.vqgan.encode(from_pil(edit.image, pipeline.canvas_size)[None])[0]
    for picture in pictures:
        assert torch.equal(picture.tokens[edit.keep], init_ids[edit.keep])
        assert not torch.equal(picture.tokens[~edit.keep], init_ids[~edit.keep])
        assert picture.likelihood is not None and picture.likelihood < 0
        assert picture.settings["edit"] == {"box": [half, 0, 2 * half, 2 * half]}
    # best first by z(score) + z(likelihood)
    scores = torch.tensor([p.score for p in pictures])
    likelihoods = torch.tensor([p.likelihood for p in pictures])
    merit = (scores - scores.mean()) / scores.std(unbiased=False) + \
        (likelihoods - likelihoods.mean()) / likelihoods.std(unbiased=False)
    assert merit.tolist() == sorted(merit.tolist(), reverse=True)
    by_score = pipeline(["a red circle left of a blue square"],
                        SamplingSettings(n=6, keep=2, seed=3, likelihood_weight=0.0), edit=edit)[0]
    assert [p.score for p in by_score] == sorted((p.score for p in by_score), reverse=True)


def test_edited_candidates_are_the_same_in_any_pass(pipeline, scene_picture):
    from sample.pipeline import SamplingSettings

    edit = pipeline.completion(scene_picture, 1)
    settings = SamplingSettings(n=4, keep=4, seed=11, rerank=False)
    prompts = ["a red circle", "two blue squares"]
    whole = pipeline(prompts, settings, edit=edit)
    split = pipeline(prompts, settings, edit=edit, per_pass=3)
    for a, b in zip(whole, split):
        assert [np.asarray(p.image).tobytes() for p in a] == [np.asarray(p.image).tobytes() for p in b]


def test_previews_come_as_they_decode_and_end_on_the_picture(pipeline):
    from sample.pipeline import SamplingSettings

    seen = []
    pictures = pipeline(["a red circle"], SamplingSettings(n=2, keep=1, seed=1), preview_every=6,
                        on_step=seen.append)[0]
    total = pipeline.model.config.image_len
    assert [p.filled for p in seen] == list(range(0, total, 6)) + ([total] if total % 6 else [])
    assert seen[0].prompts == [0, 0] and seen[0].candidates == [0, 1]
    first = np.asarray(seen[0].images[0])
    assert (first == first[0, 0]).all() and abs(int(first[0, 0, 0]) - 128) <= 1  # nothing drawn: flat grey
    for picture in pictures:
        assert len(picture.frames) == len(seen)
        assert np.array_equal(np.asarray(picture.frames[-1]), np.asarray(picture.image))


def test_wide_pictures_come_whole_and_ranked(tiny_run, pipeline, tmp_path, capsys):
    from sample import generate_images

    wide = 2 * pipeline.canvas_size + pipeline.token_size
    kept = generate_images("two red circles", n=3, keep=2, width=wide, pipeline=pipeline)[0]
    assert [p.image.size for p in kept] == [(wide, pipeline.canvas_size)] * 2
    assert kept[0].score >= kept[1].score and kept[0].tokens.shape == (pipeline.model.config.grid_size,
                                                                       wide // pipeline.token_size)
    assert _sample(tiny_run, tmp_path, f'"two red circles" --n 2 --keep 1 --width {wide}') == 0
    with Image.open(next(tmp_path.glob("*-grid.png"))) as grid:
        assert grid.size[0] > 2 * wide  # two wide cells, not cropped squares


def test_python_api_edits_and_previews(tiny_run, scene_picture):
    from sample import generate_images

    frames = []
    kept = generate_images("a red circle", checkpoint=tiny_run, n=3, keep=1, device="cpu", init=scene_picture,
                           keep_rows=1, preview_every=4, on_step=frames.append)[0]
    assert len(kept) == 1 and kept[0].settings["edit"] == {"keep_rows": 1} and kept[0].frames and frames


# ------------------------------------------------------------------------------------------- command line


def _sample(tiny_run, out, argv: str) -> int:
    return sample_cli.main(shlex.split(argv) + ["--checkpoint", str(tiny_run), "--out", str(out), "--device", "cpu"])


def test_cli_inpaints_with_a_mask_and_writes_previews(tiny_run, scene_picture, tmp_path, capsys):
    size = Image.open(scene_picture).size
    mask = Image.new("L", size)
    mask.paste(255, (0, size[1] // 2, size[0] // 2, size[1]))  # the bottom left quarter
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out"
    assert _sample(tiny_run, out, f'"a red circle" --init {scene_picture} --mask {tmp_path}/mask.png --n 3 '
                                  "--keep 2 --preview 1") == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        assert record["settings"]["edit"] == {"mask": f"{tmp_path}/mask.png"} and record["likelihood"] < 0
        with Image.open(out / record["preview"]) as preview:
            assert preview.format == "WEBP" and preview.is_animated and preview.n_frames > 3
        with Image.open(out / record["file"]) as picture:
            assert picture.text["likelihood"] == json.dumps(record["likelihood"])


def test_cli_completion_is_redrawn_from_its_seed(tiny_run, scene_picture, tmp_path, capsys):
    argv = f'"a red circle" --init {scene_picture} --keep-rows 2 --cfg 2'
    assert _sample(tiny_run, tmp_path / "many", argv + " --n 3 --keep 3 --seed 4") == 0
    assert _sample(tiny_run, tmp_path / "one", argv + " --n 1 --seed 5") == 0
    with Image.open(tmp_path / "many" / "a-red-circle-seed5.png") as a, \
            Image.open(tmp_path / "one" / "a-red-circle-seed5.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _pictures(tmp: Path, size: int) -> None:
    Image.new("RGB", (size, size), "white").save(tmp / "init.png")
    Image.new("RGB", (size - 4, size)).save(tmp / "odd.png")
    Image.new("RGB", (2 * size, 2 * size)).save(tmp / "big.png")
    Image.new("L", (size, size)).save(tmp / "black.png")
    Image.new("L", (size, size // 2), 255).save(tmp / "half.png")
    (tmp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")


BAD = [
    ("--init {tmp}/init.png --mask {tmp}/half.png", "--mask is"),
    ("--init {tmp}/init.png --mask {tmp}/black.png", "nothing to redraw"),
    ("--init {tmp}/init.png --keep-rows 0", "--keep-rows 0 is outside the grid"),
    ("--init {tmp}/init.png --keep-rows 99", "--keep-rows 99 is outside the grid"),
    ("--init {tmp}/odd.png --keep-rows 1", "not a multiple of the"),
    ("--init {tmp}/big.png --keep-rows 1", "but this run draws"),
    ("--init {tmp}/broken.png --keep-rows 1", "cannot read --init"),
    ("--init {tmp}/missing.png --keep-rows 1", "cannot read --init"),
    ("--init {tmp}/init.png --mask {tmp}/broken.png", "cannot read --mask"),
    ("--init {tmp}/init.png --box 1,2,3", "--box takes four whole numbers"),
    ("--init {tmp}/init.png --box 10,0,5,8", "is empty or leaves"),
    ("--init {tmp}/init.png --box 0,0,999,8", "is empty or leaves"),
    ("--init {tmp}/init.png", "--init takes one of"),
    ("--init {tmp}/init.png --keep-rows 1 --box 0,0,4,4", "not --keep-rows and --box"),
    ("--mask {tmp}/black.png", "--mask edits a picture: give it with --init"),
    ("--preview 0", "--preview must be >= 1"),
    ("--width 65", "--width 65 is not a multiple of the"),
    ("--height 8", "--height 8 is smaller than the"),
    ("--width 512 --init {tmp}/init.png --keep-rows 1", "do not combine with --init"),
    ("--likelihood-weight -1", "--likelihood-weight must be"),
]


@pytest.mark.parametrize("argv, words", BAD, ids=[b[1] for b in BAD])
def test_bad_edit_input_gets_one_line_and_status_2(tiny_run, pipeline, tmp_path, capsys, argv, words):
    _pictures(tmp_path, pipeline.canvas_size)
    capsys.readouterr()
    try:
        code = _sample(tiny_run, tmp_path / "out", '"a red circle" ' + argv.format(tmp=tmp_path))
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    assert words in lines[0]


def test_api_bad_input_is_a_user_error(pipeline, scene_picture):
    from sample.pipeline import make_edit

    grid = pipeline.canvas_size // pipeline.token_size
    with pytest.raises(UserError, match=f"--keep-rows {grid} is outside the grid"):
        make_edit(pipeline, scene_picture, keep_rows=grid)  # keeps everything: nothing to draw


# ------------------------------------------------------------------------------------------- benchmarks


def test_bench_edit_measures_each_part(tiny_run, pipeline, tmp_path, capsys):
    import bench.edit as bench_edit

    cases = bench_edit.inpainting_cases(24)
    for _, scene, half in cases:  # the second object wholly in the erased half, the first wholly outside
        assert bench_edit._inside(scene.objects[1], half)
        assert bench_edit._inside(scene.objects[0], bench_edit._other_half(half))
    mixed = [next(c for c in cases if c[1].relation == "above"), next(c for c in cases if c[1].relation != "above")]
    result = bench_edit.inpainting_scores(pipeline, mixed, candidates=2)
    assert result["scenes"] == 2 and result["scenes_with_tokens_after_the_hole"] == 1
    assert result["first_object_unchanged"] == 1.0
    assert set(result["kept_accepted"]) >= {"random", "scorer", "likelihood", "scorer+1*likelihood"}
    assert bench_edit.main(["--checkpoint", str(tiny_run), "--device", "cpu", "--cases", "1", "--candidates", "2",
                            "--canvas-prompts", "1", "--only", "completion"]) == 0
    assert "kept rows unchanged 100.0%" in capsys.readouterr().out
    assert bench_edit.main(["--checkpoint", str(tiny_run), "--device", "cpu", "--candidates", "1", "--only", "canvas",
                            "--canvas-prompts", "1", "--width", str(2 * pipeline.canvas_size)]) == 0
    out = capsys.readouterr().out
    assert "every object whole" in out and "windows an object crosses the edge of" in out
    wide = bench_edit.canvas_scores(pipeline, prompts=1, candidates=2, width=2 * pipeline.canvas_size)
    assert wide["seams"]["crossed"]["windows"] + wide["seams"]["clear"]["windows"] == wide["windows"] == 2 * (
        pipeline.model.config.grid_size + 1)
    assert all(0 <= (r["whole"] or 0) <= 1 for r in wide["objects"].values())
    baseline = Path(__file__).resolve().parents[1] / "seq2seq" / "generate.py"  # against itself: same ids
    speed = bench_edit.plain_sampling_ratio(pipeline, baseline, prompts=1, candidates=2, repeats=1)
    assert speed["same_ids"] and speed["ratio"] > 0


def test_edit_figure_has_a_row_per_edit_kind(pipeline):
    from bench.figure_edit import compose, edit_rows

    rows = edit_rows(pipeline, n=2, keep=1, seed=0)
    assert [label.split(":")[0].split(",")[0] for label, _ in rows] == ["completion", "inpainting", "wide canvas",
                                                                          "previews"]
    assert [title for title, _ in rows[0][1]] == ["input", "mask", "kept 1"]
    assert compose(rows, scale=1).height > 4 * pipeline.canvas_size
