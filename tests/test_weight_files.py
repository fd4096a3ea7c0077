"""The VGG19 and Inception weight files: where to get them, and a given file checked against the
official file's sha256 (a warning naming both hashes) while a wrong layout stays an error."""

from __future__ import annotations

import hashlib
import importlib.util
import logging

import pytest
import torch

from ssgan_dist.evaluation import inception
from ssgan_dist.models import vgg
from test_vgg import cheap_layout, torchvision_layout

needs_fidelity = pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None,
                                    reason="torch-fidelity not installed (pip install -e '.[eval]')")


def test_official_names_urls_and_hashes_agree():
    """torch hub names a file by the first 8 hex digits of its sha256: the names carry the prefixes."""
    for module, name in ((vgg, vgg.HUB_FILE), (inception, inception.WEIGHTS_FILE)):
        assert len(module.SHA256) == 64 and int(module.SHA256, 16) >= 0
        assert name.rsplit("-", 1)[1] == f"{module.SHA256[:8]}.pth"
    assert vgg.HUB_URL.endswith("/" + vgg.HUB_FILE) and inception.WEIGHTS_URL.endswith("/" + inception.WEIGHTS_FILE)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_vgg_file_in_the_right_layout_but_not_the_official_one_loads_with_a_warning(tmp_path, caplog):
    torch.manual_seed(0)
    state = torchvision_layout(lambda shape: torch.randn(shape) * 0.05)
    path = tmp_path / "vgg19-mine.pth"
    torch.save(state, path)
    with caplog.at_level(logging.WARNING):
        model = vgg.load_vgg19(str(path))
    assert torch.equal(model.features[0].weight, state["features.0.weight"])
    (message,) = _warnings(caplog)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert str(path) in message and digest in message and vgg.SHA256 in message and vgg.HUB_URL in message


def test_a_vgg_file_of_another_layout_is_still_refused_and_no_hash_warning(tmp_path, caplog):
    state = cheap_layout()
    del state["features.0.weight"]
    torch.save(state, tmp_path / "w.pth")
    with caplog.at_level(logging.WARNING), pytest.raises(vgg.VGGWeightsError, match=r"features\.0\.weight"):
        vgg.load_vgg19(str(tmp_path / "w.pth"))
    assert _warnings(caplog) == []
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(vgg.VGGWeightsError, match="not a PyTorch state dict"):
        vgg.load_vgg19(str(tmp_path / "junk.pth"))


def test_missing_weights_errors_say_where_to_get_them(tmp_path):
    with pytest.raises(vgg.VGGWeightsError) as err:
        vgg.load_vgg19(str(tmp_path / "none.pth"))
    for word in (vgg.HUB_FILE, vgg.HUB_URL, vgg.SHA256, "loss.vgg=false"):
        assert word in str(err.value)
    with pytest.raises(inception.InceptionWeightsError) as err:
        inception.load_inception(tmp_path / "none.pth")
    for word in (inception.WEIGHTS_FILE, inception.WEIGHTS_URL, inception.SHA256, "--inception-weights"):
        assert word in str(err.value)


def test_a_missing_vgg_file_is_exit_2_without_traceback(tmp_path):
    import subprocess
    import sys

    from conftest import TINY

    out = subprocess.run([sys.executable, "-m", "ssgan_dist.train", *TINY, f"run.dir={tmp_path / 'run'}",
                          "loss.vgg=true", f"loss.vgg_weights={tmp_path / 'none.pth'}", "data.synthetic_count=4",
                          f"data.cache_dir={tmp_path / 'cache'}"], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2 and vgg.HUB_URL in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


@needs_fidelity
def test_an_inception_file_in_the_right_layout_but_not_the_official_one_loads_with_a_warning(tmp_path, caplog):
    from test_evaluate import _random_inception_state

    path = tmp_path / "pt_inception-mine.pth"
    torch.save(_random_inception_state(tmp_path), path)
    with caplog.at_level(logging.WARNING):
        features = inception.load_inception(path)
    assert features(torch.zeros(1, 3, 32, 32)).shape == (1, inception.NUM_FEATURES)
    (message,) = _warnings(caplog)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest in message and inception.SHA256 in message and inception.WEIGHTS_URL in message
