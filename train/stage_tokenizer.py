"""``python -m train tokenizer``: train the sentencepiece text tokenizer on the captions of --data."""

from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

from checkpoint import remove_temporaries, write_json
from cli import UserError
from data.sources import DEFAULT_HELDOUT_FRACTION, DEFAULT_MAX_PIXELS, caption_texts, open_dataset
from tokenizer import TextTokenizer, words
from train.loop import SEED_HELP, add_data_arguments, seed_number


@dataclass
class TokenizerOptions:
    data: str
    out: str
    vocab_size: int = 1024
    max_texts: int = 50_000
    seed: int = 0
    image_column: str | None = None
    text_column: str | None = None
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION  # captions of held-out rows are not trained on
    augment: str = "crop"  # taken for the same command line as the other stages; captions are not augmented
    max_pixels: int = DEFAULT_MAX_PIXELS  # opening a source reads its first pictures
    follow_symlinks: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="shapes", help="shapes | a folder | *.jsonl/*.parquet/*.csv | *.tar | a hub name")
    parser.add_argument("--out", required=True, help="the run directory; writes RUN/tokenizer.model")
    parser.add_argument("--vocab-size", type=int, default=TokenizerOptions.vocab_size,
                        help="upper bound on the vocabulary (a small corpus gets fewer pieces)")
    parser.add_argument("--max-texts", type=int, default=TokenizerOptions.max_texts,
                        help="captions read to train on")
    parser.add_argument("--seed", type=seed_number, default=0, help=SEED_HELP)
    parser.add_argument("--image-column", default=None)
    parser.add_argument("--text-column", default=None)
    add_data_arguments(parser)


def train_tokenizer(options: TokenizerOptions) -> Path:
    """Train on up to ``max_texts`` captions and write RUN/tokenizer.model; returns its path."""

    if options.vocab_size < 300:
        raise UserError(f"--vocab-size {options.vocab_size} is too small: byte fallback alone needs 260; use >= 300")
    if options.max_texts < 1:
        raise UserError(f"--max-texts must be >= 1, got {options.max_texts}")
    path = Path(options.out) / "tokenizer.model"
    try:  # find out now, not after training, that --out cannot be written
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}; pass a writable --out") from None
    remove_temporaries(path.parent)  # what a killed stage left in the run, as every stage does at its start
    dataset = open_dataset(options.data, size=32, split="train", image_column=options.image_column,
                           text_column=options.text_column, seed=options.seed,
                           heldout_fraction=options.heldout_fraction, max_pixels=options.max_pixels,
                           follow_symlinks=options.follow_symlinks)
    # Every phrasing of a cell that holds several; rows whose caption is not text are skipped and counted.
    captions, skipped = caption_texts(dataset, options.max_texts, every=True)
    if not captions:
        raise UserError(f"--data {options.data}: none of the first {options.max_texts} rows has a text caption "
                        "to train the tokenizer on; check --text-column")
    tokenizer = TextTokenizer.train(captions, vocab_size=options.vocab_size)
    try:
        tokenizer.save(path)
        write_vocabulary(path.parent, captions)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}; pass a writable --out") from None
    note = f" ({skipped} rows without a text caption skipped)" if skipped else ""
    print(f"tokenizer: {len(captions)} captions{note} -> {tokenizer.vocab_size} pieces -> {path}")
    return path


VOCABULARY = "vocabulary.json"  # in the run directory: the words of the training captions


def write_vocabulary(run: Path, captions: Iterable[str]) -> Path:
    """RUN/vocabulary.json: every word (:func:`tokenizer.words`) of the captions the tokenizer trained on, with
    its count; sampling warns about a prompt's words that are not in it."""

    counts = Counter(word for caption in captions for word in words(caption))
    path = run / VOCABULARY
    write_json(path, {"words": dict(sorted(counts.items()))})
    return path


def main(args: argparse.Namespace) -> None:
    names = {f.name for f in fields(TokenizerOptions)}
    train_tokenizer(TokenizerOptions(**{k: v for k, v in vars(args).items() if k in names}))
