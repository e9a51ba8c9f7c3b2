"""Speed, measured in one run so that ratios hold on a noisy machine.

Every figure comes from the same process: the machine's matmul peak first, then decoding (cached and
recomputing, with and without guidance, batch 1 and 16), prefill, the share of a decoding step spent
outside the model, the VQGAN's and the scorer's pictures/s, and training throughput for seq2seq and the
VQGAN with their achieved FLOP/s as a share of that peak. Weights are randomly initialized at the
configs of a run (or the presets): speed does not depend on their values.

On a GPU the cached decode step is compiled and captured as a CUDA graph, and decoding is also given as
a share of the memory-bandwidth limit: the bytes one step must read (all weights plus the KV cache
filled so far, averaged over the grid) over the card's bandwidth.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from data.sources import batches as make_batches
from data.sources import open_dataset
from devices import autocast
from devices.flops import count_flops, matmul_peak_flops, synchronize
from seq2seq import generate

__all__ = ["timed", "data_figures", "decode_figures", "vqgan_figures", "scorer_figures", "training_figures",
           "BANDWIDTH_GBS"]

# Peak memory bandwidth (GB/s) of cards the project is run on, by a substring of their name; --bandwidth
# overrides it for any other card.
BANDWIDTH_GBS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0, "A100": 1555.0,
                 "L40S": 864.0, "4090": 1008.0}


def timed(fn: Callable[[], object], device: torch.device, repeat: int = 3) -> float:
    """The best of ``repeat`` timings of ``fn()`` (after one warm-up call), in seconds."""
    fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def data_figures(*, size: int = 64, batch: int = 64, batches: int = 20, workers=(0, 2)) -> list[dict]:
    """Examples/s the data layer delivers from `shapes` (rendered, captioned, as tensors) per worker count."""

    dataset = open_dataset("shapes", size, split="train")
    rows = []
    for count in workers:
        iterator = make_batches(dataset, batch, seed=0, workers=count)
        next(iterator)  # start-up (worker processes) is not throughput
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        seconds = time.perf_counter() - start
        rows.append({"workers": count, "size": size, "examples_per_s": batch * batches / seconds})
        del iterator
    return rows


def card_bandwidth(device: torch.device, override: float | None) -> float | None:
    """Bytes/s of the card's memory, or None on a CPU / an unknown card without --bandwidth."""
    if override:
        return override * 1e9
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, gbs in BANDWIDTH_GBS.items():
        if key in name:
            return gbs * 1e9
    return None


def _step_bytes(model, rows: int, text_len: int | None = None) -> float:
    """Bytes one cached decode step reads: every decoder weight once (not the encoder's, not the embedding
    tables, of which a step reads one row each, and not cross-attention's key and value projections, which
    run once per prompt), plus the key/value caches: the image positions filled so far (grid average) and
    ``text_len`` text positions (default: all the caches hold)."""
    config = model.config
    decoder = model.decoder
    once = [decoder.embed, decoder.row_embed, decoder.col_embed]
    once += [proj for block in decoder.blocks for proj in (block.cross_attn.wk, block.cross_attn.wv)]
    skipped = {id(p) for m in once for p in m.parameters()}
    weights = sum(p.numel() * p.element_size() for p in decoder.parameters() if id(p) not in skipped)
    element = next(model.parameters()).element_size()
    kv_per_position = 2 * config.n_decoder_layers * config.d_model * element * rows
    text_len = config.max_text_len if text_len is None else text_len
    return weights + kv_per_position * ((config.image_len + 1) / 2 + text_len)


@torch.inference_mode()
def decode_figures(model, *, batches=(1, 16), text_len: int = 16, recompute: bool = True, compile: bool = False,
                   bandwidth: float | None = None) -> list[dict]:
    """One row per (batch, guidance, method): image tokens/s, ms per step, prefill ms, outside-model share."""

    device = next(model.parameters()).device
    config = model.config
    tokens = config.image_len
    rows = []
    for batch in batches:
        torch.manual_seed(0)
        text_ids = torch.randint(4, config.text_vocab_size, (batch, text_len), device=device)
        text_mask = torch.ones_like(text_ids, dtype=torch.bool)
        for cfg in (1.0, 3.0):
            options = dict(seeds=0, cfg_scale=cfg, top_k=100)
            cached = timed(lambda: generate(model, text_ids, text_mask, compile=compile, **options), device, repeat=2)
            decode_rows = batch * (2 if cfg != 1.0 else 1)
            model.setup_caches(decode_rows, device=device)
            prefill_ids = torch.cat([text_ids, text_ids]) if cfg != 1.0 else text_ids
            prefill_mask = torch.ones_like(prefill_ids, dtype=torch.bool)
            prefill = timed(lambda: model.prefill(prefill_ids, prefill_mask), device, repeat=3)
            # The model alone: the same number of decode steps with nothing sampled between them.
            step_ids = torch.zeros(decode_rows, 1, dtype=torch.long, device=device)

            def model_only():
                model.prefill(prefill_ids, prefill_mask)
                for position in range(1, tokens):
                    model.decode_one_token(step_ids, torch.tensor([position], device=device))

            model_s = timed(model_only, device, repeat=2)
            row = {"batch": batch, "cfg": cfg, "method": "cached", "seconds": cached,
                   "image_tokens_per_s": batch * tokens / cached, "ms_per_step": 1000 * cached / tokens,
                   "prefill_ms": 1000 * prefill, "outside_model_share": max(0.0, 1 - model_s / cached)}
            if bandwidth:
                step_s = (cached - prefill) / (tokens - 1)
                row["bandwidth_share"] = _step_bytes(model, decode_rows) / step_s / bandwidth
            rows.append(row)
            if recompute and cfg == 1.0:
                slow = timed(lambda: generate(model, text_ids, text_mask, use_cache=False, **options), device, repeat=1)
                rows.append({"batch": batch, "cfg": cfg, "method": "recompute", "seconds": slow,
                             "image_tokens_per_s": batch * tokens / slow, "ms_per_step": 1000 * slow / tokens,
                             "cache_speedup": slow / cached})
    return rows


