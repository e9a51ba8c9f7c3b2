"""The CLIP-style scorer: a text encoder and an image encoder that map into one embedding space.

Follows CLIP (Radford et al., 2021, "Learning Transferable Visual Models From Natural Language
Supervision"): each encoder's pooled output is projected to ``embed_dim`` and l2-normalized; the cosine
similarities of every image with every text in a batch, times a learned temperature, are trained with a
symmetric InfoNCE loss. Sampling reranks a prompt's candidates by it (DALL-E 1, Parti).

- Text: token embeddings plus learned positions, pre-norm transformer blocks with bidirectional
  attention under a padding mask, a final LayerNorm, then the masked mean over the real tokens. CLIP pools
  at the EOS token because its text tower is causal, so only that position has read the whole caption;
  here every position has, and the mean does not depend on whether the tokenizer appends an EOS piece.
- Options (issue 20, BENCHMARKS.md), all defaulting to the model above so older runs load unchanged:
  ``text_causal`` (CLIP's causal text attention, which reads word order from the first step where the
  bidirectional tower must first learn it from its positions), ``text_pool`` (``mean``, ``attention``,
  ``last``) and ``image_pool`` (``mean``, ``attention``, ``flatten``).
- Image: convolutional stages that each halve the side (strided convolution, then a residual block),
  the resulting ``grid_size x grid_size`` feature map read as tokens with learned row and column
  positions, a LayerNorm (CLIP's ``ln_pre``), pre-norm transformer blocks, then the mean over the grid
  tokens (a hybrid ViT). Convolutions see colour and outline cheaply; positions and attention see where
  things are and how they stand to each other, which captions such as "a red circle above a blue
  square" name. CLIP's ViT pools a class token instead; at initialization that token is nearly the same
  for every picture (cosine 0.999 on `tiny`), and small scorers trained from it often collapsed to one
  embedding for all pictures; the mean carries each picture's content from the first step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from checkpoint import CheckpointError, load_pretrained, save_pretrained

__all__ = ["ScorerConfig", "PRESETS", "IMAGE_POOLS", "TEXT_POOLS", "Scorer", "contrastive_loss", "retrieval_accuracy"]

PART = "scorer"


IMAGE_POOLS = ("mean", "attention", "flatten")
TEXT_POOLS = ("mean", "attention", "last")


@dataclass
class ScorerConfig:
    """Sizes of the scorer; ``text_vocab_size`` and ``image_size`` must fit the run (``Scorer.check_fits``)."""

    text_vocab_size: int = 1024
    max_text_len: int = 64  # text tokens per caption, padding included
    image_size: int = 64  # side S of the (B, 3, S, S) images
    embed_dim: int = 128  # the shared embedding both encoders project to
    d_model: int = 128  # width of both transformers
    text_layers: int = 3
    image_layers: int = 2
    heads: int = 4
    image_widths: tuple[int, ...] = (32, 64, 128)  # channels of each convolutional stage; each halves the side
    mlp_ratio: int = 4
    # How the weights were trained, recorded for the reader and not read by the model: the hard negatives
    # of ``python -m train scorer --hard-negatives`` (data/negatives.py); "none" for runs made before them.
    hard_negatives: str = "none"
    # How each tower turns its final tokens into one vector (``POOLS``). "mean" (runs made before these
    # fields): the average token. "attention": one learned query attends over the tokens (the text's under
    # its padding mask). "flatten" (image only): every grid cell's token concatenated and projected, so the
    # 2-D place of each token reaches the embedding directly. "last" (text only): the last real token.
    image_pool: str = "mean"
    text_pool: str = "mean"
    # Causal self-attention in the text tower (CLIP's): a token reads only itself and the tokens before it,
    # so the same word before and after "above" has different states from the first step, without
    # having to learn to use the position embeddings. Pairs with text_pool "last" (CLIP pools at the EOS).
    text_causal: bool = False

    def __post_init__(self) -> None:
        self.image_widths = tuple(int(w) for w in self.image_widths)  # config.json stores a list
        if not isinstance(self.text_causal, bool):
            raise ValueError(f"text_causal must be true or false, got {self.text_causal!r}")
        for name, allowed in (("image_pool", IMAGE_POOLS), ("text_pool", TEXT_POOLS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        positive = ("text_vocab_size", "max_text_len", "image_size", "embed_dim", "d_model", "text_layers",
                    "image_layers", "heads", "mlp_ratio")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by heads {self.heads}")
        if not self.image_widths or min(self.image_widths) < 1:
            raise ValueError(f"image_widths must be one or more positive widths, got {self.image_widths}")
        if self.image_size % (1 << len(self.image_widths)):
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2**{len(self.image_widths)} "
                f"(one halving per entry of image_widths)"
            )

    @property
    def grid_size(self) -> int:
        """Side of the feature map the image transformer reads: ``image_size / 2**len(image_widths)``."""
        return self.image_size >> len(self.image_widths)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ScorerConfig:
        """A named preset (``tiny``, ``small``, ``base``) with some fields replaced, e.g. the vocabulary size."""
        if name not in PRESETS:
            raise ValueError(f"unknown scorer preset {name!r}; choose one of {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, ScorerConfig] = {
    # Tests: about 54 thousand parameters, S = 32 -> an 8x8 grid.
    "tiny": ScorerConfig(text_vocab_size=512, max_text_len=96, image_size=32, embed_dim=32, d_model=32,
                         text_layers=1, image_layers=1, heads=2, image_widths=(8, 16)),
    # The CPU demo: about 1.7 M parameters, S = 64 -> an 8x8 grid.
    "small": ScorerConfig(text_vocab_size=1024, max_text_len=64, image_size=64, embed_dim=128, d_model=128,
                          text_layers=3, image_layers=2, heads=4, image_widths=(32, 64, 128)),
    # GPUs: about 65 M parameters, S = 256 -> a 16x16 grid.
    "base": ScorerConfig(text_vocab_size=8192, max_text_len=77, image_size=256, embed_dim=512, d_model=512,
                         text_layers=8, image_layers=8, heads=8, image_widths=(64, 128, 256, 512)),
}


# ---------------------------------------------------------------------------------------- losses


def contrastive_loss(logits: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over a (B, B + N) matrix of image-to-text logits, matching pairs on the diagonal.

    The first B columns are the batch's own captions; N >= 0 more are texts without a picture (hard
    negatives, NegCLIP): they join each image's softmax over texts, and the text-to-image half reads the
    (B, B) square alone. ``positives`` (B, B + N) bool, optional, marks every pair that counts as a match
    (captions repeat in small vocabularies: two pictures of "a red circle" are not each other's negatives,
    and a negative made for one picture can be another's own caption); it must hold the diagonal. Each
    row's loss is then ``-log`` of the softmax mass on its positives, so with the diagonal alone and N = 0
    this is the cross-entropy of CLIP.
    """
    logits = logits.float()
    b = logits.shape[0]
    if positives is None:
        target = torch.arange(b, device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :b].t(), target))
    return 0.5 * (_multi_positive_nll(logits, positives)
                  + _multi_positive_nll(logits[:, :b].t(), positives[:, :b].t()))


