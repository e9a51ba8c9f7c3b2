"""Stage 2 model and decoding: cache parity, sampling filters, seeded candidates, guidance, files."""

from __future__ import annotations

import json
from pathlib import Path
import math

import pytest
import torch
import torch.nn.functional as F

from checkpoint import CheckpointError
from cli import UserError
from seq2seq import (EMPTY_TEXT_IDS, PRESETS, Seq2Seq, Seq2SeqConfig, counter_uniform, filter_logits, generate,
                     sample_from_probs)
from seq2seq.layers import attention_product
from seq2seq.model import image_token_loss

# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model() -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(Seq2SeqConfig.from_preset("tiny")).eval()


def text_batch(config: Seq2SeqConfig, lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random text ids (B, max length) with pad id 0 and the mask of real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, config.text_vocab_size, (len(lengths), max(lengths)), generator=g)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask


def image_batch(config: Seq2SeqConfig, batch: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.codebook_size, (batch, config.image_len), generator=g)


def cached_logits(model: Seq2Seq, text_ids, text_mask, image_ids, prefix_len: int = 0) -> torch.Tensor:
    """Logits (B, T - prefix_len, V) of every image token, decoded step by step through the caches."""
    model.setup_caches(text_ids.shape[0])
    prefix = image_ids[:, :prefix_len] if prefix_len else None
    steps = [model.prefill(text_ids, text_mask, prefix)]
    for t in range(prefix_len + 1, model.config.image_len):
        steps.append(model.decode_one_token(image_ids[:, t - 1 : t], torch.tensor([t])))
    return torch.stack(steps, dim=1)


def reference_sample(model: Seq2Seq, text_ids, text_mask, seeds: torch.Tensor, cfg_scale: float = 1.0,
                     **filters) -> torch.Tensor:
    """Sampling written out plainly: a full forward per token, guidance against the empty caption."""
    config = model.config
    uncond_ids = torch.tensor([EMPTY_TEXT_IDS]).expand(len(seeds), -1)
    ids = torch.zeros(len(seeds), 0, dtype=torch.long)
    with torch.no_grad():
        for t in range(config.image_len):
            inputs = torch.cat([ids, torch.zeros(len(seeds), 1, dtype=torch.long)], dim=1)  # last one unused
            logits = model(text_ids, text_mask, inputs)[:, t]
            if cfg_scale != 1.0:
                uncond = model(uncond_ids, torch.ones_like(uncond_ids, dtype=torch.bool), inputs)[:, t]
                logits = uncond + cfg_scale * (logits - uncond)
            probs = filter_logits(logits, **filters)
            ids = torch.cat([ids, sample_from_probs(probs, counter_uniform(seeds, t, config.codebook_size))[:, None]], 1)
    return ids.view(-1, config.grid_size, config.grid_size)


# ------------------------------------------------------------------------------------------- config


def test_presets_build_and_small_is_a_cpu_model():
    config = Seq2SeqConfig.from_preset("small", text_vocab_size=500, grid_size=16)
    assert (config.text_vocab_size, config.grid_size, config.image_len, config.bos_id) == (500, 16, 256, 1024)
    assert config.mlp_hidden % 64 == 0 and config.mlp_hidden >= 8 / 3 * config.d_model
    assert set(PRESETS) == {"tiny", "small", "base", "large"}
    with torch.device("meta"):
        counts = {name: Seq2Seq(Seq2SeqConfig.from_preset(name)).num_parameters() for name in ("small", "base")}
    assert 8e6 <= counts["small"] <= 30e6 and 80e6 <= counts["base"] <= 130e6


def test_bad_configs_are_refused():
    with pytest.raises(UserError, match="tiny, small, base, large"):
        Seq2SeqConfig.from_preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        Seq2SeqConfig(d_model=30, n_heads=4)
    with pytest.raises(TypeError):
        Seq2SeqConfig.from_preset("tiny", d_modle=64)  # a typo is an error, not ignored


# ------------------------------------------------------------------------------------------- forward


