"""The training loop end to end in one process: learning, checkpoints, resume, the embedded default."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import EQUIVALENT, capture_applied_grads, relative_difference, tiny_config
from ssgan_dist import checkpoint as ckpt
from ssgan_dist.data.batch import step_tensors
from ssgan_dist.data.writer import build_synthetic_shards
from ssgan_dist.distributed.env import setup
from ssgan_dist.labels import onehot
from ssgan_dist.models import VGGWeightsError
from ssgan_dist.train import Trainer


def _trainer(run_dir, shards, *extra) -> Trainer:
    return Trainer(tiny_config(run_dir, shards, *extra), setup())


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {**{f"G.{k}": v.clone() for k, v in trainer.task.G.state_dict().items()},
            **{f"D.{k}": v.clone() for k, v in trainer.task.D.state_dict().items()}}


def test_learning_lowers_l1_on_a_fixed_tiny_set(tmp_path):
    """Four fixed scenes, batch 4, no flips: G's images approach the real ones in L1."""
    shards = tmp_path / "four"
    build_synthetic_shards(shards, count=4, samples_per_shard=4, size=32, seed=5, num_classes=20)
    t = _trainer(tmp_path / "run", shards, "train.batch_size=4", "data.flip=false", "train.max_steps=300",
                 "optim.lr_g=1e-3", "optim.lr_d=1e-3")
    batch = step_tensors(next(t.data), torch.device("cpu"))
    m0 = onehot(batch["label"], 20)
    z = torch.randn(4, t.cfg.model.z_dim, generator=torch.Generator().manual_seed(0))

    def l1() -> float:
        with torch.no_grad():
            return float((t.task.G(m0, z) - batch["image"]).abs().mean())

    before = l1()
    t.fit()
    after = l1()
    assert after < 0.6 * before, (before, after)


