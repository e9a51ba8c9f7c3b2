"""Stage 1, the VQGAN: quantizer round trip and restarts, losses, files, and the training stage."""

from __future__ import annotations

import json
import time

import pytest
import torch

from checkpoint import CheckpointError
from train.__main__ import build_parser
from train.stage_all import STAGE_ORDER, preset_flags, stage_argv
from vqgan import VQGAN, FactorizedQuantizer, ScalarQuantizer, VQGANConfig
from vqgan.discriminator import DISCRIMINATOR_PRESETS, PatchDiscriminator
from vqgan.losses import (LossWeights, adaptive_weight, delayed_weight, discriminator_loss, feature_matching_loss,
                          generator_loss, hinge_d_loss, hinge_g_loss, psnr)


def tiny_model(seed: int = 0, **overrides) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(VQGANConfig.from_preset("tiny", **overrides))


def blocks(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """White images with one coloured rectangle each, in [-1, 1]: a little like `shapes`."""
    g = torch.Generator().manual_seed(seed)
    images = torch.ones(batch, 3, size, size)
    for b in range(batch):
        x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        w, h = torch.randint(size // 4, size // 2, (2,), generator=g).tolist()
        images[b, :, y0:y0 + h, x0:x0 + w] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    return images


# ---------------------------------------------------------------------- quantizer
def test_quantizer_round_trip_is_exact():
    model = tiny_model().eval()
    images = blocks(4)
    latents, ids = model.quantize_latents(images)
    assert ids.dtype == torch.int64 and ids.shape == (4, 4, 4)
    assert torch.equal(model.encode(images), ids)
    assert torch.equal(model.ids_to_latents(ids), latents)
    # The straight-through output of the training forward carries exactly the codes' values too.
    reconstructions, quantized = model(images)
    assert torch.equal(quantized.ids, ids)
    assert torch.equal(quantized.latents, latents)
    assert torch.equal(model.decode(ids), model.decode_latents(latents).clamp(-1, 1))
    assert torch.allclose(model.decode(ids), reconstructions.clamp(-1, 1), atol=1e-6)


def test_scalar_quantizer_spells_every_id_once_and_rounds_trip_exactly():
    quantizer = ScalarQuantizer((8, 5, 3))
    assert quantizer.codebook_size == 120 and quantizer.code_dim == 3
    ids = torch.arange(120).view(1, 10, 12)
    codes = quantizer.ids_to_latents(ids)  # (1, 3, 10, 12), each channel in [-1, 1]
    assert codes.shape == (1, 3, 10, 12) and codes.abs().max() <= 1
    assert len({tuple(c) for c in codes.flatten(2)[0].t().tolist()}) == 120  # 120 distinct codes
    channel_values = [sorted(set(codes[0, i].flatten().tolist())) for i in range(3)]
    assert [len(v) for v in channel_values] == [8, 5, 3]
    quantizer.eval()
    out = quantizer(torch.randn(4, 3, 6, 6) * 3)
    assert torch.equal(quantizer.ids_to_latents(out.ids), out.latents)
    assert int(out.ids.min()) >= 0 and int(out.ids.max()) < 120
    # Very large latents reach the outermost values of every channel, so every id is reachable.
    extremes = quantizer.lookup(torch.tensor([-50.0, -50.0, -50.0]).view(1, 3, 1, 1)), quantizer.lookup(
        torch.tensor([50.0, 50.0, 50.0]).view(1, 3, 1, 1))
    assert [int(e) for e in extremes] == [0, 119]


def test_scalar_quantizer_passes_the_gradient_straight_through_and_counts_usage():
    quantizer = ScalarQuantizer((4, 4), usage_window=5).train()
    z = torch.randn(2, 2, 4, 4, requires_grad=True)
    out = quantizer(z)
    out.latents.sum().backward()
    assert z.grad is not None and bool((z.grad != 0).all())  # tanh' > 0: every latent gets a gradient
    assert float(out.loss) == 0.0 and out.restarted == 0
    assert float(out.usage) == out.ids.unique().numel() / 16
    assert int(quantizer.step) == 1


def test_fsq_model_round_trips_saves_and_loads(tmp_path):
    model = tiny_model(quantizer="fsq", fsq_levels=(5, 3, 3)).eval()
    assert model.codebook_size == 45 and model.config.code_dim == 3
    images = blocks(4)
    latents, ids = model.quantize_latents(images)
    assert torch.equal(model.encode(images), ids)
    assert torch.equal(model.ids_to_latents(ids), latents)
    reconstructions, quantized = model(images)
    assert torch.equal(quantized.ids, ids) and torch.allclose(quantized.latents, latents)
    model.save_pretrained(tmp_path / "vqgan")
    loaded = VQGAN.from_pretrained(tmp_path / "vqgan")
    assert loaded.config.quantizer == "fsq" and loaded.config.fsq_levels == (5, 3, 3)
    assert torch.equal(loaded.encode(images), ids) and torch.equal(loaded.decode(ids), model.decode(ids))
    with pytest.raises(ValueError, match="fsq_levels"):
        VQGANConfig.from_preset("tiny", quantizer="fsq")
    with pytest.raises(ValueError, match="quantizer"):
        VQGANConfig.from_preset("tiny", quantizer="lfq")


def test_encode_touches_no_statistics_and_decode_is_in_range():
    model = tiny_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = model.encode(blocks(2))
    images = model.decode(ids)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert images.shape == (2, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    with pytest.raises(ValueError, match="ids must lie in"):
        model.decode(torch.full((1, 4, 4), model.codebook_size))


def test_straight_through_gradient_reaches_encoder():
    model = tiny_model().train()
    reconstructions, quantized = model(blocks(2))
    (reconstructions.abs().mean() + quantized.loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantizer.embedding.grad.abs().sum() > 0  # the codebook term moves the codes


def test_dead_code_restart_revives_a_collapsed_codebook():
    def run(restart: bool) -> list[float]:
        torch.manual_seed(0)
        quantizer = FactorizedQuantizer(32, 4, usage_window=3, restart_dead_codes=restart).train()
        with torch.no_grad():
            quantizer.embedding.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(32, 4))  # all codes equal
        usage = []
        for _ in range(8):
            out = quantizer(torch.randn(4, 4, 4, 4))  # 64 latents spread over the sphere
            usage.append(out.usage.item())
        return usage

    collapsed, revived = run(restart=False), run(restart=True)
    assert collapsed[-1] == pytest.approx(1 / 32)  # ties all go to code 0: one code in use
    assert revived[0] == pytest.approx(1 / 32)  # nothing is dead before a whole window has passed
    assert revived[-1] >= 0.5


def test_usage_counts_only_the_recent_window():
    quantizer = FactorizedQuantizer(8, 2, usage_window=2, restart_dead_codes=False).train()
    with torch.no_grad():
        quantizer.embedding.copy_(torch.eye(2).repeat(4, 1) * torch.arange(1, 9).unsqueeze(1))
        quantizer.embedding[2:] = -1.0  # codes 2..7 all point at (-1, -1) / sqrt(2)

    def towards(vector: list[float]) -> torch.Tensor:
        return torch.tensor(vector).view(1, 2, 1, 1)  # one latent (B=1, D=2, h=1, w=1)

    assert quantizer(towards([1.0, 0.0])).usage.item() == pytest.approx(1 / 8)  # code 0
    assert quantizer(towards([0.0, 1.0])).usage.item() == pytest.approx(2 / 8)  # codes 0, 1
    assert quantizer(towards([0.0, 1.0])).usage.item() == pytest.approx(1 / 8)  # code 0 left the window


def test_ema_codebook_moves_towards_its_latents_without_gradient():
    torch.manual_seed(0)
    quantizer = FactorizedQuantizer(4, 3, ema=True, ema_decay=0.5, restart_dead_codes=False).train()
    target = torch.nn.functional.normalize(torch.tensor([1.0, 2.0, 3.0]), dim=0)
    out = quantizer(target.view(1, 3, 1, 1).expand(2, 3, 2, 2))
    code = out.ids.flatten()[0]
    before = torch.nn.functional.cosine_similarity(out.latents[0, :, 0, 0], target, dim=0)
    after = torch.nn.functional.cosine_similarity(quantizer.codebook()[code], target, dim=0)
    assert out.codebook_loss.item() == 0.0
    assert after > before
    assert not isinstance(quantizer.embedding, torch.nn.Parameter)


# ---------------------------------------------------------------------- losses
def test_adaptive_weight_matches_hand_computation():
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    reconstruction = (w**2).sum()  # gradient 2w, norm 2 * |w|
    gan = (3.0 * w).sum()  # gradient 3 everywhere, norm 3 * 2
    expected = (2 * w.detach().norm()) / (6.0 + 1e-4)
    assert adaptive_weight(reconstruction, gan, w).item() == pytest.approx(expected.item(), rel=1e-6)
    assert adaptive_weight(reconstruction, gan, w, max_weight=0.1).item() == pytest.approx(0.1)


def test_small_loss_pieces():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert hinge_g_loss(fake).item() == pytest.approx(1.0)
    assert delayed_weight(0.5, step=9, start=10) == 0.0 and delayed_weight(0.5, step=10, start=10) == 0.5
    feats = [torch.ones(2, 3), torch.zeros(2, 1)]
    assert feature_matching_loss(feats, feats).item() == 0.0
    assert feature_matching_loss(feats, [f + 0.5 for f in feats]).item() == pytest.approx(0.5)
    images = torch.zeros(2, 3, 4, 4)
    assert psnr(images, images + 0.2).item() == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.04)).item())


