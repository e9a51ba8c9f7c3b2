"""The code cache: a dataset's images encoded once by the run's VQGAN into grid ids, kept on disk.

Stage 2 trains on (caption, image ids) pairs, so images are encoded once, not every epoch. The cache file
is named by a digest of the VQGAN's weights and config and of the data options, so a later run reuses it
and a retrained VQGAN gets a new one. It is one safetensors file: ``image_ids`` (N, h*w) and the captions
as JSON in its metadata, written atomically. A cache file that cannot be read, or that does not hold what
its name promises (ids of this VQGAN's grid and codebook, one caption per entry), is said so and built again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from checkpoint import atomic_write
from cli import UserError
from data import shapes
from data.sources import DEFAULT_HELDOUT_FRACTION, DEFAULT_MAX_PIXELS, batches, open_dataset

__all__ = ["CodeCache", "cache_path", "load_or_build", "epoch_batch_indices"]


@dataclass
class CodeCache:
    image_ids: torch.Tensor  # (N, h*w) int64
    texts: list[str]
    pictures: int | None = None  # distinct pictures behind the N entries (None: an endless source)

    def __len__(self) -> int:
        return len(self.texts)

    def save(self, path: Path) -> None:
        dtype = torch.int16 if int(self.image_ids.max()) < 2**15 else torch.int32
        tensors = {"image_ids": self.image_ids.to(dtype).contiguous()}
        metadata = {"texts": json.dumps(self.texts, ensure_ascii=False)}
        if self.pictures is not None:
            metadata["pictures"] = str(self.pictures)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: Path) -> CodeCache:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            texts = json.loads(metadata["texts"])
            image_ids = f.get_tensor("image_ids").long()
        return cls(image_ids, texts, int(metadata["pictures"]) if "pictures" in metadata else None)

    def check(self, tokens: int, codebook_size: int) -> None:
        """A ValueError unless every entry is ``tokens`` ids below ``codebook_size`` with a text caption."""
        ids = self.image_ids
        if ids.ndim != 2 or ids.shape[1] != tokens or ids.shape[0] != len(self.texts) or not len(self.texts):
            raise ValueError(f"image_ids {tuple(ids.shape)} for {len(self.texts)} captions, not (N, {tokens})")
        if int(ids.min()) < 0 or int(ids.max()) >= codebook_size:
            raise ValueError(f"ids outside the codebook of {codebook_size}")
        if not all(isinstance(t, str) for t in self.texts):
            raise ValueError("captions that are not text")


def cache_path(run: Path, vqgan_dir: Path, *, data: str, size: int, split: str, limit: int, seed: int,
               heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, augment: bool = False,
               max_pixels: int = DEFAULT_MAX_PIXELS, follow_symlinks: bool = False, balance: str = "pictures") -> Path:
    """RUN/cache/codes-<digest>.safetensors, the digest covering the VQGAN and the data options."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(vqgan_dir / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    options = [data, size, split, limit, seed]
    if data == "shapes":  # its own split, never augmented; the version of its scenes
        options.append(shapes.SCENES_VERSION)
    else:
        options += [heldout_fraction, augment and split == "train"]
        if (max_pixels, follow_symlinks) != (DEFAULT_MAX_PIXELS, False):  # which pictures are read; the
            options += [max_pixels, follow_symlinks]  # defaults keep the digests caches had before these options
        if balance != "pictures" and split == "train":
            options.append(balance)
    digest.update(json.dumps(options).encode())
    return run / "cache" / f"codes-{split}-{digest.hexdigest()[:16]}.safetensors"


@torch.no_grad()  # not inference_mode: a built cache must hold the same plain tensors as a loaded one
def load_or_build(run: Path, vqgan, *, data: str, size: int, split: str, limit: int, seed: int,
                  device: torch.device, batch_size: int = 256, workers: int = 0,
                  image_column: str | None = None, text_column: str | None = None,
                  heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, augment: bool = False,
                  max_pixels: int = DEFAULT_MAX_PIXELS, follow_symlinks: bool = False,
                  balance: str = "pictures") -> CodeCache:
    """The cached codes of up to ``limit`` examples of ``data``; encodes and saves them on a miss.

    A finite training split with ``augment`` is read for ``limit`` positions, epoch after epoch, each
    position its own crop and caption: the cache then holds several versions of every picture. Without
    augmentation it stops after one epoch (more would only repeat the same codes). With ``balance`` "groups"
    the epochs are the dataset's balanced ones: one picture of every group each.
    """

    augment = augment and split == "train"
    path = cache_path(run, run / "vqgan", data=data, size=size, split=split, limit=limit, seed=seed,
                      heldout_fraction=heldout_fraction, augment=augment, max_pixels=max_pixels,
                      follow_symlinks=follow_symlinks, balance=balance)
    if path.is_file():
        try:
            cache = CodeCache.load(path)
            cache.check((size // vqgan.downsample) ** 2, vqgan.codebook_size)
            return cache
        except Exception as e:  # noqa: BLE001 - a damaged file makes safetensors, json or torch raise anything
            print(f"encoding: the code cache {path} is damaged ({type(e).__name__}: {str(e)[:120]}); "
                  "encoding it again")
    dataset = open_dataset(data, size=size, split=split, image_column=image_column, text_column=text_column, seed=seed,
                           heldout_fraction=heldout_fraction, augment=augment, max_pixels=max_pixels,
                           follow_symlinks=follow_symlinks, balance=balance)
    total = limit if augment and not dataset.endless else min(limit, getattr(dataset, "epoch_length", len(dataset)))
    batch_size = min(batch_size, total)
    ids, texts, skipped = [], [], 0
    with tqdm(total=total, desc=f"encoding {split} images", dynamic_ncols=True) as bar:
        for batch in batches(dataset, batch_size=batch_size, seed=seed, workers=workers):
            codes = vqgan.encode(batch["image"].to(device))  # (b, h, w)
            ids.append(codes.flatten(1).cpu())  # (b, h*w)
            texts += batch["text"]
            skipped += batch["skipped"]
            bar.update(len(batch["text"]) + batch["skipped"])
            if len(texts) + skipped >= total:
                break
    if not texts:
        raise UserError(f"--data {data}: no readable images to encode; check the data source")
    cache = CodeCache(torch.cat(ids)[: total], texts[: total], None if dataset.endless else len(dataset))
    if skipped:
        print(f"encoding: skipped {skipped} examples with an unreadable image or a caption that is not text")
    cache.save(path)
    return cache


def epoch_batch_indices(n: int, batch_size: int, seed: int, position: int) -> torch.Tensor:
    """Indices of the global batch starting at example ``position`` of a per-epoch shuffled order.

    Epoch e is a permutation of range(n) drawn from a generator seeded by (seed, e); positions run on
    across epochs, so a batch that straddles two epochs takes the end of one and the start of the next.
    """
    out, need = [], batch_size
    while need:
        epoch, offset = divmod(position, n)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=generator)
        take = order[offset: offset + need]
        out.append(take)
        need -= len(take)
        position += len(take)
    return torch.cat(out)