def test_checkpoint_round_trip(tmp_path, shards32):
    t = _trainer(tmp_path / "run", shards32, "train.max_steps=3")
    t.fit()
    state = t.state_dict()
    path = t.save_checkpoint()
    fresh = _trainer(tmp_path / "run", shards32, "train.max_steps=3")
    loaded, where = fresh.ckpt.load_latest()
    assert where == path
    fresh.load_state_dict(loaded, where)
    assert fresh.step == 3
    for k, v in _params(t).items():
        assert torch.equal(v, _params(fresh)[k]), k
    assert fresh.task.engine.opt["G"].state_dict()["state"].keys() == t.task.engine.opt["G"].state_dict()["state"].keys()
    for a, b in zip(fresh.task.engine.opt["D"].state_dict()["state"].values(), state["opt_d"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    assert fresh.data.state_dict() == state["ranks"][0]["data"]


def test_truncated_checkpoint_falls_back_with_warning(tmp_path, shards32, caplog):
    run = tmp_path / "run"
    t = _trainer(run, shards32, "train.max_steps=4", "checkpoint.every=2")
    t.fit()
    newest = ckpt.list_checkpoints(run)[-1]
    assert newest.name == "ckpt-000000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        state, path = ckpt.CheckpointManager(run, keep=3).load_latest()
    assert path.name == "ckpt-000000002.pt" and state["step"] == 2
    assert "ckpt-000000004.pt" in caplog.text and "unreadable" in caplog.text


def test_keeps_last_k_and_leaves_no_temp_files(tmp_path, shards32):
    run = tmp_path / "run"
    _trainer(run, shards32, "train.max_steps=5", "checkpoint.every=1", "checkpoint.keep=2").fit()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["ckpt-000000004.pt", "ckpt-000000005.pt"]
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_checkpoint_of_another_model_is_refused(tmp_path, shards32):
    run = tmp_path / "run"
    _trainer(run, shards32, "train.max_steps=1").fit()
    other = _trainer(run, shards32, "train.max_steps=2", "model.ngf=8")
    with pytest.raises(ckpt.CheckpointMismatch, match="model.ngf"):
        other.maybe_resume()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_matches_uninterrupted_run(tmp_path, shards32, workers):
    common = [f"data.num_workers={workers}", "train.batch_size=3"]
    straight = _trainer(tmp_path / "a", shards32, "train.max_steps=6", *common)
    straight.fit()
    _trainer(tmp_path / "b", shards32, "train.max_steps=4", *common).fit()
    resumed = _trainer(tmp_path / "b", shards32, "train.max_steps=6", *common)
    resumed.fit()
    assert resumed.step == 6
    a, b = _params(straight), _params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_missing_vgg_weights_is_a_clear_error(tmp_path, shards32):
    missing = tmp_path / "nope" / "vgg19.pth"
    with pytest.raises(VGGWeightsError) as err:
        _trainer(tmp_path / "run", shards32, "loss.vgg=true", f"loss.vgg_weights={missing}")
    assert str(missing) in str(err.value) and "loss.vgg=false" in str(err.value)


def _cli(*args: str, cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "ssgan_dist.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("spec, words", [("/no/such/dir-{000000..000001}.tar", "no such shard"),
                                          ("EMPTY", "holds no .tar")])
def test_cli_bad_shard_path(tmp_path, spec, words):
    (tmp_path / "empty").mkdir()
    spec = str(tmp_path / "empty") if spec == "EMPTY" else spec
    proc = _cli(f"run.dir={tmp_path / 'run'}", f"data.shards={spec}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "data.shards" in proc.stderr and words in proc.stderr
    assert "Traceback" not in proc.stderr


def test_embedded_default_trains_and_writes_outputs(tmp_path):
    """`python -m ssgan_dist.train` with only a step override: synthetic shards made on
    first use, the demo preset trained, a checkpoint and a sample grid written."""
    cache = tmp_path / "cache"
    proc = _cli("train.max_steps=4", "train.sample_every=2", "data.synthetic_count=16", cwd=tmp_path,
                env_extra={"SSGAN_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "demo"
    assert (run / "ckpt-000000004.pt").is_file()
    assert (run / "samples" / "step-000000002.png").is_file()
    assert (run / "samples" / "step-000000004.png").is_file()
    assert (run / "config.yaml").is_file()
    assert str(cache) in proc.stderr and "synthetic" in proc.stderr
    assert "VGG19" in proc.stderr and "skipped" in proc.stderr
    state = ckpt.load(run / "ckpt-000000004.pt")
    assert state["step"] == 4


def _one_step(trainer: Trainer, batch: dict) -> dict[str, dict[str, torch.Tensor]]:
    """One training step on ``batch``: G's and D's gradients and buffers (BatchNorm statistics,
    spectral-norm vectors) after it."""
    applied = capture_applied_grads(trainer.task.engine)
    trainer.train_step({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
    g, d = trainer.task.G, trainer.task.D
    return {"G": applied["G"], "D": applied["D"],
            "buffers": {f"{n}.{k}": v.clone() for n, m in (("G", g), ("D", d)) for k, v in m.state_dict().items()
                        if not k.endswith("num_batches_tracked") and k not in dict(m.named_parameters())}}


def _assert_same_step(a: dict, b: dict) -> None:
    for part in ("G", "D", "buffers"):
        assert relative_difference(a[part], b[part]) < EQUIVALENT, (part, relative_difference(a[part], b[part]))


def test_grad_checkpointing_gives_the_same_training(tmp_path, shards32):
    """Recomputed SPADE blocks: the same gradients, BatchNorm statistics and spectral-norm
    vectors as the plain step (compared relatively, see conftest.EQUIVALENT)."""
    plain = _trainer(tmp_path / "a", shards32, "train.max_steps=3")
    checked = _trainer(tmp_path / "b", shards32, "train.max_steps=3", "train.grad_checkpoint=true")
    assert checked.task.G.grad_checkpoint
    batch = next(plain.data)
    _assert_same_step(_one_step(plain, batch), _one_step(checked, batch))


def test_fp16_scaler_state_survives_resume(tmp_path, shards32):
    """fp16 (autocast on CPU here) with a loss scaler per network: the scalers' state is in
    the checkpoint and a resumed run continues exactly."""
    common = ["train.precision=fp16"]
    straight = _trainer(tmp_path / "a", shards32, "train.max_steps=4", *common)
    straight.fit()
    _trainer(tmp_path / "b", shards32, "train.max_steps=2", *common).fit()
    saved = ckpt.load(tmp_path / "b" / "ckpt-000000002.pt")
    assert saved["scaler_g"]["scale"] > 0 and saved["scaler_d"]["scale"] > 0
    resumed = _trainer(tmp_path / "b", shards32, "train.max_steps=4", *common)
    resumed.maybe_resume()
    assert resumed.task.engine.scaler["G"].state_dict() == saved["scaler_g"]
    resumed.fit()
    assert resumed.task.engine.scaler["G"].state_dict() == straight.task.engine.scaler["G"].state_dict()
    a, b = _params(straight), _params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_channels_last_trains_like_contiguous(tmp_path, shards32):
    """NHWC activations change only the memory layout: one step's gradients and updated
    buffers equal the contiguous step's within float noise (relative, see conftest.EQUIVALENT),
    and a real difference is far outside that bound."""
    a = _trainer(tmp_path / "a", shards32)
    b = _trainer(tmp_path / "b", shards32, "train.channels_last=true")
    assert b.task.G.conv_img.weight.is_contiguous(memory_format=torch.channels_last)
    batch = next(a.data)
    contiguous, nhwc = _one_step(a, batch), _one_step(b, batch)
    _assert_same_step(contiguous, nhwc)
    other = _one_step(_trainer(tmp_path / "c", shards32), {**batch, "image": batch["image"].flip(-1)})
    assert relative_difference(contiguous["G"], other["G"]) > 10 * EQUIVALENT  # the bound can tell


def test_checkpoint_of_another_world_size_is_refused(tmp_path, shards32):
    """The data position is per rank: a checkpoint written by 2 ranks cannot resume 1."""
    from ssgan_dist.errors import SetupError

    run = tmp_path / "run"
    _trainer(run, shards32, "train.max_steps=1").fit()
    path = ckpt.list_checkpoints(run)[-1]
    state = ckpt.load(path)
    state["world_size"] = 2
    state["ranks"] = state["ranks"] * 2
    torch.save(state, path)
    with pytest.raises(SetupError, match="written by 2 ranks"):
        _trainer(run, shards32, "train.max_steps=2").maybe_resume()
