"""The data layer: every ``--data`` source as (image, caption) examples, and the batches training reads.

=========================  =====================================================================
``--data``                 read as
=========================  =====================================================================
``shapes``                 :mod:`data.shapes`; item i of a split is ``shapes.example(seed, split, i)``
``openmoji``               :mod:`data.openmoji`: every named OpenMoji emoji, captioned by its names
a folder                   ``metadata.jsonl`` (else ``metadata.csv``) rows with ``file_name`` and ``text``
``*.jsonl|parquet|csv``    rows with an image (a path relative to the file, bytes, or {"bytes", "path"})
``*.tar`` shards           webdataset: ``KEY.jpg|png|jpeg|webp`` + ``KEY.txt`` per example
anything else              a Hugging Face hub name, streamed (``--image-column``, ``--text-column``)
=========================  =====================================================================

Files and shards (one path, a glob, or a brace list such as ``shards-{000..009}.tar``) are read with
``datasets.load_dataset`` into memory-mapped Arrow; images stay undecoded bytes or paths until an item
is read, so a broken file costs one example, not the run: the item is ``None``, the collate function
drops it and counts it in ``batch["skipped"]``; the training loops sum that count and report it.

Splits: "train", "valid", "heldout". ``shapes`` has all three (valid: the training distribution,
another stream; heldout: colour-shape pairs and relations never trained on). A folder with ``train/``
and ``test/`` (or ``validation/``) inside, each with its own metadata, gives "train" from the first and
"valid" and "heldout" from the second. Otherwise, for files, shards and ``openmoji``, "valid" and
"heldout" are both the rows whose *key* ranks lowest by a stable hash (BLAKE2b), ``heldout_fraction`` of
them (default 5%, at least 8 where the table has 80 rows or more), and "train" is the rest. The key is a
row's ``group`` column where there is one (every row of a group lands on the same side: variants of one
picture, several photos of one object), else its file name or shard key, else its caption: so the split
does not depend on the order of the rows, and adding rows moves few others. For a hub dataset they are
its ``validation`` (else ``test``) split.

Files. A picture's path is read only where it leads inside the data folder (the folder of the metadata or
the data files): ``..``, absolute paths and symlinks that lead out of it are refused unless
``follow_symlinks`` (``--follow-symlinks``), and only regular files are opened, never a FIFO or a device
(which would hang the run or read without end). A picture of more than ``max_pixels`` pixels
(``--max-pixels``, default 8192 x 8192) is not decoded: its header says its size first. Such rows are
skipped and counted like unreadable ones.

Captions. A caption cell may hold a list of captions (several phrasings, or COCO's five per picture):
training draws one per example, evaluation and ``texts`` read the first; the tokenizer sees them all.

Augmentation (``augment=True``, training splits of files, folders and ``openmoji``): each example is a
random square crop of 80-100% of the picture's shorter side at a random place, resized to ``size``,
drawn from a generator seeded by ``(seed, position)``, so a resumed run reads the same crops. No
flips (captions may say left and right) and no colour changes (captions name colours). ``shapes`` is
endless and never augmented.

Order. :func:`batches` reads global example positions ``start, start+1, ...`` without end. A finite
dataset maps position p to epoch ``p // n`` of a permutation drawn from a ``torch.Generator`` seeded by
``(seed, epoch)``; ``shapes`` is endless (``len`` is ``sys.maxsize``) and already random per index, so
position p is example p. Each global batch of ``batch_size`` positions is dealt to the processes, rank
r taking positions ``r::world_size``; so resuming from ``start = step * batch_size`` or changing the
number of processes or workers changes nothing about which examples a step sees.

Balance (``balance="groups"``, the training split of a table with a ``group`` column): an epoch visits every
group once, in an order drawn from ``(seed, epoch)``, and takes one of the group's rows at random, so a group
of 18 variants (one emoji in six skin tones and three genders) is read as often as a picture that stands alone,
not 18 times as often. An epoch is then as long as the number of groups. Without a group column, or with
``balance="pictures"`` (the default), every row is read once an epoch.
"""

from __future__ import annotations

import glob
import hashlib
import io
import itertools
import json
import os
import random
import re
import stat
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import datasets
import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from cli import UserError
from data import shapes
from data.images import from_pil
from data.openmoji import openmoji_rows

__all__ = ["DataError", "open_dataset", "batches", "texts", "caption_texts", "heldout_count", "DEFAULT_HELDOUT_FRACTION",
           "DEFAULT_MAX_PIXELS",
           "ShapesDataset", "TableDataset", "StreamDataset"]

