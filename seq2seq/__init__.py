"""Stage 2: the text-to-image-token transformer (text encoder, image decoder, KV cache, sampling).

``from seq2seq import Seq2Seq, Seq2SeqConfig, generate``; see :mod:`seq2seq.model` and
:mod:`seq2seq.generate`.
"""

from seq2seq.cache import KVCache
from seq2seq.config import PRESETS, Seq2SeqConfig
from seq2seq.filters import counter_uniform, filter_logits, sample_from_probs
from seq2seq.generate import EMPTY_TEXT_IDS, generate
from seq2seq.model import Seq2Seq

__all__ = [
    "Seq2Seq",
    "Seq2SeqConfig",
    "PRESETS",
    "KVCache",
    "generate",
    "EMPTY_TEXT_IDS",
    "filter_logits",
    "sample_from_probs",
    "counter_uniform",
]