def _multi_positive_nll(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    positive_logits = logits.masked_fill(~positives, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(positive_logits, dim=1)).mean()


@torch.no_grad()
def retrieval_accuracy(logits: torch.Tensor, positives: torch.Tensor | None = None) -> float:
    """Image-to-text top-1 accuracy: the share of rows whose highest logit is a match (the diagonal by default)."""
    best = logits.argmax(dim=1)  # (B,)
    rows = torch.arange(logits.shape[0], device=logits.device)
    hits = best == rows if positives is None else positives[rows, best]
    return hits.float().mean().item()


# ---------------------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    """Multi-head self-attention; ``key_mask`` (B, T) bool hides the keys marked False (padding), or (B, T, T)
    says per query which keys it may read (a causal mask)."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)  # (B, H, T, D)
        if key_mask is None:
            attn_mask = None
        else:  # (B, 1, 1, T) or (B, 1, T, T)
            attn_mask = key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, heads)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model)
        )

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), key_mask)
        return x + self.mlp(self.ln_mlp(x))


class AttentionPool(nn.Module):
    """One learned query attends over the tokens (B, T, C) -> (B, C); ``key_mask`` (B, T) hides padding.

    The query starts near zero, so at initialization the weights are nearly uniform and the pool is close to
    the mean of the projected tokens: every picture keeps its own content from the first step (the collapse
    a class token suffered, see the module's docstring, does not arise).
    """

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, 1, d_model))
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = rearrange(self.q(self.query), "b t (h d) -> b h t d", h=self.heads)  # (1, H, 1, D)
        k, v = rearrange(self.kv(x), "b t (two h d) -> two b h t d", two=2, h=self.heads)  # (B, H, T, D)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, T)
        y = F.scaled_dot_product_attention(q.expand(x.shape[0], -1, -1, -1), k, v, attn_mask=attn_mask)
        return self.proj(rearrange(y, "b h t d -> b (t h d)"))  # (B, C)