IMAGE_COLUMNS = ("image", "img", "file_name", "path", "jpg", "png", "jpeg", "webp")
TEXT_COLUMNS = ("text", "caption", "prompt", "txt")
TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tar": "webdataset"}
SPLITS = ("train", "valid", "heldout")
HUB_HELDOUT_SPLITS = ("validation", "test")
PROBE_ROWS = 8  # rows tried at open time: if none of them decodes, the image column is wrong
STREAM_SHUFFLE_BUFFER = 10_000
DEFAULT_HELDOUT_FRACTION = 0.05
DEFAULT_MAX_PIXELS = 8192 * 8192  # a decoded RGB picture of 192 MiB; a 12 000 x 12 000 PNG is refused
CROP_SCALE = (0.8, 1.0)  # the augmentation's crop side, as a share of the picture's shorter side
GROUP_COLUMN = "group"
BALANCES = ("pictures", "groups")  # what a training epoch reads once each (module doc, Balance)
KEY_COLUMNS = ("file_name", "__key__", "path")
TRAIN_FOLDERS, TEST_FOLDERS = ("train",), ("test", "validation", "valid")
SOURCES_HINT = "pass 'shapes', 'openmoji', a folder with metadata.jsonl, .jsonl/.parquet/.csv files or .tar shards"


class DataError(UserError):
    """A --data source that cannot be read as it stands; the message says what to do."""


