"""The code cache: a damaged or foreign cache file is said so and encoded again, never trained on or crashed on."""

import shutil

import pytest
import torch
from safetensors.torch import save_file

from train import codes
from vqgan import VQGAN


def _damage(path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "ids outside the codebook":
        save_file({"image_ids": torch.full((8, 16), 5000, dtype=torch.int16)}, path, metadata={"texts": '["a"]'})
    elif how == "captions not JSON":
        save_file({"image_ids": torch.zeros(8, 16, dtype=torch.int16)}, path, metadata={"texts": "[not json"})
    elif how == "another grid":
        save_file({"image_ids": torch.zeros(8, 4, dtype=torch.int16)}, path, metadata={"texts": '["a"]'})


@pytest.mark.parametrize("how", ["truncated", "ids outside the codebook", "captions not JSON", "another grid"])
def test_a_damaged_code_cache_is_encoded_again(how, tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "vqgan", run / "vqgan")
    vqgan = VQGAN.from_pretrained(run / "vqgan")
    options = dict(data="shapes", size=32, split="heldout", limit=8, seed=0, device=torch.device("cpu"))
    first = codes.load_or_build(run, vqgan, **options)
    assert not first.image_ids.is_inference()  # as a loaded cache's: autograd may use them (the precision probe)
    (path,) = (run / "cache").iterdir()
    _damage(path, how)
    capsys.readouterr()
    again = codes.load_or_build(run, vqgan, **options)
    assert f"the code cache {path} is damaged" in capsys.readouterr().out
    assert torch.equal(again.image_ids, first.image_ids) and again.texts == first.texts
    assert torch.equal(codes.CodeCache.load(path).image_ids, first.image_ids)  # and stored whole again


def test_a_cache_of_older_shapes_scenes_is_not_read_back(tiny_run, tmp_path, monkeypatch):
    """The cache key holds the version of the shapes scenes: scenes drawn differently mean another cache; the
    key of a folder's cache does not move with it."""
    from data import shapes

    options = dict(size=32, split="train", limit=8, seed=0)

    def paths() -> dict:
        vqgan = tiny_run / "vqgan"
        return {data: codes.cache_path(tmp_path, vqgan, data=data, **options) for data in ("shapes", "a.jsonl")}

    before = paths()
    monkeypatch.setattr(shapes, "SCENES_VERSION", shapes.SCENES_VERSION - 1)
    after = paths()
    assert before["shapes"] != after["shapes"] and before["a.jsonl"] == after["a.jsonl"]


def test_a_balanced_cache_has_its_own_key_and_the_default_keeps_the_old_one(tiny_run, tmp_path):
    """--balance groups reads other pictures into a training cache, so it has another key; the held-out cache
    (never balanced) and the default keep theirs, so caches built before the option are still read."""
    vqgan = tiny_run / "vqgan"

    def path(split: str, **balance) -> str:
        return codes.cache_path(tmp_path, vqgan, data="a.jsonl", size=32, split=split, limit=8, seed=0, **balance)

    assert path("train", balance="groups") != path("train") == path("train", balance="pictures")
    assert path("heldout", balance="groups") == path("heldout")