def test_squared_error_term_adds_its_weighted_mse():
    disc = PatchDiscriminator(DISCRIMINATOR_PRESETS["tiny"])
    images, reconstructions = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    zero = torch.zeros(())
    kwargs = dict(discriminator=disc, last_layer=zero, step=0)
    plain, metrics = generator_loss(images, reconstructions, zero, weights=LossWeights(disc_start=10), **kwargs)
    both, both_metrics = generator_loss(images, reconstructions, zero, weights=LossWeights(mse=5.0, disc_start=10),
                                        **kwargs)
    assert "mse" not in metrics and both_metrics["mse"].item() == pytest.approx(0.25)
    assert (both - plain).item() == pytest.approx(5.0 * 0.25)


def test_gan_terms_start_at_disc_start():
    model = tiny_model().train()
    disc = PatchDiscriminator(DISCRIMINATOR_PRESETS["tiny"])
    images = blocks(2)
    reconstructions, quantized = model(images)
    weights = LossWeights(disc_start=5)
    kwargs = dict(discriminator=disc, last_layer=model.last_layer, weights=weights)
    _, early = generator_loss(images, reconstructions, quantized.loss, step=4, **kwargs)
    _, late = generator_loss(images, reconstructions, quantized.loss, step=5, **kwargs)
    assert "gan_loss" not in early and "feature_matching" not in early
    assert {"gan_loss", "feature_matching", "adaptive_weight"} <= late.keys()
    assert discriminator_loss(images, reconstructions, discriminator=disc, step=4, weights=weights) is None
    assert discriminator_loss(images, reconstructions, discriminator=disc, step=5, weights=weights) is not None


