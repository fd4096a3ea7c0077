"""Inference uses the EMA of G when a checkpoint holds one (evaluate and generate), G on request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssgan_dist import checkpoint as ckpt
from ssgan_dist.data.ordered import OrderedSamples
from ssgan_dist.data.shards import resolve_shards
from ssgan_dist.evaluation import evaluate, generate
from ssgan_dist.evaluation.inference import load_generator, noise, run_generator
from ssgan_dist.evaluation.ssim import ssim
from ssgan_dist.images import rgb_arrays, to_uint8

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ema_checkpoint(tmp_path_factory, trained_checkpoint) -> Path:
    """The trained checkpoint plus a G_ema: G's weights moved by noise (BatchNorm statistics kept),
    so that which weights inference ran shows in every output."""
    state = ckpt.load(trained_checkpoint)
    g = torch.Generator().manual_seed(0)
    state["G_ema"] = {k: v + 0.2 * v.abs().mean() * torch.randn(v.shape, generator=g)
                      if v.is_floating_point() and ("weight" in k or "bias" in k) else v.clone()
                      for k, v in state["G"].items()}
    path = tmp_path_factory.mktemp("ema") / "ckpt-000000002.pt"
    ckpt.save_atomic(state, path)
    return path


def test_load_generator_picks_g_ema_when_present(ema_checkpoint, trained_checkpoint):
    state = ckpt.load(ema_checkpoint)
    auto = load_generator(ema_checkpoint, CPU)
    assert auto.weights == "G_ema"
    for k, v in auto.G.state_dict().items():
        assert torch.equal(v, state["G_ema"][k]), k
    raw = load_generator(ema_checkpoint, CPU, "raw")
    assert raw.weights == "G" and all(torch.equal(v, state["G"][k]) for k, v in raw.G.state_dict().items())
    assert load_generator(ema_checkpoint, CPU, "ema").weights == "G_ema"
    assert load_generator(trained_checkpoint, CPU).weights == "G"  # no EMA: G


def _reference_ssim(checkpoint: Path, shards: Path, weights: str, n: int) -> float:
    loaded = load_generator(checkpoint, CPU, weights)
    m = loaded.cfg.model
    reader = OrderedSamples(resolve_shards(str(shards)), num_classes=m.num_classes, image_size=m.image_size,
                            max_samples=n)
    scores = []
    for batch in reader.batches(4):
        fake, _ = run_generator(loaded.G, m, batch["label"], noise(m, 0, batch["index"]))
        scores += ssim(to_uint8(fake) / 255.0, to_uint8(batch["image"]) / 255.0).tolist()
    return float(np.mean(scores))


def test_evaluate_scores_the_ema_weights(tmp_path, capsys, ema_checkpoint, shards32):
    records = {}
    for weights in ("auto", "raw"):
        out = tmp_path / f"{weights}.json"
        code = evaluate.main(["--checkpoint", str(ema_checkpoint), "--shards", str(shards32), "--max-samples", "6",
                              "--weights", weights, "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        records[weights] = json.loads(out.read_text())
    assert records["auto"]["weights"] == "G_ema" and records["raw"]["weights"] == "G"
    assert records["auto"]["ssim"] == pytest.approx(_reference_ssim(ema_checkpoint, shards32, "ema", 6), abs=1e-12)
    assert records["raw"]["ssim"] == pytest.approx(_reference_ssim(ema_checkpoint, shards32, "raw", 6), abs=1e-12)
    assert records["auto"]["ssim"] != records["raw"]["ssim"]
    assert "step 2, G_ema" in capsys.readouterr().out


def test_generate_uses_the_ema_weights(tmp_path, capsys, ema_checkpoint, shards32):
    images = {}
    for weights in ("auto", "raw"):
        out = tmp_path / weights
        assert generate.main(["--checkpoint", str(ema_checkpoint), "--shards", str(shards32), "--max-samples", "2",
                              "--weights", weights, "--out", str(out)]) == 0, capsys.readouterr().err
        assert f"weights {'G_ema' if weights == 'auto' else 'G'}" in capsys.readouterr().out
        images[weights] = {p.name: np.array(Image.open(p)) for p in sorted(out.glob("*.png"))
                           if not p.name.endswith(".mask.png")}
    loaded = load_generator(ema_checkpoint, CPU, "ema")
    m = loaded.cfg.model
    batch = next(OrderedSamples(resolve_shards(str(shards32)), num_classes=m.num_classes, image_size=m.image_size,
                                max_samples=2).batches(2))
    expected = rgb_arrays(run_generator(loaded.G, m, batch["label"], noise(m, 0, batch["index"]))[0])
    for i, key in enumerate(batch["key"]):
        assert np.array_equal(images["auto"][f"{key}.png"], expected[i])
        assert not np.array_equal(images["raw"][f"{key}.png"], expected[i])


def test_asking_for_ema_without_one_is_a_clear_error(tmp_path, capsys, trained_checkpoint, shards32):
    code = generate.main(["--checkpoint", str(trained_checkpoint), "--shards", str(shards32), "--weights", "ema",
                          "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--weights ema" in err and "no EMA of G" in err and "train.ema" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_a_train_ema_run_is_evaluated_with_its_average(tmp_path, capsys, shards32):
    """End to end: a run with train.ema writes G_ema, and evaluate scores those weights by default."""
    from conftest import tiny_config
    from ssgan_dist.distributed.env import setup
    from ssgan_dist.train import Trainer

    trainer = Trainer(tiny_config(tmp_path / "run", shards32, "train.max_steps=3", "train.ema=0.9"), setup())
    trainer.fit()
    path = ckpt.list_checkpoints(tmp_path / "run")[-1]
    state = ckpt.load(path)
    loaded = load_generator(tmp_path / "run", CPU)
    assert loaded.weights == "G_ema"
    for k, v in loaded.G.state_dict().items():
        assert torch.equal(v, state["G_ema"][k]), k
        assert torch.equal(v, trainer.task.ema.module.state_dict()[k]), k
    assert any(not torch.equal(state["G_ema"][k], state["G"][k]) for k in state["G"])
    assert evaluate.main(["--checkpoint", str(tmp_path / "run"), "--shards", str(shards32), "--max-samples", "4",
                          "--out", str(tmp_path / "r.json")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["weights"] == "G_ema"
