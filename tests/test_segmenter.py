"""The sketch segmenter (sketch -> M0): learning on held-out scenes, strokes-only predictions,
training through the shared loop (exact resume, task-checked checkpoints, metrics), the
evaluation command, and the sketch-only generate path with its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import generate_latest

from conftest import tiny_config
from ssgan_dist import checkpoint as ckpt
from ssgan_dist.config import ConfigError, load_config
from ssgan_dist.data.ordered import OrderedSamples
from ssgan_dist.data.shards import resolve_shards
from ssgan_dist.data.writer import build_synthetic_shards
from ssgan_dist.distributed.env import setup
from ssgan_dist.evaluation import generate
from ssgan_dist.evaluation.evaluate_segmenter import evaluate_segmenter, scores
from ssgan_dist.evaluation.evaluate_segmenter import main as evaluate_main
from ssgan_dist.evaluation.inference import load_segmenter, run_segmenter
from ssgan_dist.grid import Layout
from ssgan_dist.labels import PALETTE, STROKE_THRESHOLD, stroke_mask
from ssgan_dist.models.segmenter import IGNORE, stroke_cross_entropy, stroke_targets
from ssgan_dist.tasks.segmenter import SegmenterTask
from ssgan_dist.train import Trainer

# A segmenter of a few thousand parameters for the 32 px tests.
SEG_TINY = ["run.task=segmenter", "segmenter.width=4", "segmenter.levels=2", "segmenter.dilations=[1,2]"]


def _seg_trainer(run_dir: Path, shards: Path, *extra: str) -> Trainer:
    trainer = Trainer(tiny_config(run_dir, shards, *SEG_TINY, *extra), setup())
    assert isinstance(trainer.task, SegmenterTask)
    return trainer


@pytest.fixture(scope="module")
def segmenter_ckpt(tmp_path_factory, shards32) -> Path:
    """A 32 px segmenter trained 30 steps on shards32, the conftest generator's classes and size."""
    run = tmp_path_factory.mktemp("segmenter")
    _seg_trainer(run, shards32, "train.max_steps=30", "segmenter.lr=3e-3").fit()
    return run / "ckpt-000000030.pt"


