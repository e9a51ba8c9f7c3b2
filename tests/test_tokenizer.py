"""Tests for tokenizer.TextTokenizer: exact round trips, special ids, batching, persistence, training."""

from __future__ import annotations

import io
import pickle
import random
import warnings

import pytest
import sentencepiece as spm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoint import CheckpointError
from cli import UserError
from tokenizer import TextTokenizer, TruncationWarning

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "diamond"]
RELATIONS = ["to the left of", "to the right of", "above", "below"]


def make_captions(n: int, seed: int = 0) -> list[str]:
    """Short shapes-like captions, deterministic by seed."""
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        first = f"{rng.choice(['a', 'a small', 'a large'])} {rng.choice(COLOURS)} {rng.choice(SHAPES)}"
        kind = rng.randrange(3)
        if kind == 0:
            scene = f"{first} {rng.choice(RELATIONS)} a {rng.choice(COLOURS)} {rng.choice(SHAPES)}"
        elif kind == 1:
            scene = f"{rng.choice(['two', 'three', 'four'])} {rng.choice(COLOURS)} {rng.choice(SHAPES)}s"
        else:
            scene = f"{first} in the {rng.choice(['top left', 'center', 'bottom right'])}"
        captions.append(rng.choice(["{}", "there is {}", "a picture of {}", "{}, on a white background"]).format(scene))
    return captions


CAPTIONS = make_captions(300)
VOCAB_SIZE = 300


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(CAPTIONS, vocab_size=VOCAB_SIZE)


