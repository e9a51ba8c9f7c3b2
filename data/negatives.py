"""Hard negatives: captions a word or two away from the true one that no longer describe the picture.

A contrastive scorer trained on random batches learns what is in a picture (colours, shapes, words that
name objects) but rarely meets two captions that differ only in how the same words are arranged: "a red
circle above a blue square" against "a blue circle above a red square". NegCLIP (Yuksekgonul et al., 2023,
"When and why vision-language models behave like bags-of-words") adds such swapped captions to each
image's softmax as negatives; this module makes them, one caption at a time, by editing the caption's words:

- ``scene`` negatives, for `shapes`, where the scene (data/shapes.py) says exactly what the caption
  states, so every edit is certainly false: ``relation`` (the relation reversed: "above" -> "below"),
  ``swap`` (the two objects' colours swapped, or their shapes where the colours agree), ``count`` (the
  number changed by one, within 2-4), ``position`` (another of the 3x3 cells), ``attribute`` (a single
  object's colour or shape changed). Each keeps the rest of the caption word for word.
- ``words`` negatives, for any captioned data (a folder, openmoji): ``opposite`` (a word replaced by its
  opposite from a small English lexicon: left/right, above/below, man/woman, light/dark, with/without ...),
  ``number`` (a number word or digit changed by one), ``swap`` (two colour words swapped, else two content
  words). These are usually, not certainly, false ("a red and blue flag" swapped is the same flag): a
  little label noise, the price of needing nothing but the caption.

Every function returns None where its kind does not apply (a caption with no number has no ``number``
negative), and never returns the caption itself.
"""

from __future__ import annotations

import random
import re

from data.shapes import _CELL_PHRASES, _NUMBER_WORDS, _RELATION_PHRASES, COLOURS, COUNTS, SHAPES, Scene, converse

__all__ = ["MODES", "SCENE_KINDS", "WORD_KINDS", "KINDS_OF_SCENE", "scene_negative", "word_negative",
           "word_alternatives", "hard_negative", "resolve_mode"]

MODES = ("auto", "scene", "words", "none")
SCENE_KINDS = ("relation", "swap", "count", "position", "attribute")
WORD_KINDS = ("opposite", "number", "swap")
# The negative kinds each kind of `shapes` scene has.
KINDS_OF_SCENE = {"single": ("attribute",), "position": ("position",), "relation": ("relation", "swap"),
                  "count": ("count",)}

# ------------------------------------------------------------------------------------------ phrases


def _match_case(word: str, like: str) -> str:
    return word.capitalize() if like[:1].isupper() else word


def _pattern(phrases) -> re.Pattern:
    """A regex matching any of ``phrases`` as whole words, the longest first ("to the left of" before "left of")."""
    alternatives = sorted(set(phrases), key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(p) for p in alternatives) + r")\b", re.IGNORECASE)


_RELATION_OF = {phrase: relation for relation, phrases in _RELATION_PHRASES.items() for phrase in phrases}
_CELL_OF = {phrase: cell for cell, phrases in _CELL_PHRASES.items() for phrase in phrases}
_RELATION_RE = _pattern(_RELATION_OF)
_CELL_RE = _pattern(_CELL_OF)
_COUNT_OF = {word: n for n, word in _NUMBER_WORDS.items()}
_COUNT_RE = _pattern(_COUNT_OF)


_ARTICLE_RE = re.compile(r"\b(a|an|A|An) $")


def _before(prefix: str, word: str) -> str:
    """``prefix``, which ``word`` follows, with a final article fitted to the word ("a orange" -> "an orange"),
    so that no negative gives itself away by a grammar slip true captions never make."""
    match = _ARTICLE_RE.search(prefix)
    if match is None or not word:
        return prefix
    article = "an" if word[0].lower() in "aeiou" else "a"
    return prefix[:match.start()] + _match_case(article, match.group(1)) + " "


def _replace(text: str, match: re.Match, new: str) -> str:
    return _before(text[:match.start()], new) + new + text[match.end():]


def _swap_words(text: str, first: re.Match, second: re.Match) -> str:
    """``text`` with the spans of two non-overlapping matches exchanged."""
    a, b = sorted((first, second), key=lambda m: m.start())
    middle = _before(text[a.end():b.start()], a.group(0))
    return _before(text[:a.start()], b.group(0)) + b.group(0) + middle + a.group(0) + text[b.end():]


