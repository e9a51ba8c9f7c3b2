"""The CLIP-style scorer (scorer/model.py) and its training stage (train/stage_scorer.py), on tiny configs."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from checkpoint import CheckpointError
from cli import UserError
from scorer import IMAGE_POOLS, PRESETS, TEXT_POOLS, Scorer, ScorerConfig, contrastive_loss, retrieval_accuracy

TINY = PRESETS["tiny"]


def tiny_batch(batch: int = 6, length: int = 7, seed: int = 0):
    """Random images in [-1, 1] and random right-padded captions of different lengths."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, TINY.image_size, TINY.image_size, generator=generator) * 2 - 1
    text_ids = torch.randint(4, TINY.text_vocab_size, (batch, length), generator=generator)
    lengths = torch.arange(batch) % (length - 2) + 3  # (B,) between 3 and length
    text_mask = torch.arange(length)[None, :] < lengths[:, None]  # (B, L)
    return images, text_ids.masked_fill(~text_mask, 0), text_mask


@pytest.fixture
def model() -> Scorer:
    torch.manual_seed(0)
    return Scorer(TINY).eval()


# ------------------------------------------------------------------------------------ the model


def test_embeddings_are_unit_norm(model):
    images, text_ids, text_mask = tiny_batch()
    with torch.no_grad():
        image_embeds = model.encode_image(images)
        text_embeds = model.encode_text(text_ids, text_mask)
    assert image_embeds.shape == text_embeds.shape == (6, TINY.embed_dim)
    torch.testing.assert_close(image_embeds.norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(text_embeds.norm(dim=-1), torch.ones(6))


def test_score_is_the_diagonal_of_the_cosine_matrix(model):
    images, text_ids, text_mask = tiny_batch()
    with torch.no_grad():
        logits = model(images, text_ids, text_mask)
        scores = model.score(images, text_ids, text_mask)
    assert logits.shape == (6, 6) and scores.shape == (6,)
    cosine = logits / model.scale
    torch.testing.assert_close(scores, cosine.diagonal())
    assert not torch.allclose(cosine, torch.diag_embed(cosine.diagonal()))  # off-diagonal pairs differ too
    assert model.scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_temperature_is_clamped_at_100(model):
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale.item() == pytest.approx(100.0)


def test_text_embedding_ignores_padding(model):
    """Padding ids and extra padding columns, even past max_text_len, leave every embedding unchanged."""
    _, text_ids, text_mask = tiny_batch()
    with torch.no_grad():
        reference = model.encode_text(text_ids, text_mask)
        garbage = text_ids.masked_fill(~text_mask, 7)
        torch.testing.assert_close(model.encode_text(garbage, text_mask), reference)
        extra = TINY.max_text_len + 5 - text_ids.shape[1]
        wide_ids = torch.cat([text_ids, torch.zeros(6, extra, dtype=torch.long)], dim=1)
        wide_mask = torch.cat([text_mask, torch.zeros(6, extra, dtype=torch.bool)], dim=1)
        torch.testing.assert_close(model.encode_text(wide_ids, wide_mask), reference)


def test_text_longer_than_the_limit_and_wrong_image_size_are_errors(model):
    too_long = torch.ones(2, TINY.max_text_len + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=f"{TINY.max_text_len} text tokens"):
        model.encode_text(too_long, torch.ones_like(too_long, dtype=torch.bool))
    with pytest.raises(ValueError, match="images must be"):
        model.encode_image(torch.zeros(2, 3, 2 * TINY.image_size, 2 * TINY.image_size))


def test_an_all_padding_row_gets_a_finite_embedding(model):
    text_ids = torch.zeros(2, 4, dtype=torch.long)
    text_mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    with torch.no_grad():
        embeds = model.encode_text(text_ids, text_mask)
    assert torch.isfinite(embeds).all()


def test_contrastive_loss_prefers_aligned_pairs():
    embeds = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    aligned = contrastive_loss(20 * embeds @ embeds.t())
    shuffled = contrastive_loss(20 * embeds @ embeds.roll(1, dims=0).t())
    assert aligned < 0.1 < 2.0 < shuffled


def test_contrastive_loss_is_symmetric_cross_entropy():
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(2))
    target = torch.arange(5)
    expected = (torch.nn.functional.cross_entropy(logits, target)
                + torch.nn.functional.cross_entropy(logits.t(), target)) / 2
    torch.testing.assert_close(contrastive_loss(logits), expected)
    torch.testing.assert_close(contrastive_loss(logits, torch.eye(5, dtype=torch.bool)), expected)
    assert contrastive_loss(logits) != contrastive_loss(logits.t().contiguous() * 2)


