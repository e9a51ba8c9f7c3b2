"""Stage 1: the VQGAN that turns a picture into a grid of codebook ids and back.

``VQGAN.from_pretrained(dir)``, ``.encode(images) -> ids (B, h, w)``, ``.decode(ids) -> images``,
``.save_pretrained(dir)``. The discriminator, losses and LPIPS-style features are training-time parts.
"""

from vqgan.config import PRESETS, VQGANConfig
from vqgan.model import VQGAN
from vqgan.quantize import FactorizedQuantizer, QuantizerOutput, ScalarQuantizer

__all__ = ["VQGAN", "VQGANConfig", "PRESETS", "FactorizedQuantizer", "QuantizerOutput", "ScalarQuantizer"]
