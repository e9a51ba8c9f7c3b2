"""The `shapes` set: determinism, the held-out split, geometry, the words, pictures and export."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import shapes
from data.shapes import (CELLS, COLOURS, HELDOUT_PAIRS, HELDOUT_RELATIONS, KINDS, MIN_GAP, RELATIONS, SHAPES, SIZES,
                         TRAIN_PAIRS, Obj, Scene, caption, cell_of, converse, describe, evaluation_prompts, example,
                         export_imagefolder, make_scene, object_gap, relation_holds, render, shape_vertices)

N_SCENES = 3000
ROOT = Path(__file__).resolve().parents[1]


def draw(split: str, n: int = N_SCENES, seed: int = 0) -> list[tuple[Scene, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = make_scene(rng, split)
        out.append((scene, describe(scene, rng)))
    return out


@pytest.fixture(scope="module")
def train_scenes() -> list[tuple[Scene, str]]:
    return draw("train")


@pytest.fixture(scope="module")
def heldout_scenes() -> list[tuple[Scene, str]]:
    return draw("heldout", seed=1)


def triple_heldout(a: Obj, relation: str, b: Obj) -> bool:
    return (a.shape, relation, b.shape) in HELDOUT_RELATIONS or (b.shape, converse(relation), a.shape) in HELDOUT_RELATIONS


def image_digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


# ------------------------------------------------------------------------------------- determinism


def test_example_is_a_function_of_seed_split_index_only():
    first = example(7, "train", 42)
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    random.random()
    again = example(7, "train", 42)
    assert image_digest(first["image"]) == image_digest(again["image"])
    assert (first["text"], first["scene"]) == (again["text"], again["scene"])
    others = [example(7, "train", 43), example(8, "train", 42), example(7, "valid", 42), example(7, "heldout", 42)]
    assert all(o["scene"] != first["scene"] for o in others)
    assert [caption(7, "train", i) for i in range(50)] == [example(7, "train", i)["text"] for i in range(50)]


def test_example_is_the_same_in_another_process():
    """No salted hash() anywhere: a fresh interpreter with another hash seed draws the same examples."""
    code = ("import hashlib; from data.shapes import example\n"
            "for i in range(5):\n"
            "    e = example(3, 'train', i)\n"
            "    print(e['text'], hashlib.sha256(e['image'].tobytes()).hexdigest())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    expected = "".join(f"{e['text']} {image_digest(e['image'])}\n" for e in (example(3, "train", i) for i in range(5)))
    assert out == expected


def test_unknown_split_or_kind_is_refused():
    with pytest.raises(ValueError, match="split"):
        make_scene(random.Random(0), "test")
    with pytest.raises(ValueError, match="kind"):
        make_scene(random.Random(0), "train", "pair")
    with pytest.raises(ValueError, match="kind"):
        evaluation_prompts("everything", 3)


# ---------------------------------------------------------------------------------- held-out split


def test_heldout_lists_are_as_documented():
    assert sorted(s for _, s in HELDOUT_PAIRS) == sorted(SHAPES)
    assert len({c for c, _ in HELDOUT_PAIRS}) == 4 and all(c in COLOURS for c, _ in HELDOUT_PAIRS)
    assert all(a in SHAPES and r in RELATIONS and b in SHAPES for a, r, b in HELDOUT_RELATIONS)
    assert len(TRAIN_PAIRS) == len(COLOURS) * len(SHAPES) - len(HELDOUT_PAIRS)
    assert not set(TRAIN_PAIRS) & set(HELDOUT_PAIRS)


@pytest.mark.parametrize("split", ["train", "valid"])
def test_training_splits_never_hold_a_heldout_pair_or_triple(split, train_scenes):
    scenes = train_scenes if split == "train" else draw("valid", seed=2)
    for scene, _ in scenes:
        assert all((o.colour, o.shape) not in HELDOUT_PAIRS for o in scene.objects), scene
        if scene.kind == "relation":
            assert not triple_heldout(scene.objects[0], scene.relation, scene.objects[1]), scene


def test_heldout_split_always_holds_one(heldout_scenes):
    ways = Counter()
    for scene, _ in heldout_scenes:
        pair = any((o.colour, o.shape) in HELDOUT_PAIRS for o in scene.objects)
        if scene.kind == "relation":
            triple = triple_heldout(scene.objects[0], scene.relation, scene.objects[1])
            assert pair or triple, scene
            ways.update({"pair": pair, "triple": triple})
        else:
            assert pair, scene
    assert ways["pair"] > 100 and ways["triple"] > 100  # both ways of holding one out are exercised


def test_kinds_are_drawn_with_their_weights(train_scenes):
    counts = Counter(scene.kind for scene, _ in train_scenes)
    for kind, weight in zip(KINDS, shapes.KIND_WEIGHTS):
        assert abs(counts[kind] / len(train_scenes) - weight) < 0.03, counts


# ----------------------------------------------------------------------------------------- geometry


def test_objects_lie_inside_the_canvas_and_never_touch(train_scenes, heldout_scenes):
    assert MIN_GAP * 32 >= 2  # 2 px apart at every S >= 32
    crowded = 0
    for scene, _ in train_scenes + heldout_scenes:
        for obj in scene.objects:
            xs, ys = zip(*shape_vertices(obj.shape, obj.x, obj.y, SIZES[obj.size]))
            assert 0 <= min(xs) and max(xs) <= 1 and 0 <= min(ys) and max(ys) <= 1, obj
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:
                assert object_gap(a, b) >= MIN_GAP - 1e-12, (a, b)
        crowded += len(scene.objects) == 4 and scene.objects[0].size == "large"
    assert crowded > 20  # four large objects do get laid out


def boundary_points(obj: Obj, points: int = 800) -> np.ndarray:
    """About `points` points spread along the outline (a circle's polygon has many short edges)."""
    corners = np.array(shape_vertices(obj.shape, obj.x, obj.y, SIZES[obj.size]))
    t = np.linspace(0, 1, max(2, points // len(corners)))[:, None, None]
    return (corners + t * (np.roll(corners, -1, axis=0) - corners)).reshape(-1, 2)


@pytest.mark.slow
def test_object_gap_is_the_distance_between_outlines():
    rng = random.Random(5)
    checked = 0
    for _ in range(200):
        a, b = (Obj(rng.choice(SHAPES), "red", rng.choice(list(SIZES)), rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8))
                for _ in range(2))
        pa, pb = boundary_points(a), boundary_points(b)
        brute = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1)).min()
        gap = object_gap(a, b)
        if gap > 0:
            assert gap == pytest.approx(brute, abs=2e-3), (a, b)
            checked += 1
        else:  # overlapping outlines cross or one lies inside the other, and then no gap is claimed
            assert gap <= 0
    assert checked > 60


