"""The built-in `shapes` set: coloured shapes on a white canvas, each picture beside its caption and scene.

The set follows ../shared/DESIGN.md ("The `shapes` set"). A scene is size-independent structured data
(object centres are fractions of the canvas); `render` draws it at any S, `describe` words it, and
`example(seed, split, index)` derives both from a generator seeded by a stable hash, so example `i` of a
split is the same on every machine and every run. Four kinds of scene:

- single:   one object ("a large red circle");
- position: one object and the 3x3 cell holding its centre ("a red circle in the top left");
- relation: two objects and how they lie ("a small blue square to the left of a yellow triangle");
- count:    2 to 4 identical objects ("three green diamonds").

Held-out split. Four colour-shape pairs (HELDOUT_PAIRS: each shape once, four distinct colours) and four
relation triples (HELDOUT_RELATIONS) never occur in the "train" and "valid" splits; a triple is held out
together with its converse ("circle above square" also withholds "square below circle", the same picture
worded from the other side). Every "heldout" scene contains one: a single, position or count scene's
object is a held-out pair; a relation scene has a held-out pair in one object or a held-out triple.

Generated scenes keep a small margin from every decision boundary (cell borders, the relation rule), so
the words are never ambiguous; the rules themselves (`cell_of`, `relation_holds`) are exact and are
what the oracle checks.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

from checkpoint import atomic_write

__all__ = [
    "COLOURS", "SHAPES", "SIZES", "KINDS", "SPLITS", "RELATIONS", "CELLS", "HELDOUT_PAIRS", "HELDOUT_RELATIONS",
    "TRAIN_PAIRS", "Obj", "Scene", "make_scene", "describe", "render", "example", "caption", "evaluation_prompts",
    "training_prompts", "export_imagefolder", "cell_of", "relation_holds", "converse", "object_gap", "shape_vertices",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 190),
    "orange": (250, 130, 20),
}
WHITE = (255, 255, 255)
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES: dict[str, float] = {"small": 0.22, "large": 0.38}  # bounding-box side d as a fraction of S
SQUARE_SIDE = 0.9  # a square's side, as a fraction of its d
KINDS = ("single", "position", "relation", "count")
KIND_WEIGHTS = (0.1, 0.2, 0.4, 0.3)  # relations and counts, the hard kinds, most often (BENCHMARKS.md)
SPLITS = ("train", "valid", "heldout")  # "valid": the training distribution, a separate stream of examples
RELATIONS = ("left of", "right of", "above", "below")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
COUNTS = (2, 3, 4)

# Each shape once, four distinct colours; each relation once, each shape twice.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (("red", "triangle"), ("green", "square"), ("blue", "circle"),
                                              ("yellow", "diamond"))
HELDOUT_RELATIONS: tuple[tuple[str, str, str], ...] = (("circle", "above", "square"), ("triangle", "left of", "circle"),
                                                       ("diamond", "below", "triangle"), ("square", "right of", "diamond"))
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS)

MIN_GAP = 2 / 32  # objects are >= 2 px apart at every S >= 32 (4 px at the default S = 64)
RELATION_MIN_SHIFT = 0.15  # the rule: centres differ by >= 0.15 S along the relation's axis ...
RELATION_MARGIN = 0.03  # ... generated scenes clear both halves of the rule by this much
CELL_MARGIN = 0.07  # a stated position's centre lies this far inside its cell: in the middle 58% of it (BENCHMARKS.md)
# Bumped whenever the scene drawn for an index changes (2: CELL_MARGIN 0.02 -> 0.07; 3: KIND_WEIGHTS from
# (0.3, 0.25, 0.25, 0.2)); code caches key on it, so a run's cache of older scenes is encoded again rather
# than trained on.
SCENES_VERSION = 3
P_SIZE_STATED = 0.5
SUPERSAMPLE = 4
CIRCLE_SEGMENTS = 128
MAX_LAYOUTS = 1000

_CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class Obj:
    """One object: shape, colour, size word and centre as fractions of the canvas (x right, y down)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float


