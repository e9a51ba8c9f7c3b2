"""The oracle: read a `shapes` picture back into objects, and check the attributes a caption states.

Reading works at any S >= 32 with thresholds relative to S, and never looks at how the picture was made:

1. Coverage. Every pixel is explained as a blend of white and one palette colour, p = a*c + (1-a)*white,
   on the palette line nearest to it; ``a`` is the pixel's coverage. Anti-aliased rims become fractional
   coverage instead of stray colours.
2. Objects. Pixels with a >= 0.5 form 4-connected components; each grows over the rim pixels around it
   (a > 0), and components whose total coverage is under a quarter of the smallest object's area are
   specks and are dropped.
3. Attributes. Colour: the palette entry nearest to the mean of the component's core pixels. Shape: each
   of the four shapes is fitted (side d from the covered area, centre from the centroid) and drawn as an
   ideal anti-aliased template; the one that differs least from the picture wins, and a component that no
   template explains within SHAPE_ERROR_LIMIT reads as "unknown". Size: the fitted d against the geometric
   mean of the two sizes. Centre: the fitted shape's centre, as fractions of the canvas.

`check(scene, image)` holds when every attribute the caption states holds (DESIGN.md): the number of
objects; each object's colour and shape; its size where a size word was given; the 3x3 cell where a
position was given; the relation by `data.shapes.relation_holds`. `check_details` gives each one.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from data.shapes import COLOURS, SHAPES, SIZES, SQUARE_SIDE, Obj, Scene, cell_of, relation_holds

__all__ = ["Reading", "read_objects", "read_scene", "check", "check_details", "coverage", "UNKNOWN"]

UNKNOWN = "unknown"
ALPHA_THRESHOLD = 0.5  # coverage that makes a pixel part of an object's body
RIM_STEPS = 3  # pixels of anti-aliased (or blurred) rim a body grows over
CORE_ALPHA = 0.75  # pixels this covered decide the colour
MIN_AREA = 0.25 * 0.5 * min(SIZES.values()) ** 2  # a quarter of a small triangle, in canvas fractions
SIZE_THRESHOLD = math.sqrt(SIZES["small"] * SIZES["large"])  # d / S between the two sizes
SHAPE_ERROR_LIMIT = 0.4  # sum |coverage - template| / area above which no shape explains a component
TEMPLATE_SUPERSAMPLE = 4
BLURS = (0.0, 0.7, 1.4)  # Gaussian blur (sigma, pixels) of the templates: a decoder's pictures are softer
MAX_MATCHED = 8  # the largest objects read are the ones matched against a scene

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)  # (6, 3)
_PALETTE_NAMES = list(COLOURS)
# Area of each shape per unit d^2, and how far its centroid lies below its bounding-box centre per unit d.
_AREA = {"circle": math.pi / 4, "square": SQUARE_SIDE**2, "triangle": 0.5, "diamond": 0.5}
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6, "diamond": 0.0}


@dataclass(frozen=True)
class Reading:
    """One object read from a picture, with the evidence: covered area (canvas fractions) and per-shape error."""

    obj: Obj
    area: float
    shape_errors: dict[str, float]
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # the region's pixels (x0, y0, x1, y1), ends exclusive


def _pixels(image: Image.Image | torch.Tensor | np.ndarray) -> np.ndarray:
    """A PIL image, a (3, H, W) tensor in [-1, 1] or an (H, W, 3) uint8 array -> (H, W, 3) float64 in [0, 255]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image tensor (3, H, W), got {tuple(image.shape)}")
        rgb = (image.detach().float().clamp(-1, 1).cpu() + 1) * 127.5  # (3, H, W)
        return rgb.permute(1, 2, 0).double().numpy()  # (H, W, 3)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) array, got {array.shape}")
    return array.astype(np.float64)


