"""A request's editing inputs to a :class:`sample.edit.Edit`: the service's side of ``python -m sample --init``.

The pictures come inline as base64 PNG (``init``, ``mask``), never as a path on the server. A picture's size
is read from its header and checked against the run's canvas before its pixels are decoded, so a small body
cannot unpack into a large picture. The rest is checked where ``python -m sample`` checks it
(:func:`sample.edit.completion`, :func:`sample.edit.inpainting`), its messages spoken with the request's
field names. Every refusal is a :class:`BadField` naming the field at fault.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image

from cli import UserError
from sample.edit import Edit, completion, inpainting
from serve.schemas import PictureRequest

__all__ = ["BadField", "edit_of"]

DATA_URL = re.compile(r"^data:image/png;base64,")
# The command line's flags as the request's fields, for sample/edit.py's messages.
FLAG_NAMES = {"--init": "init", "--keep-rows": "keep_rows", "--mask": "mask", "--box": "box"}


class BadField(ValueError):
    """A request field the service refuses: ``field`` names it, the message says what to do."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def edit_of(body: PictureRequest, canvas: int, token: int) -> Edit | None:
    """The edit ``body`` asks for (None for a new picture) on a run drawing ``canvas`` pixels a side in tokens of
    ``token`` pixels; a BadField for anything it cannot be."""
    for name in ("width", "height"):
        value = getattr(body, name)
        if value is not None and value != canvas:
            raise BadField(name, f"{name} {value}: this service draws {canvas}x{canvas} pictures only (wider "
                                 f"canvases slide a window over the grid, which its decoder slots do not hold); "
                                 f"leave it out, or draw them with python -m sample --width --height")
    given = [name for name in ("keep_rows", "box", "mask") if getattr(body, name) is not None]
    if body.init is None:
        if given:
            raise BadField(given[0], f"{given[0]} edits a picture: send the picture as init (base64 PNG)")
        return None
    if len(given) != 1:
        field = given[1] if given else "init"
        raise BadField(field, "init takes one of keep_rows (complete), box or mask (inpaint)"
                              + (f", not {' and '.join(given)}" if given else ""))
    init = _picture(body.init, "init", canvas)
    field = given[0]
    try:
        if field == "keep_rows":
            return completion(init, body.keep_rows, canvas=canvas, token=token)
        if field == "box":
            return inpainting(init, box=tuple(body.box), canvas=canvas, token=token)
        return inpainting(init, mask=_picture(body.mask, "mask", canvas), canvas=canvas, token=token)
    except UserError as e:
        message = str(e)
        for flag, name in FLAG_NAMES.items():
            message = message.replace(flag, name)
        raise BadField(field, message) from None


def _picture(data: str, field: str, canvas: int) -> Image.Image:
    """An RGB picture of ``canvas`` x ``canvas`` pixels from base64 PNG ``data``; a BadField naming ``field``."""
    try:
        raw = base64.b64decode(DATA_URL.sub("", data, count=1), validate=True)
    except (binascii.Error, ValueError):
        raise BadField(field, f"{field} is not base64; send the PNG's bytes base64-encoded") from None
    try:
        image = Image.open(io.BytesIO(raw), formats=["PNG"])
    except Image.DecompressionBombError:
        raise BadField(field, f"{field} is a far larger picture than the {canvas}x{canvas} this run draws; resize "
                              f"it to {canvas}x{canvas}") from None
    except (OSError, ValueError):
        raise BadField(field, f"{field} is not a PNG picture; send a PNG, base64-encoded") from None
    if image.size != (canvas, canvas):
        raise BadField(field, f"{field} is {image.size[0]}x{image.size[1]} pixels but this run draws "
                              f"{canvas}x{canvas} pictures; resize it to {canvas}x{canvas}")
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise BadField(field, f"{field} is a broken PNG ({e}); send a whole PNG, base64-encoded") from None