@dataclass
class Scene:
    """What a picture holds and which attributes its caption states.

    ``relation`` (relation scenes only) says how ``objects[0]`` lies relative to ``objects[1]``;
    ``size_stated[i]`` whether object i's size word is in the caption; ``position_stated`` whether the
    3x3 cell of the (single) object is.
    """

    kind: str
    objects: list[Obj]
    relation: str | None
    size_stated: list[bool]
    position_stated: bool

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"scene kind {self.kind!r} is not one of {KINDS}")
        for obj in self.objects:
            if obj.shape not in SHAPES or obj.colour not in COLOURS or obj.size not in SIZES:
                raise ValueError(f"object {obj} has a shape, colour or size the set does not know")
        if len(self.size_stated) != len(self.objects):
            raise ValueError(f"size_stated has {len(self.size_stated)} entries for {len(self.objects)} objects")
        if (self.relation is not None) != (self.kind == "relation") or self.relation not in (None, *RELATIONS):
            raise ValueError(f"relation {self.relation!r} does not fit a {self.kind} scene")
        if self.position_stated and self.kind != "position":
            raise ValueError(f"a {self.kind} scene does not state a position")
        counts = {"single": (1,), "position": (1,), "relation": (2,), "count": COUNTS}[self.kind]
        if len(self.objects) not in counts:
            raise ValueError(f"a {self.kind} scene holds {counts} objects, not {len(self.objects)}")
        if self.kind == "count" and len({(o.shape, o.colour, o.size) for o in self.objects}) != 1:
            raise ValueError("a count scene's objects must be identical in shape, colour and size")

    def to_dict(self) -> dict:
        """Plain JSON-able data; ``Scene.from_dict`` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        """Rebuild a scene from ``to_dict`` output (or the same data read back from JSON)."""
        objects = [Obj(**o) for o in d["objects"]]
        return cls(d["kind"], objects, d["relation"], [bool(s) for s in d["size_stated"]], bool(d["position_stated"]))


# ---------------------------------------------------------------------------------------------- rules


def cell_of(x: float, y: float) -> str:
    """The 3x3 grid cell holding the point (x, y), in canvas fractions."""
    row, col = min(int(y * 3), 2), min(int(x * 3), 2)
    return CELLS[3 * max(row, 0) + max(col, 0)]


def converse(relation: str) -> str:
    """The same arrangement seen from the other object: "left of" <-> "right of", "above" <-> "below"."""
    return _CONVERSE[relation]


def _shift(a: Obj, b: Obj, relation: str) -> tuple[float, float]:
    """(along, across): how far b lies from a in the relation's direction, and the other axis's distance."""
    dx, dy = b.x - a.x, b.y - a.y
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along, abs(across)


def relation_holds(a: Obj, b: Obj, relation: str) -> bool:
    """Whether ``a`` is ``relation`` ``b``: centres differ by >= 0.15 along the axis, and by more than across."""
    along, across = _shift(a, b, relation)
    return along >= RELATION_MIN_SHIFT and along > across


# ------------------------------------------------------------------------------------------- geometry


def shape_vertices(shape: str, x: float, y: float, d: float) -> list[tuple[float, float]]:
    """Outline of a shape with bounding-box side ``d`` centred at (x, y); a circle is a fine polygon."""
    h = d / 2
    if shape == "circle":
        return [(x + h * math.cos(t), y + h * math.sin(t))
                for t in (2 * math.pi * k / CIRCLE_SEGMENTS for k in range(CIRCLE_SEGMENTS))]
    if shape == "square":
        s = SQUARE_SIDE * h
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if shape == "triangle":
        return [(x, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "diamond":
        return [(x, y - h), (x + h, y), (x, y + h), (x - h, y)]
    raise ValueError(f"unknown shape {shape!r}")


def _segment_distance(p: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    (px, py), (ax, ay), (bx, by) = p, a, b
    ex, ey = bx - ax, by - ay
    t = max(0.0, min(1.0, ((px - ax) * ex + (py - ay) * ey) / (ex * ex + ey * ey)))
    return math.hypot(px - ax - t * ex, py - ay - t * ey)


def _point_polygon_distance(p: tuple[float, float], poly: list[tuple[float, float]]) -> float:
    """Distance from p to a convex polygon in either winding (0 inside: p is on one side of every edge)."""
    edges = list(zip(poly, poly[1:] + poly[:1]))
    sides = {(bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax) > 0 for (ax, ay), (bx, by) in edges}
    return 0.0 if len(sides) == 1 else min(_segment_distance(p, a, b) for a, b in edges)


def _polygons_overlap(p: list[tuple[float, float]], q: list[tuple[float, float]]) -> bool:
    """Separating-axis test for two convex polygons."""
    for poly in (p, q):
        for (ax, ay), (bx, by) in zip(poly, poly[1:] + poly[:1]):
            nx, ny = ay - by, bx - ax
            proj_p = [nx * x + ny * y for x, y in p]
            proj_q = [nx * x + ny * y for x, y in q]
            if max(proj_p) < min(proj_q) or max(proj_q) < min(proj_p):
                return False
    return True


def object_gap(a: Obj, b: Obj) -> float:
    """Exact distance between two objects' outlines, in canvas fractions (<= 0 when they overlap)."""
    ha, hb = SIZES[a.size] / 2, SIZES[b.size] / 2
    if a.shape == "circle" and b.shape == "circle":
        return math.hypot(a.x - b.x, a.y - b.y) - ha - hb
    if b.shape == "circle":
        a, b, ha, hb = b, a, hb, ha
    poly_b = shape_vertices(b.shape, b.x, b.y, 2 * hb)
    if a.shape == "circle":
        return _point_polygon_distance((a.x, a.y), poly_b) - ha
    poly_a = shape_vertices(a.shape, a.x, a.y, 2 * ha)
    if _polygons_overlap(poly_a, poly_b):
        return 0.0
    return min(min(_point_polygon_distance(v, poly_b) for v in poly_a),
               min(_point_polygon_distance(v, poly_a) for v in poly_b))


