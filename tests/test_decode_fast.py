"""The lean decode step: stacked projections, attention over the filled cache, noise made ahead.

Each shortcut must give the very values of the plain computation, so that pictures stay what they were
for a given seed: the shipped runs' tokens are pinned to those the decoder made before the shortcuts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from seq2seq import Seq2Seq, Seq2SeqConfig, counter_uniform, generate
from seq2seq.filters import CounterNoise
from seq2seq.model import decode_length
from tokenizer.text import TextTokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model() -> Seq2Seq:
    """A model with a 64-token grid, so that decoding crosses four length buckets."""
    torch.manual_seed(0)
    config = Seq2SeqConfig.from_preset("tiny", grid_size=8, d_model=64, n_heads=2, codebook_size=64)
    return Seq2Seq(config).eval()


def text(config: Seq2SeqConfig, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, config.text_vocab_size, (len(lengths), max(lengths)), generator=g)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask


def stepwise_logits(model: Seq2Seq, text_ids, text_mask, image_ids, bucketed: bool) -> torch.Tensor:
    """Logits (B, S, V) of every image token, decoded step by step; over the filled buckets or the whole cache."""
    model.setup_caches(text_ids.shape[0])
    steps = [model.prefill(text_ids, text_mask)]
    for t in range(1, model.config.image_len):
        kv_len = model.decode_length(t + 1) if bucketed else None
        steps.append(model.decode_one_token(image_ids[:, t - 1 : t], torch.tensor([t]), kv_len))
    return torch.stack(steps, dim=1)


def test_decode_length_is_a_bucket_of_16_that_covers_the_positions():
    assert [decode_length(n, 64) for n in (1, 15, 16, 17, 48, 49, 64)] == [16, 16, 16, 32, 48, 64, 64]
    assert decode_length(250, 100) == 100


def test_attending_over_the_filled_buckets_gives_the_values_of_the_whole_cache(model):
    config = model.config
    text_ids, text_mask = text(config, [5, 2, 9])
    image_ids = torch.randint(0, config.codebook_size, (3, config.image_len), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        bucketed = stepwise_logits(model, text_ids, text_mask, image_ids, bucketed=True)
        whole = stepwise_logits(model, text_ids, text_mask, image_ids, bucketed=False)
        forced = model(text_ids, text_mask, image_ids)
    assert torch.equal(bucketed, whole)
    torch.testing.assert_close(bucketed, forced, atol=1e-4, rtol=0)  # the cache agrees with teacher forcing


def test_decoding_uses_the_weights_of_the_last_setup(model):
    """The stacked projections are copies made by setup_caches: after the weights change, setting up again
    decodes with the new ones (generate always does)."""
    config = model.config
    changed = Seq2Seq(config).eval()
    changed.load_state_dict(model.state_dict())
    text_ids, text_mask = text(config, [4])
    image_ids = torch.randint(0, config.codebook_size, (1, config.image_len), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        changed.setup_caches(1)
        for name, param in changed.decoder.named_parameters():
            if name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")):
                param.mul_(1.5)
        stepwise = stepwise_logits(changed, text_ids, text_mask, image_ids, bucketed=True)
        forced = changed(text_ids, text_mask, image_ids)
    torch.testing.assert_close(stepwise, forced, atol=1e-4, rtol=0)


def test_noise_made_ahead_equals_the_noise_of_each_step():
    seeds = torch.tensor([0, 7, 2**40 + 3, -5])
    noise = CounterNoise(seeds, 100)
    block = noise.steps(30, 5)  # (R, 5, V)
    for i in range(5):
        assert torch.equal(block[:, i], counter_uniform(seeds, 30 + i, 100))
        assert torch.equal(noise(torch.tensor([30 + i])), block[:, i])
    per_row = noise(torch.tensor([30, 31, 32, 33]))  # one step a row, as the service draws
    assert torch.equal(per_row, torch.stack([block[r, r] for r in range(4)]))


def test_guided_prefix_and_inpainting_runs_match_the_whole_cache(model, monkeypatch):
    """generate with buckets gives the ids it gives when every step attends over the whole cache."""
    config = model.config
    text_ids, text_mask = text(config, [3, 6])
    g = config.grid_size
    options = dict(num_candidates=2, seeds=4, cfg_scale=2.0, top_k=20,
                   init_ids=torch.arange(g * g).view(1, g, g).repeat(2, 1, 1) % config.codebook_size,
                   keep_mask=(torch.arange(g * g) % 5 == 0).view(g, g))
    bucketed = generate(model, text_ids, text_mask, **options)
    monkeypatch.setattr(Seq2Seq, "decode_length", lambda self, positions: None)
    assert torch.equal(bucketed, generate(model, text_ids, text_mask, **options))


@pytest.mark.parametrize(("run", "digest"), [("demo_run", "52f344e38e55771a"), ("demo_openmoji", "540585a9a800ebda")])
def test_the_shipped_runs_draw_the_tokens_they_drew_before_the_lean_step(run, digest):
    """Tokens of the shipped runs, plain and guided with top-k and top-p, hashed (x86-64 CPU, fp32). Both runs
    were shipped after the stacked projections, buckets and noise blocks (the earlier ``shapes`` demo's digest
    was the one its decoder gave before them): the digest of the current step, equal to the one it gives with
    every step attending over the whole cache."""
    directory = ROOT / "sample" / run
    model = Seq2Seq.from_pretrained(directory / "seq2seq")
    tokenizer = TextTokenizer.load(directory / "tokenizer.model")
    ids, mask = tokenizer.batch(["a red circle above a blue square", "a cat"], 64)
    plain = generate(model, ids, mask, num_candidates=2, seeds=10, top_k=64)
    guided = generate(model, ids, mask, num_candidates=2, seeds=20, cfg_scale=3.0, top_k=100, top_p=0.9)
    assert hashlib.sha256(torch.cat([plain, guided]).numpy().tobytes()).hexdigest()[:16] == digest


def test_compile_without_a_cxx_compiler_decodes_uncompiled_and_says_so(model, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(torch, "compile", lambda *a, **kw: pytest.fail("compiled without a compiler"))
    text_ids, text_mask = text(model.config, [3])
    ids = generate(model, text_ids, text_mask, seeds=2, compile=True)
    assert torch.equal(ids, generate(model, text_ids, text_mask, seeds=2))
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "C++ compiler" in message[0] and "uncompiled" in message[0]
