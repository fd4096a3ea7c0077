"""Resume compares the whole saved config: a change is applied (and recorded) or refused,
never silently ignored; checkpoint.init_from starts a new run from weights only."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import TINY, tiny_config
from ssgan_dist import checkpoint as ckpt
from ssgan_dist.config import ConfigError, load_config
from ssgan_dist.distributed.env import setup
from ssgan_dist.errors import SetupError
from ssgan_dist.resume import CONFIG_FILE, HISTORY_FILE
from ssgan_dist.train import Trainer


def _trainer(run_dir, shards, *extra) -> Trainer:
    return Trainer(tiny_config(run_dir, shards, *extra), setup())


def _history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / HISTORY_FILE).read_text().splitlines()]


@pytest.fixture
def run2(tmp_path, shards32):
    """A run dir holding the checkpoint of a 2-step run (lr 2e-4, batch 2, seed 0)."""
    run = tmp_path / "run"
    _trainer(run, shards32, "train.max_steps=2").fit()
    return run


def test_changed_settings_are_refused_naming_every_key(run2, shards32):
    """Issue 11: optim.lr_g, optim.beta1, train.batch_size and run.seed changed on resume were
    accepted and ignored, config.yaml claiming the new values. Now every changed key is named
    with old and new value, the model's shape keys as frozen, and config.yaml stays."""
    before = (run2 / CONFIG_FILE).read_text()
    changed = _trainer(run2, shards32, "train.max_steps=4", "optim.lr_g=1e-4", "optim.beta1=0.5",
                       "train.batch_size=3", "run.seed=7", "model.ngf=8")
    with pytest.raises(ckpt.CheckpointMismatch) as err:
        changed.maybe_resume()
    text = str(err.value)
    for line in ("optim.lr_g: 0.0002 -> 0.0001", "optim.beta1: 0.0 -> 0.5", "train.batch_size: 2 -> 3",
                 "run.seed: 0 -> 7", "model.ngf: 4 -> 8 (cannot change on a running state"):
        assert line in text, line
    assert "checkpoint.allow_changes=[run.seed,optim.lr_g,optim.beta1,train.batch_size]" in text
    assert "train.max_steps" not in text  # may change on resume
    assert (run2 / CONFIG_FILE).read_text() == before
    assert len(_history(run2)) == 1  # only the first start


def test_allowed_changes_are_applied_to_the_running_state(run2, shards32, caplog):
    saved = ckpt.load(run2 / "ckpt-000000002.pt")
    resumed = _trainer(run2, shards32, "train.max_steps=3", "optim.lr_g=1e-4", "optim.beta1=0.5",
                       "optim.beta2=0.99", "checkpoint.allow_changes=[optim.lr_g, optim.beta1, optim.beta2]")
    with caplog.at_level(logging.INFO):
        resumed.maybe_resume()
    opt = resumed.task.engine.opt
    assert all(g["lr"] == 1e-4 and g["betas"] == (0.5, 0.99) for g in opt["G"].param_groups)
    assert all(g["lr"] == 2e-4 and g["betas"] == (0.5, 0.99) for g in opt["D"].param_groups)
    for a, b in zip(opt["G"].state_dict()["state"].values(), saved["opt_g"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])  # the moments are the checkpoint's
    assert "resume: optim.lr_g: 0.0002 -> 0.0001 (checkpoint.allow_changes: applied)" in caplog.text
    assert "resume: train.max_steps: 2 -> 3 (may change on resume)" in caplog.text
    assert yaml.safe_load((run2 / CONFIG_FILE).read_text())["optim"]["lr_g"] == 1e-4
    last = _history(run2)[-1]
    assert last["how"] == "resumed" and last["step"] == 2 and last["from"] == str(run2 / "ckpt-000000002.pt")
    assert last["changes"]["optim.lr_g"] == {"old": 2e-4, "new": 1e-4, "by": "allowed"}
    assert last["changes"]["train.max_steps"]["by"] == "free"
    resumed.fit()  # the next checkpoint holds the new values: resuming again needs no list
    assert ckpt.load(run2 / "ckpt-000000003.pt")["config"]["optim"]["lr_g"] == 1e-4
    _trainer(run2, shards32, "train.max_steps=4", "optim.lr_g=1e-4", "optim.beta1=0.5", "optim.beta2=0.99").fit()


def test_the_new_lr_really_trains(run2, shards32, tmp_path):
    """The allowed lr is the one the optimizer steps with: one step from the same checkpoint
    with lr_g x10 moves G ten times as far (Adam's step is proportional to lr)."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(run2, other)
    start = ckpt.load(run2 / "ckpt-000000002.pt")["G"]
    moved = {}
    for run, lr in ((run2, "2e-4"), (other, "2e-3")):
        t = _trainer(run, shards32, "train.max_steps=3", f"optim.lr_g={lr}", "checkpoint.allow_changes=[optim.lr_g]")
        t.fit()
        after = t.task.G.state_dict()
        moved[lr] = sum(float((after[k] - start[k]).abs().sum()) for k in start if k.endswith("weight_orig"))
    assert moved["2e-3"] == pytest.approx(10 * moved["2e-4"], rel=0.05)


def test_shape_keys_are_refused_even_when_listed(run2, shards32):
    t = _trainer(run2, shards32, "model.ngf=8", "checkpoint.allow_changes=[model.ngf]")
    with pytest.raises(ckpt.CheckpointMismatch, match=r"model.ngf: 4 -> 8 \(cannot change on a running state") as err:
        t.maybe_resume()
    assert "checkpoint.init_from=" in str(err.value)


def test_a_key_the_checkpoint_predates_compares_with_its_default(run2, shards32):
    path = run2 / "ckpt-000000002.pt"
    state = ckpt.load(path)
    del state["config"]["train"]["d_fakes"]  # as if written before the key existed
    torch.save(state, path)
    _trainer(run2, shards32, "train.max_steps=3").maybe_resume()  # the default: no difference
    with pytest.raises(ckpt.CheckpointMismatch, match="train.d_fakes: 'reuse' -> 'regenerate'"):
        _trainer(run2, shards32, "train.max_steps=3", "train.d_fakes=regenerate").maybe_resume()


def test_worker_count_change_gets_the_loaders_own_message(tmp_path, shards32):
    """data.num_workers may change where the loader can carry its position; the torch
    loader's streams are per worker, so 1 -> 2 is refused by the loader, naming the key."""
    run = tmp_path / "run"
    _trainer(run, shards32, "train.max_steps=1", "data.num_workers=1").fit()
    with pytest.raises(SetupError, match="data.num_workers: the checkpoint's data position was saved with 1 workers"):
        _trainer(run, shards32, "train.max_steps=2", "data.num_workers=2").maybe_resume()
    _trainer(run, shards32, "train.max_steps=2", "data.num_workers=0").fit()  # 0 and 1 read one stream alike