def test_a_few_training_steps_lower_the_loss():
    model = tiny_model().train()
    torch.manual_seed(0)
    disc = PatchDiscriminator(DISCRIMINATOR_PRESETS["tiny"])
    opt_g = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.5, 0.9))
    opt_d = torch.optim.AdamW(disc.parameters(), lr=3e-3, betas=(0.5, 0.9))
    weights = LossWeights(disc_start=10)
    images = blocks(4)
    l1 = []
    for step in range(20):
        reconstructions, quantized = model(images)
        disc.requires_grad_(False)
        loss, metrics = generator_loss(images, reconstructions, quantized.loss, discriminator=disc,
                                       last_layer=model.last_layer, step=step, weights=weights)
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        disc.requires_grad_(True)
        d = discriminator_loss(images, reconstructions, discriminator=disc, step=step, weights=weights)
        if d is not None:
            opt_d.zero_grad()
            d[0].backward()
            opt_d.step()
        l1.append(metrics["l1"].item())
    assert all(torch.isfinite(torch.tensor(l1)))
    assert sum(l1[-3:]) / 3 < 0.6 * sum(l1[:3]) / 3


def test_bf16_autocast_keeps_the_quantizer_and_the_outputs_in_fp32():
    model = tiny_model().eval()
    images = blocks(4)
    with torch.no_grad():
        reference, reference_quantized = model(images)
        reference_decoded = model.decode(reference_quantized.ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reconstructions, quantized = model(images)
            latents = model.encode_latents(images)
            decoded = model.decode(reference_quantized.ids)
    assert reconstructions.dtype == latents.dtype == quantized.latents.dtype == quantized.loss.dtype == torch.float32
    assert decoded.dtype == torch.float32
    # bf16 keeps about three significant digits, and the decoder's layers add up its rounding: nearly always
    # the same codes, and pixels off by a few thousandths on average (a flipped code moves its whole patch).
    assert (quantized.ids == reference_quantized.ids).float().mean() > 0.9
    assert (decoded - reference_decoded).abs().max() < 0.1
    assert (decoded - reference_decoded).abs().mean() < 0.01
    assert (reconstructions - reference).abs().mean() < 0.01


# ---------------------------------------------------------------------- LPIPS-style perceptual distance
@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A VGG16 state dict in torchvision's layout (random weights: nothing is downloaded)."""
    from safetensors.torch import save_file

    from vqgan.lpips import vgg16_features

    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)  # present in torchvision's file, ignored here
    path = tmp_path_factory.mktemp("vgg") / "vgg16.safetensors"
    save_file(state, str(path))
    return path