def test_cell_of_and_relation_rule():
    assert [cell_of(x, y) for y in (0.1, 0.5, 0.9) for x in (0.1, 0.5, 0.9)] == list(CELLS)
    assert cell_of(1.0, 1.0) == "bottom right" and cell_of(0.0, 0.0) == "top left"
    a = Obj("circle", "red", "small", 0.3, 0.5)
    assert relation_holds(a, Obj("circle", "blue", "small", 0.45, 0.5), "left of")  # exactly 0.15 apart
    assert not relation_holds(a, Obj("circle", "blue", "small", 0.44, 0.5), "left of")  # too close
    assert not relation_holds(a, Obj("circle", "blue", "small", 0.6, 0.8), "left of")  # as far down as right
    assert relation_holds(a, Obj("circle", "blue", "small", 0.6, 0.79), "left of")
    assert relation_holds(Obj("circle", "blue", "small", 0.6, 0.79), a, "right of")
    assert relation_holds(a, Obj("circle", "blue", "small", 0.35, 0.7), "above")
    assert relation_holds(Obj("circle", "blue", "small", 0.35, 0.7), a, "below")


# -------------------------------------------------------------------------------------------- words

RELATION_WORDS = {"to the left of": "left of", "left of": "left of", "to the right of": "right of",
                  "right of": "right of", "above": "above", "over": "above", "below": "below", "under": "below",
                  "beneath": "below"}
NUMBER_WORDS = {"two": 2, "three": 3, "four": 4}
SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}


def test_relation_captions_state_a_relation_that_holds(train_scenes, heldout_scenes):
    pattern = re.compile("|".join(sorted(RELATION_WORDS, key=len, reverse=True)))
    wordings = Counter()
    for scene, text in train_scenes + heldout_scenes:
        if scene.kind != "relation":
            continue
        a, b = scene.objects
        assert relation_holds(a, b, scene.relation)
        assert [r for r in RELATIONS if relation_holds(a, b, r)] == [scene.relation]
        # The object named first is the caption's subject; the relation must hold from it to the other.
        first, second = sorted((a, b), key=lambda o: text.index(f"{o.colour} {o.shape}"))
        stated = RELATION_WORDS[pattern.search(text).group()]
        assert relation_holds(first, second, stated), (text, scene)
        wordings[first is a] += 1
    assert wordings[True] > 100 and wordings[False] > 100  # both word orders occur


