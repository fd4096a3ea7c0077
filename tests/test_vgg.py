"""VGG19 loading through the real code path, from state dicts in torchvision's key layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssgan_dist.config import LossConfig
from ssgan_dist.losses import VGGLoss
from ssgan_dist.models import VGG19Features, VGGWeightsError, load_vgg19
from ssgan_dist.tasks.gan import build_vgg_loss

# torchvision vgg19 `features`: conv index -> (in, out) channels; 16 convs
VGG19_CONVS = {
    0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
    14: (256, 256), 16: (256, 256), 19: (256, 512), 21: (512, 512), 23: (512, 512),
    25: (512, 512), 28: (512, 512), 30: (512, 512), 32: (512, 512), 34: (512, 512),
}


def torchvision_layout(make) -> dict[str, torch.Tensor]:
    """Every key of torchvision's vgg19 state dict; ``make(shape)`` builds each tensor.
    The classifier keys are there (they must be ignored) but small: their real shapes would
    put 0.5 GB on disk for nothing."""
    state = {}
    for i, (cin, cout) in VGG19_CONVS.items():
        state[f"features.{i}.weight"] = make((cout, cin, 3, 3))
        state[f"features.{i}.bias"] = make((cout,))
    for i in (0, 3, 6):
        state[f"classifier.{i}.weight"] = make((4, 4))
        state[f"classifier.{i}.bias"] = make((4,))
    return state


def cheap_layout() -> dict[str, torch.Tensor]:
    """Right keys and shapes, tiny on disk (expanded views of one number)."""
    return torchvision_layout(lambda shape: torch.zeros(1).expand(shape))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    state = torchvision_layout(lambda shape: torch.randn(shape) * 0.05)
    path = tmp_path_factory.mktemp("vgg") / "vgg19-random.pth"
    torch.save(state, path)
    return path, state


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def imagenet_normalise(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] -> ImageNet mean/std, written out independently of models/vgg.py."""
    return ((x + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD


def test_loads_torchvision_layout_and_returns_five_features(weights_file) -> None:
    path, state = weights_file
    vgg = load_vgg19(str(path))
    for i in VGG19_CONVS:
        if i <= 28:
            assert torch.equal(vgg.features[i].weight, state[f"features.{i}.weight"])
    assert not vgg.training
    assert not any(p.requires_grad for p in vgg.parameters())

    x = torch.rand(1, 3, 64, 64) * 2 - 1
    feats = vgg(x)
    assert [f.shape for f in feats] == [
        (1, 64, 64, 64), (1, 128, 32, 32), (1, 256, 16, 16), (1, 512, 8, 8), (1, 512, 4, 4)
    ]


@pytest.mark.parametrize("mode", ["raw", "imagenet"])
def test_input_mode_by_hand(weights_file, mode) -> None:
    """relu1_1 by hand: "raw" convolves the [-1, 1] image as NVlabs SPADE does, "imagenet"
    its [0, 1] ImageNet-normalised version; the default (no mode given) is "raw"."""
    path, state = weights_file
    vgg = load_vgg19(str(path), mode)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    seen = x if mode == "raw" else imagenet_normalise(x)
    by_hand = F.relu(F.conv2d(seen, state["features.0.weight"], state["features.0.bias"], padding=1))
    torch.testing.assert_close(vgg(x)[0], by_hand)
    other = F.relu(F.conv2d(imagenet_normalise(x) if mode == "raw" else x, state["features.0.weight"],
                            state["features.0.bias"], padding=1))
    assert (vgg(x)[0] - other).abs().max() > 0.1  # the two modes are really different inputs
    if mode == "raw":
        torch.testing.assert_close(load_vgg19(str(path))(x)[0], by_hand)


@pytest.mark.parametrize("mode", ["raw", "imagenet"])
def test_loss_vgg_input_reaches_the_perceptual_loss(weights_file, mode) -> None:
    """loss.vgg_input, through the GAN task's loss builder: the imagenet loss of (a, b) is the raw
    loss of the normalised images (all five layers, weighted), the raw loss that of (a, b) as given."""
    path, _ = weights_file
    loss = build_vgg_loss(LossConfig(vgg_weights=str(path), vgg_input=mode), torch.device("cpu"))
    a, b = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    raw = VGGLoss(load_vgg19(str(path), "raw"))
    expected = raw(a, b) if mode == "raw" else raw(imagenet_normalise(a), imagenet_normalise(b))
    torch.testing.assert_close(loss(a, b), expected)
    assert LossConfig().vgg_input == "raw"


def test_unknown_input_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="'bgr'.*raw, imagenet"):
        VGG19Features("bgr")


def test_empty_path_uses_torch_hub_cache(weights_file, tmp_path, monkeypatch) -> None:
    path, state = weights_file
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "vgg19-0123abcd.pth").symlink_to(path)
    vgg = load_vgg19("")
    assert torch.equal(vgg.features[28].bias, state["features.28.bias"])


def test_missing_key_is_named(tmp_path) -> None:
    state = cheap_layout()
    del state["features.21.bias"]
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(VGGWeightsError, match=r"features\.21\.bias"):
        load_vgg19(str(tmp_path / "w.pth"))


def test_misshaped_key_is_named_with_shapes(tmp_path) -> None:
    state = cheap_layout()
    state["features.10.weight"] = torch.zeros(256, 64, 3, 3)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(VGGWeightsError) as err:
        load_vgg19(str(tmp_path / "w.pth"))
    message = str(err.value)
    assert "features.10.weight" in message
    assert "(256, 64, 3, 3)" in message and "(256, 128, 3, 3)" in message


def test_missing_file_says_what_to_do(tmp_path, monkeypatch) -> None:
    missing = tmp_path / "nowhere" / "vgg19.pth"
    with pytest.raises(VGGWeightsError) as err:
        load_vgg19(str(missing))
    assert str(missing) in str(err.value)
    assert "loss.vgg=false" in str(err.value) and "loss.vgg_weights=" in str(err.value)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(VGGWeightsError) as err:
        load_vgg19("")
    assert str(tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth") in str(err.value)


def test_features_module_layout_matches_torchvision_indices() -> None:
    vgg = VGG19Features()
    convs = {i: (m.in_channels, m.out_channels) for i, m in enumerate(vgg.features)
             if isinstance(m, torch.nn.Conv2d)}
    assert convs == {i: io for i, io in VGG19_CONVS.items() if i <= 28}
    assert len(vgg.features) == 30  # up to relu5_1
