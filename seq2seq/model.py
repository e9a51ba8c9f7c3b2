"""The text-to-image-token transformer: a text encoder and an image decoder with cross-attention.

Text-to-image as translation (Parti, Yu et al. 2022; DALL-E 1, Ramesh et al. 2021): a bidirectional
encoder reads the prompt's sentencepiece ids; a causal decoder writes the VQGAN's codebook ids of the
picture in raster order, attending to the encoded text. Pre-norm blocks with RMSNorm and SwiGLU; rotary
positions for the text; learned row and column embeddings for the image grid, so every image token knows
its cell (and cross-attention can find "in the top left").

Training runs :meth:`Seq2Seq.forward` with teacher forcing, and :meth:`Seq2Seq.loss` is its objective (the
model owns its loss, nanoGPT's ``forward(idx, targets)``). Decoding runs :meth:`Seq2Seq.prefill` once
per prompt (encode the text, cache its keys and values in every decoder layer, read any given prefix)
and then :meth:`Seq2Seq.decode_one_token` once per image token; that step has static shapes, so it can
be compiled and captured whole (gpt-fast ``prefill`` / ``decode_one_token``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from checkpoint import CheckpointError, load_pretrained, save_pretrained
from seq2seq.cache import KVCache
from seq2seq.config import Seq2SeqConfig
from seq2seq.layers import CausalSelfAttention, CrossAttention, GatedMLP, RMSNorm, SelfAttention, rope_table

__all__ = ["Seq2Seq", "TextEncoder", "ImageDecoder", "image_token_loss"]


class EncoderBlock(nn.Module):
    """Pre-norm block: bidirectional self-attention, then the gated MLP."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = SelfAttention(config.d_model, config.n_heads, config.dropout)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = GatedMLP(config.d_model, config.mlp_hidden, config.dropout)

    def forward(self, x: Tensor, mask: Tensor, rope: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), mask, rope)
        return x + self.mlp(self.mlp_norm(x))


