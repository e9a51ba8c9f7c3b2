"""The data layer: every ``--data`` source as (image, caption) examples, and the batches training reads.

=========================  =====================================================================
``--data``                 read as
=========================  =====================================================================
``shapes``                 :mod:`train.shapes`; item i of a split is ``shapes.example(seed, split, i)``
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
another stream; heldout: colour-shape pairs and relations never trained on). For files and shards,
"valid" and "heldout" are both the last ``heldout_count(n)`` rows (1% of them, at least 8, at most
10%) and "train" the rows before; for a hub dataset they are its ``validation`` (else ``test``) split.

Order. :func:`batches` reads global example positions ``start, start+1, ...`` without end. A finite
dataset maps position p to epoch ``p // n`` of a permutation drawn from a ``torch.Generator`` seeded by
``(seed, epoch)``; ``shapes`` is endless (``len`` is ``sys.maxsize``) and already random per index, so
position p is example p. Each global batch of ``batch_size`` positions is dealt to the processes, rank
r taking positions ``r::world_size``; so resuming from ``start = step * batch_size`` or changing the
number of processes or workers changes nothing about which examples a step sees.
"""

from __future__ import annotations

import glob
import io
import itertools
import os
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from checkpoint import UserError
from train import shapes
from train.images import from_pil

__all__ = ["DataError", "open_dataset", "batches", "texts", "heldout_count",
           "ShapesDataset", "TableDataset", "StreamDataset"]

IMAGE_COLUMNS = ("image", "img", "file_name", "path", "jpg", "png", "jpeg", "webp")
TEXT_COLUMNS = ("text", "caption", "prompt", "txt")
TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tar": "webdataset"}
SPLITS = ("train", "valid", "heldout")
HUB_HELDOUT_SPLITS = ("validation", "test")
PROBE_ROWS = 8  # rows tried at open time: if none of them decodes, the image column is wrong
STREAM_SHUFFLE_BUFFER = 10_000
SOURCES_HINT = "pass 'shapes', a folder with metadata.jsonl, .jsonl/.parquet/.csv files or .tar shards"


class DataError(UserError):
    """A --data source that cannot be read as it stands; the message says what to do."""