# ------------------------------------------------------------------------------------------- scenes


def _triple_heldout(shape_a: str, relation: str, shape_b: str) -> bool:
    return ((shape_a, relation, shape_b) in HELDOUT_RELATIONS
            or (shape_b, converse(relation), shape_a) in HELDOUT_RELATIONS)


# Radii about an object's centre, per unit of d: no point of the shape lies farther than _OUTER, and
# the disc of radius _INNER lies inside it. They settle most gap tests without the exact geometry.
_OUTER = {"circle": 0.5, "square": SQUARE_SIDE / math.sqrt(2), "triangle": math.sqrt(2) / 2, "diamond": 0.5}
_INNER = {"circle": 0.5, "square": SQUARE_SIDE / 2, "triangle": 0.5 / math.sqrt(5), "diamond": 0.5 / math.sqrt(2)}
CANDIDATES = 40  # centres drawn per object before a layout restarts
UNIFORM_LAYOUTS = 5  # layouts tried with uniform centres before spreading crowded ones out

Box = tuple[float, float, float, float]  # x_lo, x_hi, y_lo, y_hi of the centre


def _apart(a: Obj, b: Obj) -> bool:
    """Whether two objects are at least MIN_GAP apart."""
    dist = math.hypot(a.x - b.x, a.y - b.y)
    da, db = SIZES[a.size], SIZES[b.size]
    if dist >= _OUTER[a.shape] * da + _OUTER[b.shape] * db + MIN_GAP:
        return True
    if dist < _INNER[a.shape] * da + _INNER[b.shape] * db + MIN_GAP:
        return False
    return object_gap(a, b) >= MIN_GAP


def _canvas_box(shape: str, size: str, placed: list[Obj]) -> Box:
    """Centres that keep the whole object inside the canvas, MIN_GAP / 2 from its edges."""
    lo = SIZES[size] * (SQUARE_SIDE if shape == "square" else 1.0) / 2 + MIN_GAP / 2
    return lo, 1 - lo, lo, 1 - lo


def _room(candidate: Obj, placed: list[Obj]) -> float:
    """Distance from a candidate centre to the nearest placed centre or to the canvas centre."""
    return min(math.hypot(candidate.x - o.x, candidate.y - o.y) for o in [*placed, Obj("", "", "", 0.5, 0.5)])