def test_forward_is_causal_and_ignores_padding(model):
    config = model.config
    text_ids, text_mask = text_batch(config, [5, 2])
    image_ids = image_batch(config, 2)
    logits = model(text_ids, text_mask, image_ids)
    assert logits.shape == (2, config.image_len, config.codebook_size)
    t = 6
    changed = image_ids.clone()
    changed[:, t] = (changed[:, t] + 1) % config.codebook_size
    after = model(text_ids, text_mask, changed)
    torch.testing.assert_close(after[:, : t + 1], logits[:, : t + 1])  # position t predicts id t: unseen
    assert (after[:, t + 1] - logits[:, t + 1]).abs().max() > 1e-4  # position t + 1 reads id t
    noisy_padding = text_ids.masked_fill(~text_mask, 7)
    torch.testing.assert_close(model(noisy_padding, text_mask, image_ids), logits)
    alone = model(text_ids[1:, :2], text_mask[1:, :2], image_ids[1:])
    torch.testing.assert_close(alone, logits[1:], atol=1e-5, rtol=0)


def test_cpu_attention_equals_the_fused_kernel_in_values_and_gradients():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 2, 5, 8, generator=g, requires_grad=True) for _ in range(3))
    padding = (torch.arange(5)[None, :] < torch.tensor([5, 2, 1])[:, None])[:, None, None, :]  # (B, 1, 1, S)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]  # (1, 1, T, S)
    for mask in (padding, causal):
        ours = attention_product(q, k, v, mask)
        grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
        fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(ours, fused, atol=1e-5, rtol=1e-5)
        for ours_grad, fused_grad in zip(grads, torch.autograd.grad(fused.square().sum(), (q, k, v))):
            torch.testing.assert_close(ours_grad, fused_grad, atol=1e-5, rtol=1e-5)
    nothing_allowed = torch.zeros(1, 1, 1, 5, dtype=torch.bool)
    assert torch.isfinite(attention_product(q, k, v, nothing_allowed)).all()


@pytest.mark.parametrize("prefix_len", [0, 5])
def test_kv_cache_parity_with_padded_text(model, prefix_len):
    config = model.config
    text_ids, text_mask = text_batch(config, [9, 4, 1])
    image_ids = image_batch(config, 3)
    with torch.no_grad():
        full = model(text_ids, text_mask, image_ids)  # (B, T, V)
        stepwise = cached_logits(model, text_ids, text_mask, image_ids, prefix_len)
    torch.testing.assert_close(stepwise, full[:, prefix_len:], atol=1e-4, rtol=0)


def test_caches_are_preallocated_written_in_place_and_never_saved(model):
    config = model.config
    model.setup_caches(4)
    cache = model.decoder.blocks[0].self_attn.kv_cache
    assert cache.k_cache.shape == (4, config.n_heads, config.image_len, config.head_dim)
    assert model.decoder.blocks[0].cross_attn.kv_cache.length == config.max_text_len
    pointer = cache.k_cache.data_ptr()
    text_ids, text_mask = text_batch(config, [3, 3])  # fewer rows than the caches hold
    with torch.no_grad():
        cached_logits(model, text_ids, text_mask, image_batch(config, 2))
    assert cache.k_cache.data_ptr() == pointer and cache.k_cache.shape[2] == config.image_len
    assert cache.k_cache[:2, :, -2].abs().sum() > 0  # written by position, up to the last read
    model.setup_caches(2)  # smaller: the ones there fit and are kept
    assert model.decoder.blocks[0].self_attn.kv_cache.k_cache.data_ptr() == pointer
    assert not any("cache" in name for name in model.state_dict())


# ------------------------------------------------------------------------------------------- filters


def test_temperature_scales_logits_and_zero_is_greedy():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    torch.testing.assert_close(filter_logits(logits, temperature=0.5), torch.softmax(logits / 0.5, -1))
    torch.testing.assert_close(filter_logits(logits), torch.softmax(logits, -1))
    assert filter_logits(logits, temperature=0.0).tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    probs = filter_logits(logits, top_k=7)
    kept = probs > 0
    assert kept.sum(-1).tolist() == [7] * 5
    assert torch.equal(kept, torch.zeros_like(kept).scatter(1, logits.topk(7).indices, True))
    expected = torch.softmax(logits.masked_fill(~kept, float("-inf")), -1)
    torch.testing.assert_close(probs, expected)
    assert torch.equal(filter_logits(logits, top_k=50), filter_logits(logits))


def test_top_k_keeps_tokens_tied_with_the_kth():
    probs = filter_logits(torch.tensor([[3.0, 2.0, 2.0, 1.0, 2.0]]), top_k=2)
    assert (probs > 0).tolist() == [[True, True, True, False, True]]


