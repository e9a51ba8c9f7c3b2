"""The CLIP-style scorer that reranks sampled pictures by how well they match the prompt.

``Scorer.from_pretrained(RUN / "scorer")``, then ``scorer.score(images, text_ids, text_mask) -> (B,)``;
trained by ``python -m train scorer`` (train/stage_scorer.py).
"""

from scorer.model import IMAGE_POOLS, PRESETS, TEXT_POOLS, Scorer, ScorerConfig, contrastive_loss, retrieval_accuracy

__all__ = ["IMAGE_POOLS", "PRESETS", "TEXT_POOLS", "Scorer", "ScorerConfig", "contrastive_loss", "retrieval_accuracy"]