def test_identical_captions_are_not_negatives():
    """Two pictures of the same caption: the multi-positive loss does not push them apart."""
    embeds = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(3)), dim=-1)
    embeds[1] = embeds[0]  # rows 0 and 1: the same caption, the same picture
    logits = 20 * embeds @ embeds.t()
    positives = torch.eye(4, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True
    assert contrastive_loss(logits, positives) < 0.01 < contrastive_loss(logits)


def test_retrieval_accuracy_counts_rows_whose_best_text_is_a_match():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 1.0]])  # every row's best: column 1
    assert retrieval_accuracy(logits) == pytest.approx(1 / 3)
    positives = torch.eye(3, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True  # rows 0 and 1 share a caption
    assert retrieval_accuracy(logits, positives) == pytest.approx(2 / 3)


def test_a_few_steps_lower_the_loss_and_raise_the_accuracy():
    torch.manual_seed(0)
    model = Scorer(TINY)
    images, text_ids, text_mask = tiny_batch(batch=8, seed=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    with torch.no_grad():
        first_logits = model(images, text_ids, text_mask)
    for _ in range(40):
        loss = contrastive_loss(model(images, text_ids, text_mask))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    with torch.no_grad():
        last_logits = model(images, text_ids, text_mask)
    assert contrastive_loss(last_logits) < 0.5 * contrastive_loss(first_logits)
    assert retrieval_accuracy(last_logits) == 1.0 > retrieval_accuracy(first_logits)


def test_save_and_load_round_trip(model, tmp_path):
    images, text_ids, text_mask = tiny_batch()
    with torch.no_grad():
        model.logit_scale.add_(0.5)  # a trained value, not the initial one
    model.save_pretrained(tmp_path / "scorer")
    loaded = Scorer.from_pretrained(tmp_path / "scorer")
    assert loaded.config == model.config and not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(loaded(images, text_ids, text_mask), model(images, text_ids, text_mask))


def test_loading_weights_of_another_config_names_the_part(model, tmp_path):
    model.save_pretrained(tmp_path / "scorer")
    config = json.loads((tmp_path / "scorer" / "config.json").read_text())
    config["d_model"] = 64
    (tmp_path / "scorer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="^scorer: "):
        Scorer.from_pretrained(tmp_path / "scorer")
    with pytest.raises(CheckpointError, match="^scorer: "):
        Scorer.from_pretrained(tmp_path / "missing")


def test_check_fits(model):
    model.check_fits(TINY.text_vocab_size, TINY.image_size)
    with pytest.raises(CheckpointError, match=r"^scorer: .*vocabulary of 512 .* tokenizer has 300"):
        model.check_fits(300, TINY.image_size)
    with pytest.raises(CheckpointError, match=r"^scorer: .*32x32 pictures but gets 64x64"):
        model.check_fits(TINY.text_vocab_size, 64)


def test_config_validation_and_presets():
    assert ScorerConfig.from_preset("small", text_vocab_size=300).text_vocab_size == 300
    assert PRESETS["small"].grid_size == 8 and PRESETS["base"].grid_size == 16
    with pytest.raises(ValueError, match="not divisible by 2"):
        replace(TINY, image_size=34)
    with pytest.raises(ValueError, match="not divisible by heads"):
        replace(TINY, d_model=30, heads=4)
    with pytest.raises(ValueError, match="unknown scorer preset"):
        ScorerConfig.from_preset("huge")
    assert ScorerConfig(image_widths=[8, 16]).image_widths == (8, 16)  # as config.json gives it back


# ------------------------------------------------------------------------------- the training stage


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    from data.sources import open_dataset, texts
    from tokenizer import TextTokenizer

    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    TextTokenizer.train(texts(open_dataset("shapes", size=32), 500), vocab_size=300).save(path)
    return path


def run_with_tokenizer(tmp_path: Path, tokenizer_file: Path, name: str) -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    return run


def clip_args(run: Path, *extra: str) -> argparse.Namespace:
    from train import stage_scorer

    parser = argparse.ArgumentParser()
    stage_scorer.add_arguments(parser)
    return parser.parse_args(["--out", str(run), "--data", "shapes", "--size", "32", "--model-size", "tiny",
                              "--batch-size", "8", "--device", "cpu", "--heldout-examples", "16",
                              "--warmup", "2", "--lr", "1e-3", *extra])


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics" / "scorer.jsonl").read_text().splitlines()]


def test_stage_trains_and_writes_the_scorer(tmp_path, tokenizer_file):
    from tokenizer import TextTokenizer
    from train import stage_scorer

    run = run_with_tokenizer(tmp_path, tokenizer_file, "run")
    stage_scorer.main(clip_args(run, "--steps", "3", "--log-every", "1", "--eval-every", "3"))
    scorer = Scorer.from_pretrained(run / "scorer")
    scorer.check_fits(TextTokenizer.load(run / "tokenizer.model").vocab_size, 32)
    assert scorer.config.max_text_len == PRESETS["tiny"].max_text_len
    metrics = read_metrics(run)
    losses = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in losses] == [1, 2, 3]
    assert all(0 <= m["accuracy"] <= 1 and m["loss"] > 0 for m in losses)
    heldout = [m for m in metrics if "heldout_accuracy" in m]
    assert [m["step"] for m in heldout] == [3] and 0 <= heldout[0]["heldout_accuracy"] <= 1
    assert json.loads((run / "state" / "scorer" / "latest.json").read_text())["step"] == 3


def killed_after_step_2_then_resumed(run: Path, options: tuple[str, ...], monkeypatch) -> Path:
    """The scorer stage on ``run`` with ``options``, interrupted before its third step, then run with --resume."""
    from train import stage_scorer

    train_step = stage_scorer.ScorerTrainer.train_step

    def killed_after_step_2(self, batch):
        if self.step == 2:
            raise KeyboardInterrupt
        return train_step(self, batch)

    monkeypatch.setattr(stage_scorer.ScorerTrainer, "train_step", killed_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        stage_scorer.main(clip_args(run, *options))
    monkeypatch.setattr(stage_scorer.ScorerTrainer, "train_step", train_step)
    stage_scorer.main(clip_args(run, *options, "--resume"))
    return run


def test_resume_gives_the_same_steps_as_an_uninterrupted_run(tmp_path, tokenizer_file, monkeypatch):
    from safetensors.torch import load_file

    from train import stage_scorer

    options = ("--steps", "4", "--save-every", "2", "--log-every", "1", "--eval-every", "100")
    straight = run_with_tokenizer(tmp_path, tokenizer_file, "straight")
    stage_scorer.main(clip_args(straight, *options))

    resumed = killed_after_step_2_then_resumed(run_with_tokenizer(tmp_path, tokenizer_file, "resumed"), options,
                                               monkeypatch)

    def losses(run: Path) -> dict[int, float]:
        return {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}

    assert losses(resumed) == losses(straight)
    assert sorted(losses(resumed)) == [1, 2, 3, 4]
    a = load_file(str(straight / "scorer" / "model.safetensors"))
    b = load_file(str(resumed / "scorer" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage_without_a_tokenizer_says_which_stage_to_run_first(tmp_path):
    from train import stage_scorer

    with pytest.raises(UserError, match="python -m train tokenizer"):
        stage_scorer.main(clip_args(tmp_path / "empty", "--steps", "1"))


def test_hard_negative_columns_join_the_image_softmax_only():
    """Columns past B are texts without a picture: they raise the image-to-text loss when close to the image,
    leave the text-to-image half alone, and a negative that is another picture's caption counts as its match."""
    embeds = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(4)), dim=-1)
    square = 20 * embeds @ embeds.t()  # (4, 4)
    far = torch.nn.functional.normalize(torch.randn(2, 8, generator=torch.Generator().manual_seed(5)), dim=-1)
    positives = torch.eye(4, 6, dtype=torch.bool)
    with_far = contrastive_loss(torch.cat([square, 20 * embeds @ far.t()], dim=1), positives)
    with_close = contrastive_loss(torch.cat([square, 20 * embeds @ embeds[:2].t()], dim=1), positives)
    assert contrastive_loss(square) < with_far < with_close
    # The same close negatives, each marked as its own picture's caption: nothing is pushed apart.
    positives[0, 4] = positives[1, 5] = True
    relaxed = contrastive_loss(torch.cat([square, 20 * embeds @ embeds[:2].t()], dim=1), positives)
    assert relaxed < with_close
    # Text-to-image reads the square only: extra columns change the loss by their image-to-text half alone.
    image_to_text = torch.nn.functional.cross_entropy(torch.cat([square, 20 * embeds @ far.t()], dim=1), torch.arange(4))
    text_to_image = torch.nn.functional.cross_entropy(square.t(), torch.arange(4))
    torch.testing.assert_close(contrastive_loss(torch.cat([square, 20 * embeds @ far.t()], dim=1)),
                               (image_to_text + text_to_image) / 2)


@pytest.mark.parametrize("mode, recorded", [("auto", "scene"), ("words", "words"), ("none", "none")])
def test_stage_records_its_hard_negatives_and_measures_pairwise(tmp_path, tokenizer_file, mode, recorded):
    from train import stage_scorer

    run = run_with_tokenizer(tmp_path, tokenizer_file, "run")
    stage_scorer.main(clip_args(run, "--steps", "2", "--log-every", "1", "--eval-every", "2", "--hard-negatives", mode))
    assert Scorer.from_pretrained(run / "scorer").config.hard_negatives == recorded
    heldout = [m for m in read_metrics(run) if "heldout_pairwise" in m]
    assert [m["step"] for m in heldout] == [2] and 0 <= heldout[0]["heldout_pairwise"] <= 1


def test_hard_negatives_change_the_training_step(tmp_path, tokenizer_file):
    from train import stage_scorer

    losses = {}
    for mode in ("none", "scene"):
        run = run_with_tokenizer(tmp_path, tokenizer_file, mode)
        stage_scorer.main(clip_args(run, "--steps", "1", "--log-every", "1", "--eval-every", "100",
                                  "--hard-negatives", mode))
        losses[mode] = read_metrics(run)[0]["loss"]
    assert losses["scene"] > losses["none"]  # the same batch with more texts to tell apart


def test_several_negatives_per_picture_are_distinct_and_false(tmp_path, tokenizer_file):
    from data.sources import batches
    from train import stage_scorer

    run = run_with_tokenizer(tmp_path, tokenizer_file, "run")
    counts = {}
    for k in (1, 3):
        trainer = stage_scorer.ScorerTrainer(stage_scorer.ScorerOptions.from_args(
            clip_args(run, "--steps", "1", "--hard-negatives", "auto", "--negatives-per-image", str(k))))
        batch = next(batches(trainer.dataset, 8, seed=0))
        negatives = trainer._negatives(batch)
        assert not set(negatives) & set(batch["text"])
        counts[k] = len(negatives)
    assert counts[1] == 8 and 8 < counts[3] <= 24  # shapes: every scene has a negative; repeats are dropped
    with pytest.raises(UserError, match="--negatives-per-image"):
        stage_scorer.ScorerTrainer(stage_scorer.ScorerOptions.from_args(clip_args(run, "--negatives-per-image", "0")))


# ------------------------------------------------------------------------------------ pooling (issue 20)


@pytest.mark.parametrize("image_pool", IMAGE_POOLS)
@pytest.mark.parametrize("text_pool, text_causal", [(p, False) for p in TEXT_POOLS] + [("last", True), ("mean", True)])
def test_every_pooling_gives_unit_embeddings_that_ignore_padding_and_round_trip(image_pool, text_pool, text_causal,
                                                                                 tmp_path):
    torch.manual_seed(0)
    model = Scorer(replace(TINY, image_pool=image_pool, text_pool=text_pool, text_causal=text_causal)).eval()
    images, text_ids, text_mask = tiny_batch()
    with torch.no_grad():
        image_embeds, text_embeds = model.encode_image(images), model.encode_text(text_ids, text_mask)
        garbage = model.encode_text(text_ids.masked_fill(~text_mask, 7), text_mask)
    torch.testing.assert_close(image_embeds.norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(text_embeds.norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(garbage, text_embeds)
    model.save_pretrained(tmp_path / "scorer")
    loaded = Scorer.from_pretrained(tmp_path / "scorer")
    assert (loaded.config.image_pool, loaded.config.text_pool, loaded.config.text_causal) == (image_pool, text_pool,
                                                                                              text_causal)
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(images, text_ids, text_mask), model.score(images, text_ids, text_mask))


def test_a_config_without_pooling_fields_is_the_old_mean_pooled_model(tmp_path):
    """Runs saved before the pooling fields (the shipped openmoji demo) load as mean/mean and score as before."""
    torch.manual_seed(0)
    model = Scorer(TINY).eval()
    model.save_pretrained(tmp_path / "scorer")
    config = json.loads((tmp_path / "scorer" / "config.json").read_text())
    for name in ("image_pool", "text_pool", "text_causal", "hard_negatives"):
        config.pop(name)
    (tmp_path / "scorer" / "config.json").write_text(json.dumps(config))
    loaded = Scorer.from_pretrained(tmp_path / "scorer")
    assert (loaded.config.image_pool, loaded.config.text_pool, loaded.config.text_causal) == ("mean", "mean", False)
    images, text_ids, text_mask = tiny_batch()
    with torch.no_grad():
        pooled = loaded.text.ln_final(_text_states(loaded, text_ids, text_mask))
        mean = (pooled * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True)
        torch.testing.assert_close(loaded.text(text_ids, text_mask), mean)
        torch.testing.assert_close(loaded.score(images, text_ids, text_mask), model.score(images, text_ids, text_mask))
    shipped = Path(__file__).resolve().parents[1] / "sample"
    old = Scorer.from_pretrained(shipped / "demo_openmoji" / "scorer")
    assert (old.config.image_pool, old.config.text_pool, old.config.text_causal) == ("mean", "mean", False)
    causal = Scorer.from_pretrained(shipped / "demo_run" / "scorer")  # the shapes demo's: the cpu plan's recipe
    assert (causal.config.text_pool, causal.config.text_causal, causal.config.hard_negatives) == ("last", True, "scene")


def _text_states(model: Scorer, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    x = model.text.token_embed(text_ids) + model.text.pos_embed[: text_ids.shape[1]]
    for block in model.text.blocks:
        x = block(x, text_mask)
    return x


def test_last_token_pool_reads_the_last_real_token_and_attention_pool_starts_as_a_mean():
    torch.manual_seed(0)
    model = Scorer(replace(TINY, text_pool="last", image_pool="attention")).eval()
    _, text_ids, text_mask = tiny_batch()
    with torch.no_grad():
        states = model.text.ln_final(_text_states(model, text_ids, text_mask))
        last = text_mask.sum(1) - 1
        torch.testing.assert_close(model.text(text_ids, text_mask), states[torch.arange(6), last])
        # A zero query attends uniformly: the pool is the projected mean of the values.
        pool = model.image.pool
        tokens = torch.randn(3, 16, TINY.d_model)
        values = pool.kv(tokens)[..., TINY.d_model:]
        torch.testing.assert_close(pool(tokens), pool.proj(values.mean(dim=1)))


def test_unknown_pooling_is_an_error_and_the_stage_checks_its_negative_weight(tmp_path, tokenizer_file):
    from train import stage_scorer

    with pytest.raises(ValueError, match="image_pool"):
        replace(TINY, image_pool="max")
    with pytest.raises(ValueError, match="text_pool"):
        replace(TINY, text_pool="flatten")
    run = run_with_tokenizer(tmp_path, tokenizer_file, "run")
    with pytest.raises(UserError, match="--negative-weight"):
        stage_scorer.ScorerTrainer(stage_scorer.ScorerOptions.from_args(clip_args(run, "--negative-weight", "0")))
    with pytest.raises(SystemExit):
        clip_args(run, "--image-pool", "max")


def test_the_stage_records_its_pooling_and_weighs_its_negatives(tmp_path, tokenizer_file):
    from train import stage_scorer

    losses = {}
    for weight in ("1", "4"):
        run = run_with_tokenizer(tmp_path, tokenizer_file, f"w{weight}")
        stage_scorer.main(clip_args(run, "--steps", "1", "--log-every", "1", "--eval-every", "100", "--hard-negatives",
                                    "scene", "--negative-weight", weight, "--image-pool", "flatten", "--text-pool", "last",
                                    "--text-causal"))
        losses[weight] = read_metrics(run)[0]["loss"]
        config = Scorer.from_pretrained(run / "scorer").config
        assert (config.image_pool, config.text_pool, config.text_causal) == ("flatten", "last", True)
    assert losses["4"] > losses["1"]  # each negative counts four times in its picture's softmax


@pytest.mark.parametrize("causal", [False, True])
def test_a_causal_text_tower_reads_only_the_tokens_before(causal):
    """Two captions that share their first three tokens: causal, those tokens' final states agree; bidirectional,
    every state reads the differing tail."""
    torch.manual_seed(0)
    model = Scorer(replace(TINY, text_causal=causal)).eval()
    text_ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 30, 40]])
    states = []
    hook = model.text.ln_final.register_forward_hook(lambda module, args, out: states.append(out))
    with torch.no_grad():
        model.encode_text(text_ids, torch.ones_like(text_ids, dtype=torch.bool))
    hook.remove()
    same_prefix = torch.allclose(states[0][0, :3], states[0][1, :3], atol=1e-6)
    assert same_prefix == causal
    assert not torch.allclose(states[0][0, 3:], states[0][1, 3:])
    with pytest.raises(ValueError, match="text_causal"):
        replace(TINY, text_causal="yes")


def test_init_from_starts_from_another_scorers_weights_and_refuses_another_architecture(tmp_path, tokenizer_file):
    """--init-from fine-tunes: step 1 starts from the given scorer's weights, not from a random initialisation."""
    from train import stage_scorer

    source = run_with_tokenizer(tmp_path, tokenizer_file, "source")
    stage_scorer.main(clip_args(source, "--steps", "2", "--eval-every", "100", "--text-causal", "--text-pool", "last"))
    trained = Scorer.from_pretrained(source / "scorer")
    trained.half().save_pretrained(tmp_path / "packed")  # a packed demo's float16 weights load as well

    tuned = run_with_tokenizer(tmp_path, tokenizer_file, "tuned")
    trainer = stage_scorer.ScorerTrainer(stage_scorer.ScorerOptions.from_args(clip_args(
        tuned, "--steps", "1", "--text-causal", "--text-pool", "last", "--init-from", str(tmp_path / "packed"))))
    for key, value in trained.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[key], value.float()), key
    fresh = stage_scorer.ScorerTrainer(stage_scorer.ScorerOptions.from_args(clip_args(
        run_with_tokenizer(tmp_path, tokenizer_file, "fresh"), "--steps", "1", "--text-causal", "--text-pool", "last")))
    assert not torch.equal(fresh.model.text.token_embed.weight, trainer.model.text.token_embed.weight)

    with pytest.raises(UserError, match="text_causal True .here False.*--text-causal"):
        stage_scorer.ScorerTrainer(stage_scorer.ScorerOptions.from_args(clip_args(
            tuned, "--steps", "1", "--text-pool", "last", "--init-from", str(source / "scorer"))))
    with pytest.raises(UserError, match="--init-from .*is not a directory"):
        stage_scorer.ScorerTrainer(stage_scorer.ScorerOptions.from_args(clip_args(
            tuned, "--steps", "1", "--init-from", str(tmp_path / "missing"))))


def test_candidate_ranking_loss_is_the_softmax_mass_of_the_right_candidates():
    from train.stage_scorer import candidate_ranking_loss

    rows = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]
    images = torch.nn.functional.normalize(torch.tensor(rows), dim=-1)
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scale = torch.tensor(10.0)
    # prompt 0: rows 0 (right) and 1, 2 (wrong); prompt 1: rows 3, 4 with row 3 right.
    loss = candidate_ranking_loss(scale, images, texts, [(0, 1, 2), (3, 1, 1)])
    first = torch.logsumexp(torch.tensor([10.0, 6.0, 0.0]), 0) - 10.0
    second = torch.logsumexp(torch.tensor([10.0, 0.0]), 0) - 10.0
    assert loss.item() == pytest.approx(((first + second) / 2).item(), rel=1e-5)
    swapped = candidate_ranking_loss(scale, images[[2, 1, 0, 4, 3]], texts, [(0, 1, 2), (3, 1, 1)])
    assert swapped > loss  # the wrong candidate ranked first costs more
    both = candidate_ranking_loss(scale, images, texts, [(0, 2, 1)])  # two right ones: their mass together
    assert both.item() == pytest.approx((torch.logsumexp(torch.tensor([10.0, 6.0, 0.0]), 0)
                                         - torch.logsumexp(torch.tensor([10.0, 6.0]), 0)).item(), rel=1e-5)


