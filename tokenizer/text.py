"""The text tokenizer: a sentencepiece BPE model that round-trips every string exactly.

The prompt side of the translation (Parti, DALL-E 1) is a sequence of sentencepiece ids. The model is
trained in memory from an iterator of captions and saved as the plain serialized sentencepiece model,
so ``RUN/tokenizer.model`` also loads in any sentencepiece tool.

Choices, each made so that ``decode(encode(text)) == text`` for every ``str`` that is valid Unicode:

- **BPE**, not unigram. With the same texts, sentencepiece's BPE trainer learns the same pieces and
  scores whatever its thread count; its unigram trainer does not. Training runs single-threaded,
  so even the file's bytes are the same on every machine.
- **Byte fallback.** All 256 bytes are pieces, so a character the corpus never showed (emoji, a
  control character, another script) becomes its UTF-8 bytes and ``unk`` is never produced.
- **Identity normalization**, no dummy prefix and no whitespace clean-up: the text is tokenized as
  given, with leading, trailing and repeated spaces kept.
- **The whitespace symbol.** sentencepiece writes a space as U+2581 ("▁") inside pieces, so a literal
  "▁" in the input would come back as a space. ``encode`` splits the text at each literal "▁" and
  spells it with its three byte pieces, which sentencepiece decodes back to "▁", never to a space.
- **Fixed special ids:** pad 0, unk 1, bos 2, eos 3. Padding is pad, the mask says which ids are real.
- **A soft vocabulary limit.** A corpus with fewer mergeable pairs than ``vocab_size`` asks for still
  trains, to a smaller vocabulary; ``vocab_size`` reports the size the model really has.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
import torch

from checkpoint import CheckpointError, atomic_write
from cli import UserError

__all__ = ["TextTokenizer", "TruncationWarning", "words"]

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
NUM_BYTES = 256
WHITESPACE_SYMBOL = "\u2581"  # "▁": how sentencepiece writes a space inside a piece
# The smallest vocabulary that can hold anything: the special ids, the byte pieces and "▁".
MIN_VOCAB_SIZE = 4 + NUM_BYTES + 1
# A string whose round trip exercises every setting ``load`` relies on: spaces at both ends and in a
# run, a literal "▁", characters that NFKC would rewrite, an emoji that only byte fallback can spell.
_ROUND_TRIP_PROBE = "  a\u00a0\ufb01 \u2581\u2581b\t\U0001f40d\n  "


_WORD = re.compile(r"[^\W\d_]+")  # a run of letters, in any script


def words(text: str) -> list[str]:
    """The words of ``text``, case-folded: runs of letters, so "A red-circle, 2x" gives a, red, circle, x.
    Training records the words of its captions (RUN/vocabulary.json); sampling names a prompt's others."""
    return _WORD.findall(text.casefold())


class TruncationWarning(UserWarning):
    """Some texts were longer than ``max_length`` tokens and were cut (filter with this category); ``count``
    says how many."""

    def __init__(self, message: str, count: int = 0):
        super().__init__(message)
        self.count = count


class _Corpus:
    """Streams texts into the sentencepiece trainer, counting them and keeping any error to re-raise.

    An exception raised inside a generator that sentencepiece is consuming comes out of the trainer as
    a RuntimeError with the original type lost; this keeps the original so ``train`` can raise it.
    """

    def __init__(self, texts: Iterable[str]):
        self.texts = texts
        self.count = 0
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for text in self.texts:
                if not isinstance(text, str):
                    raise TypeError(f"TextTokenizer.train needs str texts, got {type(text).__name__}")
                if text:
                    self.count += 1
                    yield text
        except Exception as e:  # re-raised by train() once the trainer has returned
            self.error = e


