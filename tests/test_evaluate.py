"""FID and SSIM against their references, the Inception loader, and the evaluate command."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg
from skimage import data, img_as_float
from skimage.filters import gaussian
from skimage.metrics import structural_similarity

from conftest import tiny_config
from ssgan_dist import checkpoint as ckpt
from ssgan_dist.config import ConfigError
from ssgan_dist.data.writer import build_synthetic_shards
from ssgan_dist.distributed.env import setup
from ssgan_dist.data.ordered import OrderedSamples
from ssgan_dist.data.shards import resolve_shards
from ssgan_dist.evaluation.evaluate import FID_SKIPPED, PAPER_ROWS_NOTE, few_samples_warning, main
from ssgan_dist.evaluation.fid import feature_stats, frechet_distance, stats_key
from ssgan_dist.evaluation.inference import load_generator, load_segmenter, noise, run_generator, run_segmenter
from ssgan_dist.evaluation.kid import kernel_inception_distance
from ssgan_dist.images import to_uint8
from ssgan_dist.evaluation.inception import InceptionWeightsError, _fidelity_inception_class, load_inception
from ssgan_dist.evaluation.ssim import ssim
from ssgan_dist.train import Trainer

# scripts/setup.sh installs it (--no-deps); a machine without it still runs the pure-math tests.
needs_fidelity = pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None,
                                    reason="torch-fidelity not installed (pip install --no-deps torch-fidelity)")

# ---------------------------------------------------------------------------------------
# Frechet distance


def _reference_fid(mu1, s1, mu2, s2) -> float:
    """pytorch-fid's formula with scipy's sqrtm."""
    covmean = linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 48))
    b = rng.normal(0.5, 1.0, size=(300, 48)) @ rng.normal(size=(48, 48)) * 0.4
    (mu1, s1), (mu2, s2) = feature_stats(a), feature_stats(b)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_reference_fid(mu1, s1, mu2, s2), rel=1e-9)
    assert ours > 1.0
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8


def test_feature_stats_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2 samples"):
        feature_stats(np.zeros((1, 8)))


def test_stats_key_follows_files_weights_and_settings(tmp_path):
    shard = tmp_path / "a.tar"
    shard.write_bytes(b"x" * 10)
    key = stats_key([str(shard)], "w1", {"max_samples": 0})
    assert key == stats_key([str(shard)], "w1", {"max_samples": 0})
    assert key != stats_key([str(shard)], "w2", {"max_samples": 0})
    assert key != stats_key([str(shard)], "w1", {"max_samples": 5})
    os.utime(shard, ns=(1, 1))
    assert key != stats_key([str(shard)], "w1", {"max_samples": 0})


# ---------------------------------------------------------------------------------------
# KID


def _reference_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The KID paper's unbiased estimator written out pair by pair, k(a, b) = (a.b / d + 1)^3."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (float(a @ b) / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_a_direct_computation():
    rng = np.random.default_rng(3)
    fake = rng.normal(0.3, 1.0, size=(30, 6)).astype(np.float32)
    real = rng.normal(0.0, 1.2, size=(25, 6)).astype(np.float32)
    kid = kernel_inception_distance(fake, real, subsets=5, subset_size=10, seed=7)
    # torch-fidelity's subset draws: one RandomState, per subset the fake indices, then the real ones
    draw = np.random.RandomState(7)
    values = []
    for _ in range(5):
        f = fake[draw.choice(30, 10, replace=False)].astype(np.float64)
        r = real[draw.choice(25, 10, replace=False)].astype(np.float64)
        values.append(_reference_mmd2(f, r))
    assert kid.mean == pytest.approx(np.mean(values), rel=1e-9)
    assert kid.std == pytest.approx(np.std(values), rel=1e-9)
    assert (kid.subsets, kid.subset_size) == (5, 10)
    # a subset larger than a set takes all of the smaller set
    assert kernel_inception_distance(fake, real, subsets=2, subset_size=1000).subset_size == 25


def test_kid_grows_with_the_distance_between_distributions():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(400, 16))
    same = kernel_inception_distance(rng.normal(size=(400, 16)), real, subsets=20, subset_size=200)
    near = kernel_inception_distance(rng.normal(0.3, 1.0, size=(400, 16)), real, subsets=20, subset_size=200)
    far = kernel_inception_distance(rng.normal(1.0, 1.0, size=(400, 16)), real, subsets=20, subset_size=200)
    assert abs(same.mean) < 3 * same.std + 1e-3  # unbiased: ~0 for one distribution
    assert far.mean > near.mean > same.mean + 3 * same.std


def test_few_samples_warning_below_the_feature_dimension():
    assert "2047 samples" in few_samples_warning(2047) and "2048" in few_samples_warning(2047)
    assert few_samples_warning(2048) is None and few_samples_warning(2816) is None


# ---------------------------------------------------------------------------------------
# SSIM


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_ssim_matches_scikit_image_on_photos(name):
    photo = img_as_float(getattr(data, name)())[:160, :200]
    noisy = np.clip(photo + np.random.default_rng(1).normal(0, 0.1, photo.shape), 0, 1)
    blurred = gaussian(photo, sigma=2, channel_axis=-1)
    as_batch = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None]  # noqa: E731
    for other in (noisy, blurred, photo):
        ref = structural_similarity(photo, other, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=1.0, channel_axis=-1)
        assert float(ssim(as_batch(photo), as_batch(other))[0]) == pytest.approx(ref, abs=1e-6)


def test_ssim_grey_and_batched():
    cam = img_as_float(data.camera())[:96, :96]
    other = gaussian(cam, sigma=1)
    ref = structural_similarity(cam, other, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                data_range=1.0)
    x = torch.from_numpy(np.stack([cam, cam]))[:, None]
    y = torch.from_numpy(np.stack([other, cam]))[:, None]
    got = ssim(x, y)
    assert got.shape == (2,)
    assert float(got[0]) == pytest.approx(ref, abs=1e-6) and float(got[1]) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------
# Inception weights


def _random_inception_state(tmp_path: Path) -> dict[str, torch.Tensor]:
    """Random weights in the exact pytorch-fid / torch-fidelity layout, with He-scaled convs so
    the features neither vanish nor explode through ~90 layers."""
    base = _fidelity_inception_class()

    class Bare(base):  # the real network, its loading skipped
        def load_state_dict(self, *args, **kwargs):
            return None

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, value in Bare("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)).state_dict().items():
        if key.endswith("conv.weight"):
            value = torch.randn(value.shape, generator=g) * (2.0 / value[0].numel()) ** 0.5
        state[key] = value
    return state


@pytest.fixture(scope="module")
def inception_state(tmp_path_factory) -> dict[str, torch.Tensor]:
    return _random_inception_state(tmp_path_factory.mktemp("inception"))


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory, inception_state) -> Path:
    path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
    torch.save(inception_state, path)
    return path


@needs_fidelity
def test_layout_is_pytorch_fids(inception_state):
    expected = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_1a_3x3.bn.running_var": (32,),
        "Mixed_5b.branch5x5_1.conv.weight": (48, 192, 1, 1), "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1), "fc.weight": (1008, 2048), "fc.bias": (1008,),
    }
    for key, shape in expected.items():
        assert tuple(inception_state[key].shape) == shape, key


@needs_fidelity
def test_inception_loads_random_weights_and_gives_pool3_features(inception_weights):
    net = load_inception(inception_weights)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    feats = net(x)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and feats.std() > 1e-3
    assert torch.equal(net(x), feats)


@needs_fidelity
def test_inception_accepts_weights_without_num_batches_tracked(tmp_path, inception_state):
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in inception_state.items() if not k.endswith("num_batches_tracked")}, path)
    assert load_inception(path).num_features == 2048


@needs_fidelity
@pytest.mark.parametrize("damage, words", [
    ("drop", "missing key Mixed_6c.branch7x7_2.conv.weight"),
    ("reshape", "key Mixed_6c.branch7x7_2.conv.weight has shape (160, 160, 7, 1), expected (160, 160, 1, 7)"),
    ("extra", "unexpected key aux.weight"),
])
def test_inception_refuses_a_wrong_layout(tmp_path, inception_state, damage, words):
    state = dict(inception_state)
    key = "Mixed_6c.branch7x7_2.conv.weight"
    if damage == "drop":
        del state[key]
    elif damage == "reshape":
        state[key] = state[key].transpose(2, 3).contiguous()
    else:
        state["aux.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(InceptionWeightsError) as err:
        load_inception(path)
    assert words in str(err.value) and str(path) in str(err.value)


def test_missing_or_foreign_weights_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "pt_inception.pth"
    with pytest.raises(InceptionWeightsError, match="--inception-weights") as err:
        load_inception(missing)
    assert str(missing) in str(err.value) and "never downloaded" in str(err.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InceptionWeightsError, match="not a PyTorch state dict") as err:
        load_inception(junk, option="eval.inception_weights")
    assert str(junk) in str(err.value) and "eval.inception_weights" in str(err.value)


# ---------------------------------------------------------------------------------------
# The command and the in-training hook


def _evaluate(capsys, *args) -> tuple[int, str, str]:
    code = main([*map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@needs_fidelity
@pytest.mark.slow
def test_evaluate_writes_results_and_caches_real_stats(tmp_path, capsys, trained_checkpoint, shards32,
                                                       inception_weights):
    common = ["--checkpoint", trained_checkpoint, "--shards", shards32, "--inception-weights", inception_weights,
              "--max-samples", 6, "--batch-size", 4, "--cache-dir", tmp_path / "cache"]
    code, out, err = _evaluate(capsys, *common, "--out", tmp_path / "a.json")
    assert code == 0, err
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["samples"] == 6 and first["step"] == 2 and first["skipped"] == 0
    assert first["fid"] > 0 and 0 < first["ssim"] < 1 and not first["real_stats_cached"]
    assert len(first["config_hash"]) == 16 and first["method"] == "SSGAN"
    assert "SSGAN (paper)" in out and "123.8" in out and "215.1" in out and "0.285" in out
    assert PAPER_ROWS_NOTE in out
    # KID from the same features: all 6 samples per subset here; the few-samples warning, in JSON and table
    assert first["kid_subset_size"] == 6 and first["kid_subsets"] == 100 and first["kid_std"] >= 0
    assert np.isfinite(first["kid"]) and f"{first['kid']:.4f} ± {first['kid_std']:.4f}" in out
    assert first["warnings"] == [few_samples_warning(6)] and few_samples_warning(6) in out
    code, _, err = _evaluate(capsys, *common, "--out", tmp_path / "b.json")
    assert code == 0, err
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["real_stats_cached"] and second["fid"] == first["fid"] and second["ssim"] == first["ssim"]
    assert second["kid"] == first["kid"]  # the cache keeps the real features themselves


@needs_fidelity
@pytest.mark.slow
def test_evaluate_under_torchrun_matches_one_process(tmp_path, trained_checkpoint, shards32, inception_weights):
    """Two ranks split the samples; the gathered result equals the single-process one exactly."""
    common = ["--checkpoint", trained_checkpoint, "--shards", shards32, "--inception-weights", inception_weights,
              "--max-samples", 5, "--batch-size", 2, "--cache-dir", tmp_path / "cache"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"r{n}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               "-m", "ssgan_dist.evaluation.evaluate", *map(str, common), "--out", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[n] = json.loads(out.read_text())
    assert runs[2]["world_size"] == 2 and runs[2]["samples"] == 5
    assert runs[2]["real_stats_cached"]  # written by the 1-rank run: same shards, weights, settings
    assert runs[1]["fid"] == pytest.approx(runs[2]["fid"], rel=1e-9) and runs[1]["ssim"] == runs[2]["ssim"]
    assert runs[1]["kid"] == pytest.approx(runs[2]["kid"], rel=1e-9)


@needs_fidelity
@pytest.mark.slow
def test_trainer_evaluates_every_n_steps(tmp_path, shards32, inception_weights):
    cfg = tiny_config(tmp_path / "run", shards32, "train.max_steps=2", "eval.every=2", f"eval.shards={shards32}",
                      f"eval.inception_weights={inception_weights}", "eval.max_samples=4",
                      f"data.cache_dir={tmp_path / 'cache'}")
    trainer = Trainer(cfg, setup())
    trainer.fit()
    assert trainer.last_eval["samples"] == 4 and trainer.last_eval["fid"] > 0
    assert trainer.task.G.training  # back in training mode after the evaluation
    assert (tmp_path / "cache" / "fid-stats").is_dir()


def test_eval_every_without_its_inputs_is_a_config_error(tmp_path, shards32):
    with pytest.raises(ConfigError, match="eval.every=5 needs eval.shards"):
        tiny_config(tmp_path, shards32, "eval.every=5")


def test_evaluate_cli_missing_weights_is_exit_2_naming_the_path(tmp_path, trained_checkpoint, shards32):
    missing = tmp_path / "absent" / "pt_inception-2015-12-05-6726825d.pth"
    proc = subprocess.run([sys.executable, "-m", "ssgan_dist.evaluation.evaluate",
                           "--checkpoint", str(trained_checkpoint),
                           "--shards", str(shards32), "--inception-weights", str(missing)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(missing) in proc.stderr and "--inception-weights" in proc.stderr
    assert "Traceback" not in proc.stderr


@needs_fidelity
def test_evaluate_refuses_shards_of_another_resolution(tmp_path, capsys, trained_checkpoint, inception_weights):
    shards64 = tmp_path / "shards64"
    build_synthetic_shards(shards64, count=2, samples_per_shard=2, size=64, seed=3, num_classes=20)
    code, _, err = _evaluate(capsys, "--checkpoint", trained_checkpoint, "--shards", shards64,
                             "--inception-weights", inception_weights, "--cache-dir", tmp_path / "cache")
    assert code == 2
    assert "--shards" in err and "shard-000000.tar" in err and "64x64, expected 32x32" in err
    assert "Traceback" not in err


@needs_fidelity
def test_evaluate_refuses_a_missing_shard_naming_the_option(tmp_path, capsys, trained_checkpoint, inception_weights):
    code, _, err = _evaluate(capsys, "--checkpoint", trained_checkpoint, "--shards", tmp_path / "x-{0..1}.tar",
                             "--inception-weights", inception_weights)
    assert code == 2 and "--shards: no such shard" in err


# ---------------------------------------------------------------------------------------
# Without Inception weights; the full pipeline sketch -> predicted M0 -> image


def _reference_scores(checkpoint: Path, shards: Path, n: int, segmenter: Path | None = None
                      ) -> tuple[float, float]:
    """Mean SSIM and L1 of the first n samples computed here from the parts: M0 from the shard,
    or from the segmenter's prediction on the sketch."""
    loaded = load_generator(checkpoint, torch.device("cpu"))
    m = loaded.cfg.model
    S = load_segmenter(segmenter, torch.device("cpu")).S if segmenter else None
    scores, l1 = [], []
    for batch in OrderedSamples(resolve_shards(str(shards)), num_classes=m.num_classes, image_size=m.image_size,
                                max_samples=n).batches(4):
        label = run_segmenter(S, batch["sketch"]) if S is not None else batch["label"]
        fake, _ = run_generator(loaded.G, m, label, noise(m, 0, batch["index"]))
        fake01, real01 = to_uint8(fake) / 255.0, to_uint8(batch["image"]) / 255.0
        scores += ssim(fake01, real01).tolist()
        l1 += [float((f - r).abs().mean()) for f, r in zip(fake01, real01)]
    return float(np.mean(scores)), float(np.mean(l1))