def coverage(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB in [0, 255] -> (H, W) coverage in [0, 1]: the blend weight on the nearest palette line."""
    offset = pixels - 255.0  # (H, W, 3), white at the origin
    lines = _PALETTE - 255.0  # (6, 3)
    norms = (lines**2).sum(1)  # (6,)
    dots = offset @ lines.T  # (H, W, 6)
    alpha = np.clip(dots / norms, 0.0, 1.0)  # (H, W, 6)
    residual = (offset**2).sum(-1, keepdims=True) - 2 * alpha * dots + alpha**2 * norms  # |p - blend|^2, (H, W, 6)
    return np.take_along_axis(alpha, residual.argmin(-1)[..., None], -1)[..., 0]


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected components of a boolean (H, W) mask -> int labels, 0 outside, 1..n inside."""
    h, w = mask.shape
    none = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), none)
    while True:
        padded = np.pad(labels, 1, constant_values=none)
        neighbours = np.minimum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        neighbours = np.where(mask, neighbours, none)
        flat = np.append(neighbours.ravel(), none)
        jumped = flat[neighbours]  # pointer jumping: adopt the label of the pixel a label names
        if np.array_equal(jumped, labels):
            break
        labels = jumped
    _, compact = np.unique(labels, return_inverse=True)
    compact = compact.reshape(h, w) + 1
    return np.where(mask, compact, 0)


def _grow(labels: np.ndarray, alpha: np.ndarray, steps: int) -> np.ndarray:
    """Let each labelled body claim the unlabelled, partly covered pixels within ``steps`` of it."""
    for _ in range(steps):
        padded = np.pad(labels, 1)
        claim = np.maximum.reduce([padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:],
                                   padded[:-2, :-2], padded[:-2, 2:], padded[2:, :-2], padded[2:, 2:]])
        labels = np.where((labels == 0) & (alpha > 0), claim, labels)
    return labels


def _template(shape: str, cx: float, cy: float, d: float, x0: int, y0: int, h: int, w: int) -> np.ndarray:
    """Ideal coverage (h, w) of a shape on the pixels [y0, y0+h) x [x0, x0+w); pixel k spans [k, k+1)."""
    ss = TEMPLATE_SUPERSAMPLE
    xs = x0 + (np.arange(w * ss) + 0.5) / ss - cx  # (w*ss,)
    ys = y0 + (np.arange(h * ss) + 0.5) / ss - cy  # (h*ss,)
    dx, dy = np.abs(xs)[None, :], ys[:, None]  # (1, w*ss), (h*ss, 1)
    half = d / 2
    if shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "square":
        inside = (dx <= SQUARE_SIDE * half) & (np.abs(dy) <= SQUARE_SIDE * half)
    elif shape == "triangle":
        inside = (dy <= half) & (dx <= (dy + half) / 2)
    else:
        inside = dx + np.abs(dy) <= half
    return inside.reshape(h, ss, w, ss).mean(axis=(1, 3))  # (h, w)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (h, w) array; mass past the edges is lost, as outside a canvas."""
    if sigma == 0:
        return image

    def operator(n: int) -> np.ndarray:  # (n, n): row i spreads pixel i over its neighbours
        offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
        return np.exp(-0.5 * (offsets / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))

    return operator(image.shape[0]) @ image @ operator(image.shape[1]).T


def _read_component(pixels: np.ndarray, alpha: np.ndarray, region: np.ndarray) -> Reading:
    """Colour, shape, size and centre of the object covering ``region`` (a boolean (H, W) mask)."""
    height, width = alpha.shape
    canvas = (height + width) / 2
    weight = np.where(region, alpha, 0.0)  # (H, W)
    area = weight.sum()
    ys, xs = np.nonzero(region)
    centroid_x = (weight[ys, xs] * (xs + 0.5)).sum() / area
    centroid_y = (weight[ys, xs] * (ys + 0.5)).sum() / area

    core = region & (alpha >= CORE_ALPHA)
    if not core.any():
        core = region & (alpha >= alpha[region].max() - 1e-9)
    mean_rgb = pixels[core].mean(0)  # (3,)
    colour = _PALETTE_NAMES[int(((_PALETTE - mean_rgb) ** 2).sum(1).argmin())]

    fits = {}
    for shape in SHAPES:
        d = math.sqrt(area / _AREA[shape])
        cx, cy = centroid_x, centroid_y - _CENTROID_DROP[shape] * d
        # The window holds the component and the blurred template, cut to the canvas as the picture is.
        pad = 1 + math.ceil(3 * max(BLURS))
        x0 = max(0, min(int(xs.min()), math.floor(cx - d / 2)) - pad)
        x1 = min(width, max(int(xs.max()) + 1, math.ceil(cx + d / 2)) + pad)
        y0 = max(0, min(int(ys.min()), math.floor(cy - d / 2)) - pad)
        y1 = min(height, max(int(ys.max()) + 1, math.ceil(cy + d / 2)) + pad)
        template = _template(shape, cx, cy, d, x0, y0, y1 - y0, x1 - x0)
        observed = weight[y0:y1, x0:x1]
        error = min(np.abs(observed - _blur(template, sigma)).sum() for sigma in BLURS) / area
        fits[shape] = (float(error), d, cx, cy)
    shape = min(fits, key=lambda s: fits[s][0])
    error, d, cx, cy = fits[shape]
    size = "large" if d / canvas >= SIZE_THRESHOLD else "small"
    obj = Obj(shape if error <= SHAPE_ERROR_LIMIT else UNKNOWN, colour, size, float(cx / width), float(cy / height))
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return Reading(obj, float(area / (height * width)), {s: f[0] for s, f in fits.items()}, box)


