"""Speculative Jacobi decoding: plain sampling's distribution exactly (a chi-square test against the enumerated
joint distribution, which a wrong acceptance rule fails), forced ids kept, seeds independent of the batch."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch

import seq2seq.speculative as speculative
from sample.pipeline import Pipeline, SamplingSettings
from seq2seq import EMPTY_TEXT_IDS, Seq2Seq, Seq2SeqConfig, filter_logits, generate

SIGNIFICANCE = 1e-3  # a correct sampler fails one case in a thousand; the seeds are fixed, so the test is too
SAMPLES = 8000
TEXT = torch.tensor([[5, 7, 3]])
TEXT_MASK = torch.ones_like(TEXT, dtype=torch.bool)


@pytest.fixture(scope="module")
def peaked() -> Seq2Seq:
    """4 image tokens over a codebook of 4 (256 pictures: the joint distribution can be enumerated), weights
    scaled up so that each token's distribution is far from uniform and hangs on the tokens before it."""
    config = Seq2SeqConfig(text_vocab_size=16, codebook_size=4, grid_size=2, max_text_len=8, d_model=16, n_heads=2,
                           n_encoder_layers=1, n_decoder_layers=1)
    torch.manual_seed(0)
    model = Seq2Seq(config).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.normal_(0.0, 3.0 / weight.shape[1] ** 0.5)
    return model


@pytest.fixture(scope="module")
def tiny() -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(Seq2SeqConfig.from_preset("tiny")).eval()


def exact_distribution(model: Seq2Seq, cfg_scale: float = 1.0, **filters) -> torch.Tensor:
    """The probability (V**S,) of every picture, in counting order, under plain sampling: the product of the
    model's conditionals after guidance and the filters, over all pictures at once by teacher forcing."""
    config = model.config
    pictures = torch.tensor(list(itertools.product(range(config.codebook_size), repeat=config.image_len)))
    n = len(pictures)
    with torch.no_grad():
        logits = model(TEXT.expand(n, -1), TEXT_MASK.expand(n, -1), pictures)  # (N, S, V)
        if cfg_scale != 1.0:
            empty = torch.tensor([EMPTY_TEXT_IDS]).expand(n, -1)
            uncond = model(empty, torch.ones_like(empty, dtype=torch.bool), pictures)
            logits = uncond + cfg_scale * (logits - uncond)
    probs = filter_logits(logits, **filters)
    return probs.gather(2, pictures[..., None])[..., 0].prod(1)  # (N,)


def drawn_counts(model: Seq2Seq, **options) -> torch.Tensor:
    """How many of SAMPLES candidates (seeds 1000, 1001, ...) drew each picture, in counting order."""
    config = model.config
    ids = generate(model, TEXT, TEXT_MASK, num_candidates=SAMPLES, seeds=1000, **options).flatten(1)  # (N, S)
    place = config.codebook_size ** torch.arange(config.image_len - 1, -1, -1)  # (S,) the first token counts most
    return torch.bincount((ids * place).sum(1), minlength=config.codebook_size ** config.image_len).double()