def heldout_count(n: int, fraction: float = DEFAULT_HELDOUT_FRACTION) -> int:
    """Rows of an n-row table held out: ``fraction`` of them, but at least 8 (or a tenth, in tables under 80)."""
    return max(round(n * fraction), min(8, n // 10))


def heldout_rows(keys: list[str], fraction: float) -> list[int]:
    """Indices (sorted) of the rows held out: whole keys in the order of their hash, until ``fraction``."""
    target = heldout_count(len(keys), fraction)
    groups: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    ranked = sorted(groups, key=lambda k: hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=8).digest())
    held: list[int] = []
    for key in ranked:
        if len(held) >= target:
            break
        held += groups[key]
    return sorted(held)


# ---------------------------------------------------------------- decoding rows


def _captions(value: Any) -> list[str]:
    """Every caption of a cell: a string itself, a list its non-empty strings (``[""]`` if all are empty).

    A cell that holds no text (null, a number, an object, a list of anything but strings) gives none: its
    row is skipped and counted like an unreadable picture, rather than trained on as "7" or "{'k': 'v'}".
    """
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        strings = [v for v in value if isinstance(v, str)]
        if strings and len(strings) == sum(v is not None for v in value):
            return [v for v in strings if v] or [""]
    return []


def _caption(value: Any, rng: random.Random | None = None) -> str | None:
    """A caption cell as a string: the first of a list, or one drawn by ``rng``; None where it holds no text."""
    options = _captions(value)
    if not options:
        return None
    return options[0] if rng is None or len(options) == 1 else options[rng.randrange(len(options))]


def augmentation_rng(seed: int, position: int) -> random.Random:
    """The generator of the crop and caption choice of the example at global ``position``."""
    return random.Random(seed * 1_000_003 + position)


def random_crop(rng: random.Random) -> tuple[float, float, float]:
    """``(scale, x, y)`` for :func:`data.images.from_pil`: 80-100% of the side, anywhere."""
    return rng.uniform(*CROP_SCALE), rng.random(), rng.random()


@dataclass(frozen=True)
class RowDecoder:
    """Turns a row's image cell and caption cell into an example; paths resolve against ``base_dir`` and must
    stay inside it unless ``follow_symlinks`` (module doc, Files)."""

    image_column: str
    text_column: str
    base_dir: Path
    size: int
    max_pixels: int = DEFAULT_MAX_PIXELS
    follow_symlinks: bool = False

    def read(self, row: dict, rng: random.Random | None = None) -> dict:
        """The example ``{"image": (3,S,S) in [-1,1], "text": str}``; raises if the image cannot be read or
        the caption is not text.

        With ``rng`` (augmentation) the picture is a random crop and the caption one of the cell's, drawn.
        """
        crop = random_crop(rng) if rng is not None else None
        text = _caption(row.get(self.text_column), rng)
        if text is None:
            raise ValueError(f"the caption in column {self.text_column!r} is not text")
        return {"image": self.image(row, crop), "text": text}

    def image(self, row: dict, crop: tuple[float, float, float] | None = None) -> torch.Tensor:
        """The row's picture as (3,S,S) in [-1,1] (cropped by ``crop``); raises if it cannot be read."""
        value = row.get(self.image_column)
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            source: Any = io.BytesIO(value)
        elif isinstance(value, str) and value:
            source = self._open(value)
        elif isinstance(value, Image.Image):
            return from_pil(value, self.size, crop)
        else:
            raise ValueError(f"no image in column {self.image_column!r} (found {type(value).__name__})")
        with source, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the bound is --max-pixels, below
            with Image.open(source) as img:
                width, height = img.size  # from the header: nothing is decoded yet
                if width * height > self.max_pixels:
                    raise ValueError(f"the picture is {width} x {height}, more than --max-pixels {self.max_pixels}")
                img.draft("RGB", (self.size, self.size))  # JPEG: decode at the smallest scale >= size
                return from_pil(img, self.size, crop)

    def _open(self, value: str) -> io.BufferedReader:
        """The file a path cell names, opened: inside ``base_dir`` (unless ``follow_symlinks``), a regular file."""
        path = Path(value) if os.path.isabs(value) else self.base_dir / value
        if not self.follow_symlinks:
            real, root = os.path.realpath(path), os.path.realpath(self.base_dir)
            if os.path.commonpath([real, root]) != root:
                raise ValueError(f"{value} leads outside the data folder {self.base_dir} (an absolute path, .. or a "
                                 "symlink); pass --follow-symlinks to read such files")
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting
        try:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise ValueError(f"{value} is not a regular file (a FIFO, a device or a folder)")
            return os.fdopen(descriptor, "rb")
        except BaseException:
            os.close(descriptor)
            raise

    def __call__(self, row: dict, rng: random.Random | None = None) -> dict | None:
        """:meth:`read`, or ``None`` for an unreadable image or a caption that is not text."""
        try:
            return self.read(row, rng)
        except Exception:  # noqa: BLE001 - a corrupt file can make PIL raise almost anything; skip it
            return None


# ---------------------------------------------------------------- the three kinds of dataset


class ShapesDataset(Dataset):
    """The procedural ``shapes`` set: item i is ``shapes.example(seed, split, i)``, without end."""

    endless = True

    def __init__(self, size: int, split: str, seed: int) -> None:
        self.size, self.split, self.seed = size, split, seed

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> dict:
        example = shapes.example(self.seed, self.split, index, size=self.size)
        return {"image": from_pil(example["image"], self.size), "text": example["text"], "scene": example["scene"]}


class TableDataset(Dataset):
    """Rows of a local ``datasets.Dataset`` (folder metadata, files, shards); images decoded per item."""

    endless = False

    def __init__(self, table: datasets.Dataset, decoder: RowDecoder, name: str, augment: bool = False,
                 seed: int = 0) -> None:
        self.images = table.select_columns([decoder.image_column])
        self.captions = table.select_columns([decoder.text_column])
        self.decoder, self.name, self.size = decoder, name, decoder.size
        self.augment, self.seed = augment, seed
        self.groups: list[str] | None = None  # each row's group, where the table has a group column
        self.balanced_groups: torch.Tensor | None = None  # each row's group index, where epochs balance groups

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def epoch_length(self) -> int:
        """Positions in one epoch: a row each, or a group each where epochs balance groups."""
        return len(self) if self.balanced_groups is None else int(self.balanced_groups.max()) + 1

    def row(self, index: int) -> dict:
        return {**self.images[index], **self.captions[index]}

    def caption(self, index: int) -> str | None:
        """Row ``index``'s caption as evaluation reads it (the first of a list), None where it is not text."""
        return _caption(self.captions[index][self.decoder.text_column])

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        """Row ``key``, or ``(row, position)``: with augmentation, the crop and caption of that position."""
        index, position = key if isinstance(key, tuple) else (key, None)
        rng = augmentation_rng(self.seed, position) if self.augment and position is not None else None
        return self.decoder(self.row(index), rng)


class StreamDataset:
    """A streamed hub dataset (a ``datasets.IterableDataset``); :func:`batches` and :func:`texts` read it."""

    endless = True

    def __init__(self, stream: datasets.IterableDataset, decoder: RowDecoder, name: str) -> None:
        self.stream, self.decoder, self.name, self.size = stream, decoder, name, decoder.size

    def __len__(self) -> int:
        return sys.maxsize


# ---------------------------------------------------------------- opening a source


@dataclass(frozen=True)
class TableOptions:
    """How a table source becomes a split: columns, held-out share, augmentation."""

    size: int
    split: str
    image_column: str | None = None
    text_column: str | None = None
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
    augment: bool = False
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    follow_symlinks: bool = False
    balance: str = "pictures"


def open_dataset(data: str, size: int, split: str = "train", image_column: str | None = None,
                 text_column: str | None = None, seed: int = 0, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                 augment: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                 follow_symlinks: bool = False,
                 balance: str = "pictures") -> ShapesDataset | TableDataset | StreamDataset:
    """The ``--data`` source as examples ``{"image": (3,size,size) in [-1,1], "text": str}`` (see module doc).

    ``seed`` picks the ``shapes`` stream and the augmentation's draws. ``augment`` and ``balance`` apply to the
    "train" split of tables only. ``max_pixels`` and ``follow_symlinks``: see the module doc (Files). Raises
    :class:`DataError` for a path that does not exist, a folder without metadata, a missing column or an
    empty dataset.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if size < 1:
        raise DataError(f"--size must be a positive number of pixels, got {size}")
    if not 0 < heldout_fraction < 1:
        raise DataError(f"--heldout-fraction must lie between 0 and 1, got {heldout_fraction}")
    if max_pixels < 1:
        raise DataError(f"--max-pixels must be >= 1, got {max_pixels}")
    if balance not in BALANCES:
        raise DataError(f"--balance must be one of {', '.join(BALANCES)}, got {balance!r}")
    if data == "shapes":
        if image_column or text_column:
            raise DataError("--image-column and --text-column name columns of a file source; shapes has none")
        return ShapesDataset(size, split, seed)
    options = TableOptions(size, split, image_column, text_column, heldout_fraction, augment and split == "train", seed,
                           max_pixels, follow_symlinks, balance if split == "train" else "pictures")
    if data == "openmoji":
        return _open_openmoji(options)
    path = Path(data).expanduser()
    if path.is_dir():
        return _open_folder(path, options)
    files = _expand(data)
    if files:
        return _open_files(data, files, options)
    if _is_hub_name(data):
        return _open_hub(data, size, split, image_column, text_column, max_pixels)
    raise DataError(f"--data {data}: no such file or folder; {SOURCES_HINT}")


def _open_openmoji(options: TableOptions) -> TableDataset:
    # Drawn at twice the side, so that the augmentation's crops and the final resize stay sharp.
    table = datasets.Dataset.from_dict(openmoji_rows(2 * options.size))
    return _table_dataset(table, "openmoji", Path("."), options)


def _metadata(folder: Path) -> Path | None:
    return next((folder / n for n in ("metadata.jsonl", "metadata.csv") if (folder / n).is_file()), None)


def _open_folder(folder: Path, options: TableOptions) -> TableDataset:
    metadata = _metadata(folder)
    if metadata is None:
        train = next((folder / n for n in TRAIN_FOLDERS if _metadata(folder / n)), None)
        test = next((folder / n for n in TEST_FOLDERS if _metadata(folder / n)), None)
        if train is not None and test is not None:
            part = train if options.split == "train" else test
            metadata = _metadata(part)
            table = _load_table(TABLE_BUILDERS[metadata.suffix], [metadata], str(metadata), options.text_column)
            return _table_dataset(table, str(metadata), part, options, whole=True)
        inside = [n for n in (*TRAIN_FOLDERS, *TEST_FOLDERS) if (folder / n).is_dir()]
        hint = (f"it has {'/'.join(inside)}/ inside: give both train/ and test/ (or validation/) a "
                f"metadata.jsonl, or " if inside else "")
        raise DataError(f"--data {folder}: the folder has no metadata.jsonl or metadata.csv; {hint}add one with a "
                        f"file_name and a text column per image (python -m train export writes an example), "
                        f"or pass its data files themselves ({folder}/*.parquet, {folder}/*.tar)")
    table = _load_table(TABLE_BUILDERS[metadata.suffix], [metadata], str(metadata), options.text_column)
    return _table_dataset(table, str(metadata), folder, options)


def _open_files(data: str, files: list[Path], options: TableOptions) -> TableDataset:
    suffixes = sorted({f.suffix.lower() for f in files})
    if len(suffixes) > 1 or suffixes[0] not in TABLE_BUILDERS:
        raise DataError(f"--data {data}: cannot read {'/'.join(suffixes)} files; {SOURCES_HINT}")
    table = _load_table(TABLE_BUILDERS[suffixes[0]], files, data, options.text_column)
    return _table_dataset(table, data, files[0].parent, options)


def _load_table(builder: str, files: list[Path], name: str, text_column: str | None = None) -> datasets.Dataset:
    """``datasets.load_dataset(builder)`` on local files (JSON: :func:`_read_json`), its failures as one-line
    DataErrors."""
    if all(f.stat().st_size == 0 for f in files):
        raise DataError(f"--data {name}: the file is empty; it needs rows with an image and a caption")
    if builder == "json":
        return _read_json(files, name, text_column)
    data_files = {"train": [str(f) for f in files]}
    try:
        table = datasets.load_dataset(builder, data_files=data_files, split="train")
    except Exception as e:  # noqa: BLE001 - datasets wraps parse errors of every format differently
        cause = e.__cause__ or e.__context__ or e
        if "corresponds to no data" in str(e):
            raise DataError(f"--data {name}: the dataset is empty; it needs rows with an image and a caption") from None
        hint = "every key of a shard needs the same extensions, e.g. .jpg and .txt" if builder == "webdataset" \
            else f"check that it is valid {builder}"
        raise DataError(f"--data {name}: cannot read it ({_one_line(cause)}); {hint}") from None
    # Keep images undecoded: bytes or paths, read per item so a broken file is skipped, not fatal.
    for column, feature in table.features.items():
        if isinstance(feature, datasets.Image):
            table = table.cast_column(column, datasets.Image(decode=False))
    return table


_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8
_REPORTED: set[str] = set()  # sources whose skipped rows were announced in this process


def _read_json(files: list[Path], name: str, text_column: str | None) -> datasets.Dataset:
    """JSON lines (or a JSON list of objects) as a table, read here rather than by ``datasets``.

    pyarrow's reader takes bytes that are not UTF-8 into a string column and fails only when the column is
    read, so one such row ended a run at whatever step met it, and a caption column that mixes text and
    numbers refused the whole file. Here a value that is not UTF-8 becomes null, and so does a caption that
    is not text (a number, an object, a list of those); such rows are kept, then skipped and counted when
    read, like an unreadable picture, and announced once with their number. A line that is not a JSON
    object is refused with its number.
    """
    rows: list[dict] = []
    places: list[str] = []  # where each row is: "line N of PATH"
    undecodable: list[int] = []  # rows, 0-based over all files
    for path in files:
        text = path.read_bytes().decode("utf-8", "surrogateescape").removeprefix("\ufeff")
        if text.lstrip().startswith("["):
            try:
                values = [(f"item {i + 1} of {path}", v) for i, v in enumerate(json.loads(text))]
            except ValueError as e:
                raise DataError(f"--data {name}: {path} is not valid JSON ({e}); check that it is valid json") from None
        else:
            values = []
            for number, line in enumerate(text.split("\n"), start=1):
                if not line.strip():
                    continue
                try:
                    values.append((f"line {number} of {path}", json.loads(line)))
                except ValueError as e:
                    raise DataError(f"--data {name}: line {number} of {path} is not valid JSON ({e}); fix or remove "
                                    "that line") from None
        for where, value in values:
            if not isinstance(value, dict):
                raise DataError(f"--data {name}: {where} is not a JSON object; write one object a line")
            if any(_has_undecodable(key) or _has_undecodable(cell) for key, cell in value.items()):
                undecodable.append(len(rows))
            rows.append({_repaired(key): None if _has_undecodable(cell) else cell for key, cell in value.items()})
            places.append(where)
    if not rows:
        raise DataError(f"--data {name}: the dataset is empty; it needs rows with an image and a caption")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = {column: [row.get(column) for row in rows] for column in columns}
    caption = text_column if text_column in cells else next((c for c in TEXT_COLUMNS if c in cells), None)
    no_text = []
    if caption is not None:
        listed = any(isinstance(cell, list) for cell in cells[caption])
        for i, cell in enumerate(cells[caption]):
            if not _captions(cell):
                cells[caption][i] = None
                no_text.append(i)
            elif listed and isinstance(cell, str):  # a column of lists, some rows a single caption
                cells[caption][i] = [cell]
    skipped = sorted(set(undecodable) | set(no_text))
    if skipped and name not in _REPORTED:
        _REPORTED.add(name)
        print(f"data: --data {name}: {len(skipped)} of {len(rows)} rows have bytes that are not UTF-8 or a caption "
              f"that is not text (the first: {places[skipped[0]]}); they are skipped")
    try:
        return datasets.Dataset.from_dict(cells)
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
        raise DataError(f"--data {name}: cannot read it ({_one_line(e)}); give each column one type") from None


def _has_undecodable(value: Any) -> bool:
    """Whether a parsed JSON value holds a string with bytes that were not UTF-8."""
    if isinstance(value, str):
        return _UNDECODABLE.search(value) is not None
    if isinstance(value, list):
        return any(map(_has_undecodable, value))
    if isinstance(value, dict):
        return any(map(_has_undecodable, value)) or any(map(_has_undecodable, value.values()))
    return False


def _repaired(key: str) -> str:
    """A column name with bytes that were not UTF-8 shown as U+FFFD."""
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _table_dataset(table: datasets.Dataset, name: str, base_dir: Path, options: TableOptions,
                   whole: bool = False) -> TableDataset:
    """The split of ``table`` (all of it when ``whole``: a train/ or test/ folder), decoded at ``options.size``."""
    if len(table) == 0:
        raise DataError(f"--data {name}: the dataset is empty; it needs rows with an image and a caption")
    decoder = RowDecoder(
        image_column=_column(table.column_names, options.image_column, IMAGE_COLUMNS, "image", name),
        text_column=_column(table.column_names, options.text_column, TEXT_COLUMNS, "text", name),
        base_dir=base_dir, size=options.size, max_pixels=options.max_pixels, follow_symlinks=options.follow_symlinks)
    _check_captions(table, decoder.text_column, name)
    if not whole:
        n = len(table)
        held = heldout_rows(_split_keys(table, decoder), options.heldout_fraction)
        if options.split != "train" and not held:
            raise DataError(f"--data {name}: {n} rows are too few to hold out a {options.split} split; "
                            "give it at least 10")
        held_set = set(held)
        table = table.select(held if options.split != "train" else [i for i in range(n) if i not in held_set])
    dataset = TableDataset(table, decoder, name, augment=options.augment, seed=options.seed)
    if GROUP_COLUMN in table.column_names:
        dataset.groups = [str(g) for g in table[GROUP_COLUMN]]
        if options.balance == "groups":
            index: dict[str, int] = {}
            dataset.balanced_groups = torch.tensor([index.setdefault(g, len(index)) for g in dataset.groups])
    _probe(dataset)
    return dataset


def _check_captions(table: datasets.Dataset, column: str, name: str) -> None:
    """Refuse, in one line, a caption column that holds no text at all: numbers, objects, or only nulls.

    Single rows without a text caption are not refused here: they are skipped and counted when read.
    """
    kind = table.data.schema.field(column).type
    inner = kind.value_type if pa.types.is_list(kind) or pa.types.is_large_list(kind) else kind
    if pa.types.is_null(inner) or table.data.column(column).null_count == len(table):
        raise DataError(f"--data {name}: no row has a text caption in column {column!r}; pass --text-column "
                        "naming the captions")
    if not (pa.types.is_string(inner) or pa.types.is_large_string(inner)):
        raise DataError(f"--data {name}: column {column!r} holds {kind} values, not text captions; pass "
                        "--text-column naming the captions")


def _split_keys(table: datasets.Dataset, decoder: RowDecoder) -> list[str]:
    """Each row's split key: its group, else its file name or shard key, else its caption (module doc)."""
    columns = table.column_names
    if GROUP_COLUMN in columns:
        return [str(v) for v in table[GROUP_COLUMN]]
    for column in (*KEY_COLUMNS, decoder.image_column):
        if column in columns and isinstance(table.features[column], datasets.Value) \
                and table.features[column].dtype in ("string", "large_string"):
            return [str(v) for v in table[column]]
    return [_caption(v) or "" for v in table[decoder.text_column]]


def _probe(dataset: TableDataset) -> None:
    """Fail now, not after hours, when none of the first rows' images can be read."""
    first_error = None
    for index in range(min(len(dataset), PROBE_ROWS)):
        try:
            dataset.decoder.image(dataset.row(index))
            return
        except Exception as e:  # noqa: BLE001 - reported below when every probe fails
            first_error = first_error or e
    raise DataError(f"--data {dataset.name}: none of the first {min(len(dataset), PROBE_ROWS)} images in column "
                    f"{dataset.decoder.image_column!r} can be read ({_one_line(first_error)}); check "
                    f"--image-column, and that paths are relative to {dataset.decoder.base_dir}")


def _column(columns: list[str], wanted: str | None, defaults: tuple[str, ...], kind: str, name: str) -> str:
    """The named column, else the first default present; a DataError listing the columns otherwise."""
    if wanted is not None and wanted in columns:
        return wanted
    found = next((c for c in defaults if c in columns), None) if wanted is None else None
    if found is not None:
        return found
    what = f"no column {wanted!r}" if wanted else f"no {kind} column (looked for {', '.join(defaults)})"
    raise DataError(f"--data {name}: {what}; its columns are {', '.join(columns)}; pass --{kind}-column")


def _open_hub(name: str, size: int, split: str, image_column: str | None, text_column: str | None,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> StreamDataset:
    candidates = ("train",) if split == "train" else HUB_HELDOUT_SPLITS
    for hub_split in candidates:
        try:
            stream = datasets.load_dataset(name, split=hub_split, streaming=True)
            break
        except Exception as e:  # noqa: BLE001 - network, auth and missing-split errors all end here
            if "split" in str(e).lower() and hub_split != candidates[-1]:
                continue
            raise DataError(f"--data {name}: no such file or folder, and the Hugging Face Hub could not give a "
                            f"dataset of that name ({_one_line(e)}); connect this machine to the Hub, or "
                            f"{SOURCES_HINT}") from None
    return stream_dataset(stream, name, size, image_column, text_column, max_pixels)


def stream_dataset(stream: datasets.IterableDataset, name: str, size: int, image_column: str | None = None,
                   text_column: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> StreamDataset:
    """Wrap an iterable ``datasets`` stream (a hub dataset) with its image and caption columns resolved."""
    if stream.features:
        columns = list(stream.features)
    else:
        first = next(iter(stream.take(1)), None)
        if first is None:
            raise DataError(f"--data {name}: the dataset is empty")
        columns = list(first)
    decoder = RowDecoder(_column(columns, image_column, IMAGE_COLUMNS, "image", name),
                         _column(columns, text_column, TEXT_COLUMNS, "text", name), Path("."), size, max_pixels,
                         follow_symlinks=True)  # no data folder: the hub's files are where its cache put them
    if stream.features and isinstance(stream.features.get(decoder.image_column), datasets.Image):
        stream = stream.cast_column(decoder.image_column, datasets.Image(decode=False))
    return StreamDataset(stream, decoder, name)


def _expand(data: str) -> list[Path]:
    """Existing files named by ``data``: one path, a glob, or braces (``{a,b}``, ``{000..009}``)."""
    files: list[Path] = []
    for pattern in _braces(os.path.expanduser(data)):
        if glob.has_magic(pattern):
            files += [Path(p) for p in sorted(glob.glob(pattern)) if os.path.isfile(p)]
        elif os.path.isfile(pattern):
            files.append(Path(pattern))
    return files


def _braces(pattern: str) -> list[str]:
    """Shell-style brace expansion of the first ``{...}``, recursively: ``a{1..3}`` -> a1, a2, a3."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        low, high = numbers.group(1), numbers.group(2)
        width = len(low) if low.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(low), int(high) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        return [pattern]
    return [expanded for option in options for expanded in _braces(head + option + tail)]


def _is_hub_name(data: str) -> bool:
    """``name`` or ``owner/name`` without a file suffix or path punctuation."""
    if Path(data).suffix.lower() in TABLE_BUILDERS:
        return False
    return re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", data) is not None


def _one_line(error: BaseException | None) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0] if error is not None else "no rows"
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------- batches


class PositionSampler(Sampler[int]):
    """Dataset indices of one rank's share of global positions ``start, start+1, ...``, without end.

    Global batch k covers positions ``[start + k*batch_size, start + (k+1)*batch_size)``; rank r takes
    the positions ``r::world_size`` of it. Finite datasets map a position through the permutation of
    its epoch (with ``groups``, each row's group index: a permutation of the groups, one row of each);
    endless ones read position p as index p.
    """

    def __init__(self, length: int, endless: bool, batch_size: int, seed: int, start: int, rank: int,
                 world_size: int, with_position: bool = False, groups: torch.Tensor | None = None) -> None:
        self.length, self.endless, self.batch_size, self.seed = length, endless, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size
        self.with_position = with_position  # yield (index, position): the dataset augments per position
        self.groups = groups
        if groups is not None:
            self.length = int(groups.max()) + 1
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def index(self, position: int) -> int:
        if self.endless:
            return position
        epoch, offset = divmod(position, self.length)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.length, generator=generator)
            self._epoch, self._order = epoch, order if self.groups is None else balanced_order(self.groups, order,
                                                                                                 generator)
        return int(self._order[offset])

    def __iter__(self) -> Iterator[int]:
        for batch_start in itertools.count(self.start, self.batch_size):
            for position in range(batch_start + self.rank, batch_start + self.batch_size, self.world_size):
                yield (self.index(position), position) if self.with_position else self.index(position)


def balanced_order(groups: torch.Tensor, group_order: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Row indices, one row of each group in ``group_order``, chosen uniformly among the group's rows by
    ``generator``. ``groups`` holds each row's group index, 0 to G-1, every index used."""
    sizes = torch.bincount(groups)
    rows_by_group = torch.argsort(groups, stable=True)
    first = torch.cumsum(sizes, 0) - sizes
    pick = (torch.rand(len(sizes), generator=generator, dtype=torch.float64) * sizes).long()
    return rows_by_group[(first + pick)[group_order]]


def collate(items: list[dict | None], size: int) -> dict:
    """Stack the readable examples; ``None`` (an unreadable image) is dropped and counted in "skipped"."""
    kept = [item for item in items if item is not None]
    images = torch.stack([item["image"] for item in kept]) if kept else torch.empty(0, 3, size, size)
    batch = {"image": images, "text": [item["text"] for item in kept], "skipped": len(items) - len(kept)}
    if kept and "scene" in kept[0]:
        batch["scene"] = [item["scene"] for item in kept]
    return batch


def _worker_init(worker_id: int) -> None:
    """One thread per worker (they are the parallelism); Python and NumPy seeded from torch's worker seed."""
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def batches(dataset: ShapesDataset | TableDataset | StreamDataset, batch_size: int, seed: int, start: int = 0,
            rank: int = 0, world_size: int = 1, workers: int = 0) -> Iterator[dict]:
    """Endless batches ``{"image": (b,3,S,S), "text": [b], "skipped": int}`` (+ "scene" for shapes).

    ``batch_size`` is the global batch; this rank gets ``b = batch_size // world_size`` of it, fewer by
    the unreadable images ("skipped"). ``start`` is a global example position: resuming a run at step s
    passes ``s * batch_size`` and gets the batches an uninterrupted run would. ``workers`` DataLoader
    processes decode ahead; the batches do not depend on their number.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start < 0 or workers < 0:
        raise DataError(f"bad batch options: batch_size={batch_size}, rank={rank}, world_size={world_size}, "
                        f"start={start}, workers={workers}")
    if batch_size % world_size:
        raise DataError(f"--batch-size {batch_size} does not split evenly over {world_size} processes; "
                        f"pass a multiple of {world_size}")
    local = batch_size // world_size
    if isinstance(dataset, StreamDataset):
        return _stream_batches(dataset, local, seed, start, rank, world_size, workers)
    sampler = PositionSampler(len(dataset), dataset.endless, batch_size, seed, start, rank, world_size,
                              with_position=getattr(dataset, "augment", False),
                              groups=getattr(dataset, "balanced_groups", None))
    # One endless pass: the workers live as long as the iterator, so there is nothing to persist across
    # epochs. The loader's own generator keeps it from drawing worker seeds from the global torch RNG.
    loader = DataLoader(dataset, batch_size=local, sampler=sampler, num_workers=workers,
                        collate_fn=partial(collate, size=dataset.size), worker_init_fn=_worker_init,
                        generator=torch.Generator().manual_seed(seed))
    return iter(loader)


def _stream_batches(dataset: StreamDataset, local: int, seed: int, start: int, rank: int, world_size: int,
                    workers: int) -> Iterator[dict]:
    """Batches of a stream: positions ``rank::world_size`` of the global order, decoded on ``workers`` threads.

    Every process reads the whole stream and keeps its positions (``split_dataset_by_node``'s "examples"
    strategy, done here so that it does not depend on the ``datasets`` version): sharding by files would
    make what a step sees depend on the number of processes.
    """
    rows = itertools.islice(_global_rows(dataset, seed, start), rank, None, world_size)
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:  # PIL releases the GIL while decoding
        while True:
            chunk = list(itertools.islice(rows, local))
            yield collate(list(pool.map(dataset.decoder, chunk)), dataset.size)


def _global_rows(dataset: StreamDataset, seed: int, start: int) -> Iterator[dict]:
    """Undecoded rows at global positions ``start, start+1, ...``: epoch e is the stream shuffled by (seed, e)."""
    shuffled = dataset.stream.shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_BUFFER)
    skip = start
    for epoch in itertools.count():
        part = shuffled.skip(skip) if skip else shuffled
        part.set_epoch(epoch)
        count = 0
        for row in part:
            count += 1
            yield row
        if count:
            skip = 0
            continue
        length = sum(1 for _ in dataset.stream.select_columns([dataset.decoder.text_column])) if skip else 0
        if length == 0:
            raise DataError(f"--data {dataset.name}: the dataset is empty")
        skip -= length  # the whole epoch lay before ``start``


def texts(dataset: ShapesDataset | TableDataset | StreamDataset, limit: int, every: bool = False) -> list[str]:
    """The captions of the first ``limit`` rows in stored order (fewer if the dataset is smaller, or rows
    hold no text caption), no image decoded; with ``every``, all the captions of a cell that holds several
    (the tokenizer learns them all). :func:`caption_texts` also counts the rows skipped."""
    return caption_texts(dataset, limit, every)[0]


def caption_texts(dataset: ShapesDataset | TableDataset | StreamDataset, limit: int,
                  every: bool = False) -> tuple[list[str], int]:
    """:func:`texts` and how many of the rows read were skipped for a caption that is not text."""
    if limit <= 0:
        return [], 0
    if isinstance(dataset, ShapesDataset):
        return [shapes.caption(dataset.seed, dataset.split, index) for index in range(limit)], 0
    column = dataset.decoder.text_column
    if isinstance(dataset, StreamDataset):
        cells = [row[column] for row in dataset.stream.select_columns([column]).take(limit)]
    else:
        cells = dataset.captions[: min(limit, len(dataset))][column]
    options = [_captions(cell) for cell in cells]
    skipped = sum(not o for o in options)
    if every:
        return [text for o in options for text in o][:limit], skipped
    return [o[0] for o in options if o], skipped