def _layout(rng: random.Random, specs: list[tuple[str, str]],
            box: Callable[[str, str, list[Obj]], Box] = _canvas_box,
            fits: Callable[[Obj, list[Obj]], bool] = lambda obj, placed: True) -> list[tuple[float, float]]:
    """Centres for objects ``specs`` = [(shape, size)], placed one by one, each inside
    ``box(shape, size, placed_so_far)`` (an empty box: no room, start again), at least MIN_GAP from the others
    and passing ``fits(candidate, placed_so_far)``.

    The first UNIFORM_LAYOUTS layouts take the first fitting centre of up to CANDIDATES uniform draws.
    A scene that keeps failing is crowded (four large objects): its later layouts take, of the fitting
    candidates, the one farthest from the objects placed and from the canvas centre, which packs them.
    """
    for attempt in range(MAX_LAYOUTS):
        placed: list[Obj] = []
        for shape, size in specs:
            x_lo, x_hi, y_lo, y_hi = box(shape, size, placed)
            if x_lo > x_hi or y_lo > y_hi:
                break
            draws = (Obj(shape, "red", size, rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi))
                     for _ in range(CANDIDATES))
            fitting = (c for c in draws if all(_apart(c, other) for other in placed) and fits(c, placed))
            if attempt < UNIFORM_LAYOUTS:
                chosen = next(fitting, None)
            else:
                chosen = max(fitting, key=lambda c: _room(c, placed), default=None)
            if chosen is None:
                break
            placed.append(chosen)
        else:
            return [(o.x, o.y) for o in placed]
    raise RuntimeError(f"no layout found for {specs} in {MAX_LAYOUTS} tries")


def _single(rng: random.Random, heldout: bool, positioned: bool) -> Scene:
    colour, shape = rng.choice(HELDOUT_PAIRS if heldout else TRAIN_PAIRS)
    size = rng.choice(tuple(SIZES))
    box = _canvas_box
    if positioned:
        row, col = divmod(rng.randrange(len(CELLS)), 3)

        def box(shape: str, size: str, placed: list[Obj]) -> Box:
            x_lo, x_hi, y_lo, y_hi = _canvas_box(shape, size, placed)
            return (max(x_lo, col / 3 + CELL_MARGIN), min(x_hi, (col + 1) / 3 - CELL_MARGIN),
                    max(y_lo, row / 3 + CELL_MARGIN), min(y_hi, (row + 1) / 3 - CELL_MARGIN))

    [(x, y)] = _layout(rng, [(shape, size)], box)
    kind = "position" if positioned else "single"
    return Scene(kind, [Obj(shape, colour, size, x, y)], None, [rng.random() < P_SIZE_STATED], positioned)


def _relation_words(rng: random.Random, heldout: bool) -> tuple[tuple[str, str], str, tuple[str, str]]:
    """(colour, shape) of the first object, the relation, (colour, shape) of the second; never the same pair twice.

    Training scenes use training pairs and no held-out triple (nor its converse). Held-out scenes are
    half a held-out triple (any colours), half a held-out pair in one object beside any other.
    """
    while True:
        relation = rng.choice(RELATIONS)
        if heldout and rng.random() < 0.5:
            shape_a, relation, shape_b = rng.choice(HELDOUT_RELATIONS)
            pair_a, pair_b = (rng.choice(tuple(COLOURS)), shape_a), (rng.choice(tuple(COLOURS)), shape_b)
        elif heldout:
            pair_a, pair_b = rng.choice(HELDOUT_PAIRS), (rng.choice(tuple(COLOURS)), rng.choice(SHAPES))
            if rng.random() < 0.5:
                pair_a, pair_b = pair_b, pair_a
        else:
            pair_a, pair_b = rng.choice(TRAIN_PAIRS), rng.choice(TRAIN_PAIRS)
            if _triple_heldout(pair_a[1], relation, pair_b[1]):
                continue
        if pair_a != pair_b:
            return pair_a, relation, pair_b


