"""The service's JSON: requests and responses as typed models, and the service's limits.

The sampling fields, their defaults and their bounds are ``python -m sample``'s (``SamplingSettings`` and
the constants beside it); a request may not carry a field the model does not know. Numbers are strict: a
string "4" is not 4, NaN and infinities are refused. The editing fields are ``python -m sample``'s --init,
--keep-rows, --box, --mask and --likelihood-weight, with the pictures sent inline as base64 PNG, never as a
path on the server; what depends on the run (a picture's size, the rows of its grid) is checked by the
service (serve/app.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from sample.pipeline import (MAX_CFG, MAX_LIKELIHOOD_WEIGHT, MAX_SEED, MAX_TEMPERATURE, MIN_TEMPERATURE,
                             SamplingSettings)

__all__ = ["Limits", "PictureRequest", "PictureOut", "PicturesResponse", "ErrorBody", "ErrorResponse"]

DEFAULTS = SamplingSettings()
MAX_PROMPT_CHARS = 1000  # far more than any model here reads (64 tokens); the rest is truncated anyway


@dataclass(frozen=True)
class Limits:
    """What one service accepts and holds; ``python -m serve`` sets each from a flag."""

    max_n: int = 16  # candidates per request
    max_rows: int = 256  # decoder rows decoding at once (a guided candidate takes two): the KV cache's slots
    max_queue: int = 64  # requests waiting for rows; one more is refused with 429
    max_body_bytes: int = 256 * 1024  # a request body larger than this is refused with 413 (it holds an init
    # picture and a mask as base64 PNG when editing: a 64x64 picture is at most 17 KB so, a 256x256 one 350 KB)
    timeout_s: float = 120.0  # a request not answered by then is dropped with 408
    stored_pictures: int = 2048  # kept pictures held for GET /v1/pictures/{id}, oldest dropped first
    preview_every: int | None = None  # tokens between previews on the stream; None: one grid row


class PictureRequest(BaseModel):
    """Draw ``n`` candidates for ``prompt`` and keep the best ``keep`` by the run's scorer."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what to draw",
                        examples=["a large red circle above a small blue square"])
    n: int = Field(DEFAULTS.n, ge=1, description="candidates drawn (the service's limit: GET /v1/info)")
    keep: int = Field(DEFAULTS.keep, ge=1, description="pictures returned, best first by the scorer; <= n")
    top_k: int | None = Field(DEFAULTS.top_k, ge=1, description="sample among the k likeliest tokens; null: off")
    top_p: float | None = Field(DEFAULTS.top_p, gt=0, le=1, description="sample among the smallest set of mass p")
    temperature: float = Field(DEFAULTS.temperature, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE,
                               description="divides the logits")
    cfg: float = Field(DEFAULTS.cfg, ge=0, le=MAX_CFG, description="classifier-free guidance scale; 1 is off")
    seed: int | None = Field(None, ge=0, le=MAX_SEED,
                             description="candidate j has seed SEED+j; null draws one (returned with each picture)")
    init: str | None = Field(None, description="edit this picture: a PNG of the run's size (GET /v1/info: "
                             "model.canvas) as base64, optionally as a data: URL; with keep_rows, box or mask")
    keep_rows: int | None = Field(None, ge=1, description="with init: keep its first rows of tokens, draw the rest "
                                                           "(completion)")
    box: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=4, max_length=4, description="with init: redraw this box [x0, y0, x1, y1] in pixels, x1 "
                                                      "and y1 excluded (inpainting)")
    mask: str | None = Field(None, description="with init: redraw where this PNG (base64, init's size) is white, "
                                               "keep where black (inpainting)")
    shortlist: int = Field(DEFAULTS.shortlist, ge=1, description="the scorer's best SHORTLIST candidates are "
                           "re-ordered by the decoder's likelihood of the picture given the prompt; 1: the scorer "
                           "alone (new pictures only; edits rank as python -m sample ranks them)")
    likelihood_weight: float = Field(DEFAULTS.likelihood_weight, ge=0, le=MAX_LIKELIHOOD_WEIGHT,
                                     description="inpainting: weight of the likelihood of what follows the hole "
                                                 "beside the scorer when ranking; 0: the scorer alone")
    width: int | None = Field(None, description="the picture's width in pixels: the run's size only (wider "
                                                "canvases: python -m sample --width)")
    height: int | None = Field(None, description="likewise, the height")
    response_format: Literal["base64", "url"] = Field(
        "base64", description="base64: each picture's PNG inline; url: only the address to GET it from")

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, prompt: str) -> str:
        # Lone surrogates (JSON allows \ud800) become U+FFFD, as python -m sample repairs them.
        prompt = prompt.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        if not prompt.strip():
            raise ValueError('the prompt is blank; describe a picture, e.g. "a red circle above a blue square"')
        return prompt

    @field_validator("keep")
    @classmethod
    def _keep_at_most_n(cls, keep: int, info: ValidationInfo) -> int:
        n = info.data.get("n")
        if n is not None and keep > n:
            raise ValueError(f"keep must be at most n ({n}), got {keep}")
        return keep

    @field_validator("seed")
    @classmethod
    def _seeds_fit(cls, seed: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n")
        if seed is not None and n is not None and seed > MAX_SEED - (n - 1):
            raise ValueError(f"seed must be at most 2**63-1 less n-1 ({MAX_SEED - (n - 1)}): candidate j has "
                             "seed SEED+j, a 64-bit signed number")
        return seed

    def settings(self, seed: int) -> SamplingSettings:
        return SamplingSettings(n=self.n, keep=self.keep, top_k=self.top_k, top_p=self.top_p,
                                temperature=self.temperature, cfg=self.cfg, seed=seed,
                                shortlist=self.shortlist, likelihood_weight=self.likelihood_weight)


class PictureOut(BaseModel):
    id: str = Field(description="GET /v1/pictures/{id} gives the PNG, with prompt, seed and settings in its text")
    url: str
    seed: int = Field(description="draw it again: the same request with this seed and n=1")
    score: float | None = Field(description="the scorer's match of picture and prompt (higher is better)")
    rank: int = Field(description="1 = best of the request's candidates")
    candidate: int = Field(description="its place j among the candidates (seed = the request's seed + j)")
    likelihood: float | None = Field(None, description="the mean log-likelihood per token (nats) the ranking "
                                                       "used: inpainting, of the kept tokens after the hole; a new "
                                                       "picture on the scorer's shortlist, of its tokens given the "
                                                       "prompt; else null")
    png_base64: str | None = Field(None, description="the PNG, when response_format is base64")


class PicturesResponse(BaseModel):
    id: str = Field(description="the request's id")
    prompt: str
    settings: dict = Field(description="n, keep, top_k, top_p, temperature, cfg, shortlist, likelihood_weight, the "
                                       "seed used and, for an edit, how it was asked for (edit)")
    truncated: bool = Field(description="the prompt was longer than the model reads, and was cut")
    pictures: list[PictureOut] = Field(description="the kept pictures, best first")
    queued_s: float = Field(description="seconds waiting for decoder rows")
    total_s: float = Field(description="seconds from arrival to the pictures")


class ErrorBody(BaseModel):
    field: str | None = Field(description="the request field at fault (dotted), null when none is")
    message: str
    type: str


class ErrorResponse(BaseModel):
    error: ErrorBody