def test_counts_are_plural_and_single_objects_singular(train_scenes):
    plural = re.compile(r"\b(two|three|four) (?:(small|little|large|big) )?(\w+) (circle|square|triangle|diamond)s\b")
    for scene, text in train_scenes:
        if scene.kind == "count":
            match = plural.search(text)
            assert match, text
            number, size, colour, shape = match.groups()
            obj = scene.objects[0]
            assert (NUMBER_WORDS[number], colour, shape) == (len(scene.objects), obj.colour, obj.shape), text
            assert (size is not None) == scene.size_stated[0] and (size is None or SIZE_WORDS[size] == obj.size)
            assert text.startswith(("there are", "two", "three", "four", "a picture of", "an image of", "a drawing of"))
        else:
            assert not re.search(r"(circle|square|triangle|diamond)s\b|there are", text), text
        assert not re.search(r"\ba [aeiou]|\ban [^aeiou]", text), text  # "an orange circle", "a red one"


def test_size_word_appears_exactly_when_stated(train_scenes):
    for scene, text in train_scenes:
        if scene.kind in ("single", "position"):
            words = [SIZE_WORDS[w] for w in text.split() if w in SIZE_WORDS]
            assert words == ([scene.objects[0].size] if scene.size_stated[0] else []), text


def test_position_captions_name_the_cell_of_the_centre(train_scenes):
    cells = Counter()
    for scene, text in train_scenes:
        if scene.kind != "position":
            assert not re.search(r"\b(top|bottom|middle|center)\b|on the (left|right)", text), text
            continue
        corner = re.search(r"(top|bottom) (left|right)", text)
        edge = re.search(r"at the (top|bottom)\b|in the (top|bottom) middle|on the (left|right)", text)
        if corner:
            named = corner.group()
        elif edge:
            named = next(g for g in edge.groups() if g)
        else:
            assert re.search(r"in the (center|middle)", text), text
            named = "center"
        obj = scene.objects[0]
        assert named == cell_of(obj.x, obj.y), (text, obj)
        # Never on a border: the centre lies well inside its cell, so the words are not ambiguous.
        assert min(abs(v - border) for v in (obj.x, obj.y) for border in (1 / 3, 2 / 3)) >= shapes.CELL_MARGIN - 1e-12
        cells[named] += 1
    assert set(cells) == set(CELLS)


def test_captions_come_in_several_phrasings(train_scenes):
    texts = [text for _, text in train_scenes]
    for opening in ("there is", "there are", "a picture of", "an image of", "a drawing of"):
        assert sum(t.startswith(opening) for t in texts) > 50, opening
    assert sum(t.endswith(", on a white background") for t in texts) > 50
    assert sum(t.endswith(" on white") for t in texts) > 50
    assert len(set(texts)) > 0.8 * len(texts)


def test_describe_examples():
    three = Scene("count", [Obj("diamond", "green", "small", x, 0.5) for x in (0.2, 0.5, 0.8)], None,
                  [False] * 3, False)
    texts = {describe(three, random.Random(i)) for i in range(40)}
    assert all("three green diamonds" in t for t in texts) and len(texts) > 5
    pair = Scene("relation", [Obj("square", "blue", "small", 0.25, 0.5), Obj("triangle", "yellow", "large", 0.7, 0.5)],
                 "left of", [True, False], False)
    texts = {describe(pair, random.Random(i)) for i in range(60)}
    assert any("a small blue square to the left of a yellow triangle" in t for t in texts)
    assert any("a yellow triangle to the right of a small blue square" in t for t in texts)
    one = Scene("position", [Obj("circle", "orange", "large", 0.2, 0.2)], None, [True], True)
    texts = {describe(one, random.Random(i)) for i in range(60)}
    assert any(t.startswith("a large orange circle in the top left") for t in texts)
    assert all(re.match(r"(there is |a picture of |an image of |a drawing of )?a (large|big) orange circle", t)
               for t in texts)  # a stated size is never dropped


# ----------------------------------------------------------------------------- scenes as data


def test_scene_round_trips_through_json(train_scenes):
    for scene, _ in train_scenes[:200]:
        back = Scene.from_dict(json.loads(json.dumps(scene.to_dict())))
        assert back == scene