def chi_square_pvalue(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of counts against probabilities; cells expecting under 5 pooled into one."""
    expected = probs.double() * observed.sum()
    large = expected >= 5
    observed = torch.cat([observed[large], observed[~large].sum()[None]])
    expected = torch.cat([expected[large], expected[~large].sum()[None]])
    if expected[-1] < 5:  # the pool itself too small: fold it into the last large cell
        observed = torch.cat([observed[:-2], observed[-2:].sum()[None]])
        expected = torch.cat([expected[:-2], expected[-2:].sum()[None]])
    statistic = ((observed - expected) ** 2 / expected).sum()
    freedom = torch.tensor((len(observed) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(freedom, statistic / 2))  # P(chi2 with that freedom >= statistic)


CASES = [
    dict(speculative=2),
    dict(speculative=3, cfg_scale=2.0, top_k=3),  # guidance and top-k; the window stops at the grid's end
    dict(speculative=4, cfg_scale=1.5, temperature=0.8, top_p=0.9),
]


def _filters(options: dict) -> dict:
    return {k: v for k, v in options.items() if k in ("temperature", "top_k", "top_p")}


def test_the_model_of_the_distribution_tests_is_peaked_and_hangs_on_the_past(peaked):
    """What lets a wrong rule show: tokens far from uniform, the last one's law moved by the first."""
    probs = exact_distribution(peaked).view(64, 4)  # (the first three tokens, the last)
    last_given_past = probs / probs.sum(1, keepdim=True)  # (64, 4)
    assert float(probs.max()) > 10 / 256
    spread = (last_given_past[:, None] - last_given_past[None, :]).abs().sum(-1) / 2  # (64, 64) total variation
    assert float(spread.max()) > 0.5


@pytest.mark.parametrize("options", CASES, ids=["plain", "guided-top-k", "temperature-top-p"])
def test_speculative_pictures_follow_the_exact_distribution_of_plain_sampling(peaked, options):
    probs = exact_distribution(peaked, options.get("cfg_scale", 1.0), **_filters(options))
    assert chi_square_pvalue(drawn_counts(peaked, **options), probs) > SIGNIFICANCE
    plain = {k: v for k, v in options.items() if k != "speculative"}  # the test passes plain sampling too
    assert chi_square_pvalue(drawn_counts(peaked, **plain), probs) > SIGNIFICANCE


def _always_accept(uniform, p_draft, q_draft):
    return torch.ones_like(p_draft, dtype=torch.bool)


def _redraw_from_target(target, proposal):
    return target


@pytest.mark.parametrize("wrong", [("accept_drafts", _always_accept), ("residual", _redraw_from_target)],
                         ids=["always-accept", "redraw-from-p"])
def test_the_distribution_test_rejects_a_wrong_acceptance_rule(peaked, monkeypatch, wrong):
    options = CASES[1]
    probs = exact_distribution(peaked, options["cfg_scale"], **_filters(options))
    monkeypatch.setattr(speculative, *wrong)
    assert chi_square_pvalue(drawn_counts(peaked, **options), probs) < SIGNIFICANCE


class _Passes:
    """Counts the decoder's forward passes (prefill included)."""

    def __init__(self, model: Seq2Seq, monkeypatch):
        self.count, plain = 0, model.decoder.decode

        def counted(*args, **kwargs):
            self.count += 1
            return plain(*args, **kwargs)

        monkeypatch.setattr(model.decoder, "decode", counted)


def test_greedy_speculative_decoding_is_greedy_decoding_in_fewer_passes(tiny, monkeypatch):
    text_ids = torch.randint(4, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    text_mask = torch.ones_like(text_ids, dtype=torch.bool)
    greedy = generate(tiny, text_ids, text_mask, temperature=0, cfg_scale=2.0)
    passes = _Passes(tiny, monkeypatch)
    assert torch.equal(generate(tiny, text_ids, text_mask, temperature=0, cfg_scale=2.0, speculative=6), greedy)
    assert passes.count < tiny.config.image_len


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_a_speculative_candidate_is_the_same_alone_or_in_a_batch(tiny, cfg_scale):
    text_ids = torch.randint(4, 64, (3, 6), generator=torch.Generator().manual_seed(1))
    text_mask = torch.ones_like(text_ids, dtype=torch.bool)
    options = dict(top_k=10, cfg_scale=cfg_scale, speculative=5)
    batch = generate(tiny, text_ids, text_mask, num_candidates=3, seeds=50, **options)
    for row in (0, 4, 8):
        prompt = row // 3
        alone = generate(tiny, text_ids[prompt : prompt + 1], text_mask[prompt : prompt + 1], seeds=[50 + row],
                         **options)
        assert torch.equal(alone[0], batch[row])
    assert not torch.equal(batch, generate(tiny, text_ids, text_mask, num_candidates=3, seeds=50, top_k=10,
                                           cfg_scale=cfg_scale))  # another stream than plain sampling's


def test_forced_ids_are_kept_and_their_likelihood_is_the_models(tiny):
    config = tiny.config
    text_ids = torch.randint(4, 64, (2, 4), generator=torch.Generator().manual_seed(2))
    text_mask = torch.ones_like(text_ids, dtype=torch.bool)
    init = torch.randint(0, config.codebook_size, (2, config.grid_size, config.grid_size))
    keep = torch.zeros(config.grid_size, config.grid_size, dtype=torch.bool)
    keep[0, :2] = keep[1, 1] = keep[2:, 2:] = True  # a prefix, a lone kept token, a block after the holes
    ids, likelihood = generate(tiny, text_ids, text_mask, num_candidates=3, seeds=7, init_ids=init, keep_mask=keep,
                               cfg_scale=2.0, speculative=4, return_likelihood=True)
    rows = init.repeat_interleave(3, 0)
    assert torch.equal(ids[:, keep], rows[:, keep])
    # The likelihood of the kept ids after the first hole, read off a teacher-forced pass over the pictures drawn.
    with torch.no_grad():
        log_probs = tiny(text_ids.repeat_interleave(3, 0), text_mask.repeat_interleave(3, 0), ids).log_softmax(-1)
    after_hole = keep.flatten() & (torch.arange(config.image_len) > 1)
    expected = log_probs.gather(2, ids.flatten(1)[..., None])[..., 0][:, after_hole].mean(1)
    torch.testing.assert_close(likelihood, expected, rtol=1e-4, atol=1e-4)


def test_previews_come_every_k_tokens_from_the_prefix_on(tiny):
    text_ids = torch.tensor([[5, 9, 11]])
    filled = []
    ids = generate(tiny, text_ids, torch.ones_like(text_ids, dtype=torch.bool), seeds=3, speculative=8,
                   prefix_ids=torch.tensor([[1, 2, 3]]), preview_every=5,
                   on_step=lambda n, grid: filled.append((n, grid.clone())))
    assert [n for n, _ in filled] == [3, 8, 13, 16]
    for n, grid in filled:
        assert torch.equal(grid.flatten()[:n], ids.flatten()[:n]) and bool((grid.flatten()[n:] == -1).all())


def test_generate_refuses_a_window_it_cannot_use(tiny):
    text_ids = torch.tensor([[5, 9]])
    text_mask = torch.ones_like(text_ids, dtype=torch.bool)
    for window in (1, -2, tiny.config.image_len + 1):
        with pytest.raises(ValueError, match="speculative window must be 0"):
            generate(tiny, text_ids, text_mask, speculative=window)
    for option in (dict(compile=True), dict(use_cache=False)):
        with pytest.raises(ValueError, match="not with compile or use_cache=False"):
            generate(tiny, text_ids, text_mask, speculative=4, **option)


def test_the_pipeline_hands_the_window_to_generate(tiny_run, monkeypatch):
    decoding = importlib.import_module("seq2seq.generate")  # the module: seq2seq.generate is also the function
    windows = []
    plain = decoding.decode_speculative

    def spy(*args):
        windows.append(args[5])
        return plain(*args)

    monkeypatch.setattr(decoding, "decode_speculative", spy)
    pipeline = Pipeline(tiny_run, device="cpu", rerank=False)
    pictures = pipeline(["a red circle"], SamplingSettings(n=2, keep=1, speculative=4))[0]
    assert windows == [4] and len(pictures) == 2
