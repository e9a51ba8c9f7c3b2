"""`python -m bench` on a tiny run: every figure is produced, consistent with the others, and reported."""

import json
import math

import pytest
import torch

import bench.__main__ as bench_cli
from cli import UserError
from sample.pipeline import SamplingSettings


@pytest.mark.slow
def test_bench_reports_speed_and_quality(tiny_run, tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench_cli.main(["--checkpoint", str(tiny_run), "--out", str(out), "--device", "cpu", "--grid", "3",
                           "--batches", "1", "2", "--prompts-per-kind", "2", "--candidates", "3",
                           "--single-prompts", "3", "--vqgan-pictures", "4", "--data-batches", "2"]) == 0
    report = json.loads((out / "bench.json").read_text())
    speed, quality = report["speed"], report["quality"]
    assert speed["peak_flops"] > 0 and speed["decode_model"]["image_tokens"] == 9
    assert [r["workers"] for r in speed["data"]] == [0, 2] and all(r["examples_per_s"] > 0 for r in speed["data"])
    methods = {(r["batch"], r["cfg"], r["method"]) for r in speed["decode"]}
    assert methods == {(b, c, "cached") for b in (1, 2) for c in (1.0, 3.0)} | {(b, 1.0, "recompute") for b in (1, 2)}
    for row in speed["decode"]:
        assert row["image_tokens_per_s"] > 0
        assert 0 <= row.get("outside_model_share", 0) <= 1
    for part in ("seq2seq", "vqgan"):
        figures = speed["training"][part]
        assert figures["flops_per_step"] > 0
        assert math.isclose(figures["share_of_peak"], figures["achieved_flops"] / speed["peak_flops"])
        if speed["peak_dtype"] == "bfloat16":  # training's bf16 on this CPU; the same step in fp32 beside it
            fp32 = speed["training_fp32"]
            assert math.isclose(fp32[part]["share_of_peak"], fp32[part]["achieved_flops"] / fp32["peak_flops"])

    for kind, scores in quality["composition"].items():
        assert scores["prompts"] == 2
        assert all(0 <= scores[key] <= 1 for key in ("any", "random1", "clip1"))
        assert list(scores["clip1_of_first"]) == ["1", "2", "3"]  # JSON keys
        # The scorer's best of the first candidate alone is that candidate: the random pick.
        assert scores["clip1_of_first"]["1"] == scores["random1"]
        assert scores["clip1_of_first"]["3"] == scores["clip1"]
    single = quality["single_unranked"]  # training's quality test: 4 unranked candidates per prompt
    assert single["prompts"] == 3 and list(single["clip1_of_first"]) == ["1", "2", "4"]
    assert 0 <= single["any"] <= 1
    assert quality["vqgan"]["pictures"] == 4 and math.isfinite(quality["vqgan"]["psnr_db"])
    assert quality["heldout_bits_per_token"] > 0
    assert quality["sampling"]["cfg"] == SamplingSettings.cfg

    table = (out / "bench.md").read_text()
    assert "| 2 | cfg 3 | cached |" in table and "keep 1 by the scorer" in table
    assert "Single objects, 3 held-out prompts x 4 candidates, no reranking" in table
    assert table in capsys.readouterr().out
    # The share of all candidates is named for what it is, and goals are not judged on a handful of pictures.
    assert "| candidates right |" in table and "any candidate" not in table
    oracle = [line for line in table.splitlines() if line.startswith(("| single |", "| relation |", "| count |"))]
    assert oracle and all("on 2 pictures: too few to judge" in line and "met" not in line for line in oracle[:3])
    assert "of pictures right (goal 90.0%: " in table and "on 12 pictures: too few to judge)" in table


def test_goals_are_judged_on_100_pictures_or_more():
    assert bench_cli._judged(0.95, 0.9, 32) == "95.0% on 32 pictures: too few to judge"
    assert bench_cli._judged(0.95, 0.9, 100) == "met" and bench_cli._judged(0.85, 0.9, 512) == "not met"


def test_bench_without_a_run_is_one_line(tmp_path, capsys):
    assert bench_cli.main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --checkpoint") and len(err.strip().splitlines()) == 1


def _small_quality(run, out, *extra):
    """bench --only quality on the tiny run with counts small enough for seconds."""
    return bench_cli.main(["--checkpoint", str(run), "--out", str(out), "--device", "cpu", "--only", "quality",
                           "--prompts-per-kind", "1", "--candidates", "2", "--single-prompts", "1",
                           "--vqgan-pictures", "6", "--gap-pictures", "5", "--retrieval-captions", "3",
                           "--retrieval-candidates", "2", *extra])


def _check_real(real: dict, pictures: int, gap_pictures: int, captions: int) -> None:
    v, base = real["vqgan"], real["vqgan"]["baseline"]
    assert v["pictures"] == pictures and base["downsample"] == 8
    for value in (v["psnr_db"], v["ssim"], base["psnr_db"], base["ssim"]):
        assert math.isfinite(value)
    assert -1 <= v["ssim"] <= 1 and -1 <= base["ssim"] <= 1
    k = real["codebook"]
    assert k["codebook_size"] == 64 and 1 <= k["codes_used"] <= 64 and math.isclose(k["usage"], k["codes_used"] / 64)
    g = real["caption_gap"]
    assert g["pictures"] == gap_pictures and g["distinct_captions"] >= 2
    assert all(math.isfinite(g[key]) and g[key] > 0 for key in ("right", "shuffled", "empty"))
    assert math.isclose(g["gap"], g["shuffled"] - g["right"])
    t = real["retrieval"]
    assert t["captions"] == captions and t["pictures"] == captions * t["candidates"] == captions * 2
    assert 0 <= t["r1"] <= t["r5"] <= 1
    assert math.isclose(t["chance_r1"], 1 / captions) and math.isclose(t["chance_r5"], min(5, captions) / captions)
    d = real["frechet"]
    assert d["name"] == "scorer Fréchet distance" and d["generated"] == captions * 2 and d["real"] == pictures
    assert math.isfinite(d["distance"]) and d["distance"] >= 0
    assert d["floor"] >= 0 and d["floor_pictures"] == pictures // 2


def test_bench_generic_figures_on_shapes(tiny_run, tmp_path):
    out = tmp_path / "bench"
    assert _small_quality(tiny_run, out, "--data", "shapes") == 0
    quality = json.loads((out / "bench.json").read_text())["quality"]
    assert quality["data"] == "shapes" and "composition" in quality and "single_unranked" in quality
    real = quality["real"]
    assert real["data"] == "shapes" and real["size"] == 32 and real["skipped_unreadable"] == 0
    _check_real(real, pictures=6, gap_pictures=5, captions=3)
    table = (out / "bench.md").read_text()
    assert "scorer Fréchet distance" in table and "FID" not in table.replace("not FID", "")
    assert "| VQGAN PSNR, mean of per-picture PSNR | 6 pictures |" in table and "baseline (8x average pooling" in table
    assert "does not apply" not in table


def test_bench_on_a_folder(tiny_run, tmp_path):
    import train.__main__ as train_cli

    folder = tmp_path / "folder"
    assert train_cli.main(["export", "--data", "shapes", "--n", "40", "--size", "32", "--out", str(folder)]) == 0
    out = tmp_path / "bench"
    assert _small_quality(tiny_run, out, "--data", str(folder), "--retrieval-captions", "10") == 0
    quality = json.loads((out / "bench.json").read_text())["quality"]
    assert quality["data"] == str(folder) and quality["data_from"] == "--data"
    assert not {"composition", "single_unranked", "vqgan"} & set(quality)
    # 40 rows hold out 4 (data.sources.heldout_count): every count stops there.
    _check_real(quality["real"], pictures=4, gap_pictures=4, captions=4)
    assert quality["real"]["retrieval"]["captions_asked"] == 10
    table = (out / "bench.md").read_text()
    assert "The `shapes` oracle does not apply to this data" in table
    assert "has 4 distinct captions, fewer than the 10 asked for" in table


def test_bench_data_defaults_to_the_runs_record(tmp_path):
    args = bench_cli.build_parser().parse_args([])
    assert bench_cli.run_data(tmp_path, args)["data"] == "shapes"  # an older run: no all.json
    (tmp_path / "all.json").write_text(json.dumps({"finished": [], "data": "pics", "text_column": "caption"}))
    source = bench_cli.run_data(tmp_path, args)
    assert (source["data"], source["from"], source["text_column"]) == ("pics", "all.json", "caption")
    source = bench_cli.run_data(tmp_path, bench_cli.build_parser().parse_args(["--data", "other"]))
    assert (source["data"], source["text_column"]) == ("other", None)  # the record's columns are its data's


def test_bench_counts_below_one_are_one_line(tmp_path, capsys):
    for option in ("--retrieval-captions", "--retrieval-candidates", "--gap-pictures", "--size"):
        assert bench_cli.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"), option, "0"]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {option} must be >= 1, got 0\n"


def test_ssim():
    import torch

    from bench.real import ssim

    x = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    noisy = (x + 0.3 * noise).clamp(0, 1)
    slightly, badly = ssim(x, (x + 0.05 * noise).clamp(0, 1)), ssim(x, noisy)
    assert (badly < slightly).all() and (slightly < 1).all()
    assert torch.allclose(ssim(x, noisy), ssim(noisy, x), atol=1e-6)  # symmetric
    assert ssim(x[:, :, :8, :8], x[:, :, :8, :8]).shape == (3,)  # smaller than the window


def test_frechet_distance():
    import torch

    from bench.real import frechet_distance

    a = torch.randn(200, 6, generator=torch.Generator().manual_seed(0)) @ torch.randn(6, 6)
    assert abs(frechet_distance(a, a)) < 1e-8
    shift = torch.tensor([0.5, -1.0, 0.0, 2.0, 0.0, 0.25])
    assert math.isclose(frechet_distance(a, a + shift), float(shift.square().sum()), rel_tol=1e-6)
    # Against tr sqrt(S_a S_b) from the eigenvalues of the plain product, another way to the same trace.
    b = torch.randn(150, 6, generator=torch.Generator().manual_seed(1)) * 2 + 1
    cov_a, cov_b = torch.cov(a.double().t()), torch.cov(b.double().t())
    cross = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0).sqrt().sum()
    expected = (a.double().mean(0) - b.double().mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    assert math.isclose(frechet_distance(a, b), float(expected), rel_tol=1e-6)
    # Fewer pictures than dimensions: singular covariances, still a finite distance >= 0.
    few = torch.nn.functional.normalize(torch.randn(5, 32, generator=torch.Generator().manual_seed(2)), dim=-1)
    assert 0 <= frechet_distance(few, few[:3]) < math.inf and frechet_distance(few, few) < 1e-8


def test_retrieval_counts_ties_against_the_picture():
    import torch

    from bench.real import retrieval_at

    texts = torch.eye(4)
    assert retrieval_at(torch.eye(4), texts, torch.arange(4)) == {1: 1.0, 5: 1.0}
    tied = torch.tensor([[1.0, 1.0, 0, 0]]) / 2**0.5  # equally close to captions 0 and 1
    assert retrieval_at(tied, texts, torch.tensor([0]), ks=(1, 2)) == {1: 0.0, 2: 1.0}


def test_bench_size_that_does_not_fit_the_run_is_one_line(tiny_run, tmp_path, capsys):
    assert _small_quality(tiny_run, tmp_path / "o", "--size", "48") == 2
    assert capsys.readouterr().err == "error: --size 48 does not fit the run: its seq2seq writes a 4x4 grid of codes, " \
                                      "each 8x8 pixels; pass --size 32\n"


def test_figure_finds_each_caption_at_its_own_row_past_rows_without_text(tmp_path):
    from PIL import Image

    from bench.figure_real import _pictures_by_caption
    from data.sources import open_dataset

    rows = []
    for i in range(12):
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": 7 if i == 0 else f"caption {i}"})  # row 0: no text
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = open_dataset(str(tmp_path), 8)
    by_caption = _pictures_by_caption(dataset)
    assert by_caption and all(dataset[i]["text"] == caption for caption, i in by_caption.items())


def test_min_dalle_style_decoder_draws_ids_and_the_comparison_prints_ratios(capsys):
    import torch

    from bench.mindalle import MinDalleDecoder, main

    decoder = MinDalleDecoder(width=16, heads=2, layers=2, hidden=32, codebook_size=10, image_len=6).eval()
    state, mask = torch.randn(4, 3, 16), torch.ones(4, 3, dtype=torch.bool)
    ids = decoder.sample(state, mask, guided=True, top_k=3, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 6) and ids.min() >= 0 and ids.max() < 10  # never the start id
    again = decoder.sample(state, mask, guided=True, top_k=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)
    assert decoder.sample(state, mask, guided=False, top_k=1).shape == (4, 6)

    main(["--grid", "2", "--batches", "1", "--threads", "1", "--repeats", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("1 ")]
    assert [row[:3] for row in rows] == [["1", "off", "1"], ["1", "on", "1"]]
    assert all(float(row[3]) > 0 and float(row[4]) > 0 and row[5].endswith("x") for row in rows)


def test_figure_draws_as_many_heldout_captions_as_asked_none_for_zero(tmp_path):
    from PIL import Image

    from bench.figure_real import _heldout_rows
    from data.sources import open_dataset

    for i in range(4):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"c {i}"}) + "\n"
                                                     for i in range(4)))
    dataset = open_dataset(str(tmp_path), 8)
    assert [len(_heldout_rows(dataset, count)) for count in (0, 1, 3, 9)] == [0, 1, 3, 4]