@torch.inference_mode()
def vqgan_figures(vqgan, *, size: int, batch: int = 32) -> dict:
    """Encode and decode pictures/s at ``batch``."""
    device = next(vqgan.parameters()).device
    images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    ids = vqgan.encode(images)
    encode = timed(lambda: vqgan.encode(images), device)
    decode = timed(lambda: vqgan.decode(ids), device)
    return {"batch": batch, "size": size, "encode_pictures_per_s": batch / encode,
            "decode_pictures_per_s": batch / decode}


@torch.inference_mode()
def scorer_figures(scorer, *, batch: int = 64, text_len: int = 16) -> dict:
    """Pictures/s scored against their prompts at ``batch``."""
    device = next(scorer.parameters()).device
    config = scorer.config
    images = torch.rand(batch, 3, config.image_size, config.image_size, device=device) * 2 - 1
    text_ids = torch.randint(4, config.text_vocab_size, (batch, text_len), device=device)
    mask = torch.ones_like(text_ids, dtype=torch.bool)
    seconds = timed(lambda: scorer.score(images, text_ids, mask), device)
    return {"batch": batch, "pictures_per_s": batch / seconds}


def _train_step_fn(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()

    return step


def training_figures(seq2seq, vqgan, *, peak: float, seq2seq_batch: int = 64, vqgan_batch: int = 32, size: int = 64,
                     text_len: int = 16, amp_dtype: torch.dtype | None = None) -> dict:
    """Seq2seq image tokens/s and VQGAN pictures/s, each with achieved FLOP/s over the measured ``peak``;
    both run under autocast in ``amp_dtype`` (None: fp32), as training does (``devices.autocast``).

    A step is forward, backward and the AdamW update on random data at the stage's default batch; its
    FLOPs are counted over one real step (FlopCounterMode). The VQGAN step is the autoencoder's
    reconstruction and quantizer loss (the discriminator adds a second, smaller step in training).
    """
    device = next(seq2seq.parameters()).device
    config = seq2seq.config
    text_ids = torch.randint(4, config.text_vocab_size, (seq2seq_batch, text_len), device=device)
    text_mask = torch.ones_like(text_ids, dtype=torch.bool)
    image_ids = torch.randint(0, config.codebook_size, (seq2seq_batch, config.image_len), device=device)

    def seq2seq_loss() -> torch.Tensor:
        with autocast(device, amp_dtype):
            return seq2seq.loss(text_ids, text_mask, image_ids)

    seq2seq.train()
    step = _train_step_fn(seq2seq, seq2seq_loss)
    flops = count_flops(step)
    seconds = timed(step, device, repeat=3)
    result = {"seq2seq": {"batch": seq2seq_batch, "image_tokens_per_s": seq2seq_batch * config.image_len / seconds,
                          "step_s": seconds, "flops_per_step": flops, "achieved_flops": flops / seconds,
                          "share_of_peak": flops / seconds / peak}}

    images = torch.rand(vqgan_batch, 3, size, size, device=device) * 2 - 1

    def vqgan_loss() -> torch.Tensor:
        with autocast(device, amp_dtype):
            reconstructions, quantized = vqgan(images)
        return (reconstructions - images).abs().mean() + quantized.loss

    vqgan.train()
    step = _train_step_fn(vqgan, vqgan_loss)
    flops = count_flops(step)
    seconds = timed(step, device, repeat=3)
    result["vqgan"] = {"batch": vqgan_batch, "pictures_per_s": vqgan_batch / seconds, "step_s": seconds,
                       "flops_per_step": flops, "achieved_flops": flops / seconds,
                       "share_of_peak": flops / seconds / peak}
    vqgan.eval()
    seq2seq.eval()
    return result


def peak_figure(device: torch.device, dtype: torch.dtype) -> float:
    """The matmul peak, best of two measurements (the first also warms the threads up)."""
    return max(matmul_peak_flops(device, dtype), matmul_peak_flops(device, dtype))