class DecoderBlock(nn.Module):
    """Pre-norm block: causal self-attention, cross-attention to the text, then the gated MLP."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.self_norm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = CausalSelfAttention(config.d_model, config.n_heads, config.dropout)
        self.cross_norm = RMSNorm(config.d_model, config.norm_eps)
        self.cross_attn = CrossAttention(config.d_model, config.n_heads, config.dropout)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = GatedMLP(config.d_model, config.mlp_hidden, config.dropout)

    def forward(self, x: Tensor, self_mask: Tensor, cross_mask: Tensor, memory: Tensor) -> Tensor:
        """Teacher forcing: ``x`` (B, T, C) over itself and the encoded text ``memory`` (B, L, C)."""
        x = x + self.self_attn(self.self_norm(x), self_mask)
        x = x + self.cross_attn(self.cross_norm(x), cross_mask, memory)
        return x + self.mlp(self.mlp_norm(x))

    def decode(self, x: Tensor, self_mask: Tensor, cross_mask: Tensor, input_pos: Tensor, kv_len: int,
               text_len: int) -> Tensor:
        """Decoding: ``x`` (B, T, C) at ``input_pos`` over the key/value caches, which it extends; attention
        reads the first ``kv_len`` image positions and ``text_len`` text positions of the caches."""
        x = x + self.self_attn.decode(self.self_norm(x), self_mask, input_pos, kv_len)
        x = x + self.cross_attn.decode(self.cross_norm(x), cross_mask, text_len)
        return x + self.mlp.decode(self.mlp_norm(x))

    def fuse_for_decoding(self, dtype: torch.dtype) -> None:
        self.self_attn.fuse_for_decoding(dtype)
        self.mlp.fuse_for_decoding(dtype)


class TextEncoder(nn.Module):
    """Token embedding, bidirectional blocks with rotary positions, final norm: (B, L) ids -> (B, L, C)."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.max_len = config.max_text_len
        self.embed = nn.Embedding(config.text_vocab_size, config.d_model)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_encoder_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.register_buffer("rope", rope_table(config.max_text_len, config.head_dim, config.rope_base),
                             persistent=False)  # (max_text_len, D/2, 2)

    def forward(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        length = text_ids.shape[1]
        if not 1 <= length <= self.max_len:
            raise ValueError(f"text of {length} tokens; the model reads 1 to {self.max_len} (max_text_len)")
        mask = text_mask.bool()[:, None, None, :]  # (B, 1, 1, L): keys that are real tokens
        rope = self.rope[:length]
        x = self.embed(text_ids)  # (B, L, C)
        for block in self.blocks:
            x = block(x, mask, rope)
        return self.norm(x)


class ImageDecoder(nn.Module):
    """Image-token embedding plus row and column embeddings, causal blocks, final norm, logits head.

    :meth:`forward` is the teacher-forced pass over the encoded text; :meth:`decode` reads and extends the
    caches that :meth:`setup_caches` allocated and :meth:`fill_caches` filled. Two methods, not one that
    switches on its arguments: which of the two runs is always written at the call.
    """

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.grid_size = config.grid_size
        self.embed = nn.Embedding(config.codebook_size + 1, config.d_model)  # codebook ids and bos
        self.row_embed = nn.Embedding(config.grid_size, config.d_model)
        self.col_embed = nn.Embedding(config.grid_size, config.d_model)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_decoder_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.codebook_size, bias=False)
        causal = torch.ones(config.image_len, config.image_len, dtype=torch.bool).tril()  # (S, S)
        self.register_buffer("causal_mask", causal, persistent=False)
        # The same as an additive bias, what a decode step hands the attention kernel: made once, not per step.
        causal_bias = torch.zeros(causal.shape).masked_fill(~causal, float("-inf"))  # (S, S)
        self.register_buffer("causal_bias", causal_bias, persistent=False)
        self.register_buffer("text_bias", None, persistent=False)  # (B, max_text_len) 0 or -inf, once set up
        self.text_len = 0  # the cached text positions decoding attends to (a bucket: see decode_length)

    def embed_positions(self, input_ids: Tensor, input_pos: Tensor) -> Tensor:
        """Token plus row and column embeddings (B, T, C) of ids (B, T) at grid positions (T,) or (B, T)."""
        rows = torch.div(input_pos, self.grid_size, rounding_mode="floor")
        cols = input_pos % self.grid_size
        return self.embed(input_ids) + self.row_embed(rows) + self.col_embed(cols)  # (B, T, C)

    def forward(self, input_ids: Tensor, memory: Tensor, text_mask: Tensor) -> Tensor:
        """Teacher forcing: logits (B, T, codebook_size) for decoder inputs ``input_ids`` (B, T) at positions
        0..T-1, attending to the encoded text ``memory`` (B, L, C) where ``text_mask`` (B, L) is True."""
        length = input_ids.shape[1]
        x = self.embed_positions(input_ids, torch.arange(length, device=input_ids.device))
        self_mask = self.causal_mask[None, None, :length, :length]  # (1, 1, T, T)
        cross_mask = text_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
        for block in self.blocks:
            x = block(x, self_mask, cross_mask, memory)
        return self.head(self.norm(x))

    def decode(self, input_ids: Tensor, input_pos: Tensor, kv_len: int | None = None) -> Tensor:
        """Decoding: logits (B, T, codebook_size) for ``input_ids`` (B, T) at grid positions ``input_pos``
        (T,), or (B, T) every row at its own positions (rows at different steps), over the caches, which
        this call extends. Self-attention reads the caches' first ``kv_len`` positions (default all; it
        must exceed every position in ``input_pos``); cross-attention reads the text positions filled."""
        if self.text_bias is None:
            raise RuntimeError("decoding needs key/value caches: call setup_caches(batch_size) first")
        kv_len = self.causal_bias.shape[0] if kv_len is None else kv_len
        x = self.embed_positions(input_ids, input_pos)
        dtype = _compute_dtype(self.head.weight)
        self_mask = self.causal_bias[input_pos, :kv_len].to(dtype)  # (T, kv_len), or (B, T, kv_len) per row
        self_mask = self_mask[:, None] if self_mask.dim() == 3 else self_mask[None, None]  # (B or 1, 1, T, kv_len)
        cross_mask = self.text_bias[: x.shape[0], None, None, : self.text_len].to(dtype)  # (B, 1, 1, text_len)
        for block in self.blocks:
            x = block.decode(x, self_mask, cross_mask, input_pos, kv_len, self.text_len)
        return self.head(self.norm(x))

    def setup_caches(self, batch_size: int, max_text_len: int, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate every layer's self-attention cache (whole grid) and cross-attention cache (whole text)."""
        for block in self.blocks:
            attn = block.self_attn
            block.self_attn.kv_cache = KVCache(batch_size, attn.n_heads, self.causal_mask.shape[0], attn.head_dim,
                                               dtype, device)
            block.cross_attn.kv_cache = KVCache(batch_size, attn.n_heads, max_text_len, attn.head_dim, dtype, device)
        self.text_bias = torch.full((batch_size, max_text_len), float("-inf"), device=device)
        self.text_len = 0

    def fuse_for_decoding(self, dtype: torch.dtype) -> None:
        """Stack each block's projections that a decode step runs side by side (q, k, v; w1, w3) in ``dtype``."""
        for block in self.blocks:
            block.fuse_for_decoding(dtype)

    def fill_caches(self, memory: Tensor, text_mask: Tensor, slots: Tensor | None = None) -> None:
        """Cache the text's keys and values (B, L, C) in every layer, and its mask (B, L): in the first B
        rows, or in the rows ``slots`` (B,)."""
        batch, length = text_mask.shape
        for block in self.blocks:
            block.cross_attn.fill_cache(memory, slots)
        rows = slice(0, batch) if slots is None else slots
        self.text_bias[rows] = float("-inf")
        self.text_bias[rows, :length] = torch.zeros_like(text_mask, dtype=torch.float).masked_fill(
            ~text_mask.bool(), float("-inf"))
        # Cross-attention reads the text positions any row may hold; the first B rows are all new without slots.
        longest = length if slots is None else max(length, self.text_len)
        self.text_len = decode_length(longest, self.text_bias.shape[1])

    def move_slots(self, source: Tensor, target: Tensor) -> None:
        """Copy every cache's rows ``source`` (N,) onto rows ``target`` (N,): self- and cross-attention, text mask."""
        for block in self.blocks:
            block.self_attn.cache().move_slots(source, target)
            block.cross_attn.cache().move_slots(source, target)
        self.text_bias[target] = self.text_bias[source]


class Seq2Seq(nn.Module):
    """Text ids in, logits over the codebook for each image token out; see the module docstring."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = config
        self.encoder = TextEncoder(config)
        self.decoder = ImageDecoder(config)
        self.apply(_init_weights)
        # Residual branches start small, so each stack starts close to the identity (GPT-2).
        for stack, branches in ((self.encoder, 2 * config.n_encoder_layers), (self.decoder, 3 * config.n_decoder_layers)):
            for name, param in stack.named_parameters():
                if name.endswith(("wo.weight", "w2.weight")):
                    nn.init.normal_(param, std=0.02 / math.sqrt(branches))

    # ---------------------------------------------------------------------------------------- training

    def encode(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Encode right-padded text ids (B, L) with their mask (True = real token) to (B, L, C)."""
        return self.encoder(text_ids, text_mask)

    def decode(self, memory: Tensor, text_mask: Tensor, decoder_ids: Tensor) -> Tensor:
        """Logits (B, T, V) for decoder inputs (B, T) that start with ``bos_id``, without the cache."""
        return self.decoder(decoder_ids, memory, text_mask)

    def forward(self, text_ids: Tensor, text_mask: Tensor, image_ids: Tensor) -> Tensor:
        """Teacher forcing: logits (B, T, codebook_size) where position t predicts ``image_ids[:, t]``.

        ``image_ids`` is (B, T) in raster order, T <= grid_size**2, or a whole grid (B, h, w). Position
        t sees the text and ``bos, image_ids[:, :t]``. Every text row needs at least one real token.
        """
        image_ids = image_ids.flatten(1)  # (B, T)
        if image_ids.shape[1] > self.config.image_len:
            raise ValueError(f"{image_ids.shape[1]} image tokens; the grid holds {self.config.image_len}")
        bos = image_ids.new_full((image_ids.shape[0], 1), self.config.bos_id)
        decoder_ids = torch.cat([bos, image_ids[:, :-1]], dim=1)  # (B, T)
        return self.decode(self.encode(text_ids, text_mask), text_mask, decoder_ids)

    def loss(self, text_ids: Tensor, text_mask: Tensor, image_ids: Tensor) -> Tensor:
        """The training objective: mean cross-entropy (nats, fp32) of every image token under teacher forcing.

        Arguments as :meth:`forward`'s. Under autocast the logits come out in the autocast dtype and the
        cross-entropy is taken in fp32 all the same. A wrapper such as DistributedDataParallel only sees
        ``forward``: call it, then :func:`image_token_loss` on its logits.
        """
        return image_token_loss(self(text_ids, text_mask, image_ids), image_ids)

    # ---------------------------------------------------------------------------------------- decoding

    def setup_caches(self, max_batch_size: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> None:
        """Prepare decoding for up to ``max_batch_size`` rows: preallocate the caches (kept if the ones there
        fit) and stack the projections a decode step runs side by side from the current weights.

        ``dtype`` defaults to the dtype decoding computes in: autocast's if it is on, else the weights'.
        Call it again after the weights change (training, loading): decoding uses the stacked copies.
        """
        weight = self.decoder.head.weight
        compute = _compute_dtype(weight)
        dtype = dtype or compute
        device = torch.device(device) if device is not None else weight.device
        self.decoder.fuse_for_decoding(compute)
        cache = self.decoder.blocks[0].self_attn.kv_cache
        if cache is not None:
            buffer = cache.k_cache
            usable = not buffer.is_inference() or torch.is_inference_mode_enabled()
            if cache.batch_size >= max_batch_size and buffer.dtype == dtype and buffer.device == device and usable:
                return
        self.decoder.setup_caches(max_batch_size, self.config.max_text_len, dtype, device)

    def decode_length(self, positions: int) -> int:
        """The cache positions a decode step reads when ``positions`` of them are written: a bucket of 16."""
        return decode_length(positions, self.config.image_len)

    @torch.no_grad()
    def prefill(self, text_ids: Tensor, text_mask: Tensor, prefix_ids: Tensor | None = None) -> Tensor:
        """Start decoding a batch: encode the text, fill the caches, read ``bos`` and any given prefix.

        ``prefix_ids`` (B, k) are the picture's first k ids. Returns the logits (B, codebook_size) of
        image token k. Needs :meth:`setup_caches` for at least B rows.
        """
        batch = text_ids.shape[0]
        memory = self.encode(text_ids, text_mask)
        self.decoder.fill_caches(memory, text_mask)
        decoder_ids = text_ids.new_full((batch, 1), self.config.bos_id)
        if prefix_ids is not None:
            decoder_ids = torch.cat([decoder_ids, prefix_ids], dim=1)  # (B, 1 + k)
        if decoder_ids.shape[1] > self.config.image_len:
            raise ValueError(f"a prefix of {decoder_ids.shape[1] - 1} ids leaves nothing to generate")
        positions = torch.arange(decoder_ids.shape[1], device=decoder_ids.device)
        return self.decoder.decode(decoder_ids, positions, self.decode_length(decoder_ids.shape[1]))[:, -1]  # (B, V)

    @torch.no_grad()
    def prefill_slots(self, text_ids: Tensor, text_mask: Tensor, slots: Tensor) -> None:
        """Start decoding rows ``slots`` (B,) of the caches, whatever the other rows are doing: encode the
        text (B, L) and cache its keys, values and mask in those rows.

        Each row then reads ``bos`` at decoder position 0 in :meth:`decode_one_token` with per-row
        positions, which gives the logits :meth:`prefill` returns (without a prefix).
        """
        self.decoder.fill_caches(self.encode(text_ids, text_mask), text_mask, slots)

    def move_slots(self, source: Tensor, target: Tensor) -> None:
        """Copy the cache rows ``source`` (N,) onto rows ``target`` (N,), to keep a batch's rows first."""
        self.decoder.move_slots(source, target)

    @torch.no_grad()
    def decode_one_token(self, token_ids: Tensor, input_pos: Tensor, kv_len: int | None = None) -> Tensor:
        """Read image ids (B, 1) at decoder position ``input_pos`` (1,); logits (B, codebook_size) of the next.

        The token at decoder position p is image token p - 1 (position 0 holds ``bos``), so the logits
        returned predict image token ``input_pos``. Static shapes: compile this with torch.compile.
        ``input_pos`` (B,) puts every row at its own position: rows of different requests at different
        steps in one batch (continuous batching).

        ``kv_len``, at least every row's position + 1, limits self-attention to the caches' first ``kv_len``
        positions: pass ``decode_length(max position + 1)`` to attend only over the filled part (one shape
        per bucket of 16). The default, all positions, keeps one shape for every step.
        """
        if input_pos.shape[0] != 1:
            input_pos = input_pos[:, None]  # (B, 1)
        return self.decoder.decode(token_ids, input_pos, kv_len)[:, -1]  # (B, V)

    # ---------------------------------------------------------------------------------------- files

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Seq2Seq:
        """Load ``directory/config.json`` and ``model.safetensors`` (strict), in eval mode."""
        return load_pretrained(cls, Seq2SeqConfig, directory, "seq2seq")

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the config and the weights (not the caches) to ``directory``, atomically."""
        save_pretrained(self, self.config, directory)

    def check_fits(self, tokenizer_vocab_size: int, codebook_size: int, grid_size: int) -> None:
        """Raise CheckpointError naming the part (tokenizer or vqgan) that this model was not trained with."""
        config = self.config
        if tokenizer_vocab_size != config.text_vocab_size:
            raise CheckpointError(
                f"tokenizer does not fit seq2seq: the tokenizer has {tokenizer_vocab_size} ids but seq2seq was "
                f"trained on {config.text_vocab_size}; use the tokenizer.model of the run that trained seq2seq")
        if codebook_size != config.codebook_size:
            raise CheckpointError(
                f"vqgan does not fit seq2seq: the VQGAN has {codebook_size} codes but seq2seq was trained on "
                f"{config.codebook_size}; use the vqgan of the run that trained seq2seq, or retrain seq2seq")
        if grid_size != config.grid_size:
            raise CheckpointError(
                f"vqgan does not fit seq2seq: the VQGAN makes {grid_size}x{grid_size} grids but seq2seq writes "
                f"{config.grid_size}x{config.grid_size}; use the same --size and vqgan as seq2seq's training")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def decode_length(positions: int, limit: int, bucket: int = 16) -> int:
    """``positions`` rounded up to a multiple of ``bucket``, at most ``limit``: how much of a cache attention reads.

    A multiple of 16 keeps the CPU attention kernel on its vector path, so the values equal those of
    attending over the whole cache with the unwritten positions masked (tested); 16 shapes for 256 tokens.
    """
    return min(limit, -(-positions // bucket) * bucket)


def _compute_dtype(weight: Tensor) -> torch.dtype:
    """The dtype the decoder's products run in: autocast's when it is on for the weight's device, else the weight's."""
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def image_token_loss(logits: Tensor, image_ids: Tensor) -> Tensor:
    """Mean cross-entropy (fp32) of ``logits`` (B, T, codebook_size) against ``image_ids`` (B, T) or (B, h, w)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), image_ids.flatten())


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
