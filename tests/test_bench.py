"""`python -m bench` on a tiny run: every figure is produced, consistent with the others, and reported."""

import json
import math

import bench.__main__ as bench_cli
from sample.pipeline import SamplingSettings


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


def test_bench_without_a_run_is_one_line(tmp_path, capsys):
    assert bench_cli.main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --checkpoint") and len(err.strip().splitlines()) == 1