class ConvStage(nn.Module):
    """Halve the side with a 4x4 stride-2 convolution, then one residual block (GroupNorm, SiLU, conv3x3, twice)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        groups = math.gcd(8, out_channels)
        self.down = nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1)
        self.norm1 = nn.GroupNorm(groups, out_channels)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return x + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))


# ---------------------------------------------------------------------------------------- encoders


class TextEncoder(nn.Module):
    """Token ids (B, T) and their mask -> the final hidden states pooled (``text_pool``), (B, d_model)."""

    def __init__(self, config: ScorerConfig):
        super().__init__()
        self.max_text_len = config.max_text_len
        self.token_embed = nn.Embedding(config.text_vocab_size, config.d_model)
        self.pos_embed = nn.Parameter(torch.zeros(config.max_text_len, config.d_model))
        self.blocks = nn.ModuleList(Block(config.d_model, config.heads, config.mlp_ratio) for _ in range(config.text_layers))
        self.ln_final = nn.LayerNorm(config.d_model)
        self.pool_kind, self.causal = config.text_pool, config.text_causal
        if config.text_pool == "attention":
            self.pool = AttentionPool(config.d_model, config.heads)

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        text_ids, text_mask = _fit_text(text_ids, text_mask, self.max_text_len)
        # A row with no tokens at all (an empty prompt) reads its padding, so its embedding is finite.
        valid = text_mask | ~text_mask.any(dim=1, keepdim=True)  # (B, T)
        x = self.token_embed(text_ids) + self.pos_embed[: text_ids.shape[1]]  # (B, T, C)
        mask = valid
        if self.causal:  # each token reads itself and the tokens before it (and no padding)
            t = text_ids.shape[1]
            mask = valid[:, None, :] & torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()[None]
        for block in self.blocks:
            x = block(x, mask)
        x = self.ln_final(x)
        if self.pool_kind == "attention":
            return self.pool(x, valid)
        if self.pool_kind == "last":
            last = valid.shape[1] - 1 - valid.flip(1).to(torch.int8).argmax(dim=1)  # (B,) the last real token
            return x[torch.arange(x.shape[0], device=x.device), last]
        weights = valid.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        return (x * weights).sum(dim=1) / weights.sum(dim=1)  # (B, C)


def _fit_text(text_ids: torch.Tensor, text_mask: torch.Tensor, max_text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes; drop padding columns past ``max_text_len`` (a batch padded for another model is fine)."""
    if text_ids.dim() != 2 or text_ids.shape != text_mask.shape:
        raise ValueError(f"text_ids and text_mask must both be (B, T), got {tuple(text_ids.shape)} and {tuple(text_mask.shape)}")
    text_mask = text_mask.bool()
    if text_ids.shape[1] > max_text_len:
        if text_mask[:, max_text_len:].any():
            raise ValueError(
                f"a caption has more than the scorer's {max_text_len} text tokens; "
                f"tokenize with max_length={max_text_len}"
            )
        text_ids, text_mask = text_ids[:, :max_text_len], text_mask[:, :max_text_len]
    return text_ids, text_mask