def test_precision_change_when_allowed_starts_fresh_scalers(run2, shards32):
    t = _trainer(run2, shards32, "train.max_steps=3", "train.precision=fp16", "checkpoint.allow_changes=[train.precision]")
    t.fit()
    assert t.step == 3 and t.task.engine.scaler["G"].is_enabled()


def test_unknown_key_in_allow_changes_is_a_config_error():
    with pytest.raises(ConfigError, match="checkpoint.allow_changes: unknown key"):
        load_config("demo", ["checkpoint.allow_changes=[optim.lr]"])


def test_refused_resume_leaves_config_yaml_from_the_cli(run2, shards32):
    before = (run2 / CONFIG_FILE).read_text()
    proc = subprocess.run([sys.executable, "-m", "ssgan_dist.train", *TINY, f"data.shards={shards32}",
                           f"run.dir={run2}", "model.ngf=8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.ngf: 4 -> 8" in proc.stderr
    assert (run2 / CONFIG_FILE).read_text() == before


# -- checkpoint.init_from ---------------------------------------------------------------------


def test_init_from_loads_weights_only(run2, shards32, tmp_path):
    source = ckpt.load(run2 / "ckpt-000000002.pt")
    new = tmp_path / "new"
    t = _trainer(new, shards32, "train.max_steps=1", f"checkpoint.init_from={run2 / 'ckpt-000000002.pt'}",
                 "optim.lr_g=1e-4")  # a new run: its own optimizer settings, no allow_changes needed
    t.maybe_resume()
    assert t.step == 0
    for net in ("G", "D"):
        for k, v in source[net].items():
            assert torch.equal(t.task.engine.module(net).state_dict()[k], v), (net, k)
    assert all(not opt.state for opt in t.task.engine.opt.values())  # fresh optimizers
    assert t.task.engine.opt["G"].param_groups[0]["lr"] == 1e-4
    last = _history(new)[-1]
    assert last["how"] == "init_from" and last["step"] == 0
    from_dir = _trainer(tmp_path / "new2", shards32, f"checkpoint.init_from={run2}")  # a run dir: its newest
    from_dir.maybe_resume()
    assert torch.equal(from_dir.task.G.fc.weight, source["G"]["fc.weight"])


def test_init_from_a_model_that_does_not_fit_is_refused(run2, shards32, tmp_path):
    t = _trainer(tmp_path / "new", shards32, "model.ngf=8", f"checkpoint.init_from={run2}")
    with pytest.raises(ckpt.CheckpointMismatch, match="model.ngf: checkpoint 4, config 8"):
        t.maybe_resume()
    with pytest.raises(SetupError, match="checkpoint.init_from: no such file"):
        _trainer(tmp_path / "new", shards32, f"checkpoint.init_from={tmp_path / 'nope.pt'}").maybe_resume()


def test_init_from_is_ignored_when_run_dir_has_checkpoints(run2, shards32, tmp_path, caplog):
    other = tmp_path / "other"
    _trainer(other, shards32, "train.max_steps=1").fit()
    t = _trainer(run2, shards32, "train.max_steps=3", f"checkpoint.init_from={other}")
    with caplog.at_level(logging.INFO):
        t.maybe_resume()
    assert t.step == 2 and "checkpoint.init_from=" in caplog.text and "ignored" in caplog.text


def test_init_from_carries_the_ema_of_g_when_both_runs_keep_one(tmp_path, shards32):
    """EMA weights if present: a source with train.ema gives its G_ema to a new run with one;
    a source without gives none, and the new run's average starts from the loaded G."""
    with_ema, without = tmp_path / "ema", tmp_path / "plain"
    _trainer(with_ema, shards32, "train.max_steps=2", "train.ema=0.9").fit()
    _trainer(without, shards32, "train.max_steps=2").fit()
    source = ckpt.load(with_ema / "ckpt-000000002.pt")
    t = _trainer(tmp_path / "a", shards32, "train.ema=0.9", f"checkpoint.init_from={with_ema}")
    t.maybe_resume()
    for k, v in source["G_ema"].items():
        assert torch.equal(t.task.ema.module.state_dict()[k], v), k
    assert t.task.ema.updates == source["G_ema_updates"]
    u = _trainer(tmp_path / "b", shards32, "train.ema=0.9", f"checkpoint.init_from={without}")
    u.maybe_resume()
    plain = ckpt.load(without / "ckpt-000000002.pt")["G"]
    for k, v in plain.items():
        assert torch.equal(u.task.ema.module.state_dict()[k], v), k