# ------------------------------------------------------------------------------------ `shapes` scenes


def scene_negative(text: str, scene: Scene, kind: str, rng: random.Random) -> str | None:
    """``text``, the caption of ``scene``, edited into a false caption of ``kind`` (SCENE_KINDS), or None.

    None where the kind does not fit the scene (a ``count`` negative for a relation scene) or the caption
    does not hold the words the edit needs (a caption not written by ``shapes.describe``).
    """
    if kind not in SCENE_KINDS:
        raise ValueError(f"negative kind {kind!r} is not one of {SCENE_KINDS}")
    if kind not in KINDS_OF_SCENE[scene.kind]:
        return None
    if kind == "relation":
        match = _RELATION_RE.search(text)
        if match is None:
            return None
        reversed_relation = converse(_RELATION_OF[match.group(0).lower()])
        return _replace(text, match, rng.choice(_RELATION_PHRASES[reversed_relation]))
    if kind == "position":
        match = _CELL_RE.search(text)
        if match is None:
            return None
        cell = rng.choice([c for c in _CELL_PHRASES if c != _CELL_OF[match.group(0).lower()]])
        return _replace(text, match, rng.choice(_CELL_PHRASES[cell]))
    if kind == "count":
        match = _COUNT_RE.search(text)
        if match is None:
            return None
        n = _COUNT_OF[match.group(0).lower()]
        return _replace(text, match, _NUMBER_WORDS[rng.choice([m for m in (n - 1, n + 1) if m in COUNTS])])
    if kind == "swap":
        first, second = scene.objects
        words = ((first.colour, second.colour) if first.colour != second.colour else (first.shape, second.shape))
        matches = [m for m in _pattern(words).finditer(text)]
        if len(matches) != 2 or matches[0].group(0).lower() == matches[1].group(0).lower():
            return None
        return _swap_words(text, *matches)
    # attribute: a single object's colour (or, half the time, its shape) replaced by another
    obj = scene.objects[0]
    if rng.random() < 0.5:
        old, new = obj.shape, rng.choice([s for s in SHAPES if s != obj.shape])
    else:
        old, new = obj.colour, rng.choice([c for c in COLOURS if c != obj.colour])
    match = _pattern([old]).search(text)
    return None if match is None else _replace(text, match, new)


# ------------------------------------------------------------------------------------ any caption

_OPPOSITE_PAIRS = (
    ("left", "right"), ("top", "bottom"), ("above", "below"), ("over", "under"), ("up", "down"),
    ("upper", "lower"), ("upward", "downward"), ("front", "back"), ("inside", "outside"), ("before", "after"),
    ("first", "last"), ("big", "small"), ("large", "little"), ("tall", "short"), ("wide", "narrow"),
    ("open", "closed"), ("full", "empty"), ("light", "dark"), ("black", "white"), ("day", "night"),
    ("man", "woman"), ("men", "women"), ("boy", "girl"), ("male", "female"), ("old", "young"), ("hot", "cold"),
    ("happy", "sad"), ("smiling", "frowning"), ("with", "without"), ("plus", "minus"), ("north", "south"),
    ("east", "west"), ("increasing", "decreasing"), ("high", "low"), ("fast", "slow"), ("new", "old"),
)
_OPPOSITE: dict[str, list[str]] = {}
for _a, _b in _OPPOSITE_PAIRS:
    _OPPOSITE.setdefault(_a, []).append(_b)
    _OPPOSITE.setdefault(_b, []).append(_a)
_OPPOSITE_RE = _pattern(_OPPOSITE)
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
            "twelve")
_NUMBER_RE = re.compile(r"\b(" + "|".join(_NUMBERS) + r"|\d+)\b", re.IGNORECASE)
_COLOUR_WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "brown", "black", "white", "grey",
                 "gray", "violet", "gold", "silver")
_COLOUR_RE = _pattern(_COLOUR_WORDS)
_STOP_WORDS = frozenset(
    "a an the of on in at to and or with without for from by is are there this that it its as into onto some "
    "picture image drawing photo background".split())
_WORD_RE = re.compile(r"\b[^\W\d_]{3,}\b")


