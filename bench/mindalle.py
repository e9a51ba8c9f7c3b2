"""Decoding speed against min-dalle's decoder, built here at the same size and timed in the same process.

min-dalle (a lean PyTorch port of DALL-E mini) decodes one image token per step like tilecraft, but its
decoder differs in what a step costs. As min-dalle describes it, a step

- embeds the previous token and its position (learned positions) and layer-normalizes the sum;
- in every layer, runs self-attention with pre- and post-attention layer norms, writing this step's key
  and value into a preallocated state of all image positions and attending over every position, the
  unfilled ones masked by a bias;
- runs cross-attention that projects the encoder's output to keys and values again at every step;
- runs a GLU feed-forward (layer norm, GELU(fc0) * fc1, layer norm, fc2) with a residual;
- applies the guidance mix to the logits of the conditional and unconditional rows, keeps the top k by
  a full sort, and draws with ``torch.multinomial``.

:class:`MinDalleDecoder` is written here from that description (not copied), with tilecraft's `small`
decoder's width, depth, heads and feed-forward width, so both hold about as many parameters. Weights are
random: speed does not depend on them. Both decoders read the same encoder output; tilecraft's time
includes its encoder pass and its per-candidate counter-based sampler, min-dalle's does not include an
encoder. ``python -m bench.mindalle`` prints, for each batch size, guidance on and off and each thread
count, the two times and min-dalle's over tilecraft's (above 1: tilecraft is faster), the runs
interleaved and the fastest of ``--repeats`` kept.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cli import ArgumentParser, UserError, counts, positive_int, run_command
from seq2seq import Seq2Seq, Seq2SeqConfig, generate
from seq2seq.generate import EMPTY_TEXT_IDS, with_unconditional

__all__ = ["MinDalleDecoder", "main"]


class _Attention(nn.Module):
    """Multi-head attention over given keys, values and queries, unfilled keys masked by a bias."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.q_proj = nn.Linear(width, width, bias=False)
        self.out_proj = nn.Linear(width, width, bias=False)

    def attend(self, keys: Tensor, values: Tensor, queries: Tensor, mask: Tensor) -> Tensor:
        """``keys``, ``values`` (B, K, D); ``queries`` (B, Q, D); ``mask`` (B, K) True where a key counts."""
        b, k, d = keys.shape
        c = d // self.heads
        keys = keys.reshape(b, k, self.heads, c)
        values = values.reshape(b, k, self.heads, c)
        queries = queries.reshape(b, queries.shape[1], self.heads, c) / math.sqrt(c)
        bias = (1 - mask.to(queries.dtype))[:, None, None, :] * -1e12  # (B, 1, 1, K)
        weights = torch.einsum("bqhc,bkhc->bhqk", queries, keys) + bias
        weights = weights.softmax(-1)
        out = torch.einsum("bhqk,bkhc->bqhc", weights, values).reshape(b, -1, d)
        return self.out_proj(out)


class _Layer(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.pre_self_attn_norm = nn.LayerNorm(width)
        self.self_attn = _Attention(width, heads)
        self.self_attn_norm = nn.LayerNorm(width)
        self.pre_encoder_attn_norm = nn.LayerNorm(width)
        self.encoder_attn = _Attention(width, heads)
        self.encoder_attn_norm = nn.LayerNorm(width)
        self.glu_norm0 = nn.LayerNorm(width)
        self.fc0 = nn.Linear(width, hidden, bias=False)
        self.fc1 = nn.Linear(width, hidden, bias=False)
        self.glu_norm1 = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, width, bias=False)

    def forward(self, x: Tensor, encoder_state: Tensor, encoder_mask: Tensor, state: Tensor, self_mask: Tensor,
                token_index: Tensor) -> Tensor:
        """One token (B, 1, D); ``state`` (2B, N, D) holds every position's keys then values, written in place."""
        rows = x.shape[0]
        h = self.pre_self_attn_norm(x)
        attn = self.self_attn
        state[:, token_index] = torch.cat([attn.k_proj(h), attn.v_proj(h)]).to(state.dtype)
        h = attn.attend(state[:rows], state[rows:], attn.q_proj(h), self_mask)
        x = x + self.self_attn_norm(h)
        h = self.pre_encoder_attn_norm(x)
        attn = self.encoder_attn  # the encoder's keys and values, projected again at every step
        h = attn.attend(attn.k_proj(encoder_state), attn.v_proj(encoder_state), attn.q_proj(h), encoder_mask)
        x = x + self.encoder_attn_norm(h)
        h = self.glu_norm0(x)
        h = self.glu_norm1(F.gelu(self.fc0(h)) * self.fc1(h))
        return x + self.fc2(h)