def train_raw_sentencepiece(**options) -> bytes:
    """A sentencepiece model trained directly, without TextTokenizer's settings."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CAPTIONS), model_writer=model, vocab_size=VOCAB_SIZE, minloglevel=2, **options
    )
    return model.getvalue()


# ---------------------------------------------------------------------------------- round trips

NAMED_TEXTS = [
    "",
    "héllo wörld",
    "🐍🔥",
    "\t\n  x  ",
    " ",
    "   leading and trailing   ",
    "\x00\x01\x1f\x7f control",
    "\r\n",
    "\u2581",  # sentencepiece's own whitespace symbol, as a literal character
    "a \u2581 b\u2581\u2581c",
    "ﬁ ½ \u00a0 \u3000",  # NFKC would rewrite each of these
    "e\u0301 versus é",
    "日本語のキャプション",
    "<s></s><pad><unk>",
    "a red circle above a blue square",
]


@pytest.mark.parametrize("text", NAMED_TEXTS)
def test_round_trip_named(tok: TextTokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.characters(codec="utf-8")))  # valid Unicode: lone surrogates are refused
def test_round_trip_any_text(tok: TextTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


# Text dense in the characters that tokenizers get wrong: spaces, sentencepiece's "▁", line ends.
TRICKY_TEXT = st.text(alphabet=st.one_of(st.sampled_from(" \u2581\t\n\r\x00ab"), st.characters(codec="utf-8")))


@settings(max_examples=300, deadline=None)
@given(text=TRICKY_TEXT, bos=st.booleans(), eos=st.booleans())
def test_round_trip_tricky_text(tok: TextTokenizer, text: str, bos: bool, eos: bool) -> None:
    assert tok.decode(tok.encode(text, bos=bos, eos=eos)) == text


def test_whitespace_symbol_is_not_a_space(tok: TextTokenizer) -> None:
    assert tok.encode("a\u2581b") != tok.encode("a b")
    assert tok.decode(tok.encode("a\u2581b")) == "a\u2581b"


def test_unseen_characters_fall_back_to_bytes(tok: TextTokenizer) -> None:
    unseen = "Ω ∮ 漢字 🦜 \x07"
    assert not set(unseen) - {" "} & set("".join(CAPTIONS))
    ids = tok.encode(unseen, eos=False)
    assert tok.unk_id not in ids
    assert len(ids) >= len(unseen.encode("utf-8")) - unseen.count(" ")  # spelled byte by byte
    assert tok.decode(ids) == unseen


def test_training_learns_merges(tok: TextTokenizer) -> None:
    # With only ~40 ids beyond bytes and characters, BPE still spends them on the corpus's frequent
    # pairs: its captions take clearly fewer ids than characters.
    n_ids = sum(len(tok.encode(c, eos=False)) for c in CAPTIONS)
    assert n_ids < 0.8 * sum(len(c) for c in CAPTIONS)


def test_lone_surrogate_is_a_value_error(tok: TextTokenizer) -> None:
    with pytest.raises(ValueError, match="not valid Unicode"):
        tok.encode("a\ud800b")


def test_encode_rejects_a_list(tok: TextTokenizer) -> None:
    with pytest.raises(TypeError):
        tok.encode(["a red circle"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- special ids


def test_special_ids_are_fixed(tok: TextTokenizer) -> None:
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    raw = spm.SentencePieceProcessor(model_proto=tok.to_bytes())  # as any sentencepiece tool reads the file
    assert [raw.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert (raw.pad_id(), raw.unk_id(), raw.bos_id(), raw.eos_id()) == (0, 1, 2, 3)


def test_encode_adds_bos_and_eos_on_request(tok: TextTokenizer) -> None:
    body = tok.encode("a red circle", eos=False)
    assert tok.encode("a red circle") == body + [tok.eos_id]
    assert tok.encode("a red circle", bos=True) == [tok.bos_id] + body + [tok.eos_id]
    assert tok.encode("", bos=False, eos=False) == []
    assert tok.encode("") == [tok.eos_id]
    assert not {tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id} & set(body)


def test_decode_skips_pad_bos_eos(tok: TextTokenizer) -> None:
    body = tok.encode("two green squares", eos=False)
    assert tok.decode([tok.bos_id] + body + [tok.eos_id, tok.pad_id, tok.pad_id]) == "two green squares"
    assert tok.decode(torch.tensor(body + [tok.eos_id])) == "two green squares"


def test_decode_rejects_ids_outside_the_vocabulary(tok: TextTokenizer) -> None:
    with pytest.raises(ValueError, match=str(tok.vocab_size)):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(ValueError):
        tok.decode([-1])


# ------------------------------------------------------------------------------------ batching


def test_batch_pads_to_the_longest_with_a_mask(tok: TextTokenizer) -> None:
    texts = ["a red circle", "three purple diamonds to the left of a small yellow square", ""]
    rows = [tok.encode(t) for t in texts]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is truncated, so nothing may warn
        ids, mask = tok.batch(texts, max_length=64)
    longest = max(len(r) for r in rows)
    assert ids.shape == mask.shape == (3, longest)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    for i, row in enumerate(rows):
        assert ids[i, : len(row)].tolist() == row
        assert (ids[i, len(row) :] == tok.pad_id).all()
        assert mask[i].tolist() == [True] * len(row) + [False] * (longest - len(row))
        assert tok.decode(ids[i]) == texts[i]


def test_batch_with_bos(tok: TextTokenizer) -> None:
    ids, mask = tok.batch(["a blue square"], max_length=64, bos=True)
    assert ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id and mask.all()


def test_batch_truncation_warns_once_and_keeps_eos(tok: TextTokenizer) -> None:
    long_text = "a large orange triangle above a small green circle, on a white background"
    texts = [long_text, long_text.upper(), "a"]
    max_length = 5
    with pytest.warns(TruncationWarning) as record:
        ids, mask = tok.batch(texts, max_length=max_length)
    assert len(record) == 1
    message = str(record[0].message)
    assert "2 of 3 texts" in message and f"max_length={max_length}" in message
    assert record[0].filename == __file__  # points at the caller, not at the tokenizer
    assert ids.shape == (3, max_length)
    for i in range(2):
        assert ids[i].tolist() == tok.encode(texts[i])[: max_length - 1] + [tok.eos_id]
        assert mask[i].all()
    assert ids[2].tolist() == tok.encode("a") + [tok.pad_id] * (max_length - len(tok.encode("a")))


def test_training_counts_cut_captions_in_one_line_not_a_warning_a_batch(tok: TextTokenizer, capsys) -> None:
    import warnings

    from train.loop import CaptionTokens

    long_text = "a large orange triangle above a small green circle, on a white background"
    captions = CaptionTokens("seq2seq", tok, max_length=5, device=torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any Python warning fails the test
        ids, mask = captions([long_text, "a"])
        captions([long_text, long_text, long_text])
        captions([long_text], count=False)  # a probe's texts: not counted
    assert ids.shape == (2, 5) and captions.cut == 4
    assert capsys.readouterr().out.count("cut to that length") == 1
    with pytest.warns(TruncationWarning):
        assert ids.tolist() == tok.batch([long_text, "a"], max_length=5)[0].tolist()


def test_batch_truncation_keeps_bos_and_eos(tok: TextTokenizer) -> None:
    with pytest.warns(TruncationWarning, match="1 of 1"):
        ids, _ = tok.batch(["four yellow diamonds in the bottom right"], max_length=3, bos=True)
    assert ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id and ids.shape == (1, 3)


def test_batch_argument_errors(tok: TextTokenizer) -> None:
    with pytest.raises(TypeError):
        tok.batch("a red circle", max_length=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        tok.batch(["a"], max_length=0)
    with pytest.raises(ValueError):
        tok.batch(["a"], max_length=1, bos=True, eos=True)


def test_batch_of_nothing(tok: TextTokenizer) -> None:
    ids, mask = tok.batch([], max_length=8)
    assert ids.shape == mask.shape == (0, 0)


# --------------------------------------------------------------------------------- persistence


def test_save_load_gives_identical_encodings(tok: TextTokenizer, tmp_path) -> None:
    path = tmp_path / "run" / "tokenizer.model"
    tok.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.model"]  # no temporary file left
    loaded = TextTokenizer.load(path)
    assert loaded.to_bytes() == tok.to_bytes() == path.read_bytes()
    assert loaded.vocab_size == tok.vocab_size
    for text in CAPTIONS[:50] + NAMED_TEXTS:
        assert loaded.encode(text, bos=True) == tok.encode(text, bos=True)


def test_pickle_round_trip(tok: TextTokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.to_bytes() == tok.to_bytes()
    assert clone.encode("a\u2581red circle 🐍") == tok.encode("a\u2581red circle 🐍")


def test_missing_file_is_a_checkpoint_error(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="missing"):
        TextTokenizer.load(tmp_path / "tokenizer.model")
    with pytest.raises(CheckpointError, match="missing"):
        TextTokenizer.load(tmp_path)  # a directory is not a model file


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_file_is_a_checkpoint_error(tok: TextTokenizer, tmp_path, damage: str) -> None:
    data = tok.to_bytes()
    content = {"truncated": data[: len(data) // 2], "garbage": b"\x00\xffnot a model" * 10, "empty": b""}[damage]
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        TextTokenizer.load(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message


def test_foreign_special_ids_are_a_checkpoint_error() -> None:
    # sentencepiece's defaults: unk 0, bos 1, eos 2, no pad.
    foreign = train_raw_sentencepiece(model_type="bpe", byte_fallback=True)
    with pytest.raises(CheckpointError, match="special ids"):
        TextTokenizer.from_bytes(foreign)


def test_normalizing_model_is_a_checkpoint_error() -> None:
    # Right ids and byte fallback, but NFKC and whitespace clean-up would change the prompt.
    normalizing = train_raw_sentencepiece(
        model_type="bpe", byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3
    )
    with pytest.raises(CheckpointError, match="normalizes"):
        TextTokenizer.from_bytes(normalizing)


# ------------------------------------------------------------------------------------ training


def test_training_is_deterministic(tok: TextTokenizer) -> None:
    again = TextTokenizer.train(iter(CAPTIONS), vocab_size=VOCAB_SIZE)  # a one-shot iterator works too
    assert again.to_bytes() == tok.to_bytes()


def test_vocab_size_is_an_upper_bound(tok: TextTokenizer) -> None:
    assert tok.vocab_size == VOCAB_SIZE
    small = TextTokenizer.train(["a red circle", "a blue square"], vocab_size=1024)
    assert 4 + 256 < small.vocab_size < 1024
    assert small.decode(small.encode("a green triangle")) == "a green triangle"


def test_corpus_without_spaces_still_encodes_spaces() -> None:
    tok = TextTokenizer.train(["abc", "abcabc"] * 10, vocab_size=300)
    assert tok.decode(tok.encode(" a b\u2581c ")) == " a b\u2581c "


def test_vocab_size_too_small_is_a_user_error() -> None:
    with pytest.raises(UserError, match="--vocab-size"):
        TextTokenizer.train(CAPTIONS, vocab_size=100)
    many_characters = ["".join(chr(0x4E00 + i) for i in range(k, k + 20)) for k in range(0, 200, 20)]
    with pytest.raises(UserError, match="at least"):
        TextTokenizer.train(many_characters, vocab_size=270, character_coverage=1.0)


def test_empty_corpus_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no text"):
        TextTokenizer.train([], vocab_size=300)
    with pytest.raises(UserError, match="no text"):
        TextTokenizer.train(["", ""], vocab_size=300)
    with pytest.raises(UserError, match="short enough"):
        TextTokenizer.train(["x" * 5000], vocab_size=300)


def test_errors_from_the_texts_keep_their_type() -> None:
    def texts_that_fail():
        yield from CAPTIONS[:10]
        raise UserError("caption column missing")

    with pytest.raises(UserError, match="caption column missing"):
        TextTokenizer.train(texts_that_fail(), vocab_size=300)
    with pytest.raises(TypeError, match="str"):
        TextTokenizer.train(["a red circle", 7], vocab_size=300)  # type: ignore[list-item]