def heldout_count(n: int) -> int:
    """Rows of an n-row file source held out as the ``"heldout"`` split: 1%, at least 8, at most 10%."""
    return min(max(n // 100, 8), n // 10)


# ---------------------------------------------------------------- decoding rows


def _caption(value: Any) -> str:
    """A caption cell as a string; a list of captions gives its first."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return next((str(v) for v in value if v), "")
    return value if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class RowDecoder:
    """Turns a row's image cell and caption cell into an example; paths resolve against ``base_dir``."""

    image_column: str
    text_column: str
    base_dir: Path
    size: int

    def read(self, row: dict) -> dict:
        """The example ``{"image": (3,S,S) in [-1,1], "text": str}``; raises if the image cannot be read."""
        value = row.get(self.image_column)
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            source: Any = io.BytesIO(value)
        elif isinstance(value, str) and value:
            source = Path(value) if os.path.isabs(value) else self.base_dir / value
        elif isinstance(value, Image.Image):
            return {"image": from_pil(value, self.size), "text": _caption(row.get(self.text_column))}
        else:
            raise ValueError(f"no image in column {self.image_column!r} (found {type(value).__name__})")
        with Image.open(source) as img:
            img.draft("RGB", (self.size, self.size))  # JPEG: decode at the smallest scale >= size
            image = from_pil(img, self.size)
        return {"image": image, "text": _caption(row.get(self.text_column))}

    def __call__(self, row: dict) -> dict | None:
        """:meth:`read`, or ``None`` for an unreadable image."""
        try:
            return self.read(row)
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

    def __init__(self, table: datasets.Dataset, decoder: RowDecoder, name: str) -> None:
        self.images = table.select_columns([decoder.image_column])
        self.captions = table.select_columns([decoder.text_column])
        self.decoder, self.name, self.size = decoder, name, decoder.size

    def __len__(self) -> int:
        return len(self.captions)

    def row(self, index: int) -> dict:
        return {**self.images[index], **self.captions[index]}

    def __getitem__(self, index: int) -> dict | None:
        return self.decoder(self.row(index))


class StreamDataset:
    """A streamed hub dataset (a ``datasets.IterableDataset``); :func:`batches` and :func:`texts` read it."""

    endless = True

    def __init__(self, stream: datasets.IterableDataset, decoder: RowDecoder, name: str) -> None:
        self.stream, self.decoder, self.name, self.size = stream, decoder, name, decoder.size

    def __len__(self) -> int:
        return sys.maxsize


# ---------------------------------------------------------------- opening a source


def open_dataset(data: str, size: int, split: str = "train", image_column: str | None = None,
                 text_column: str | None = None, seed: int = 0) -> ShapesDataset | TableDataset | StreamDataset:
    """The ``--data`` source as examples ``{"image": (3,size,size) in [-1,1], "text": str}`` (see module doc).

    ``seed`` picks the ``shapes`` stream; file sources do not depend on it. Raises :class:`DataError`
    for a path that does not exist, a folder without metadata, a missing column or an empty dataset.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if size < 1:
        raise DataError(f"--size must be a positive number of pixels, got {size}")
    if data == "shapes":
        if image_column or text_column:
            raise DataError("--image-column and --text-column name columns of a file source; shapes has none")
        return ShapesDataset(size, split, seed)
    path = Path(data).expanduser()
    if path.is_dir():
        return _open_folder(path, size, split, image_column, text_column)
    files = _expand(data)
    if files:
        return _open_files(data, files, size, split, image_column, text_column)
    if _is_hub_name(data):
        return _open_hub(data, size, split, image_column, text_column)
    raise DataError(f"--data {data}: no such file or folder; {SOURCES_HINT}")


def _open_folder(folder: Path, size: int, split: str, image_column: str | None,
                 text_column: str | None) -> TableDataset:
    metadata = next((folder / n for n in ("metadata.jsonl", "metadata.csv") if (folder / n).is_file()), None)
    if metadata is None:
        raise DataError(f"--data {folder}: the folder has no metadata.jsonl or metadata.csv; add one with a "
                        f"file_name and a text column per image (python -m train export writes an example), "
                        f"or pass its data files themselves ({folder}/*.parquet, {folder}/*.tar)")
    table = _load_table(TABLE_BUILDERS[metadata.suffix], [metadata], str(metadata))
    return _table_dataset(table, str(metadata), folder, size, split, image_column, text_column)


def _open_files(data: str, files: list[Path], size: int, split: str, image_column: str | None,
                text_column: str | None) -> TableDataset:
    suffixes = sorted({f.suffix.lower() for f in files})
    if len(suffixes) > 1 or suffixes[0] not in TABLE_BUILDERS:
        raise DataError(f"--data {data}: cannot read {'/'.join(suffixes)} files; {SOURCES_HINT}")
    table = _load_table(TABLE_BUILDERS[suffixes[0]], files, data)
    return _table_dataset(table, data, files[0].parent, size, split, image_column, text_column)


def _load_table(builder: str, files: list[Path], name: str) -> datasets.Dataset:
    """``datasets.load_dataset(builder)`` on local files, its failures as one-line DataErrors."""
    if all(f.stat().st_size == 0 for f in files):
        raise DataError(f"--data {name}: the file is empty; it needs rows with an image and a caption")
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


def _table_dataset(table: datasets.Dataset, name: str, base_dir: Path, size: int, split: str,
                   image_column: str | None, text_column: str | None) -> TableDataset:
    if len(table) == 0:
        raise DataError(f"--data {name}: the dataset is empty; it needs rows with an image and a caption")
    decoder = RowDecoder(
        image_column=_column(table.column_names, image_column, IMAGE_COLUMNS, "image", name),
        text_column=_column(table.column_names, text_column, TEXT_COLUMNS, "text", name),
        base_dir=base_dir, size=size)
    n, held = len(table), heldout_count(len(table))
    if split != "train" and held == 0:
        raise DataError(f"--data {name}: {n} rows are too few to hold out a {split} split; give it at least 10")
    table = table.select(range(n - held) if split == "train" else range(n - held, n))
    dataset = TableDataset(table, decoder, name)
    _probe(dataset)
    return dataset


def _probe(dataset: TableDataset) -> None:
    """Fail now, not after hours, when none of the first rows' images can be read."""
    first_error = None
    for index in range(min(len(dataset), PROBE_ROWS)):
        try:
            dataset.decoder.read(dataset.row(index))
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


def _open_hub(name: str, size: int, split: str, image_column: str | None, text_column: str | None) -> StreamDataset:
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
    return stream_dataset(stream, name, size, image_column, text_column)


def stream_dataset(stream: datasets.IterableDataset, name: str, size: int, image_column: str | None = None,
                   text_column: str | None = None) -> StreamDataset:
    """Wrap an iterable ``datasets`` stream (a hub dataset) with its image and caption columns resolved."""
    if stream.features:
        columns = list(stream.features)
    else:
        first = next(iter(stream.take(1)), None)
        if first is None:
            raise DataError(f"--data {name}: the dataset is empty")
        columns = list(first)
    decoder = RowDecoder(_column(columns, image_column, IMAGE_COLUMNS, "image", name),
                         _column(columns, text_column, TEXT_COLUMNS, "text", name), Path("."), size)
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
    its epoch; endless ones read position p as index p.
    """

    def __init__(self, length: int, endless: bool, batch_size: int, seed: int, start: int, rank: int,
                 world_size: int) -> None:
        self.length, self.endless, self.batch_size, self.seed = length, endless, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def index(self, position: int) -> int:
        if self.endless:
            return position
        epoch, offset = divmod(position, self.length)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.length, generator=generator)
        return int(self._order[offset])

    def __iter__(self) -> Iterator[int]:
        for batch_start in itertools.count(self.start, self.batch_size):
            for position in range(batch_start + self.rank, batch_start + self.batch_size, self.world_size):
                yield self.index(position)


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
    sampler = PositionSampler(len(dataset), dataset.endless, batch_size, seed, start, rank, world_size)
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


def texts(dataset: ShapesDataset | TableDataset | StreamDataset, limit: int) -> list[str]:
    """The first ``limit`` captions in stored order (fewer if the dataset is smaller), no image decoded."""
    if limit <= 0:
        return []
    if isinstance(dataset, ShapesDataset):
        return [shapes.caption(dataset.seed, dataset.split, index) for index in range(limit)]
    column = dataset.decoder.text_column
    if isinstance(dataset, StreamDataset):
        return [_caption(row[column]) for row in dataset.stream.select_columns([column]).take(limit)]
    return [_caption(value) for value in dataset.captions[: min(limit, len(dataset))][column]]
