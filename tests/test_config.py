"""Config: presets, overrides, and errors that name the key before any work starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from ssgan_dist.config import ConfigError, config_from_dict, load_config, preset_names


def test_presets_load_and_paper_settings():
    assert {"demo", "sketchycoco-256"} <= set(preset_names())
    paper = load_config("sketchycoco-256")
    assert (paper.model.image_size, paper.model.ngf, paper.model.num_classes) == (256, 64, 20)
    assert (paper.optim.lr_g, paper.optim.lr_d) == (2e-4, 2e-4)
    assert (paper.optim.beta1, paper.optim.beta2) == (0.0, 0.999)
    assert type(paper.optim.beta1) is float  # torch's Adam refuses an int beta next to a float one
    assert (paper.loss.lambda_fm, paper.loss.lambda_vgg) == (10.0, 10.0)
    assert paper.model.sfm and paper.loss.vgg
    demo = load_config()
    assert demo.model.image_size == 64 and not demo.loss.vgg


def test_overrides_are_typed():
    cfg = load_config("demo", ["model.sfm=false", "train.max_steps=7", "optim.beta1=0", "run.dir=/tmp/x", "optim.lr_g=1e-3",
                               "model.background_classes=[17, 18]"])
    assert cfg.model.sfm is False and cfg.train.max_steps == 7
    assert cfg.optim.beta1 == 0.0 and isinstance(cfg.optim.beta1, float) and cfg.optim.lr_g == 1e-3
    assert cfg.model.background_classes == [17, 18]


@pytest.mark.parametrize(
    "override, words",
    [
        ("model.sfmm=true", ["model.sfmm", "unknown key", "sfm"]),
        ("modle.sfm=true", ["modle", "unknown section", "model"]),
        ("model.sfm=3", ["model.sfm", "true or false"]),
        ("train.max_steps=ten", ["train.max_steps", "integer"]),
        ("train.precision=fp8", ["train.precision", "fp32", "bf16", "fp16"]),
        ("data.on_error=ignore", ["data.on_error", "skip", "raise"]),
        ("model.image_size=100", ["model.image_size", "multiple of 32"]),
        ("model.background_classes=[25]", ["model.background_classes", "25"]),
        ("train.batch_size=0", ["train.batch_size", "at least 1"]),
        ("nodot=1", ["nodot", "section.name"]),
        ("novalue", ["key=value"]),
    ],
)
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    for word in words:
        assert word in str(err.value)


def test_unknown_preset_lists_presets(tmp_path):
    with pytest.raises(ConfigError, match="sketchycoco-256"):
        load_config("no-such-preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  ngff: 3\n")
    with pytest.raises(ConfigError, match="model.ngff"):
        load_config(str(bad))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("demo", ["model.sfm=false", "train.batch_size=3"])
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


def test_cli_rejects_bad_key_before_work(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "ssgan_dist.train", f"run.dir={run_dir}", "train.max_stepz=3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "train.max_stepz" in proc.stderr and "max_steps" in proc.stderr
    assert not run_dir.exists()  # nothing was started


@pytest.mark.parametrize("override", ["model.image_size=0", "optim.beta1=1.5", "optim.lr_g=-1", "train.threads=-1",
                                      "loss.lambda_fm=nan", "segmenter.dilations=[0]", "dist.timeout_s=0",
                                      "metrics.port=70000", "train.ema=1.0", "data.num_workers=-1",
                                      "checkpoint.keep=0", "optim.eps=inf", "engine.bucket_mb=nan",
                                      "model.num_classes=300", "train.accum_steps=0"])
def test_out_of_range_values_are_refused_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    assert str(err.value).startswith(key), str(err.value)


def test_every_key_has_a_doc_and_every_number_a_lower_bound():
    from ssgan_dist.config import describe_keys, keys

    for key, f, default in keys():
        assert f.metadata.get("doc"), key
        numbers = default if isinstance(default, list) else [default]
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers) or key.endswith("dilations"):
            assert f.metadata["low"] is not None or f.metadata["above"] is not None, key
        assert f"  {key} (" in describe_keys()


def test_a_discriminator_too_deep_for_the_image_is_refused_before_training():
    """model.d_scales=8 on 32 px images left one pixel for an instance norm: a traceback at
    the first step. Now a ConfigError naming the keys when D is built (every scale/layer count
    that runs is accepted: checked against the real forward over 1..8 scales, 1..10 layers)."""
    from ssgan_dist.models import build_discriminator

    with pytest.raises(ConfigError, match="model.d_scales=8: the last scale of a 32 px image is too small"):
        build_discriminator(load_config("demo", ["model.image_size=32", "model.d_scales=8"]).model)
    build_discriminator(load_config("demo", ["model.image_size=32", "model.d_scales=4", "model.ndf=2"]).model)
