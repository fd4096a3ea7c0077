"""VGG19 features for the perceptual loss, loaded from a torchvision state dict.

Pretrained weights cannot be downloaded on our machines, and torchvision is not a
dependency: the layers are built here in torchvision's ``vgg19().features`` layout (so its
``features.N.weight`` keys load directly) and the weights come from a file: torchvision's
IMAGENET1K_V1 file (HUB_FILE, from HUB_URL), which NVlabs SPADE's perceptual loss uses too.
A given file is hashed: another sha256 than the official file's is a warning (a fine-tuned
or converted copy may be meant), a file of another layout is refused.

What VGG19 sees (``loss.vgg_input``): NVlabs SPADE's ``VGGLoss`` feeds the generator's
[-1, 1] images to torchvision's VGG19 as they are, without the ImageNet normalisation those
weights were trained with ("raw", the default, so that lambda_vgg = 10 weighs the loss as in
GauGAN and the paper built on it); "imagenet" maps to [0, 1] and normalises with ImageNet's
mean and std, as torchvision documents the weights' input.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ssgan_dist.errors import SetupError
from ssgan_dist.files import check_sha256

log = logging.getLogger(__name__)

# torchvision's vgg19 `features` up to relu5_1: channel widths, "M" = 2x2 max-pool.
_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512]
# features indices of relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
OUTPUT_INDICES = (1, 6, 11, 20, 29)
HUB_FILE = "vgg19-dcbb9e9d.pth"  # torchvision's IMAGENET1K_V1 weights, as the hub caches them
HUB_URL = f"https://download.pytorch.org/models/{HUB_FILE}"
# The file's sha256 (torch hub names files by its first 8 hex digits) and size.
SHA256 = "dcbb9e9dad569fff7a846263a77324fc34978fea2bfb039c012d710e1776ae44"
SIZE = 574_673_361
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
InputMode = Literal["raw", "imagenet"]
INPUT_MODES: tuple[InputMode, ...] = ("raw", "imagenet")


class VGGWeightsError(SetupError):
    """VGG19 weights missing or not in torchvision's layout; the message says what to do."""


def _build_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for item in _LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, item, 3, padding=1), nn.ReLU()]
            cin = item
    return nn.Sequential(*layers)


class VGG19Features(nn.Module):
    """Frozen VGG19 trunk: image in [-1, 1] -> [relu1_1, relu2_1, relu3_1, relu4_1, relu5_1].

    ``input_mode`` "raw" feeds the [-1, 1] image unchanged (NVlabs SPADE); "imagenet" maps it
    to [0, 1] and ImageNet-normalises it (torchvision's convention for these weights).
    """

    def __init__(self, input_mode: InputMode = "raw"):
        super().__init__()
        if input_mode not in INPUT_MODES:
            raise ValueError(f"VGG19 input mode {input_mode!r}: expected one of {', '.join(INPUT_MODES)}")
        self.input_mode = input_mode
        self.features = _build_features()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.input_mode == "imagenet":
            x = ((x + 1) / 2 - self.mean) / self.std
        outputs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in OUTPUT_INDICES:
                outputs.append(x)
        return outputs


def _candidates(path: str) -> list[Path]:
    if path:
        return [Path(path)]
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    others = sorted(p for p in checkpoints.glob("vgg19-*.pth") if p.name != HUB_FILE)
    return [checkpoints / HUB_FILE, *others]


def load_vgg19(path: str = "", input_mode: InputMode = "raw") -> VGG19Features:
    """VGG19Features with weights from ``path``, or from the torch hub cache when empty;
    ``input_mode`` is loss.vgg_input (see the module docstring)."""
    tried = _candidates(path)
    found = next((p for p in tried if p.is_file()), None)
    if found is None:
        where = "\n".join(f"  {p}" for p in tried)
        if not path:
            where += f"\n  {Path(torch.hub.get_dir()) / 'checkpoints' / 'vgg19-*.pth'}"
        raise VGGWeightsError(
            f"VGG19 weights for the perceptual loss not found; looked for:\n{where}\n"
            f"Set loss.vgg_weights=PATH to torchvision's {HUB_FILE} ({HUB_URL}, {SIZE:,} bytes, sha256 "
            f"{SHA256}; it is never downloaded), or loss.vgg=false to skip the perceptual loss."
        )
    try:
        state = torch.load(found, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, or more than tensors
        raise VGGWeightsError(f"{found}: not a PyTorch state dict ({type(exc).__name__}: {exc}); expected "
                              f"torchvision's {HUB_FILE} ({HUB_URL})") from None
    if not isinstance(state, dict):
        raise VGGWeightsError(f"{found}: expected a state dict, got {type(state).__name__}")
    model = VGG19Features(input_mode)
    own = model.state_dict()
    for key, expected in own.items():
        if key not in state:
            raise VGGWeightsError(f"{found}: missing key {key} (torchvision vgg19 layout expected)")
        if tuple(state[key].shape) != tuple(expected.shape):
            raise VGGWeightsError(
                f"{found}: key {key} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(expected.shape)}"
            )
    model.load_state_dict({key: state[key] for key in own})
    check_sha256(found, SHA256, official=HUB_FILE, source=HUB_URL, log=log)
    return model