def read_objects(image: Image.Image | torch.Tensor | np.ndarray) -> list[Reading]:
    """Every object in the picture with its evidence, largest first."""
    pixels = _pixels(image)
    height, width, _ = pixels.shape
    alpha = coverage(pixels)
    labels = _grow(_components(alpha >= ALPHA_THRESHOLD), alpha, RIM_STEPS)
    readings = []
    for label in range(1, labels.max() + 1):
        region = labels == label
        if alpha[region].sum() >= MIN_AREA * height * width:
            readings.append(_read_component(pixels, alpha, region))
    return sorted(readings, key=lambda r: -r.area)


def read_scene(image: Image.Image | torch.Tensor | np.ndarray) -> list[Obj]:
    """The objects in a picture (PIL image, or (3, H, W) tensor in [-1, 1]), largest first."""
    return [reading.obj for reading in read_objects(image)]


def _matchings(n_wanted: int, n_found: int) -> list[list[tuple[int, int]]]:
    """Every one-to-one pairing (wanted index, found index) that uses up the smaller side."""
    if n_found >= n_wanted:
        return [list(enumerate(p)) for p in itertools.permutations(range(n_found), n_wanted)]
    return [[(i, j) for j, i in enumerate(p)] for p in itertools.permutations(range(n_wanted), n_found)]


def _judge(scene: Scene, found: list[Obj], pairs: list[tuple[int, int]]) -> dict[str, bool]:
    """The stated attributes under one pairing of the scene's objects with the ones read."""
    wanted = scene.objects
    whole = len(pairs) == len(wanted)
    matched = {i: found[j] for i, j in pairs}
    details = {
        "count": len(found) == len(wanted),
        "colour": whole and all(found[j].colour == wanted[i].colour for i, j in pairs),
        "shape": whole and all(found[j].shape == wanted[i].shape for i, j in pairs),
    }
    if any(scene.size_stated):
        details["size"] = all(i in matched and matched[i].size == wanted[i].size
                              for i, stated in enumerate(scene.size_stated) if stated)
    if scene.position_stated:
        details["position"] = whole and all(cell_of(found[j].x, found[j].y) == cell_of(wanted[i].x, wanted[i].y)
                                            for i, j in pairs)
    if scene.relation is not None:
        details["relation"] = whole and relation_holds(matched[0], matched[1], scene.relation)
    return details


def check_details(scene: Scene, image: Image.Image | torch.Tensor | np.ndarray) -> dict[str, bool]:
    """Each stated attribute (count, colour, shape, and size / position / relation where stated) -> holds?

    Objects read are paired with the scene's in the way that satisfies the most attributes.
    """
    found = read_scene(image)[:MAX_MATCHED]
    best = _judge(scene, found, [])
    for pairs in _matchings(len(scene.objects), len(found)):
        details = _judge(scene, found, pairs)
        if sum(details.values()) > sum(best.values()):
            best = details
        if all(best.values()):
            break
    return best


def check(scene: Scene, image: Image.Image | torch.Tensor | np.ndarray) -> bool:
    """Whether every attribute the scene's caption states holds in the picture."""
    return all(check_details(scene, image).values())