def _reference_ssim(checkpoint: Path, shards: Path, n: int, segmenter: Path | None = None) -> float:
    return _reference_scores(checkpoint, shards, n, segmenter)[0]


def test_ssim_without_inception_weights_skips_fid_with_a_clear_word(tmp_path, capsys, trained_checkpoint, shards32):
    code, out, err = _evaluate(capsys, "--checkpoint", trained_checkpoint, "--shards", shards32, "--max-samples", 6,
                               "--out", tmp_path / "r.json")
    assert code == 0, err
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["fid"] is None and record["kid"] is None and record["metrics_skipped"] == FID_SKIPPED
    assert record["samples"] == 6 and record["labels"] == "shards" and record["segmenter"] is None
    ref_ssim, ref_l1 = _reference_scores(trained_checkpoint, shards32, 6)
    assert record["ssim"] == pytest.approx(ref_ssim, abs=1e-12)
    assert record["l1"] == pytest.approx(ref_l1, abs=1e-12) and 0 < record["l1"] < 1
    assert FID_SKIPPED in out and "skipped" in out.splitlines()[3]  # our row: FID and KID skipped
    assert "FID and KID skipped" in err  # and logged


SEG_TINY = ["run.task=segmenter", "segmenter.width=4", "segmenter.levels=2", "segmenter.dilations=[1,2]"]