def test_vgg_perceptual_distance(vgg_file, tmp_path):
    from safetensors.torch import load_file

    from vqgan.lpips import VGGPerceptual

    perceptual = VGGPerceptual.from_file(vgg_file)
    images, other = blocks(2, size=16), blocks(2, size=16, seed=1)
    assert perceptual(images, images).item() == 0.0
    reconstructions = other.clone().requires_grad_(True)
    distance = perceptual(images, reconstructions)
    assert distance.item() > 0
    distance.backward()
    assert reconstructions.grad.abs().sum() > 0
    assert all(p.grad is None for p in perceptual.parameters())
    # A torch.save file of the `features` module alone loads to the same network.
    features_only = {k.removeprefix("features."): v for k, v in load_file(str(vgg_file)).items() if "features" in k}
    torch.save(features_only, tmp_path / "features.pt")
    assert perceptual(images, other).item() == VGGPerceptual.from_file(tmp_path / "features.pt")(images, other).item()


def test_vgg_weights_that_are_not_vgg16_are_refused(vgg_file, tmp_path):
    from safetensors.torch import load_file, save_file

    from vqgan.lpips import VGGPerceptual

    state = load_file(str(vgg_file))
    del state["features.28.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match=r"^perceptual weights: .*features\.28\.weight"):
        VGGPerceptual.from_file(tmp_path / "partial.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="^perceptual weights: .*cannot be read"):
        VGGPerceptual.from_file(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="^perceptual weights: .*is missing"):
        VGGPerceptual.from_file(tmp_path / "absent.safetensors")


# ---------------------------------------------------------------------- configuration and files
@pytest.mark.parametrize("downsample", [4, 8, 16])
def test_downsample_sets_the_grid(downsample):
    config = VQGANConfig.from_preset("tiny", downsample=downsample)
    assert config.downsample == downsample
    torch.manual_seed(0)
    model = VQGAN(config).eval()
    assert model.grid_size(32) == 32 // downsample
    assert model.encode(blocks(1)).shape == (1, 32 // downsample, 32 // downsample)


@pytest.mark.parametrize("preset", ["small", "base"])
def test_presets_downsample_by_eight(preset):
    assert VQGANConfig.from_preset(preset).downsample == 8


@pytest.mark.parametrize("ema", [False, True])
def test_save_and_load_give_identical_outputs(tmp_path, ema):
    model = tiny_model(ema=ema).train()
    for _ in range(2):  # move the usage statistics and (with EMA) the codes off their initial values
        model(blocks(4))
    model.eval()
    model.save_pretrained(tmp_path / "vqgan")
    loaded = VQGAN.from_pretrained(tmp_path / "vqgan")
    assert loaded.config == model.config and not loaded.training
    images = blocks(3, seed=1)
    ids = model.encode(images)
    assert torch.equal(loaded.encode(images), ids)
    assert torch.equal(loaded.decode(ids), model.decode(ids))
    assert torch.equal(loaded.quantizer.last_used, model.quantizer.last_used)


def test_config_that_does_not_fit_the_weights_names_the_part(tmp_path):
    tiny_model().save_pretrained(tmp_path / "vqgan")
    config_path = tmp_path / "vqgan" / "config.json"
    raw = json.loads(config_path.read_text())
    raw["codebook_size"] = 128
    config_path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"^vqgan: .*quantizer\.embedding"):
        VQGAN.from_pretrained(tmp_path / "vqgan")
    raw["codebook_size"], raw["ema"] = 64, True
    config_path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"^vqgan: weights do not fit"):
        VQGAN.from_pretrained(tmp_path / "vqgan")


# ---------------------------------------------------------------------- the training stage
def run_stage(out, *extra: str) -> None:
    import argparse

    from train import stage_vqgan

    parser = argparse.ArgumentParser()
    stage_vqgan.add_arguments(parser)
    args = parser.parse_args([
        "--data", "shapes", "--out", str(out), "--model-size", "tiny", "--size", "32", "--batch-size", "4",
        "--steps", "4", "--disc-start", "1", "--warmup", "1", "--lr", "1e-3", "--log-every", "1",
        "--eval-every", "2", "--sample-every", "4", "--save-every", "2", "--heldout-examples", "4", *extra,
    ])
    stage_vqgan.main(args)


def logged_losses(out) -> dict[int, float]:
    lines = (out / "metrics" / "vqgan.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_stage_trains_writes_the_run_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    from train import stage_vqgan

    # One precision for both runs: `auto` times both on a bf16-capable CPU, and two runs may choose differently.
    run_stage(tmp_path / "straight", "--precision", "fp32")
    assert "held-out PSNR" in capsys.readouterr().out
    straight = tmp_path / "straight"
    assert (straight / "samples" / "vqgan" / "step-0000004.png").is_file()
    records = [json.loads(line) for line in (straight / "metrics" / "vqgan.jsonl").read_text().splitlines()]
    assert any("heldout_psnr" in r for r in records) and any("disc_loss" in r for r in records)
    model = VQGAN.from_pretrained(straight / "vqgan")
    assert model.config == VQGANConfig.from_preset("tiny")

    # The same run, killed right after its step-2 checkpoint, then resumed.
    original = stage_vqgan.VQGANTrainer.checkpoint

    def checkpoint_then_die(self, step):
        original(self, step)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(stage_vqgan.VQGANTrainer, "checkpoint", checkpoint_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path / "resumed", "--precision", "fp32")
    monkeypatch.setattr(stage_vqgan.VQGANTrainer, "checkpoint", original)
    run_stage(tmp_path / "resumed", "--resume", "--precision", "fp32")
    assert logged_losses(tmp_path / "resumed") == logged_losses(straight)
    resumed = VQGAN.from_pretrained(tmp_path / "resumed" / "vqgan")
    for key, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_a_stage_killed_before_its_first_checkpoint_resumes_in_the_precision_it_chose(tmp_path, monkeypatch, capsys):
    """``--precision auto`` is written to the run when chosen: a stage stopped before its first checkpoint starts
    again in that precision on --resume, where probing again could choose the other on a noisy machine."""
    from train import loop, stage_vqgan

    run_stage(tmp_path / "straight", "--precision", "bf16")
    monkeypatch.setattr(loop, "native_bf16", lambda device: True)

    def probe_where(slow):  # a probe on which ``slow`` takes 20 ms and the other precision nothing
        return lambda self, dtype: time.sleep(0.02) if dtype is slow else None

    def die(self, images):
        raise KeyboardInterrupt

    original = stage_vqgan.VQGANTrainer.train_step
    monkeypatch.setattr(stage_vqgan.VQGANTrainer, "_precision_probe", probe_where(None))  # bf16 measures faster
    monkeypatch.setattr(stage_vqgan.VQGANTrainer, "train_step", die)
    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path / "resumed", "--precision", "auto")
    assert "--precision auto: bf16" in capsys.readouterr().out
    assert not (tmp_path / "resumed" / "state" / "vqgan" / "latest.json").exists()

    monkeypatch.setattr(stage_vqgan.VQGANTrainer, "train_step", original)
    monkeypatch.setattr(stage_vqgan.VQGANTrainer, "_precision_probe", probe_where(torch.bfloat16))  # now fp32
    run_stage(tmp_path / "resumed", "--resume", "--precision", "auto")
    out = capsys.readouterr().out
    assert "starting again at step 0 in bf16" in out and "--precision auto:" not in out  # not probed again
    assert logged_losses(tmp_path / "resumed") == logged_losses(tmp_path / "straight")
    straight, resumed = (VQGAN.from_pretrained(tmp_path / name / "vqgan").state_dict()
                         for name in ("straight", "resumed"))
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key

    with pytest.raises(CheckpointError, match="start without --resume"):  # never got as far as choosing
        run_stage(tmp_path / "empty", "--resume")


def test_stage_refuses_to_resume_with_another_model(tmp_path):
    from cli import UserError

    run_stage(tmp_path, "--steps", "2")
    with pytest.raises(UserError):
        run_stage(tmp_path, "--steps", "4", "--resume", "--codebook-size", "32")
    with pytest.raises(UserError, match="multiple of the VQGAN's downsampling factor"):
        run_stage(tmp_path / "odd", "--size", "36")


def test_stage_betas_reach_the_autoencoders_optimizer_only(tmp_path):
    import argparse

    from cli import UserError
    from train import stage_vqgan

    parser = argparse.ArgumentParser()
    stage_vqgan.add_arguments(parser)
    common = ["--data", "shapes", "--model-size", "tiny", "--size", "32", "--heldout-examples", "4"]
    options = stage_vqgan.VQGANOptions.from_args(parser.parse_args([*common, "--out", str(tmp_path / "a"),
                                                                    "--betas", "0.9", "0.99"]))
    trainer = stage_vqgan.VQGANTrainer(options)
    assert trainer.optimizers["generator"].param_groups[0]["betas"] == (0.9, 0.99)
    assert trainer.optimizers["discriminator"].param_groups[0]["betas"] == (0.5, 0.9)
    default = parser.parse_args([*common, "--out", str(tmp_path / "b")])
    assert tuple(default.betas) == (0.5, 0.9)
    run_stage(tmp_path / "resumed", "--steps", "2")
    run_stage(tmp_path / "resumed", "--steps", "4", "--resume", "--betas", "0.8", "0.95")
    resumed = stage_vqgan.VQGANTrainer(stage_vqgan.VQGANOptions.from_args(parser.parse_args(
        [*common, "--out", str(tmp_path / "resumed"), "--steps", "4", "--resume", "--betas", "0.8", "0.95"])))
    assert resumed.optimizers["generator"].param_groups[0]["betas"] == (0.8, 0.95)
    for bad in (["1.0", "0.9"], ["0.9", "nan"], ["-0.1", "0.9"]):
        args = parser.parse_args([*common, "--out", str(tmp_path / "c"), "--betas", *bad])
        with pytest.raises(UserError, match="--betas"):
            stage_vqgan.VQGANTrainer(stage_vqgan.VQGANOptions.from_args(args))


def test_stage_fsq_levels_train_an_fsq_model_and_bad_levels_are_refused(tmp_path):
    import argparse

    from cli import UserError
    from train import stage_vqgan

    run_stage(tmp_path / "fsq", "--fsq-levels", "4", "3", "3")
    config = json.loads((tmp_path / "fsq" / "vqgan" / "config.json").read_text())
    assert config["quantizer"] == "fsq" and config["fsq_levels"] == [4, 3, 3] and config["codebook_size"] == 36
    assert VQGAN.from_pretrained(tmp_path / "fsq" / "vqgan").encode(blocks(1)).max() < 36
    parser = argparse.ArgumentParser()
    stage_vqgan.add_arguments(parser)
    common = ["--data", "shapes", "--model-size", "tiny", "--size", "32", "--out", str(tmp_path / "bad")]
    for bad, match in ((["--fsq-levels", "4", "1"], "--fsq-levels"), (["--fsq-levels", "4", "--ema"], "--ema"),
                       (["--fsq-levels", "4", "--codebook-size", "4"], "--codebook-size")):
        with pytest.raises(UserError, match=match):
            stage_vqgan.VQGANTrainer(stage_vqgan.VQGANOptions.from_args(parser.parse_args([*common, *bad])))


def test_stage_precision_changes_the_arithmetic_not_the_training(tmp_path):
    run_stage(tmp_path / "fp32", "--precision", "fp32")
    run_stage(tmp_path / "bf16", "--precision", "bf16")
    fp32, bf16 = logged_losses(tmp_path / "fp32"), logged_losses(tmp_path / "bf16")
    assert fp32.keys() == bf16.keys() and len(fp32) == 4
    for step, loss in fp32.items():
        assert bf16[step] == pytest.approx(loss, rel=0.05), step


@pytest.mark.parametrize("data", ["shapes", "openmoji"])
@pytest.mark.parametrize("plan", ["tiny", "cpu", "gpu"])
def test_every_plan_of_train_all_parses_in_its_stage(plan, data):
    """A typo in a plan's flags would otherwise surface only when `train all` reaches that stage."""
    parser = build_parser()
    for stage in STAGE_ORDER:
        args = parser.parse_args([stage, "--out", "RUN", *preset_flags(plan, stage, data)])
        assert args.stage == stage
    real = parser.parse_args(["vqgan", "--out", "RUN", *preset_flags("cpu", "vqgan", "openmoji")])
    assert real.mse_weight > 0 and real.disc_start < real.steps


def test_train_all_hands_balance_to_every_stage():
    parser = build_parser()
    args = parser.parse_args(["all", "--out", "RUN", "--data", "openmoji", "--balance", "groups"])
    for stage in STAGE_ORDER:
        argv = stage_argv(stage, "cpu", args)
        assert argv[argv.index("--balance") + 1] == "groups"
        assert parser.parse_args([stage, *argv]).balance == "groups"