def test_top_p_without_top_k_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]])
    logits = probs.log()
    assert (filter_logits(logits, top_p=0.35) > 0).tolist() == [[False, True, False, False, False]]
    assert (filter_logits(logits, top_p=0.65) > 0).tolist() == [[False, True, False, True, False]]
    assert (filter_logits(logits, top_p=0.8) > 0).tolist() == [[False, True, False, True, True]]
    kept = filter_logits(logits, top_p=0.8)
    torch.testing.assert_close(kept, torch.tensor([[0.0, 0.4, 0.0, 0.3, 0.15]]) / 0.85)
    assert (filter_logits(logits, top_p=1.0) > 0).all()
    assert (filter_logits(logits, top_p=1e-6) > 0).sum() == 1  # never empty


def test_top_p_keeps_ties_and_composes_with_top_k_and_temperature():
    tied = torch.tensor([[0.3, 0.2, 0.2, 0.2, 0.1]]).log()
    assert (filter_logits(tied, top_p=0.45) > 0).tolist() == [[True, True, True, True, False]]
    logits = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]]).log()
    # top-k 3 leaves 0.4, 0.3, 0.15 -> renormalized 0.47, 0.35, 0.18; top-p 0.8 then keeps two.
    assert (filter_logits(logits, top_k=3, top_p=0.8) > 0).tolist() == [[False, True, False, True, False]]
    # A high temperature flattens the distribution, so the same top-p keeps more tokens.
    assert (filter_logits(logits, temperature=5.0, top_p=0.8) > 0).sum() == 4


def test_filter_arguments_are_checked():
    logits = torch.zeros(1, 4)
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            filter_logits(logits, **bad)


def test_draws_follow_the_probabilities_and_skip_filtered_tokens():
    probs = torch.tensor([0.1, 0.0, 0.2, 0.3, 0.4]).expand(40_000, -1)
    ids = sample_from_probs(probs, counter_uniform(torch.arange(40_000), 0, 5))
    frequencies = torch.bincount(ids, minlength=5).float() / len(ids)
    assert frequencies[1] == 0
    torch.testing.assert_close(frequencies, probs[0], atol=0.01, rtol=0)


def test_noise_depends_on_seed_and_step_only():
    noise = counter_uniform(torch.tensor([3, 4, 5, 2**40 + 5]), 7, 64)
    torch.testing.assert_close(counter_uniform(torch.tensor([5]), torch.tensor([7]), 64), noise[2:3], atol=0, rtol=0)
    assert not torch.equal(noise[2], noise[3])  # the high bits of a seed count
    assert not torch.equal(counter_uniform(torch.tensor([5]), 8, 64)[0], noise[2])
    assert 0 < noise.min() and noise.max() < 1
    many = counter_uniform(torch.arange(200), 0, 500)
    assert abs(many.mean().item() - 0.5) < 0.01 and abs(many.std().item() - math.sqrt(1 / 12)) < 0.01


# ------------------------------------------------------------------------------------------- generate


def test_cached_generation_equals_recomputing_the_prefix(model):
    text_ids, text_mask = text_batch(model.config, [6, 2])
    options = dict(num_candidates=3, seeds=11, temperature=0.9, top_p=0.9, cfg_scale=2.5)
    cached = generate(model, text_ids, text_mask, **options)
    assert cached.shape == (6, model.config.grid_size, model.config.grid_size)
    assert torch.equal(cached, generate(model, text_ids, text_mask, use_cache=False, **options))


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_a_candidate_is_the_same_alone_or_in_a_batch_of_8(model, cfg_scale):
    config = model.config
    text_ids, text_mask = text_batch(config, [3, 8, 5, 2])
    batch = generate(model, text_ids, text_mask, num_candidates=2, seeds=100, top_k=10, cfg_scale=cfg_scale)
    assert batch.shape[0] == 8
    for row in (0, 3, 6):
        prompt = row // 2
        length = int(text_mask[prompt].sum())
        alone = generate(model, text_ids[prompt : prompt + 1, :length], text_mask[prompt : prompt + 1, :length],
                         seeds=[100 + row], top_k=10, cfg_scale=cfg_scale)
        assert torch.equal(alone[0], batch[row])
    assert len({tuple(ids.flatten().tolist()) for ids in batch}) == 8  # distinct seeds, distinct pictures