def judged_candidates(folder: Path, *, size: int = 32, prompts: int = 12, candidates: int = 4, split: str = "train",
                      mixed: bool = True) -> Path:
    """A folder as `python -m train candidates` writes it, with made-up pictures and verdicts."""
    from sample.candidates import save_candidates
    from data.shapes import training_prompts

    generator = torch.Generator().manual_seed(0)
    texts = [text for text, _ in training_prompts("relation", prompts)]
    right = [[j == 0 or (not mixed) for j in range(candidates)] for _ in texts]  # one right, the rest wrong
    settings = {"format": 3, "run": "somewhere", "prompts_per_kind": prompts, "candidates": candidates, "seed": 0,
                "kinds": ["relation"], "cfg": 2.0, "temperature": 1.0, "top_k": None, "top_p": 0.8}
    if split != "heldout":
        settings["split"] = split
    record = {"settings": settings,
              "kinds": {"relation": {"prompts": texts, "right": right, "failed": [[[]] * candidates] * prompts}},
              "images": torch.randint(0, 256, (prompts, candidates, 3, size, size), dtype=torch.uint8,
                                      generator=generator),
              "tokens": torch.zeros(prompts, candidates, 4, 4, dtype=torch.int32)}
    save_candidates(record, folder / "relation")
    return folder