@pytest.fixture(scope="module")
def segmenters(tmp_path_factory, shards32) -> dict[str, Path]:
    """A 32 px segmenter of the conftest generator's classes (5 steps), and an untrained one of 10
    classes (on shards of 10 classes: a run refuses shards of classes it lacks)."""
    fits, ten, shards10 = (tmp_path_factory.mktemp(name) for name in ("seg-fits", "seg-ten", "shards10"))
    Trainer(tiny_config(fits, shards32, *SEG_TINY, "train.max_steps=5"), setup()).fit()
    build_synthetic_shards(shards10, count=4, samples_per_shard=4, size=32, seed=1, num_classes=10,
                           background_classes=(6, 7, 8, 9))
    Trainer(tiny_config(ten, shards10, *SEG_TINY, "model.num_classes=10", "model.background_classes=[6,7,8,9]"),
            setup()).save_checkpoint()
    return {"fits": fits, "ten": ten}


@pytest.fixture(scope="module")
def label_sensitive_checkpoint(tmp_path_factory, trained_checkpoint) -> Path:
    """The 2-step checkpoint with G's conv weights redrawn at PyTorch's default scale: after 2 steps
    from SPADE's init (gain 0.02) G barely reads its label map, and this test is about which map it gets."""
    state = ckpt.load(trained_checkpoint)
    g = torch.Generator().manual_seed(0)
    for k, v in state["G"].items():
        if v.is_floating_point() and v.dim() == 4:
            bound = 1.0 / v[0].numel() ** 0.5
            state["G"][k] = (torch.rand(v.shape, generator=g) * 2 - 1) * bound
    path = tmp_path_factory.mktemp("sensitive") / "ckpt-000000002.pt"
    ckpt.save_atomic(state, path)
    return path


