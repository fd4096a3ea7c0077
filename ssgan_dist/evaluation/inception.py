"""The FID network: torch-fidelity's InceptionV3, with its weights from a file only.

torch-fidelity's ``FeatureExtractorInceptionV3`` is the TensorFlow 2015-12-05 Inception graph
that FID is defined with, ported to PyTorch (TF1-style bilinear resize to 299, the same
pooling quirks), so our FIDs are comparable with published ones. Its weights are the
pytorch-fid file ``pt_inception-2015-12-05-6726825d.pth`` (WEIGHTS_URL; torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` is the same file), never downloaded. A given
file is hashed: another sha256 than the official one is a warning, another layout an error.

torch-fidelity is the ``eval`` extra. Its package ``__init__`` imports torchvision (for
datasets and extractors we do not use): where torchvision works (CUDA torch) it is imported
normally; beside the CPU torch build torchvision installs but cannot be imported (its
compiled ops need CUDA torch), so there its Inception module is imported without running
that ``__init__`` (the module itself needs only torch).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssgan_dist.errors import SetupError
from ssgan_dist.files import check_sha256
from ssgan_dist.images import to_uint8

log = logging.getLogger(__name__)
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
# The file's sha256 (its name carries the first 8 hex digits) and size.
SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
SIZE = 95_628_359
NUM_FEATURES = 2048  # pool3


class InceptionWeightsError(SetupError):
    """Inception weights missing or not in the pytorch-fid layout; the message names path and key."""


def _fidelity_inception_class() -> type[nn.Module]:
    """torch-fidelity's FeatureExtractorInceptionV3: imported normally where torchvision works,
    else without the package __init__ (see the module docstring)."""
    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None:
            raise InceptionWeightsError(
                "FID needs torch-fidelity's InceptionV3: pip install -e '.[eval]' (on a CPU-only torch add "
                "the installed torch, e.g. \"torch==$(python -c 'import torch; print(torch.__version__)')\", "
                "so that pip keeps it; scripts/setup.sh does)")
        try:
            importlib.import_module("torch_fidelity")
        except Exception:  # torchvision missing or unusable (RuntimeError from its ops on CPU torch)
            for name in [m for m in sys.modules if m == "torch_fidelity" or m.startswith("torch_fidelity.")]:
                del sys.modules[name]
            sys.modules["torch_fidelity"] = importlib.util.module_from_spec(spec)  # __path__ set, body not run
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3


def check_layout(state: dict[str, Any], expected: dict[str, torch.Tensor]) -> None:
    """Raise naming the first key that is missing, unexpected or misshaped."""
    for key, tensor in expected.items():
        if key not in state:
            raise InceptionWeightsError(f"missing key {key} (pytorch-fid / torch-fidelity InceptionV3 layout expected)")
        got = tuple(getattr(state[key], "shape", ()))
        if got != tuple(tensor.shape):
            raise InceptionWeightsError(f"key {key} has shape {got}, expected {tuple(tensor.shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise InceptionWeightsError(f"unexpected key {extra[0]} ({len(extra)} in all); not the InceptionV3 FID layout")


class InceptionFeatures(nn.Module):
    """Images in [-1, 1] [B,3,H,W] -> pool3 features [B,2048] (float32).

    Images are quantized to 8 bits first, as torch-fidelity expects and as saved PNGs are.
    """

    num_features = NUM_FEATURES

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(to_uint8(images))[0]


def load_inception(path: str | Path, option: str = "--inception-weights") -> InceptionFeatures:
    """InceptionFeatures with the weights of ``path``, checked key by key before use."""
    where = f"{WEIGHTS_FILE} from {WEIGHTS_URL} ({SIZE:,} bytes, sha256 {SHA256}; it is never downloaded)"
    if not str(path):
        raise InceptionWeightsError(f"{option} is not set: FID needs the Inception weights file {where}")
    path = Path(path)
    if not path.is_file():
        raise InceptionWeightsError(f"{option}: Inception weights file {path} does not exist: FID needs {where}")
    try:  # weights_only first: a file that is more than tensors is refused before torch-fidelity unpickles it
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InceptionWeightsError(f"{option}: {path} is not a PyTorch state dict ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise InceptionWeightsError(f"{option}: {path} holds a {type(state).__name__}, not a state dict")
    base = _fidelity_inception_class()

    class Checked(base):  # type: ignore[misc, valid-type]
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ANN001
            own = self.state_dict()
            # BatchNorm's num_batches_tracked is training bookkeeping that older conversions lack.
            full = {k: v for k, v in own.items() if k.endswith("num_batches_tracked")} | dict(state_dict)
            check_layout(full, own)
            return super().load_state_dict(full, strict=strict, assign=assign)

    try:
        net = Checked("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except InceptionWeightsError as exc:
        raise InceptionWeightsError(f"{option}: {path}: {exc}") from None
    check_sha256(path, SHA256, official=WEIGHTS_FILE, source=WEIGHTS_URL, log=log)
    return InceptionFeatures(net)