@pytest.fixture(scope="module")
def held_out32(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("held32")
    build_synthetic_shards(out, count=8, samples_per_shard=8, size=32, seed=77, num_classes=20)
    return out


@pytest.fixture(scope="module")
def sketch_png(tmp_path_factory, shards32) -> Path:
    """The sketch PNG of the first sample of shards32, as a user would have it."""
    out = tmp_path_factory.mktemp("sketch") / "sketch.png"
    with tarfile.open(shards32 / "shard-000000.tar") as tar:
        member = next(n for n in tar.getnames() if n.endswith("sketch.png"))
        out.write_bytes(tar.extractfile(member).read())
    return out


def _samples(shards: Path) -> dict:
    """Every sample of a 32 px shard set in one batch."""
    return next(OrderedSamples(resolve_shards(str(shards)), num_classes=20, image_size=32).batches(1000))


# -- the model and its loss -------------------------------------------------------------


def test_stroke_rule_is_the_writers_and_labels_sit_on_strokes(shards32):
    values = torch.arange(256, dtype=torch.float32).div(255.0)
    assert torch.equal(stroke_mask(values), torch.arange(256) < STROKE_THRESHOLD)
    batch = _samples(shards32)
    assert not (batch["label"][~stroke_mask(batch["sketch"][:, 0])] > 0).any()


def test_loss_counts_labelled_stroke_pixels_only():
    sketch = torch.ones(1, 1, 4, 4)
    sketch[0, 0, 0, :3] = 0.0  # three stroke pixels
    label = torch.zeros(1, 4, 4, dtype=torch.int64)
    label[0, 0, :2] = 5  # two labelled, one unlabelled stroke pixel (class 0)
    label[0, 3, 3] = 7  # a label off the strokes: no training signal
    target = stroke_targets(label, sketch)
    assert target[0, 0, :2].tolist() == [4, 4] and (target.flatten()[2:] == IGNORE).all()
    logits = torch.randn(1, 19, 4, 4, requires_grad=True)
    loss = stroke_cross_entropy(logits, label, sketch)
    expected = torch.nn.functional.cross_entropy(logits[0, :, 0, :2].T, torch.tensor([4, 4]))
    assert torch.allclose(loss, expected)
    blank = stroke_cross_entropy(logits, label, torch.ones(1, 1, 4, 4))
    blank.backward()  # no labelled stroke pixel: a zero loss, not NaN
    assert blank.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_predictions_only_on_strokes(segmenter_ckpt, held_out32):
    batch = _samples(held_out32)
    pred = run_segmenter(load_segmenter(segmenter_ckpt, torch.device("cpu")).S, batch["sketch"])
    stroke = stroke_mask(batch["sketch"][:, 0])
    assert (pred[~stroke] == 0).all()
    assert (pred[stroke] >= 1).all() and (pred[stroke] < 20).all()


def test_scores_of_a_known_confusion_matrix():
    conf = np.zeros((4, 4), np.int64)
    conf[0, 2] = 9  # unlabelled strokes: counted, not scored
    conf[1, 1], conf[1, 2] = 6, 2
    conf[2, 2] = 2
    r = scores(conf)
    assert r["pixel_accuracy"] == pytest.approx(8 / 10) and r["majority_baseline"] == pytest.approx(8 / 10)
    assert r["classes"]["bicycle"]["iou"] == pytest.approx(6 / 8) and r["classes"]["car"]["iou"] == pytest.approx(2 / 4)
    assert r["mean_iou"] == pytest.approx((6 / 8 + 2 / 4) / 2) and "motorcycle" not in r["classes"]
    assert r["unlabelled_stroke_pixels"] == 9 and r["labelled_stroke_pixels"] == 10


# -- training through the shared loop -------------------------------------------------


def test_learns_well_above_the_majority_class_on_held_out_scenes(tmp_path):
    train, held = tmp_path / "train", tmp_path / "held"
    build_synthetic_shards(train, count=96, samples_per_shard=32, size=64, seed=3, num_classes=20)
    build_synthetic_shards(held, count=32, samples_per_shard=32, size=64, seed=4, num_classes=20)
    cfg = load_config("segment-demo", [f"run.dir={tmp_path / 'run'}", f"data.shards={train}", "train.max_steps=120",
                                       "segmenter.width=8", "data.num_workers=0", "train.progress=false"])
    Trainer(cfg, setup()).fit()
    env = setup()
    r = evaluate_segmenter(load_segmenter(tmp_path / "run", env.device), resolve_shards(str(held)), env)
    assert r["samples"] == 32 and r["labelled_stroke_pixels"] > 10_000
    assert r["pixel_accuracy"] > r["majority_baseline"] + 0.15, r


def test_resume_matches_uninterrupted_run(tmp_path, shards32):
    common = ["train.batch_size=3"]
    straight = _seg_trainer(tmp_path / "a", shards32, "train.max_steps=6", *common)
    straight.fit()
    _seg_trainer(tmp_path / "b", shards32, "train.max_steps=4", "checkpoint.every=2", *common).fit()
    resumed = _seg_trainer(tmp_path / "b", shards32, "train.max_steps=6", *common)
    resumed.fit()
    assert resumed.step == 6
    for k, v in straight.task.S.state_dict().items():
        assert torch.equal(v, resumed.task.S.state_dict()[k]), k
    for a, b in zip(straight.task.engine.opt["S"].state_dict()["state"].values(),
                    resumed.task.engine.opt["S"].state_dict()["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    state = ckpt.load(tmp_path / "b" / "ckpt-000000006.pt")
    assert {"S", "opt_s", "scaler_s", "ranks", "step"} <= state.keys() and "G" not in state
    assert state["config"]["run"]["task"] == "segmenter"


def test_checkpoints_of_the_other_task_are_refused(tmp_path, shards32, segmenter_ckpt, trained_checkpoint):
    gan_run, seg_run = tmp_path / "gan", segmenter_ckpt.parent
    with pytest.raises(ckpt.CheckpointMismatch, match="run.task=segmenter"):
        Trainer(tiny_config(seg_run, shards32, "train.max_steps=40"), setup()).maybe_resume()
    Trainer(tiny_config(gan_run, shards32, "train.max_steps=1"), setup()).fit()
    with pytest.raises(ckpt.CheckpointMismatch, match="run.task=gan"):
        _seg_trainer(gan_run, shards32, "train.max_steps=2").maybe_resume()
    with pytest.raises(ckpt.CheckpointMismatch, match="segmenter.width"):
        _seg_trainer(seg_run, shards32, "train.max_steps=40", "segmenter.width=8").maybe_resume()


def test_config_refuses_what_a_segmenter_run_cannot_do():
    with pytest.raises(ConfigError, match="engine.name=deepspeed"):
        load_config("segment-demo", ["engine.name=deepspeed"])
    with pytest.raises(ConfigError, match="segmenter.levels"):
        load_config("segment-demo", ["model.image_size=32", "segmenter.levels=7"])
    with pytest.raises(ConfigError, match="allowed values"):
        load_config("segment-demo", ["run.task=segmentation"])


def test_metrics_name_the_segmenter_step(tmp_path, shards32):
    t = _seg_trainer(tmp_path / "run", shards32, "train.max_steps=2", "metrics.enabled=true", "metrics.port=0")
    t.fit()
    text = generate_latest(t.telemetry.registry).decode()
    assert 'phase="s_step"' in text and 'net="S"' in text and 'term="s_ce"' in text
    assert 'phase="g_step"' not in text and 'net="G"' not in text
    assert "ssgan_mfu_ratio{" in text


def test_cli_trains_the_segment_demo_preset(tmp_path, shards32):
    proc = subprocess.run([sys.executable, "-m", "ssgan_dist.train", "--config", "segment-demo",
                           f"run.dir={tmp_path / 'run'}", f"data.shards={shards32}", "model.image_size=32",
                           "segmenter.width=4", "train.max_steps=2", "train.batch_size=2", "data.num_workers=0"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "ckpt-000000002.pt").is_file()
    height, width = Layout(32, 2, 3).shape  # sketch | true M0 | predicted M0, 2 rows, upscaled, with a header
    assert Image.open(tmp_path / "run" / "samples" / "step-000000002.png").size == (width, height)
    assert "s_ce" in proc.stderr


# -- evaluation command -----------------------------------------------------------------


def test_evaluate_command_writes_json(tmp_path, capsys, segmenter_ckpt, held_out32):
    out = tmp_path / "seg.json"
    assert evaluate_main(["--checkpoint", str(segmenter_ckpt), "--shards", str(held_out32), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["samples"] == 8 and record["step"] == 30 and 0 <= record["pixel_accuracy"] <= 1
    assert 0 <= record["mean_iou"] <= 1 and record["classes"] and "pixel accuracy" in capsys.readouterr().out


def test_evaluate_command_refuses_a_generator_checkpoint(capsys, trained_checkpoint, held_out32):
    assert evaluate_main(["--checkpoint", str(trained_checkpoint), "--shards", str(held_out32)]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "generator checkpoint" in err


# -- generate from a bare sketch --------------------------------------------------------


def _colours_to_classes(rgb: np.ndarray) -> np.ndarray:
    """Invert labels.colorize for the first 20 classes (their colours are distinct)."""
    lookup = {tuple(c): i for i, c in enumerate(PALETTE[:20].tolist())}
    return np.vectorize(lambda r, g, b: lookup[(r, g, b)])(rgb[..., 0], rgb[..., 1], rgb[..., 2])


def test_sketch_only_generation_uses_the_segmenters_m0(tmp_path, capsys, monkeypatch, trained_checkpoint,
                                                       segmenter_ckpt, sketch_png):
    seen = []
    real = generate.run_generator
    monkeypatch.setattr(generate, "run_generator", lambda G, cfg, label, z: seen.append(label) or real(G, cfg, label, z))
    out = tmp_path / "o" / "scene.png"
    code = generate.main(["--checkpoint", str(trained_checkpoint), "--segmenter", str(segmenter_ckpt),
                          "--sketch", str(sketch_png), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).size == (32, 32) and Image.open(out).mode == "RGB"
    sketch = torch.from_numpy(np.array(Image.open(sketch_png))).float().div(255.0)[None, None]
    expected = run_segmenter(load_segmenter(segmenter_ckpt, torch.device("cpu")).S, sketch)[0]
    assert torch.equal(seen[0][0], expected)
    assert np.array_equal(_colours_to_classes(np.array(Image.open(tmp_path / "o" / "scene.label.png"))), expected.numpy())
    assert "scene.label.png" in capsys.readouterr().out


@pytest.fixture(scope="module")
def ten_class_segmenter(tmp_path_factory) -> Path:
    """An (untrained) segmenter checkpoint of 10 classes: not the 20 of the conftest generator."""
    run, shards = tmp_path_factory.mktemp("seg10"), tmp_path_factory.mktemp("shards10")
    build_synthetic_shards(shards, count=4, samples_per_shard=4, size=32, seed=1, num_classes=10,
                           background_classes=(6, 7, 8, 9))  # a run refuses shards of classes it lacks
    return _seg_trainer(run, shards, "model.num_classes=10", "model.background_classes=[6,7,8,9]").save_checkpoint()


@pytest.mark.parametrize("case, words", [
    ("rgb sketch", ["--sketch", "colour image (RGB)"]),
    ("blank sketch", ["--sketch", "is blank", "--segmenter"]),
    ("class count", ["--segmenter", "predicts 10 classes", "takes 20", "model.num_classes"]),
    ("generator as segmenter", ["--segmenter", "generator checkpoint", "take it as --checkpoint"]),
    ("segmenter as generator", ["--checkpoint", "sketch segmenter checkpoint", "takes it as --segmenter"]),
    ("label and segmenter", ["--label and --segmenter", "give one"]),
    ("segmenter with shards", ["--segmenter goes with --sketch"]),
    ("neither", ["no label map for --sketch", "--label PNG", "--segmenter CKPT"]),
])
def test_bad_inputs_are_clear_errors(tmp_path, capsys, trained_checkpoint, segmenter_ckpt, ten_class_segmenter,
                                     sketch_png, shards32, case, words):
    grey = np.array(Image.open(sketch_png))
    g, s = trained_checkpoint, segmenter_ckpt
    source = ["--sketch", str(sketch_png)]
    if case == "rgb sketch":
        rgb = np.stack([grey, grey, np.full_like(grey, 255)], -1)  # blue strokes: not a grey sketch
        Image.fromarray(rgb).save(tmp_path / "rgb.png")
        source = ["--sketch", str(tmp_path / "rgb.png")]
    elif case == "blank sketch":
        Image.fromarray(np.full_like(grey, 255)).save(tmp_path / "blank.png")
        source = ["--sketch", str(tmp_path / "blank.png")]
    elif case == "class count":
        s = ten_class_segmenter
    elif case == "generator as segmenter":
        s = trained_checkpoint
    elif case == "segmenter as generator":
        g = segmenter_ckpt
    elif case == "label and segmenter":
        source += ["--label", str(sketch_png)]
    elif case == "segmenter with shards":
        source = ["--shards", str(shards32)]
    args = ["--checkpoint", str(g), *source, "--out", str(tmp_path / "o" / "x.png")]
    if case != "neither":
        args += ["--segmenter", str(s)]
    assert generate.main(args) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "o").exists()


def test_cli_error_has_exit_code_2_and_no_traceback(tmp_path, trained_checkpoint, ten_class_segmenter, sketch_png):
    proc = subprocess.run([sys.executable, "-m", "ssgan_dist.evaluation.generate",
                           "--checkpoint", str(trained_checkpoint),
                           "--segmenter", str(ten_class_segmenter), "--sketch", str(sketch_png),
                           "--out", str(tmp_path / "x.png")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert str(ten_class_segmenter) in proc.stderr and "predicts 10 classes" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_two_ranks_under_torchrun_resume_exactly(tmp_path, shards32):
    from conftest import TINY

    def train(run: Path, steps: int) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "ssgan_dist.train", *TINY, *SEG_TINY, f"data.shards={shards32}", f"run.dir={run}",
                f"train.max_steps={steps}", "checkpoint.every=2", "data.num_workers=1"]
        proc = subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    train(tmp_path / "straight", 5)
    train(tmp_path / "stopped", 3)
    assert "resumed from" in train(tmp_path / "stopped", 5).stderr
    a, b = (ckpt.load(ckpt.list_checkpoints(tmp_path / run)[-1]) for run in ("straight", "stopped"))
    assert a["step"] == b["step"] == 5 and a["world_size"] == 2
    for k in a["S"]:
        assert torch.equal(a["S"][k], b["S"][k]), k
    assert [r["data"] for r in a["ranks"]] == [r["data"] for r in b["ranks"]]