def word_negative(text: str, rng: random.Random, kind: str | None = None) -> str | None:
    """A word-swap negative of ``kind`` (WORD_KINDS; None: one of those that apply, at random), or None."""
    kinds = WORD_KINDS if kind is None else (kind,)
    if kind is not None and kind not in WORD_KINDS:
        raise ValueError(f"negative kind {kind!r} is not one of {WORD_KINDS}")
    for kind in rng.sample(kinds, len(kinds)):
        negative = _word_negative(text, rng, kind)
        if negative is not None and negative.lower() != text.lower():
            return negative
    return None


def _word_negative(text: str, rng: random.Random, kind: str) -> str | None:
    if kind == "opposite":
        matches = list(_OPPOSITE_RE.finditer(text))
        if not matches:
            return None
        match = rng.choice(matches)
        return _replace(text, match, _match_case(rng.choice(_OPPOSITE[match.group(0).lower()]), match.group(0)))
    if kind == "number":
        matches = list(_NUMBER_RE.finditer(text))
        if not matches:
            return None
        match = rng.choice(matches)
        word = match.group(0)
        if word.isdigit():
            n = int(word)
            return _replace(text, match, str(rng.choice([m for m in (n - 1, n + 1) if m >= 0])))
        n = _NUMBERS.index(word.lower())
        other = rng.choice([m for m in (n - 1, n + 1) if 0 <= m < len(_NUMBERS)])
        return _replace(text, match, _match_case(_NUMBERS[other], word))
    # swap: two different colour words, else two different content words
    for candidates in (list(_COLOUR_RE.finditer(text)),
                       [m for m in _WORD_RE.finditer(text) if m.group(0).lower() not in _STOP_WORDS]):
        pairs = [(a, b) for i, a in enumerate(candidates) for b in candidates[i + 1:]
                 if a.group(0).lower() != b.group(0).lower()]
        if pairs:
            return _swap_words(text, *rng.choice(pairs))
    return None


def word_alternatives(text: str) -> list[str]:
    """Every ``opposite`` and ``number`` negative of ``text`` and every swap of two of its colour words, each
    once, in the order of the words they change: the captions a picture of ``text`` is told apart from when
    a model's likelihood judges it (bench.structure). Content-word swaps are left out: "a diamond yellow" is no
    caption a model was trained on."""
    found = []
    for match in _OPPOSITE_RE.finditer(text):
        found += [_replace(text, match, _match_case(other, match.group(0)))
                  for other in _OPPOSITE[match.group(0).lower()]]
    for match in _NUMBER_RE.finditer(text):
        word = match.group(0)
        if word.isdigit():
            found += [_replace(text, match, str(m)) for m in (int(word) - 1, int(word) + 1) if m >= 0]
        else:
            n = _NUMBERS.index(word.lower())
            found += [_replace(text, match, _match_case(_NUMBERS[m], word)) for m in (n - 1, n + 1)
                      if 0 <= m < len(_NUMBERS)]
    colours = list(_COLOUR_RE.finditer(text))
    found += [_swap_words(text, a, b) for i, a in enumerate(colours) for b in colours[i + 1:]
              if a.group(0).lower() != b.group(0).lower()]
    return [t for t in dict.fromkeys(found) if t.lower() != text.lower()]


# ------------------------------------------------------------------------------------------ the stage


def resolve_mode(mode: str, data: str) -> str:
    """``auto`` is ``scene`` on `shapes` and ``words`` on any other data; other modes are themselves."""
    if mode not in MODES:
        raise ValueError(f"hard-negative mode {mode!r} is not one of {MODES}")
    if mode == "auto":
        return "scene" if data == "shapes" else "words"
    return mode


def hard_negative(text: str, scene: dict | None, rng: random.Random, mode: str) -> str | None:
    """One hard negative for a training pair, of a kind drawn at random among those that apply, or None.

    ``mode`` is ``scene`` (needs ``scene``, a ``Scene.to_dict()``; falls back to ``words`` without one),
    ``words`` or ``none``.
    """
    if mode == "none":
        return None
    if mode == "scene" and scene is not None:
        parsed = Scene.from_dict(scene)
        kinds = KINDS_OF_SCENE[parsed.kind]
        for kind in rng.sample(kinds, len(kinds)):
            negative = scene_negative(text, parsed, kind, rng)
            if negative is not None:
                return negative
        return None
    return word_negative(text, rng)