def test_guidance_at_scale_1_is_plain_conditional_sampling(model):
    text_ids, text_mask = text_batch(model.config, [4, 4])
    seeds = torch.tensor([5, 9])
    ids = generate(model, text_ids, text_mask, seeds=seeds, top_k=12, cfg_scale=1.0)
    assert torch.equal(ids, reference_sample(model, text_ids, text_mask, seeds, top_k=12))


def test_guidance_pushes_away_from_the_empty_caption(model):
    text_ids, text_mask = text_batch(model.config, [4, 4])
    seeds = torch.tensor([5, 9])
    guided = generate(model, text_ids, text_mask, seeds=seeds, top_k=12, cfg_scale=4.0)
    assert torch.equal(guided, reference_sample(model, text_ids, text_mask, seeds, cfg_scale=4.0, top_k=12))
    assert not torch.equal(guided, generate(model, text_ids, text_mask, seeds=seeds, top_k=12))


def test_prefix_ids_are_kept_and_conditioned_on(model):
    config = model.config
    text_ids, text_mask = text_batch(config, [5])
    prefix = image_batch(config, 1)[:, : config.grid_size]  # the first row of the grid
    ids = generate(model, text_ids, text_mask, num_candidates=3, seeds=0, prefix_ids=prefix, cfg_scale=2.0)
    assert torch.equal(ids[:, 0], prefix.expand(3, -1))
    recomputed = generate(model, text_ids, text_mask, num_candidates=3, seeds=0, prefix_ids=prefix, cfg_scale=2.0,
                          use_cache=False)
    assert torch.equal(ids, recomputed)
    with pytest.raises(ValueError, match="codebook ids"):
        generate(model, text_ids, text_mask, prefix_ids=prefix + config.codebook_size)


def test_generate_checks_its_arguments_and_keeps_the_model_mode(model):
    text_ids, text_mask = text_batch(model.config, [3, 3])
    with pytest.raises(ValueError, match="one per candidate"):
        generate(model, text_ids, text_mask, num_candidates=2, seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="at least one real token"):
        generate(model, text_ids, torch.zeros_like(text_mask))
    model.train()
    try:
        with torch.inference_mode():
            first = generate(model, text_ids, text_mask, seeds=1)
        assert model.training
        assert torch.equal(first, generate(model, text_ids, text_mask, seeds=1))  # caches made in inference mode
    finally:
        model.eval()


# ------------------------------------------------------------------------------------------- training and files


def test_a_few_optimizer_steps_lower_the_loss():
    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig.from_preset("tiny"))
    text_ids, text_mask = text_batch(model.config, [6, 3, 8, 1])
    image_ids = image_batch(model.config, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(text_ids, text_mask, image_ids).flatten(0, 1), image_ids.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(model.config.codebook_size), abs=0.2)
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_the_model_owns_its_loss_the_training_stage_cross_entropy(amp):
    """Seq2Seq.loss gives the very numbers and gradients of the formula train/ and bench/ write out today:
    forward (under autocast if any), then fp32 cross-entropy over every image token."""
    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig.from_preset("tiny")).eval()
    text_ids, text_mask = text_batch(model.config, [6, 3, 8, 1])
    grid = model.config.grid_size
    image_ids = image_batch(model.config, 4).view(4, grid, grid)  # a whole grid, as the stage passes it
    with torch.autocast("cpu", amp or torch.float32, enabled=amp is not None):
        logits = model(text_ids, text_mask, image_ids)
    expected = F.cross_entropy(logits.flatten(0, 1).float(), image_ids.flatten())
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autocast("cpu", amp or torch.float32, enabled=amp is not None):
        loss = model.loss(text_ids, text_mask, image_ids)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.equal(loss, expected)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), expected_grads))
    assert torch.equal(image_token_loss(logits, image_ids.flatten(1)), expected)


def test_decoding_lives_in_generate_and_the_model_does_not_import_it():
    """No Seq2Seq.generate (nothing called it) and no import cycle: seq2seq/model.py imports no decoding module."""
    import ast
    import inspect

    import seq2seq.model

    tree = ast.parse(inspect.getsource(seq2seq.model))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not any(name.startswith(("seq2seq.generate", "seq2seq.canvas")) for name in imported), imported
    assert not hasattr(Seq2Seq, "generate")


