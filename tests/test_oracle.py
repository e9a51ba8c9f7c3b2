"""The oracle reads the set's own renders back as their scenes, and notices when a picture says otherwise."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from data import oracle, shapes
from data.shapes import Obj, Scene

SCENES_PER_SPLIT = 300


def _scenes(split: str, n: int) -> list[Scene]:
    return [shapes._scene_and_text(0, split, index)[0] for index in range(n)]


def test_oracle_agrees_with_renders_at_64_on_99_percent(capsys):
    scenes = _scenes("train", SCENES_PER_SPLIT) + _scenes("heldout", SCENES_PER_SPLIT)
    agree = [oracle.check(scene, shapes.render(scene, 64)) for scene in scenes]
    share = sum(agree) / len(agree)
    with capsys.disabled():
        print(f"\noracle agreement at S=64: {sum(agree)}/{len(agree)} = {share:.2%}")
    assert share >= 0.99


@pytest.mark.parametrize("size", [32, 128])
def test_oracle_reads_other_sizes(size):
    scenes = _scenes("valid", 60)
    agree = [oracle.check(scene, shapes.render(scene, size)) for scene in scenes]
    assert sum(agree) / len(agree) >= 0.95


def test_read_scene_gives_each_object():
    scene = Scene("relation", [Obj("circle", "red", "large", 0.3, 0.3), Obj("triangle", "blue", "small", 0.75, 0.7)],
                  "above", [True, True], False)
    found = sorted(oracle.read_scene(shapes.render(scene, 64)), key=lambda o: o.x)
    assert [(o.shape, o.colour, o.size) for o in found] == [("circle", "red", "large"), ("triangle", "blue", "small")]
    assert found[0].x == pytest.approx(0.3, abs=0.03) and found[0].y == pytest.approx(0.3, abs=0.03)
    assert found[1].x == pytest.approx(0.75, abs=0.03) and found[1].y == pytest.approx(0.7, abs=0.03)


def test_tensor_and_pil_read_the_same():
    scene = _scenes("train", 1)[0]
    image = shapes.render(scene, 64)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1  # (3, 64, 64) in [-1, 1]
    from_pil, from_tensor = oracle.read_scene(image), oracle.read_scene(tensor)
    assert [(o.shape, o.colour, o.size) for o in from_pil] == [(o.shape, o.colour, o.size) for o in from_tensor]
    assert all(abs(a.x - b.x) < 1e-6 and abs(a.y - b.y) < 1e-6 for a, b in zip(from_pil, from_tensor))


def _changed(scene: Scene, **change) -> Scene:
    return dataclasses.replace(scene, objects=[dataclasses.replace(scene.objects[0], **change)] + scene.objects[1:])


@pytest.mark.parametrize("attribute", ["colour", "shape", "size", "position", "count", "relation"])
def test_oracle_refuses_a_picture_of_another_scene(attribute):
    """Render one scene, judge it against a caption that differs in one attribute: that attribute fails."""
    base = Scene("position", [Obj("square", "green", "large", 0.2, 0.2)], None, [True], True)
    if attribute == "colour":
        stated, picture = base, _changed(base, colour="orange")
    elif attribute == "shape":
        stated, picture = base, _changed(base, shape="circle")
    elif attribute == "size":
        stated, picture = base, _changed(base, size="small")
    elif attribute == "position":
        stated, picture = base, _changed(base, x=0.8, y=0.8)
    elif attribute == "count":
        stated = Scene("count", [Obj("circle", "red", "small", 0.2, 0.2), Obj("circle", "red", "small", 0.8, 0.8)],
                       None, [False, False], False)
        picture = Scene("single", stated.objects[:1], None, [False], False)
    else:
        a, b = Obj("circle", "red", "small", 0.2, 0.5), Obj("square", "blue", "small", 0.8, 0.5)
        stated = Scene("relation", [a, b], "left of", [False, False], False)
        swapped = [dataclasses.replace(a, x=0.8), dataclasses.replace(b, x=0.2)]
        picture = Scene("relation", swapped, "right of", [False, False], False)
    image = shapes.render(picture, 64)
    assert oracle.check(picture, image)
    details = oracle.check_details(stated, image)
    assert not details[attribute] and not oracle.check(stated, image)


def test_a_blank_picture_holds_nothing():
    scene = _scenes("train", 1)[0]
    image = torch.ones(3, 64, 64)
    assert oracle.read_scene(image) == []
    assert not oracle.check(scene, image)


def test_a_reading_holds_its_objects_pixel_box():
    from data.oracle import read_objects
    from data.shapes import Obj, Scene, render

    scene = Scene("single", [Obj("square", "red", "large", 0.25, 0.5)], None, [False], False)
    (reading,) = read_objects(render(scene, 64))
    x0, y0, x1, y1 = reading.box
    assert x0 < 16 < x1 and y0 < 32 < y1  # around the centre (16, 32)
    assert x1 <= 33 and 0 < x0  # within the left half, clear of the edge