def test_step_bytes_are_the_weights_a_decode_step_reads_plus_its_caches():
    """Every tensor a cached decode step hands an operator, recorded: the weights among them (parameters and
    the stacked decoding copies) are what bench.speed counts, with the caches' filled part on top."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from bench.speed import _step_bytes
    from seq2seq import Seq2Seq, Seq2SeqConfig

    model = Seq2Seq(Seq2SeqConfig.from_preset("tiny")).eval()
    text_ids = torch.randint(4, model.config.text_vocab_size, (1, 5))
    model.setup_caches(1)
    model.prefill(text_ids, torch.ones_like(text_ids, dtype=torch.bool))

    class Reads(TorchDispatchMode):
        storages: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for arg in torch.utils._pytree.tree_leaves((args, kwargs or {})):
                if isinstance(arg, torch.Tensor):
                    self.storages.add(arg.untyped_storage().data_ptr())
            return func(*args, **(kwargs or {}))

    with Reads() as reads:
        model.decode_one_token(torch.tensor([[3]]), torch.tensor([1]))
    decoder = model.decoder
    stacked = [t for block in decoder.blocks for t in (block.self_attn.qkv_fused, block.mlp.w13_fused)]
    tables = {id(p) for m in (decoder.embed, decoder.row_embed, decoder.col_embed) for p in m.parameters()}
    weights = [t for t in [*decoder.parameters(), *stacked] if id(t) not in tables]
    read = sum(t.numel() * t.element_size() for t in weights if t.untyped_storage().data_ptr() in reads.storages)
    config, element = model.config, 4
    caches = 2 * config.n_decoder_layers * config.d_model * element * ((config.image_len + 1) / 2 + 16)
    assert read > 0 and _step_bytes(model, 1, text_len=16) == read + caches


def test_roofline_on_the_cpu_prints_both_decoders_and_the_ceiling(tmp_path, capsys):
    from bench.decode_roofline import main

    out = tmp_path / "rows.json"
    assert main(["--preset", "tiny", "--grid", "2", "--dtypes", "float32", "--threads", "1", "--device", "cpu",
                 "--bandwidth", "10", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["system"] for r in rows] == ["tilecraft", "min-dalle"]
    assert all(r["ms_per_step"] > 0 and r["step_mb"] > 0 for r in rows)
    assert rows[0]["ceiling_vs_mindalle"] == pytest.approx(rows[1]["ms_per_step"] / rows[0]["roofline_ms"])
    assert "at the roofline tilecraft's step would be at most" in capsys.readouterr().out


def test_structure_compares_scorers_on_the_same_cached_candidates(tiny_run, tmp_path, capsys):
    """bench.structure: pairwise figures per kind of negative, and reranking curves read from candidates
    drawn once, kept in --cache and read back for a second scorer."""
    import bench.structure as structure

    args = ["--checkpoint", str(tiny_run), "--device", "cpu", "--pairwise-prompts", "3", "--prompts-per-kind", "2",
            "--candidates", "3", "--kinds", "single", "relation", "--cache", str(tmp_path / "cache")]
    assert structure.main([*args, "--out", str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "a" / "structure.json").read_text())["scorers"][str(tiny_run / "scorer")]
    assert set(first["pairwise"]) == {"relation", "swap", "count", "position", "attribute"}  # JSON: keys sorted
    for r in first["pairwise"].values():
        assert r["pairs"] == 3 and 0 <= r["accuracy"] <= 1 and r["examples"][0][0] != r["examples"][0][1]
    assert set(first["rerank"]) == {"single", "relation"}
    for r in first["rerank"].values():
        assert r["prompts"] == 2 and list(r["best_of_first"]) == ["1", "2", "3"]
        assert r["best_of_first"]["1"] == r["random1"] and r["best_of_first"]["3"] == r["pick"]
    for kind, r in first["shortlist"].items():  # K = 1 is the scorer alone
        assert list(r["pick"]) == ["1", "2", "3"] and r["pick"]["1"] == first["rerank"][kind]["pick"]
    assert set(first["candidate_pairwise"]) == {"single", "relation"}
    for r in first["candidate_pairwise"].values():  # pairs of a right and a wrong candidate of one prompt
        assert r["pairs"] <= r["prompts"] * 2 and (r["accuracy"] is None) == (r["pairs"] == 0)

    record = structure.load_candidates(tmp_path / "cache", json.loads((tmp_path / "cache" / "candidates.json")
                                                                      .read_text())["settings"])
    assert record is not None and tuple(record["images"].shape) == (4, 3, 3, 32, 32)

    def no_drawing(*_, **__):
        raise AssertionError("the cached candidates should have been read back")

    original = structure.draw_candidates
    structure.draw_candidates = no_drawing
    try:  # the same scorer twice, from the cache: the same figures
        assert structure.main([*args, "--out", str(tmp_path / "b"), "--scorer", str(tiny_run / "scorer")]) == 0
    finally:
        structure.draw_candidates = original
    second = json.loads((tmp_path / "b" / "structure.json").read_text())["scorers"][str(tiny_run / "scorer")]
    assert second == first

    # Other sampling settings are other candidates: the cache's key holds them, so they are drawn again.
    assert structure.main([*args, "--out", str(tmp_path / "e"), "--top-p", "0.5", "--temperature", "0.7"]) == 0
    redrawn = json.loads((tmp_path / "cache" / "candidates.json").read_text())["settings"]
    assert (redrawn["top_p"], redrawn["temperature"], redrawn["top_k"]) == (0.5, 0.7, None)
    assert structure.load_candidates(tmp_path / "cache", record["settings"]) is None
    assert structure.main([*args, "--temperature", "0"]) == 2  # one line saying what to do, before any drawing
    assert "--temperature must be > 0" in capsys.readouterr().err

    # Fewer prompts cached: the later ones are drawn and appended, the same pictures as drawn all at once.
    short = [a if a != "2" else "1" for a in args[:-1]] + [str(tmp_path / "short")]
    assert short[short.index("--prompts-per-kind") + 1] == "1"
    assert structure.main([*short, "--out", str(tmp_path / "c")]) == 0
    assert structure.main([*short[:-1], str(tmp_path / "short"), "--prompts-per-kind", "2", "--out",
                           str(tmp_path / "d")]) == 0
    extended = structure.load_candidates(tmp_path / "short", record["settings"])
    assert torch.equal(extended["images"], record["images"]) and extended["kinds"] == record["kinds"]
    assert torch.equal(extended["tokens"], record["tokens"]) and tuple(record["tokens"].shape) == (4, 3, 4, 4)
    assert "own caption preferred" in capsys.readouterr().out

    # Why candidates fail: a candidate is right exactly when no aspect fails, and the shares add up.
    report = json.loads((tmp_path / "a" / "structure.json").read_text())
    for kind, r in report["failures"].items():
        verdicts = [v for prompt in record["kinds"][kind]["failed"] for v in prompt]
        assert [not v for v in verdicts] == [ok for prompt in record["kinds"][kind]["right"] for ok in prompt]
        assert r["candidates"] == 6 and r["right"] == sum(not v for v in verdicts) / 6
        assert all(r["alone"][a] <= r["failing"][a] for a in r["failing"])


def test_the_decoder_judges_pictures_by_its_own_likelihood(tiny_run, tmp_path, capsys):
    """bench.structure --decoder: log p(tokens | caption) equals the held-out loss's figure for the same
    pictures, the posterior rule is a log-probability, and the command reports every rule."""
    import math

    import bench.structure as structure
    from seq2seq.evaluate import bits_per_token

    judge = structure.DecoderJudge(tiny_run, "cpu")
    grid = judge.model.config.grid_size
    ids = torch.randint(0, judge.model.config.codebook_size, (3, grid, grid),
                        generator=torch.Generator().manual_seed(0))
    texts = ["two red circles", "a blue square above a green circle", "there is a yellow diamond"]
    nats = judge.log_likelihood(texts, ids)
    bits = bits_per_token(judge.model, judge.tokenizer, texts, ids, "cpu")
    assert -nats.sum().item() / ids.numel() / math.log(2) == pytest.approx(bits, rel=1e-4)
    posterior = torch.tensor(judge.ranks(texts[0], ids)["posterior"])
    assert bool((posterior <= 1e-5).all())  # a log-probability among "two" and its alternatives
    assert judge.ranks(texts[2], ids)["posterior"] == [0.0, 0.0, 0.0]  # no alternatives: no evidence

    args = ["--checkpoint", str(tiny_run), "--device", "cpu", "--pairwise-prompts", "2", "--prompts-per-kind", "1",
            "--candidates", "2", "--kinds", "count", "--decoder", "--out", str(tmp_path)]
    assert structure.main(args) == 0
    decoder = json.loads((tmp_path / "structure.json").read_text())["decoder"]
    assert set(decoder["rerank"]) == set(structure.DecoderJudge.RULES)
    assert all(r["pairs"] == 2 for r in decoder["pairwise"].values())
    assert "Reranking by the decoder's posterior" in capsys.readouterr().out


def test_shortlist_picks_the_likeliest_of_the_scorers_best_k():
    """bench.structure's shortlist rule on candidates whose scores and likelihoods are known: the scorer
    ranks 0, 1, 2, 3; the decoder likes 3, then 1; only candidate 1 is right."""
    import bench.structure as structure

    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    record = {"settings": {"candidates": 4, "kinds": ["count"]},
              "kinds": {"count": {"prompts": ["two red circles"], "right": [[False, True, False, False]]}}}
    curves = structure.shortlist_curves(record, scores, torch.tensor([[0.0, 5.0, 1.0, 9.0]]))
    assert curves == {"count": {"prompts": 1, "pick": {1: 0.0, 2: 1.0, 3: 1.0, 4: 0.0}}}
    tied = structure.shortlist_curves(record, scores, torch.zeros(1, 4))  # equal likelihoods: the scorer's order
    assert tied["count"]["pick"] == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0}


def test_candidate_pairwise_counts_right_over_wrong_pairs_of_prompts_with_both():
    """Prompt 1: right candidates 0 and 2 against wrong 1 and 3, scored so that 3 of the 4 pairs are won (a tie
    loses); prompt 2 is all right and counts nowhere; a kind without mixed prompts has no figure."""
    import bench.structure as structure

    scores = torch.tensor([[5.0, 2.0, 3.0, 3.0], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    record = {"settings": {"candidates": 4, "kinds": ["relation", "count"]},
              "kinds": {"relation": {"right": [[True, False, True, False], [True, True, True, True]]},
                        "count": {"right": [[False, False, False, False]]}}}
    figures = structure.candidate_pairwise(record, scores)
    assert figures == {"relation": {"prompts": 1, "pairs": 4, "accuracy": 0.75},
                       "count": {"prompts": 0, "pairs": 0, "accuracy": None}}
    assert "| relation | 1 | 4 | 75.0% |" in "\n".join(structure._candidate_pairwise_markdown(figures))


def test_train_candidates_draws_training_prompts_judges_them_and_keeps_what_is_drawn(tiny_run, tmp_path, capsys):
    """`python -m train candidates`: per kind, training prompts (never held-out ones) drawn as `python -m sample`
    draws them and judged by the oracle, in bench.structure's cache format; run again, it keeps what is there
    and draws only what is missing; a run of other data is refused."""
    import shutil

    import train.__main__ as train_cli
    from bench import structure
    from data.shapes import training_prompts
    from train.stage_scorer import RankedCandidates

    out = tmp_path / "candidates"
    args = ["candidates", "--checkpoint", str(tiny_run), "--out", str(out), "--candidates", "3", "--device", "cpu"]
    assert train_cli.main([*args, "--prompts", "relation=2", "count=1"]) == 0
    record = json.loads((out / "relation" / "candidates.json").read_text())
    assert record["settings"]["split"] == "train" and record["settings"]["candidates"] == 3
    assert record["kinds"]["relation"]["prompts"] == [t for t, _ in training_prompts("relation", 2)]
    assert [len(r) for r in record["kinds"]["relation"]["right"]] == [3, 3]
    settings = json.loads((out / "count" / "candidates.json").read_text())["settings"]
    count = structure.load_candidates(out / "count", settings)
    assert count["images"].shape == (1, 3, 3, 32, 32)

    capsys.readouterr()
    assert train_cli.main([*args, "--prompts", "relation=2", "count=2"]) == 0
    printed = capsys.readouterr().out
    assert "relation: 2 prompts already in" in printed and "count: 2 prompts x 3" in printed
    again = json.loads((out / "count" / "candidates.json").read_text())
    assert again["kinds"]["count"]["prompts"] == [t for t, _ in training_prompts("count", 2)]
    # A scorer reads every kind's folder; four prompts are too few for a step's eight, which it says.
    with pytest.raises(UserError, match=r"only \d prompts in .* have both right and wrong candidates"):
        RankedCandidates.load(out, 32)

    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    (other / "all.json").write_text(json.dumps({**json.loads((tiny_run / "all.json").read_text()), "data": "openmoji"}))
    assert train_cli.main(["candidates", "--checkpoint", str(other), "--out", str(tmp_path / "x")]) == 2
    assert "knows `shapes` scenes only" in capsys.readouterr().err
    assert train_cli.main([*args, "--prompts", "relation=0"]) == 2
    assert train_cli.main([*args, "--candidates", "1"]) == 2