def test_save_and_load_round_trip(model, tmp_path):
    model.setup_caches(2)
    model.save_pretrained(tmp_path / "seq2seq")
    loaded = Seq2Seq.from_pretrained(tmp_path / "seq2seq")
    assert loaded.config == model.config and not loaded.training
    text_ids, text_mask = text_batch(model.config, [4, 2])
    image_ids = image_batch(model.config, 2)
    torch.testing.assert_close(loaded(text_ids, text_mask, image_ids), model(text_ids, text_mask, image_ids),
                               atol=0, rtol=0)
    other = Seq2Seq(Seq2SeqConfig.from_preset("tiny", d_model=64))
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_bytes((tmp_path / "seq2seq" / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="seq2seq"):
        Seq2Seq.from_pretrained(tmp_path / "other")


def test_check_fits_names_the_part_that_does_not_fit(model):
    config = model.config
    model.check_fits(config.text_vocab_size, config.codebook_size, config.grid_size)
    with pytest.raises(CheckpointError, match="^tokenizer does not fit"):
        model.check_fits(config.text_vocab_size + 1, config.codebook_size, config.grid_size)
    with pytest.raises(CheckpointError, match="^vqgan does not fit.*codes"):
        model.check_fits(config.text_vocab_size, 2 * config.codebook_size, config.grid_size)
    with pytest.raises(CheckpointError, match="^vqgan does not fit.*grids"):
        model.check_fits(config.text_vocab_size, config.codebook_size, 2 * config.grid_size)


def test_compile_without_a_cxx_compiler_trains_uncompiled(monkeypatch, capsys):
    import shutil

    from train.stage_seq2seq import _can_compile

    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert not _can_compile(torch.device("cpu"))
    assert "training uncompiled" in capsys.readouterr().out


def test_the_weight_average_warms_up_from_the_first_step(tiny_run, tmp_path):
    import shutil

    from train.stage_seq2seq import Seq2SeqOptions, Seq2SeqTrainer, ema_decay

    shutil.copyfile(tiny_run / "tokenizer.model", tmp_path / "tokenizer.model")
    shutil.copytree(tiny_run / "vqgan", tmp_path / "vqgan")
    trainer = Seq2SeqTrainer(Seq2SeqOptions(
        data="shapes", out=str(tmp_path), size=32, device="cpu", precision="fp32", preset="tiny", steps=3,
        batch_size=8, cache_examples=16, heldout_examples=8, ema=0.999))
    for step in range(2):
        before = [e.clone() for e in trainer.ema.parameters()]
        trainer.train_step(trainer.batch_at(step))
        decay = (1 + step) / (10 + step)  # not 0.999 yet: the random start fades within the first steps
        assert ema_decay(0.999, step) == decay
        for average, old, weight in zip(trainer.ema.parameters(), before, trainer.model.parameters()):
            torch.testing.assert_close(average, decay * old + (1 - decay) * weight)
    assert ema_decay(0.999, 100_000) == 0.999


def _trainer(tiny_run, tmp_path, **options):
    import shutil

    from train.stage_seq2seq import Seq2SeqOptions, Seq2SeqTrainer

    shutil.copyfile(tiny_run / "tokenizer.model", tmp_path / "tokenizer.model")
    shutil.copytree(tiny_run / "vqgan", tmp_path / "vqgan")
    defaults = dict(data="shapes", out=str(tmp_path), size=32, device="cpu", precision="fp32", preset="tiny",
                    batch_size=8, cache_examples=16, heldout_examples=8, warmup=1)
    return Seq2SeqTrainer(Seq2SeqOptions(**{**defaults, **options}))


def test_keep_best_exports_the_weights_of_the_lowest_heldout_loss(tiny_run, tmp_path):
    from safetensors.torch import load_file

    trainer = _trainer(tiny_run, tmp_path, steps=4, eval_every=1, log_every=1)
    exported = tmp_path / "seq2seq" / "model.safetensors"
    trainer.record_evaluation({"heldout_bits_per_token": 5.0})
    best = load_file(str(exported))
    for step in range(2):  # the weights move; a worse evaluation leaves the best export alone
        trainer.train_step(trainer.batch_at(step))
    trainer.record_evaluation({"heldout_bits_per_token": 6.0})
    assert all(torch.equal(best[k], v) for k, v in load_file(str(exported)).items())
    trainer.record_evaluation({"heldout_bits_per_token": 4.0})
    now = {k: v for k, v in trainer.model.state_dict().items() if k in best}
    assert all(torch.equal(now[k], v) for k, v in load_file(str(exported)).items())
    assert trainer.best == 4.0
    logged = [json.loads(line) for line in (tmp_path / "metrics" / "seq2seq.jsonl").read_text().splitlines()]
    assert [r.get("kept", False) for r in logged] == [True, False, True]


def test_keep_best_is_restored_on_resume(tiny_run, tmp_path):
    trainer = _trainer(tiny_run, tmp_path, steps=2, eval_every=1, save_every=1)
    trainer.fit()
    assert trainer.best < float("inf")
    (tmp_path / "copy").mkdir()
    assert _trainer(tiny_run, tmp_path / "copy", steps=2).best == float("inf")  # a fresh run has seen no evaluation
    from train.stage_seq2seq import Seq2SeqOptions, Seq2SeqTrainer

    resumed = Seq2SeqTrainer(Seq2SeqOptions(
        data="shapes", out=str(tmp_path), size=32, device="cpu", precision="fp32", preset="tiny", steps=2,
        batch_size=8, cache_examples=16, heldout_examples=8, eval_every=1, save_every=1, resume=True))
    assert resumed.best == trainer.best


def test_caption_gap_is_shuffled_minus_right_and_never_gives_a_picture_its_own_caption(model):
    from seq2seq.evaluate import caption_gap, derangement

    class Tokenizer:  # each caption to a few ids of its own
        def batch(self, texts, max_length):
            ids = torch.tensor([[1 + (hash(t) % 20), 2] for t in texts])
            return ids, torch.ones_like(ids, dtype=torch.bool)

    texts = ["a", "a", "b", "c", "d", "e"]
    other = derangement(texts)
    assert set(other) == set(texts) and all(other[t] != t for t in other)
    assert sorted(other.values()) == sorted(set(texts))  # a cycle: every caption is used once
    ids = torch.randint(0, model.config.codebook_size, (6, model.config.image_len))
    model.train()
    gap = caption_gap(model, Tokenizer(), texts, ids, "cpu")
    assert model.training  # left as it came
    assert gap["gap"] == pytest.approx(gap["shuffled"] - gap["right"]) and gap["distinct_captions"] == 5
    assert caption_gap(model, Tokenizer(), ["same"] * 3, ids[:3], "cpu")["gap"] is None


def _captioned_folder(folder: Path, pictures: int = 20) -> Path:
    """``pictures`` 32 px pictures, each with two phrasings of its caption."""
    from PIL import Image

    folder.mkdir()
    rows = []
    for i in range(pictures):
        Image.new("RGB", (32, 32), (12 * i, 255 - 12 * i, 90)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": [f"picture {i}", f"a picture of {i}"]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_augment_until_trains_on_crops_then_on_the_whole_pictures(tiny_run, tmp_path):
    from cli import UserError

    folder = _captioned_folder(tmp_path / "pics")
    (tmp_path / "run").mkdir()
    trainer = _trainer(tiny_run, tmp_path / "run", data=str(folder), steps=6, augment="crop", augment_until=3,
                       cache_examples=64, heldout_fraction=0.25)
    whole, crops = trainer.whole_codes, trainer.train_codes
    assert len(crops) == 64 and len(whole) == crops.pictures < 20  # one version of each training picture
    assert {t.split()[0] for t in crops.texts} == {"picture", "a"}  # crops draw either phrasing
    for step in range(6):
        texts, ids = trainer.global_batch(step)
        source = crops if step < 3 else whole
        rows = [next(i for i in range(len(source)) if source.texts[i] == t and torch.equal(source.image_ids[i], row))
                for t, row in zip(texts, ids)]  # every example is a row of the cache of its phase
        assert len(rows) == 8
        if step >= 3:
            assert all(t.startswith("picture ") for t in texts)  # the first phrasing, the picture as it is
    (tmp_path / "other").mkdir()
    with pytest.raises(UserError, match="--augment-until 6 is not a step of this run"):
        _trainer(tiny_run, tmp_path / "other", data=str(folder), steps=6, augment_until=6)


def test_precision_auto_probes_a_freshly_built_code_cache(tiny_run, tmp_path, monkeypatch):
    # Where the device multiplies bf16 natively, `auto` runs a forward and backward pass in each precision on
    # held-out codes, which a new run has just encoded under inference mode.
    from train import loop

    monkeypatch.setattr(loop, "native_bf16", lambda device: True)
    trainer = _trainer(tiny_run, tmp_path, steps=2, precision="auto")
    assert trainer.run.precision in ("fp32", "bf16")
    assert all(p.grad is None for p in trainer.model.parameters())