def test_ranked_candidates_join_the_step_and_a_killed_run_resumes_exactly(tmp_path, tokenizer_file, monkeypatch):
    from safetensors.torch import load_file

    from train import stage_scorer

    folder = judged_candidates(tmp_path / "candidates")
    options = ("--steps", "4", "--save-every", "2", "--log-every", "1", "--eval-every", "100",
               "--precision", "fp32", "--rank-candidates", str(folder), "--rank-weight", "2")
    straight = run_with_tokenizer(tmp_path, tokenizer_file, "straight")
    stage_scorer.main(clip_args(straight, *options))
    plain = run_with_tokenizer(tmp_path, tokenizer_file, "plain")
    stage_scorer.main(clip_args(plain, *options[:-4]))

    resumed = killed_after_step_2_then_resumed(run_with_tokenizer(tmp_path, tokenizer_file, "resumed"), options,
                                               monkeypatch)

    def logged(run: Path) -> dict[int, tuple]:
        return {m["step"]: (m["loss"], m.get("rank_loss")) for m in read_metrics(run) if "loss" in m}

    assert logged(resumed) == logged(straight) and sorted(logged(straight)) == [1, 2, 3, 4]
    assert all(rank > 0 for _, rank in logged(straight).values())
    assert all(rank is None for _, rank in logged(plain).values())
    # The same first batch and weights: the step's loss is the contrastive one plus twice the ranking loss.
    loss, rank = logged(straight)[1]
    assert loss == pytest.approx(logged(plain)[1][0] + 2 * rank, rel=1e-4)
    a = load_file(str(straight / "scorer" / "model.safetensors"))
    b = load_file(str(resumed / "scorer" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rank_candidates_refuses_what_it_cannot_rank_with(tmp_path, tokenizer_file):
    from train import stage_scorer

    run = run_with_tokenizer(tmp_path, tokenizer_file, "run")

    def refused(folder: Path, *extra: str) -> str:
        with pytest.raises(UserError) as error:
            stage_scorer.ScorerTrainer(stage_scorer.ScorerOptions.from_args(clip_args(
                run, "--steps", "1", "--rank-candidates", str(folder), *extra)))
        return str(error.value)

    assert "holds no candidates.json" in refused(tmp_path / "empty")
    assert "held-out prompts" in refused(judged_candidates(tmp_path / "bench", split="heldout"))
    assert "64-pixel pictures and this scorer reads 32" in refused(judged_candidates(tmp_path / "big", size=64))
    assert "only 0 prompts" in refused(judged_candidates(tmp_path / "all-right", mixed=False))
    weightless = refused(judged_candidates(tmp_path / "ok"), "--rank-weight", "0")
    assert "--rank-weight must be a positive number" in weightless
    damaged = judged_candidates(tmp_path / "damaged")
    (damaged / "relation" / "candidates.safetensors").write_bytes(b"not a tensor file")
    assert "cannot read the candidates" in refused(damaged)