class TextTokenizer:
    """A sentencepiece BPE tokenizer with byte fallback and fixed pad/unk/bos/eos ids.

    Example::

        tok = TextTokenizer.train(captions, vocab_size=1024)
        tok.save(run_dir / "tokenizer.model")
        ids = tok.encode("a red circle")              # [..., tok.eos_id]
        assert tok.decode(ids) == "a red circle"
        text_ids, text_mask = tok.batch(["a red circle", "two blue squares"], max_length=64)  # (2, L)
    """

    def __init__(self, processor: spm.SentencePieceProcessor):
        """Wrap a loaded processor; use :meth:`train`, :meth:`load` or :meth:`from_bytes` instead."""
        self._sp = processor
        self._special_ids = frozenset({PAD_ID, BOS_ID, EOS_ID})
        # The byte pieces that spell a literal "▁" (E2 96 81 in UTF-8).
        self._whitespace_symbol_ids = [
            processor.piece_to_id(f"<0x{b:02X}>") for b in WHITESPACE_SYMBOL.encode("utf-8")
        ]

    # ----------------------------------------------------------------------------------- training

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 1024, *, character_coverage: float = 0.9995
    ) -> TextTokenizer:
        """Train a BPE model on ``texts``, streamed from memory (no corpus file is written).

        ``vocab_size`` is an upper bound: a small corpus that runs out of pairs to merge gives a smaller
        vocabulary (read it from :attr:`vocab_size`). ``character_coverage`` is the share of the
        corpus's characters that get a piece of their own; the rarest rest are spelled in bytes.
        Empty texts are skipped, and so are texts over sentencepiece's 4192-byte limit (they still
        encode: only training ignores them). The same texts give a byte-identical model.
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise UserError(
                f"vocab_size={vocab_size} is too small: the tokenizer needs at least {MIN_VOCAB_SIZE} ids "
                f"(4 special ids and {NUM_BYTES} byte pieces, plus the corpus's characters); raise --vocab-size"
            )
        if not 0.0 < character_coverage <= 1.0:
            raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}")
        corpus = _Corpus(texts)
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(corpus),
                model_writer=model,
                model_type="bpe",
                vocab_size=vocab_size,
                hard_vocab_limit=False,  # running out of merges ends training early, not in an error
                character_coverage=character_coverage,
                required_chars=WHITESPACE_SYMBOL,  # a space must be a piece even if the corpus has none
                byte_fallback=True,
                split_digits=True,  # "128" is three pieces, so numbers the corpus never saw still split alike
                normalization_rule_name="identity",
                add_dummy_prefix=False,
                remove_extra_whitespaces=False,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                num_threads=1,
                minloglevel=2,
            )
        except RuntimeError as e:
            if corpus.error is not None:
                raise corpus.error from None
            if corpus.count == 0:
                raise UserError("no text to train the tokenizer on: the captions are missing or all empty") from None
            if "!sentences_.empty()" in str(e):
                raise UserError(
                    "no caption is short enough to train the tokenizer on (sentencepiece skips texts over "
                    "4192 bytes); check the caption column"
                ) from None
            needed = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", str(e))
            if needed:
                raise UserError(
                    f"vocab_size={vocab_size} is too small for these captions: they need at least "
                    f"{needed.group(1)} ids (special ids, byte pieces and one per character); raise --vocab-size"
                ) from None
            raise
        if corpus.error is not None:
            raise corpus.error
        return cls.from_bytes(model.getvalue(), source="the trained model")

    # --------------------------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials and byte pieces included: the size of an embedding table."""
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        """Fills a batch past each text's end; the mask is False there."""
        return PAD_ID

    @property
    def unk_id(self) -> int:
        """Reserved by sentencepiece; byte fallback means ``encode`` never produces it."""
        return UNK_ID

    @property
    def bos_id(self) -> int:
        """Begins a text when ``encode(..., bos=True)``."""
        return BOS_ID

    @property
    def eos_id(self) -> int:
        """Ends every text unless ``encode(..., eos=False)``."""
        return EOS_ID

    # ------------------------------------------------------------------------ encoding, decoding

    def encode(self, text: str, bos: bool = False, eos: bool = True) -> list[int]:
        """Token ids of ``text``, with bos first and eos last when asked; never the unk id."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes one str, got {type(text).__name__} (use batch for several texts)")
        ids = [BOS_ID] if bos else []
        for k, segment in enumerate(text.split(WHITESPACE_SYMBOL)):
            if k:
                ids.extend(self._whitespace_symbol_ids)
            if segment:
                ids.extend(self._encode_segment(segment))
        if eos:
            ids.append(EOS_ID)
        return ids

    def _encode_segment(self, segment: str) -> list[int]:
        try:
            return self._sp.encode(segment)
        except RuntimeError:
            try:
                segment.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"text is not valid Unicode and cannot be tokenized: {e}") from None
            raise

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of ``ids``; pad, bos and eos are skipped. Accepts a list or a 1-D tensor."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence of ids, got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        vocab_size = self.vocab_size
        kept = []
        for i in ids:
            i = int(i)
            if not 0 <= i < vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {vocab_size})")
            if i not in self._special_ids:
                kept.append(i)
        return self._sp.decode(kept)

    def batch(
        self, texts: Sequence[str], max_length: int, *, bos: bool = False, eos: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``texts`` into right-padded ids and a mask, both (B, L) with L = the longest, <= max_length.

        ``mask`` is True at real tokens and False at padding. A text longer than ``max_length`` tokens
        is cut to that length, keeping its bos and eos; when any is cut, one :class:`TruncationWarning`
        says how many.
        """
        if isinstance(texts, str):
            raise TypeError("batch takes a sequence of texts, not one str (wrap it in a list)")
        if max_length < max(1, int(bos) + int(eos)):
            raise ValueError(f"max_length={max_length} cannot hold even the bos/eos tokens")
        rows = [self.encode(text, bos=bos, eos=eos) for text in texts]
        truncated = sum(len(row) > max_length for row in rows)
        if truncated:
            rows = [_truncate(row, max_length, eos) for row in rows]
            warnings.warn(
                TruncationWarning(f"{truncated} of {len(rows)} texts were longer than max_length={max_length} "
                                  f"tokens and were truncated{' (eos kept)' if eos else ''}", truncated),
                stacklevel=2,
            )
        lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)  # (B,)
        length = int(lengths.max()) if rows else 0
        ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)  # (B, L)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask = torch.arange(length)[None, :] < lengths[:, None]  # (B, L)
        return ids, mask

    # ------------------------------------------------------------------------------ persistence

    def to_bytes(self) -> bytes:
        """The serialized sentencepiece model, as :meth:`save` writes it."""
        return self._sp.serialized_model_proto()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "tokenizer bytes") -> TextTokenizer:
        """Load a serialized model; anything that is not a model :meth:`train` made is a CheckpointError."""
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(data)
        except RuntimeError:
            raise CheckpointError(
                f"tokenizer: {source} is not a sentencepiece model (damaged or truncated); "
                "retrain it with `python -m train tokenizer`"
            ) from None
        specials = (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id())
        if specials != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise CheckpointError(
                f"tokenizer: {source} has special ids (pad, unk, bos, eos) = {specials}, not "
                f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}; retrain it with `python -m train tokenizer`"
            )
        byte_ids = [processor.piece_to_id(f"<0x{b:02X}>") for b in range(NUM_BYTES)]
        if not all(processor.is_byte(i) for i in byte_ids):
            raise CheckpointError(
                f"tokenizer: {source} has no byte fallback, so it cannot spell every text; "
                "retrain it with `python -m train tokenizer`"
            )
        tokenizer = cls(processor)
        if tokenizer.decode(tokenizer.encode(_ROUND_TRIP_PROBE)) != _ROUND_TRIP_PROBE:
            raise CheckpointError(
                f"tokenizer: {source} normalizes text, so decoding would not give the prompt back; "
                "retrain it with `python -m train tokenizer`"
            )
        return tokenizer

    def save(self, path: str | Path) -> None:
        """Write the serialized model to ``path`` atomically (a killed run never leaves half a file)."""
        data = self.to_bytes()
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Load a model written by :meth:`save`; a missing or damaged file is a CheckpointError."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(
                f"tokenizer: {path} is missing; train it with `python -m train tokenizer` "
                "or pass the right --checkpoint"
            )
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CheckpointError(f"tokenizer: {path} cannot be read ({e.strerror})") from None
        return cls.from_bytes(data, source=str(path))

    # -------------------------------------------------------------------------- python protocol

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn pickle the collate function and the tokenizer with it.
        return {"model": self.to_bytes()}

    def __setstate__(self, state: dict) -> None:
        processor = spm.SentencePieceProcessor()
        processor.LoadFromSerializedProto(state["model"])
        TextTokenizer.__init__(self, processor)

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size})"


def _truncate(ids: list[int], max_length: int, eos: bool) -> list[int]:
    """Cut ``ids`` to ``max_length``, keeping the final eos when there is one."""
    if len(ids) <= max_length:
        return ids
    return ids[: max_length - 1] + [EOS_ID] if eos else ids[:max_length]
