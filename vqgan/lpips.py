"""LPIPS-style perceptual distance on VGG16 features, from a VGG16 state dict the user supplies.

Zhang et al., 2018 ("The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"): run
both images through VGG16, take the activations after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3,
normalize each position's feature vector to unit length, and compare. LPIPS proper then weighs the
channels with learned 1x1 "linear" layers, trained on human judgements; those weights are a download
this project does not make, so this is the unweighted variant (the paper's "baseline" distance):
squared differences averaged over channels and positions, summed over the five layers.

The VGG16 weights come from ``--perceptual-weights PATH``: a torchvision-layout state dict
(``features.0.weight`` ...; classifier weights are ignored) or a state dict of the ``features``
module alone (``0.weight`` ...), as ``.safetensors`` or as a ``torch.save`` file (loaded with
``weights_only=True``). torchvision is not needed: the network is written out here.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from checkpoint import CheckpointError

__all__ = ["VGGPerceptual", "vgg16_features", "PART"]

PART = "perceptual weights"
# VGG16's convolution widths, "M" for a 2x2 max-pool; the last pool is not needed.
_VGG16_LAYOUT: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)  # indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


def vgg16_features() -> nn.Sequential:
    """VGG16's convolutional trunk with torchvision's layer indices (conv, ReLU and pool each count)."""
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU()]
            channels = int(item)
    return nn.Sequential(*layers)


class VGGPerceptual(nn.Module):
    """``distance(images, reconstructions)`` -> scalar, for images in [-1, 1]; the VGG16 weights are frozen."""

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        # LPIPS's input scaling: [-1, 1] images to the ImageNet statistics VGG16 was trained on.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path) -> VGGPerceptual:
        """Load VGG16 weights from ``path``; a missing, damaged or misshapen file is a CheckpointError."""
        model = cls()
        state = _read_state_dict(Path(path))
        if "features.0.weight" not in state and "0.weight" in state:
            state = {f"features.{k}": v for k, v in state.items()}
        expected = model.features.state_dict()
        for key, tensor in expected.items():
            given = state.get(f"features.{key}")
            if given is None:
                raise CheckpointError(
                    f"{PART}: {path} has no features.{key}; pass a torchvision VGG16 state dict"
                )
            if given.shape != tensor.shape:
                raise CheckpointError(
                    f"{PART}: features.{key} in {path} is {tuple(given.shape)}, VGG16 has {tuple(tensor.shape)}; "
                    "pass a torchvision VGG16 state dict"
                )
        model.features.load_state_dict({k: state[f"features.{k}"].float() for k in expected}, strict=True)
        return model

    def train(self, mode: bool = True) -> VGGPerceptual:
        """Always in eval mode: the network is a fixed feature extractor."""
        return super().train(False)

    def _taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        h = (images.float() - self.shift) / self.scale
        taps = []
        for index, layer in enumerate(self.features[: _TAPS[-1] + 1]):
            h = layer(h)
            if index in _TAPS:
                taps.append(F.normalize(h, dim=1, eps=1e-10))  # unit feature vector per position
        return taps

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, enabled=False):
            with torch.no_grad():
                reference = self._taps(images)
            distance = torch.zeros((), device=images.device)
            for real, fake in zip(reference, self._taps(reconstructions)):
                distance = distance + (fake - real).pow(2).mean()  # mean over batch, channels, positions
        return distance


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{PART}: {path} is missing; pass the path of a VGG16 state dict")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch.load raise many types for a damaged or unsafe file
        raise CheckpointError(f"{PART}: {path} cannot be read ({type(e).__name__}); pass a VGG16 state dict") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{PART}: {path} does not hold a state dict of tensors; pass a VGG16 state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}