def _relation(rng: random.Random, heldout: bool) -> Scene:
    pair_a, relation, pair_b = _relation_words(rng, heldout)
    sizes = [rng.choice(tuple(SIZES)), rng.choice(tuple(SIZES))]

    def box(shape: str, size: str, placed: list[Obj]) -> Box:
        """The second object's centre lies far enough along the relation's axis from the first's."""
        x_lo, x_hi, y_lo, y_hi = _canvas_box(shape, size, placed)
        if not placed:
            return x_lo, x_hi, y_lo, y_hi
        a, shift = placed[0], RELATION_MIN_SHIFT + RELATION_MARGIN
        return {"left of": (max(x_lo, a.x + shift), x_hi, y_lo, y_hi),
                "right of": (x_lo, min(x_hi, a.x - shift), y_lo, y_hi),
                "above": (x_lo, x_hi, max(y_lo, a.y + shift), y_hi),
                "below": (x_lo, x_hi, y_lo, min(y_hi, a.y - shift))}[relation]

    def clear(obj: Obj, placed: list[Obj]) -> bool:
        """Both halves of the rule hold with RELATION_MARGIN to spare."""
        if not placed:
            return True
        along, across = _shift(placed[0], obj, relation)
        return along >= RELATION_MIN_SHIFT + RELATION_MARGIN and along >= across + RELATION_MARGIN

    (xa, ya), (xb, yb) = _layout(rng, [(pair_a[1], sizes[0]), (pair_b[1], sizes[1])], box, clear)
    objects = [Obj(pair_a[1], pair_a[0], sizes[0], xa, ya), Obj(pair_b[1], pair_b[0], sizes[1], xb, yb)]
    stated = [rng.random() < P_SIZE_STATED, rng.random() < P_SIZE_STATED]
    return Scene("relation", objects, relation, stated, False)


def _count(rng: random.Random, heldout: bool) -> Scene:
    colour, shape = rng.choice(HELDOUT_PAIRS if heldout else TRAIN_PAIRS)
    size = rng.choice(tuple(SIZES))
    n = rng.choice(COUNTS)
    centres = _layout(rng, [(shape, size)] * n)
    stated = rng.random() < P_SIZE_STATED
    return Scene("count", [Obj(shape, colour, size, x, y) for x, y in centres], None, [stated] * n, False)


def make_scene(rng: random.Random, split: str = "train", kind: str | None = None) -> Scene:
    """Draw one scene of ``kind`` (None: drawn by KIND_WEIGHTS) from ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if kind is None:
        kind = rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    heldout = split == "heldout"
    if kind == "relation":
        return _relation(rng, heldout)
    if kind == "count":
        return _count(rng, heldout)
    return _single(rng, heldout, positioned=kind == "position")


# -------------------------------------------------------------------------------------------- words

_SIZE_WORDS = {"small": ("small", "small", "small", "little"), "large": ("large", "large", "large", "big")}
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
_CELL_PHRASES = {
    "top left": ("in the top left", "in the top left corner", "at the top left"),
    "top": ("at the top", "in the top middle"),
    "top right": ("in the top right", "in the top right corner", "at the top right"),
    "left": ("on the left", "on the left side"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "on the right side"),
    "bottom left": ("in the bottom left", "in the bottom left corner", "at the bottom left"),
    "bottom": ("at the bottom", "in the bottom middle"),
    "bottom right": ("in the bottom right", "in the bottom right corner", "at the bottom right"),
}
_RELATION_PHRASES = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
# Repeats weight the draw: most captions are the bare phrase.
_FRAMES = (("{}", "{}"), ("{}", "{}"), ("there is {}", "there are {}"), ("a picture of {}",) * 2,
           ("an image of {}",) * 2, ("a drawing of {}",) * 2)  # (one object, several)
_BACKGROUNDS = ("", "", "", ", on a white background", " on a white background", " on white")


def _with_article(phrase: str) -> str:
    """"a red circle", "an orange circle"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(obj: Obj, size_stated: bool, rng: random.Random, number: int = 1) -> str:
    """"a large red circle", or with ``number`` > 1 "three large red circles"."""
    words = [rng.choice(_SIZE_WORDS[obj.size])] if size_stated else []
    words += [obj.colour, obj.shape + ("s" if number > 1 else "")]
    phrase = " ".join(words)
    return f"{_NUMBER_WORDS[number]} {phrase}" if number > 1 else _with_article(phrase)


