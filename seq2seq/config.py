"""The configuration of the text-to-image-token transformer, with named presets.

One dataclass, saved as ``RUN/seq2seq/config.json`` (``asdict``) and rebuilt from it. Derived sizes are
filled in ``__post_init__`` (gpt-fast's ``ModelArgs``); the presets size the model for a test, a CPU demo
and two GPU budgets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cli import UserError

__all__ = ["Seq2SeqConfig", "PRESETS"]


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of ``k`` that is >= ``n``."""
    return n if n % k == 0 else n + k - n % k


@dataclass
class Seq2SeqConfig:
    """Sizes of the text encoder and the image decoder.

    The vocabulary, codebook and grid sizes must match the run's tokenizer and VQGAN
    (:meth:`seq2seq.Seq2Seq.check_fits`). The decoder reads ``codebook_size + 1`` token ids: the codebook
    ids and a begin-of-image id, ``bos_id = codebook_size``.
    """

    text_vocab_size: int = 1024
    codebook_size: int = 1024
    grid_size: int = 8  # the image is grid_size x grid_size codebook ids, generated in raster order
    max_text_len: int = 64
    d_model: int = 256
    n_heads: int = 4
    n_encoder_layers: int = 4
    n_decoder_layers: int = 8
    mlp_ratio: float = 8 / 3  # SwiGLU hidden width as a multiple of d_model (about 4 * 2/3)
    mlp_hidden: int | None = None  # derived from mlp_ratio when None, rounded up to a multiple of 64
    dropout: float = 0.0
    rope_base: float = 10_000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("text_vocab_size", "codebook_size", "grid_size", "max_text_len", "d_model", "n_heads",
                     "n_encoder_layers", "n_decoder_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary positions")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (self.rope_base > 1 and self.norm_eps > 0 and self.mlp_ratio > 0):  # NaN fails each comparison
            raise ValueError(f"rope_base must be > 1, norm_eps and mlp_ratio > 0; got {self.rope_base}, "
                             f"{self.norm_eps}, {self.mlp_ratio}")
        if self.mlp_hidden is None:
            self.mlp_hidden = find_multiple(round(self.mlp_ratio * self.d_model), 64)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def image_len(self) -> int:
        """Image tokens per picture: the grid in raster order."""
        return self.grid_size * self.grid_size

    @property
    def bos_id(self) -> int:
        """The decoder's begin-of-image id, one past the codebook."""
        return self.codebook_size

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Seq2SeqConfig:
        """The named preset (``tiny``, ``small``, ``base``, ``large``) with ``overrides`` applied."""
        if name not in PRESETS:
            raise UserError(f"unknown seq2seq preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Parameter counts with each preset's own vocabulary, codebook and grid: tiny 0.06 M, small 9.6 M,
# base 106 M, large 349 M (the decoder holds about three quarters of each).
PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: a few thousand parameters, milliseconds per step.
    "tiny": dict(text_vocab_size=64, codebook_size=32, grid_size=4, max_text_len=64, d_model=32, n_heads=2,
                 n_encoder_layers=1, n_decoder_layers=2),
    # The CPU demo: trains on `shapes` in minutes on a laptop.
    "small": dict(d_model=256, n_heads=4, n_encoder_layers=3, n_decoder_layers=6),
    # One GPU.
    "base": dict(max_text_len=128, d_model=768, n_heads=12, n_encoder_layers=4, n_decoder_layers=8, dropout=0.1),
    # Several GPUs (FSDP2) or one large one.
    "large": dict(max_text_len=128, d_model=1024, n_heads=16, n_encoder_layers=6, n_decoder_layers=16,
                  dropout=0.1),
}