def test_segmenter_scores_the_full_pipeline(tmp_path, capsys, label_sensitive_checkpoint, shards32, segmenters):
    g = label_sensitive_checkpoint
    code, out, err = _evaluate(capsys, "--checkpoint", g, "--shards", shards32, "--max-samples", 6,
                               "--segmenter", segmenters["fits"], "--out", tmp_path / "r.json")
    assert code == 0, err
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["labels"] == "segmenter" and record["segmenter_step"] == 5
    assert record["segmenter"].startswith(str(segmenters["fits"]))
    assert record["ssim"] == pytest.approx(_reference_ssim(g, shards32, 6, segmenters["fits"]), abs=1e-12)
    # not the shards' labels (3e-4 apart here; the match above is to 1e-12)
    assert abs(record["ssim"] - _reference_ssim(g, shards32, 6)) > 1e-5
    assert "M0 predicted from the sketches by --segmenter" in out


def test_segmenter_of_other_classes_is_refused(capsys, trained_checkpoint, shards32, segmenters):
    code, _, err = _evaluate(capsys, "--checkpoint", trained_checkpoint, "--shards", shards32,
                             "--segmenter", segmenters["ten"])
    assert code == 2 and "--segmenter" in err and "predicts 10 classes" in err and "Traceback" not in err
