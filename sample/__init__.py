"""Sampling: prompts to pictures with top-k / top-p, classifier-free guidance and CLIP reranking.

``from sample import generate_images`` for notebooks and services; ``python -m sample`` for the shell.
"""

from sample.pipeline import DEMO_RUN, Picture, Pipeline, SamplingSettings, generate_images

__all__ = ["DEMO_RUN", "Picture", "Pipeline", "SamplingSettings", "generate_images"]