class ImageEncoder(nn.Module):
    """Images (B, 3, S, S) in [-1, 1] -> the grid tokens of a hybrid conv + transformer encoder pooled
    (``image_pool``), (B, d_model)."""

    def __init__(self, config: ScorerConfig):
        super().__init__()
        self.image_size = config.image_size
        widths = (3, *config.image_widths)
        self.stages = nn.Sequential(*(ConvStage(c_in, c_out) for c_in, c_out in zip(widths[:-1], widths[1:])))
        self.to_tokens = nn.Linear(widths[-1], config.d_model)
        self.row_embed = nn.Parameter(torch.zeros(config.grid_size, config.d_model))
        self.col_embed = nn.Parameter(torch.zeros(config.grid_size, config.d_model))
        self.ln_pre = nn.LayerNorm(config.d_model)
        self.blocks = nn.ModuleList(Block(config.d_model, config.heads, config.mlp_ratio) for _ in range(config.image_layers))
        self.ln_final = nn.LayerNorm(config.d_model)
        self.pool_kind = config.image_pool
        if config.image_pool == "attention":
            self.pool = AttentionPool(config.d_model, config.heads)
        elif config.image_pool == "flatten":
            self.pool = nn.Linear(config.grid_size ** 2 * config.d_model, config.d_model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"images must be (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}")
        features = self.stages(images)  # (B, W, g, g)
        tokens = self.to_tokens(rearrange(features, "b c h w -> b h w c"))  # (B, g, g, C)
        tokens = tokens + self.row_embed[:, None, :] + self.col_embed[None, :, :]
        x = self.ln_pre(rearrange(tokens, "b h w c -> b (h w) c"))  # (B, g*g, C)
        for block in self.blocks:
            x = block(x)
        x = self.ln_final(x)
        if self.pool_kind == "attention":
            return self.pool(x)
        if self.pool_kind == "flatten":
            return self.pool(x.flatten(1))  # (B, g*g*C) -> (B, C)
        return x.mean(dim=1)  # (B, C)


# ---------------------------------------------------------------------------------------- the scorer


class Scorer(nn.Module):
    """Text and image encoders projected into one l2-normalized space, with CLIP's learned temperature."""

    def __init__(self, config: ScorerConfig):
        super().__init__()
        self.config = config
        self.text = TextEncoder(config)
        self.image = ImageEncoder(config)
        self.text_proj = nn.Linear(config.d_model, config.embed_dim, bias=False)
        self.image_proj = nn.Linear(config.d_model, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.apply(_init_weights)
        for table in (self.text.pos_embed, self.image.row_embed, self.image.col_embed):
            nn.init.normal_(table, std=0.02)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Scorer:
        """Rebuild from ``directory/config.json`` and ``model.safetensors`` (RUN/scorer/), in eval mode."""
        return load_pretrained(cls, ScorerConfig, directory, PART)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors to ``directory``, atomically."""
        save_pretrained(self, self.config, directory)

    def check_fits(self, tokenizer_vocab_size: int, image_size: int) -> None:
        """Raise CheckpointError, naming the scorer part, unless the run's tokenizer and pictures fit this scorer."""
        if tokenizer_vocab_size != self.config.text_vocab_size:
            raise CheckpointError(
                f"{PART}: the scorer reads a vocabulary of {self.config.text_vocab_size} text pieces but the "
                f"tokenizer has {tokenizer_vocab_size}; retrain it with `python -m train scorer` on this run"
            )
        if image_size != self.config.image_size:
            raise CheckpointError(
                f"{PART}: the scorer reads {self.config.image_size}x{self.config.image_size} pictures but gets "
                f"{image_size}x{image_size}; retrain it with `python -m train scorer --size {image_size}`"
            )

    # ------------------------------------------------------------------ embeddings and scores
    @property
    def scale(self) -> torch.Tensor:
        """The inverse temperature ``exp(logit_scale)``, clamped at 100 as in CLIP."""
        return self.logit_scale.clamp(max=math.log(100)).exp()

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) and mask (B, T) -> unit-norm text embeddings (B, E)."""
        return F.normalize(self.text_proj(self.text(text_ids, text_mask)), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] -> unit-norm image embeddings (B, E)."""
        return F.normalize(self.image_proj(self.image(images)), dim=-1)

    def score(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of image i with text row i, (B,): the reranking score, in [-1, 1]."""
        return (self.encode_image(images) * self.encode_text(text_ids, text_mask)).sum(dim=-1)

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """logits_per_image (B, B): ``scale`` times the cosine of image i with text j."""
        image_embeds = self.encode_image(images)  # (B, E)
        text_embeds = self.encode_text(text_ids, text_mask)  # (B, E)
        return self.scale * image_embeds @ text_embeds.t()


def _init_weights(module: nn.Module) -> None:
    """GPT-2 style: normal(0, 0.02) linear and embedding weights, zero biases; convolutions keep torch's init."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