class MinDalleDecoder(nn.Module):
    """min-dalle's image-token decoder at a given size, with its sampling loop (:meth:`sample`)."""

    def __init__(self, width: int, heads: int, layers: int, hidden: int, codebook_size: int, image_len: int):
        super().__init__()
        self.image_len, self.codebook_size = image_len, codebook_size
        self.embed_tokens = nn.Embedding(codebook_size + 1, width)  # the last id starts every picture
        self.embed_positions = nn.Embedding(image_len, width)
        self.embed_norm = nn.LayerNorm(width)
        self.layers = nn.ModuleList(_Layer(width, heads, hidden) for _ in range(layers))
        self.final_norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, codebook_size + 1, bias=False)

    @torch.no_grad()
    def sample(self, encoder_state: Tensor, encoder_mask: Tensor, guided: bool, cfg: float = 1.5, top_k: int = 64,
               temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Image ids (B, image_len). ``encoder_state`` (R, L, D) and ``encoder_mask`` (R, L): R = 2B when
        ``guided`` (conditional rows, then unconditional), else B."""
        rows = encoder_state.shape[0]
        images = rows // 2 if guided else rows
        device, dtype = encoder_state.device, encoder_state.dtype
        width = self.embed_tokens.embedding_dim
        state = torch.zeros(len(self.layers), 2 * rows, self.image_len, width, dtype=dtype, device=device)
        positions = torch.arange(self.image_len, device=device)
        tokens = torch.full((images,), self.codebook_size, dtype=torch.long, device=device)
        out = []
        for i in range(self.image_len):
            token_index = torch.tensor([i], device=device)
            self_mask = (positions < i + 1)[None].expand(rows, -1)  # built again every step, as there
            previous = tokens.repeat(2) if guided else tokens
            x = self.embed_tokens(previous) + self.embed_positions(token_index.expand(rows))
            x = self.embed_norm(x)[:, None]  # (R, 1, D)
            for layer, layer_state in zip(self.layers, state):
                x = layer(x, encoder_state, encoder_mask, layer_state, self_mask, token_index)
            logits = self.lm_head(self.final_norm(x))[:, -1, : self.codebook_size].float()
            if guided:
                logits = logits[:images] * cfg + logits[images:] * (1 - cfg)
            ranked, _ = logits.sort(descending=True)
            kept = logits >= ranked[:, [top_k - 1]]
            weights = ((logits - ranked[:, [0]]) / temperature).exp() * kept
            tokens = torch.multinomial(weights, 1, generator=generator)[:, 0]
            out.append(tokens)
        return torch.stack(out, 1)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.mindalle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=positive_int, default=16,
                        help="grid side: grid**2 image tokens (default 16: 256)")
    parser.add_argument("--batches", type=counts, default=[1, 16], help="batch sizes, comma-separated (default 1,16)")
    parser.add_argument("--threads", type=counts, default=[1, 2], help="thread counts, comma-separated (default 1,2)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs of each, interleaved (default 3)")
    parser.add_argument("--cfg", type=float, default=1.5, help="guidance scale when on (default 1.5)")
    parser.add_argument("--top-k", type=positive_int, default=64, help="top-k for both (default 64)")
    parser.add_argument("--text-len", type=positive_int, default=16, help="prompt tokens (default 16)")
    args = parser.parse_args(argv)
    return run_command(lambda: _run(args))


def _run(args) -> None:
    if args.grid > 64 or args.text_len > 64:
        raise UserError("--grid and --text-len go up to 64 (the small preset's text positions: 64)")
    batches, threads = args.batches, args.threads

    torch.manual_seed(0)
    config = Seq2SeqConfig.from_preset("small", grid_size=args.grid)
    if args.top_k > config.codebook_size:
        raise UserError(f"--top-k {args.top_k} is more than the {config.codebook_size} codes; give at most "
                        f"{config.codebook_size}")
    ours = Seq2Seq(config).eval()
    theirs = MinDalleDecoder(config.d_model, config.n_heads, config.n_decoder_layers, config.mlp_hidden,
                             config.codebook_size, config.image_len).eval()
    ours_params = sum(p.numel() for p in ours.decoder.parameters())
    theirs_params = sum(p.numel() for p in theirs.parameters())
    print(f"decoders: tilecraft small {ours_params / 1e6:.2f} M, min-dalle-style {theirs_params / 1e6:.2f} M "
          f"parameters; {config.image_len} image tokens, top-k {args.top_k}, guidance {args.cfg} when on; "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    text_ids = torch.randint(4, config.text_vocab_size, (max(batches), args.text_len))
    text_mask = torch.ones_like(text_ids, dtype=torch.bool)
    # The unconditional rows as generate() builds them: the empty caption, padded to the prompts' length.
    both_ids, both_mask = with_unconditional(text_ids, text_mask, EMPTY_TEXT_IDS)
    empty, empty_mask = both_ids[len(text_ids):], both_mask[len(text_ids):]
    with torch.no_grad():
        memory = ours.encode(text_ids, text_mask)
        empty_memory = ours.encode(empty, empty_mask)

    def run_ours(batch: int, guided: bool) -> None:
        generate(ours, text_ids[:batch], text_mask[:batch], seeds=0, top_k=args.top_k,
                 cfg_scale=args.cfg if guided else 1.0)

    def run_theirs(batch: int, guided: bool) -> None:
        state, mask = memory[:batch], text_mask[:batch]
        if guided:
            state, mask = torch.cat([state, empty_memory[:batch]]), torch.cat([mask, empty_mask[:batch]])
        theirs.sample(state, mask, guided, cfg=args.cfg, top_k=args.top_k, generator=torch.Generator().manual_seed(0))

    print(f"{'batch':>5} {'guidance':>8} {'threads':>7} {'tilecraft s':>11} {'min-dalle s':>11} {'ratio':>6}")
    for batch, guided, n_threads in itertools.product(batches, (False, True), threads):
        torch.set_num_threads(n_threads)
        run_ours(batch, guided)  # warm up both: allocation, kernel choice
        run_theirs(batch, guided)
        times = {"ours": math.inf, "theirs": math.inf}
        for _ in range(args.repeats):
            times["ours"] = min(times["ours"], _seconds(lambda: run_ours(batch, guided)))
            times["theirs"] = min(times["theirs"], _seconds(lambda: run_theirs(batch, guided)))
        print(f"{batch:>5} {'on' if guided else 'off':>8} {n_threads:>7} {times['ours']:>11.2f} "
              f"{times['theirs']:>11.2f} {times['theirs'] / times['ours']:>5.2f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
