"""The paper presets say what the paper and its SPADE baseline train, and differ only where they should."""

from __future__ import annotations

from ssgan_dist.config import keys, load_config


PAPER_PRESETS = ("sketchycoco-256", "gaugan-sketch-256", "spade-ttur-256")


def training_settings(name: str) -> dict[str, object]:
    """Every key that changes what is trained (not the cadences, logs and paths a resume may change),
    run.dir and run.name left out."""
    skip = {"run.dir", "run.name"}
    return {k: v for k, f, v in keys(load_config(name)) if not f.metadata["resume"] and k not in skip}


def differences(a: str, b: str) -> dict[str, tuple[object, object]]:
    sa, sb = training_settings(a), training_settings(b)
    return {k: (sa[k], sb[k]) for k in sa if sa[k] != sb[k]}


def test_sketchycoco_256_is_the_papers_setting():
    cfg = load_config("sketchycoco-256")
    m = cfg.model
    assert (m.image_size, m.ngf, m.ndf, m.spade_hidden, m.num_classes) == (256, 64, 64, 128, 20)
    assert m.background_classes == [16, 17, 18, 19] and m.num_upsampling == "normal"
    assert m.sfm and m.use_z and m.z_dim == 256 and (m.d_scales, m.d_layers) == (2, 4)
    assert (cfg.optim.lr_g, cfg.optim.lr_d, cfg.optim.beta1, cfg.optim.beta2) == (2e-4, 2e-4, 0.0, 0.999)
    assert (cfg.loss.lambda_fm, cfg.loss.lambda_vgg, cfg.loss.vgg, cfg.loss.vgg_input) == (10.0, 10.0, True, "raw")


def test_gaugan_sketch_256_is_sketchycoco_256_without_sfm_and_z():
    assert differences("sketchycoco-256", "gaugan-sketch-256") == {"model.sfm": (True, False),
                                                                   "model.use_z": (True, False)}
    cfg = load_config("gaugan-sketch-256")
    assert cfg.run.name == "gaugan-sketch-256" and cfg.run.dir == "runs/gaugan-sketch-256"


def test_spade_ttur_256_differs_only_in_the_optimizer():
    assert differences("sketchycoco-256", "spade-ttur-256") == {
        "optim.lr_g": (2e-4, 1e-4), "optim.lr_d": (2e-4, 4e-4), "optim.beta2": (0.999, 0.9)}


def test_paper_presets_never_train_on_synthetic_scenes():
    for name in PAPER_PRESETS:
        cfg = load_config(name)
        assert cfg.data.allow_synthetic is False and cfg.data.shards == "", name