@pytest.mark.parametrize("change, message", [
    (dict(kind="picture"), "kind"),
    (dict(objects=[Obj("star", "red", "small", 0.5, 0.5)]), "does not know"),
    (dict(relation="left of"), "relation"),
    (dict(size_stated=[True, False]), "size_stated"),
    (dict(position_stated=True), "position"),
])
def test_scene_refuses_inconsistent_data(change, message):
    fields = dict(kind="single", objects=[Obj("circle", "red", "small", 0.5, 0.5)], relation=None,
                  size_stated=[True], position_stated=False)
    with pytest.raises(ValueError, match=message):
        Scene(**{**fields, **change})
    with pytest.raises(ValueError, match="identical"):
        Scene("count", [Obj("circle", "red", "small", 0.2, 0.5), Obj("circle", "blue", "small", 0.8, 0.5)], None,
              [False, False], False)


# ---------------------------------------------------------------------------------------- pictures


@pytest.mark.parametrize("size", [16, 64, 128])
def test_render_draws_the_palette_on_white(size):
    scene = Scene("single", [Obj("square", "purple", "large", 0.5, 0.5)], None, [False], False)
    image = render(scene, size)
    assert image.mode == "RGB" and image.size == (size, size)
    pixels = np.asarray(image).astype(int)
    assert (pixels[0, 0] == 255).all() and (pixels[-1, -1] == 255).all()
    assert np.abs(pixels[size // 2, size // 2] - COLOURS["purple"]).max() <= (1 if size >= 64 else 6)
    # The square covers (0.9 * 0.38)^2 of the canvas, rims anti-aliased rather than jagged.
    covered = (255 - pixels).sum(-1) / (255 * 3 - sum(COLOURS["purple"]))
    assert covered.sum() / size**2 == pytest.approx((0.9 * 0.38) ** 2, rel=0.05)
    if size >= 64:
        assert ((covered > 0.1) & (covered < 0.9)).any()


def test_evaluation_prompts_are_heldout_and_fixed():
    for kind in KINDS:
        prompts = evaluation_prompts(kind, 20, seed=4)
        assert len(prompts) == 20 and all(scene.kind == kind for _, scene in prompts)
        assert prompts == evaluation_prompts(kind, 20, seed=4)
        assert prompts != evaluation_prompts(kind, 20, seed=5)
        for text, scene in prompts:
            pair = any((o.colour, o.shape) in HELDOUT_PAIRS for o in scene.objects)
            assert pair or (kind == "relation" and triple_heldout(scene.objects[0], scene.relation, scene.objects[1]))
            assert isinstance(text, str) and text


def test_training_prompts_are_of_the_training_split_fixed_and_apart_from_the_data_stream():
    from data.shapes import training_prompts

    for kind in KINDS:
        prompts = training_prompts(kind, 40, seed=4)
        assert len(prompts) == 40 and all(scene.kind == kind for _, scene in prompts)
        assert prompts == training_prompts(kind, 40, seed=4) and prompts != training_prompts(kind, 40, seed=5)
        for text, scene in prompts:  # never a held-out pair or triple: the scorer may be tuned on these
            assert not any((o.colour, o.shape) in HELDOUT_PAIRS for o in scene.objects)
            assert not (kind == "relation" and triple_heldout(scene.objects[0], scene.relation, scene.objects[1]))
    training = [caption(4, "train", i) for i in range(40)]
    assert [t for t, _ in training_prompts("relation", 40, seed=4)] != training  # a stream of its own
    with pytest.raises(ValueError, match="kind"):
        training_prompts("everything", 3)


def test_export_imagefolder_writes_what_data_reads(tmp_path):
    out = export_imagefolder(tmp_path / "shapes", 12, seed=2, split="heldout", size=32)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [f"{i:06d}.png" for i in range(12)]
    for i, row in enumerate(rows):
        reference = example(2, "heldout", i, 32)
        assert row["text"] == reference["text"] and row["scene"] == reference["scene"]
        with Image.open(out / row["file_name"]) as image:
            assert image_digest(image.convert("RGB")) == image_digest(reference["image"])
    from data.sources import open_dataset

    dataset = open_dataset(str(out), size=32)
    items = [dataset[i] for i in range(len(dataset))]
    assert len(items) >= 4 and all(item["image"].shape == (3, 32, 32) for item in items)
    assert {item["text"] for item in items} <= {r["text"] for r in rows}