def describe(scene: Scene, rng: random.Random) -> str:
    """A caption that states exactly what ``scene`` says is stated, in one of several phrasings."""
    objects, stated = scene.objects, scene.size_stated
    if scene.kind == "count":
        body = _noun_phrase(objects[0], stated[0], rng, number=len(objects))
    elif scene.kind == "relation":
        first, second, relation = 0, 1, scene.relation
        if rng.random() < 0.5:  # word it from the other object: "B right of A" for "A left of B"
            first, second, relation = 1, 0, converse(scene.relation)
        body = " ".join((_noun_phrase(objects[first], stated[first], rng),
                         rng.choice(_RELATION_PHRASES[relation]),
                         _noun_phrase(objects[second], stated[second], rng)))
    else:
        body = _noun_phrase(objects[0], stated[0], rng)
        if scene.position_stated:
            body += " " + rng.choice(_CELL_PHRASES[cell_of(objects[0].x, objects[0].y)])
    frame = rng.choice(_FRAMES)[scene.kind == "count"]
    return frame.format(body) + rng.choice(_BACKGROUNDS)


# ------------------------------------------------------------------------------------ pictures and API


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw ``scene`` on a white ``size`` x ``size`` RGB canvas: at 4x, then downsampled with LANCZOS."""
    scale = SUPERSAMPLE * size
    canvas = Image.new("RGB", (scale, scale), WHITE)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        outline = shape_vertices(obj.shape, obj.x * scale, obj.y * scale, SIZES[obj.size] * scale)
        draw.polygon(outline, fill=COLOURS[obj.colour])
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def _rng(seed: int, stream: str, index: int) -> random.Random:
    """A generator that depends only on its arguments (blake2b, not Python's salted ``hash``)."""
    digest = hashlib.blake2b(f"tilecraft/shapes/{seed}/{stream}/{index}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _scene_and_text(seed: int, split: str, index: int) -> tuple[Scene, str]:
    rng = _rng(seed, split, index)
    scene = make_scene(rng, split)
    return scene, describe(scene, rng)


def example(seed: int, split: str, index: int, size: int = 64) -> dict:
    """Example ``index`` of ``split``: {"image": PIL RGB, "text": caption, "scene": Scene.to_dict()}."""
    scene, text = _scene_and_text(seed, split, index)
    return {"image": render(scene, size), "text": text, "scene": scene.to_dict()}


def caption(seed: int, split: str, index: int) -> str:
    """The caption of ``example(seed, split, index)``, without drawing the picture."""
    return _scene_and_text(seed, split, index)[1]


def _prompts(kind: str, n: int, seed: int, split: str, stream: str) -> list[tuple[str, Scene]]:
    """``n`` (caption, scene) pairs of one kind of ``split``, from the generator stream ``stream/kind``."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    prompts = []
    for index in range(n):
        rng = _rng(seed, f"{stream}/{kind}", index)
        scene = make_scene(rng, split, kind)
        prompts.append((describe(scene, rng), scene))
    return prompts


def evaluation_prompts(kind: str, n: int, seed: int = 0) -> list[tuple[str, Scene]]:
    """``n`` (caption, scene) pairs of one kind from the held-out split, for benchmarks."""
    return _prompts(kind, n, seed, "heldout", "heldout")


def training_prompts(kind: str, n: int, seed: int = 0) -> list[tuple[str, Scene]]:
    """``n`` (caption, scene) pairs of one kind from the training split (its colour-shape pairs and relation
    triples), from a stream of their own: prompts a scorer may be tuned on without seeing a held-out one."""
    return _prompts(kind, n, seed, "train", "ranking")


def export_imagefolder(out_dir: str | Path, n: int, seed: int = 0, split: str = "train", size: int = 64) -> Path:
    """Write examples 0..n-1 of ``split`` as ``%06d.png`` plus metadata.jsonl (file_name, text, scene).

    This is the imagefolder format ``--data`` accepts, so a user sees what to bring. metadata.jsonl is
    written last and atomically: a folder that has it is whole.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(n):
        item = example(seed, split, index, size)
        file_name = f"{index:06d}.png"
        atomic_write(out / file_name, lambda tmp: item["image"].save(tmp, format="PNG"))
        lines.append(json.dumps({"file_name": file_name, "text": item["text"], "scene": item["scene"]}))

    def write(tmp: str) -> None:
        Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8")

    atomic_write(out / "metadata.jsonl", write)
    return out
