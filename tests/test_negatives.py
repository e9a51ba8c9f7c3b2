"""Hard negatives (data/negatives.py): false captions a word or two from the true one, for `shapes` and any data."""

import random

import pytest

from data.negatives import (_CELL_OF, _CELL_RE, KINDS_OF_SCENE, SCENE_KINDS, WORD_KINDS, hard_negative, resolve_mode,
                            scene_negative, word_negative)
from data.shapes import Obj, Scene, _scene_and_text, relation_holds


def relation_scene(colour_a="red", colour_b="blue", shape_a="circle", shape_b="square") -> Scene:
    """``a`` above ``b``."""
    return Scene("relation", [Obj(shape_a, colour_a, "small", 0.5, 0.2), Obj(shape_b, colour_b, "small", 0.5, 0.8)],
                 "above", [False, False], False)


def test_relation_reversed_keeps_every_other_word():
    scene = relation_scene()
    assert relation_holds(*scene.objects, "above")
    negatives = {scene_negative("a red circle above a blue square on white", scene, "relation", random.Random(i))
                 for i in range(20)}
    assert negatives == {f"a red circle {word} a blue square on white" for word in ("below", "under", "beneath")}
    # Worded from the other object ("the square is below the circle"), the reversal says "above" or "over".
    negative = scene_negative("a blue square to the right of a red circle", scene, "relation", random.Random(0))
    assert negative in ("a blue square to the left of a red circle", "a blue square left of a red circle")


def test_swap_exchanges_colours_or_shapes_when_the_colours_agree():
    assert (scene_negative("a red circle above a blue square", relation_scene(), "swap", random.Random(0))
            == "a blue circle above a red square")
    same_colour = relation_scene(colour_b="red")
    assert (scene_negative("a red circle above a large red square", same_colour, "swap", random.Random(0))
            == "a red square above a large red circle")
    # Articles follow the new word, so no negative gives itself away by "a orange".
    orange = relation_scene(colour_a="orange")
    assert (scene_negative("An orange circle above a blue square", orange, "swap", random.Random(0))
            == "A blue circle above an orange square")


def test_count_changes_by_one_within_the_counts_drawn():
    scene = Scene("count", [Obj("square", "green", "small", x, 0.5) for x in (0.2, 0.5, 0.8)], None, [False] * 3, False)
    assert {scene_negative("three green squares", scene, "count", random.Random(i)) for i in range(20)} == {
        "two green squares", "four green squares"}
    two = Scene("count", [Obj("square", "green", "small", x, 0.5) for x in (0.2, 0.8)], None, [False] * 2, False)
    assert scene_negative("there are two green squares", two, "count", random.Random(0)) == "there are three green squares"


def test_kinds_that_do_not_fit_the_scene_give_none():
    scene = relation_scene()
    assert scene_negative("a red circle above a blue square", scene, "count", random.Random(0)) is None
    assert scene_negative("a red circle above a blue square", scene, "position", random.Random(0)) is None
    with pytest.raises(ValueError, match="not one of"):
        scene_negative("a red circle", scene, "colour", random.Random(0))


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_every_caption_shapes_writes_has_its_negatives(split):
    """The lexicon covers the caption grammar: each kind that fits a scene edits its caption, and the edit
    changes what the caption states (another cell for position, never the caption itself)."""
    for index in range(300):
        scene, text = _scene_and_text(0, split, index)  # what example() draws, without rendering the picture
        for kind in KINDS_OF_SCENE[scene.kind]:
            negative = scene_negative(text, scene, kind, random.Random(index))
            assert negative is not None and negative != text, (kind, text)
            if kind == "position":
                cells = [_CELL_OF[m.group(0).lower()] for m in (_CELL_RE.search(t) for t in (text, negative))]
                assert cells[0] != cells[1], (text, negative)
        assert hard_negative(text, scene.to_dict(), random.Random(index), "scene") is not None


def test_word_negatives():
    rng = random.Random(0)
    assert word_negative("grinning face with big eyes", rng, "opposite") in (
        "grinning face without big eyes", "grinning face with small eyes")
    assert word_negative("man in suit: light skin tone", rng, "opposite") in (
        "woman in suit: light skin tone", "man in suit: dark skin tone")
    assert word_negative("Left arrow", rng, "opposite") == "Right arrow"
    assert word_negative("keycap: 3", rng, "number") in ("keycap: 2", "keycap: 4")
    assert word_negative("two red circles", rng, "number") in ("one red circles", "three red circles")
    assert word_negative("a red circle above a blue square", rng, "swap") == "a blue circle above a red square"
    assert word_negative("red apple", rng, "swap") == "apple red"
    for kind in WORD_KINDS:
        assert word_negative("dog", rng, kind) is None
    assert word_negative("dog", rng) is None
    for i in range(50):  # any kind that applies; never the caption itself
        negative = word_negative("a small cat on the left of a big dog", random.Random(i))
        assert negative is not None and negative != "a small cat on the left of a big dog"


def test_modes():
    assert resolve_mode("auto", "shapes") == "scene" and resolve_mode("auto", "openmoji") == "words"
    assert resolve_mode("none", "shapes") == "none"
    scene, text = _scene_and_text(0, "train", 3)
    assert hard_negative(text, scene.to_dict(), random.Random(0), "none") is None
    assert hard_negative("a red circle on the left", None, random.Random(0), "scene") is not None  # words fallback
    assert set(SCENE_KINDS) == {kind for kinds in KINDS_OF_SCENE.values() for kind in kinds}


def test_word_alternatives_are_every_single_edit_once():
    from data.negatives import word_alternatives

    relation = "a red triangle above a yellow diamond, on a white background"
    assert word_alternatives(relation) == [
        "a red triangle below a yellow diamond, on a white background",
        "a red triangle above a yellow diamond, on a black background",
        "a yellow triangle above a red diamond, on a white background",
        "a white triangle above a yellow diamond, on a red background",
        "a red triangle above a white diamond, on a yellow background"]
    assert word_alternatives("Three red triangles") == ["Two red triangles", "Four red triangles"]
    assert word_alternatives("0 cats") == ["1 cats"]
    assert word_alternatives("a yellow diamond") == []  # nothing to edit: no content-word swaps
