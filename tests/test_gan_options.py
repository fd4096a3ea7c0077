"""The GAN step's options against what they promise: regenerated fakes come from the updated G,
the EMA follows its recurrence and survives resume, the learning rates decay linearly."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from ssgan_dist.data.batch import step_tensors
from ssgan_dist.distributed.env import setup
from ssgan_dist.labels import onehot
from ssgan_dist.train import Trainer


def _trainer(run_dir, shards, *extra) -> Trainer:
    return Trainer(tiny_config(run_dir, shards, *extra), setup())


def _step(t: Trainer, step: int):
    batch = next(t.data)
    batch.pop("skipped")
    return batch, t.task.train_step(batch, step, lambda phase: None)


@pytest.mark.parametrize("mode", ["reuse", "regenerate"])
def test_d_step_fakes(tmp_path, shards32, mode):
    """reuse: D sees the G step's fakes; regenerate: the updated G's, with the same z.
    Without spectral norm (its power iteration moves u at every training forward) a G forward
    in train mode is a pure function of the weights and the batch, so it can be redone here."""
    t = _trainer(tmp_path / "run", shards32, f"train.d_fakes={mode}", "model.spectral_norm=false")
    seen = []
    t.task.D.register_forward_pre_hook(lambda module, args: seen.append(args[1].detach().clone()))
    batch, out = _step(t, 0)
    n = batch["image"].shape[0]
    d_step_fakes = seen[-1][:n]  # D's calls: the G step's (frozen D), then the D step's
    with torch.no_grad():
        label = step_tensors(batch, torch.device("cpu"), ("label",))["label"]  # the loader's uint8, as the step takes it
        updated = t.task.G(onehot(label, t.cfg.model.num_classes), t.task.step_noise(0, n))
    assert not torch.equal(out.visuals["fake"], updated)  # G did move
    if mode == "reuse":
        assert torch.equal(d_step_fakes, out.visuals["fake"])
    else:
        torch.testing.assert_close(d_step_fakes, updated, rtol=0, atol=0)


def test_ema_follows_its_recurrence_and_copies_buffers(tmp_path, shards32):
    t = _trainer(tmp_path / "run", shards32, "train.ema=0.9")
    expected = [p.detach().clone() for p in t.task.G.parameters()]
    for step in range(3):
        _step(t, step)
        decay = min(0.9, (1 + step) / (10 + step))
        expected = [e + (1 - decay) * (p.detach() - e) for e, p in zip(expected, t.task.G.parameters())]
    for e, a in zip(expected, t.task.ema.module.parameters()):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)
    for b_ema, b in zip(t.task.ema.module.buffers(), t.task.G.buffers()):
        assert torch.equal(b_ema, b)
    assert not t.task.ema.module.training and t.task.G.training


def test_ema_is_checkpointed_and_resumes_exactly(tmp_path, shards32):
    common = ["train.ema=0.99", "checkpoint.every=2"]
    straight = _trainer(tmp_path / "a", shards32, "train.max_steps=4", *common)
    straight.fit()
    _trainer(tmp_path / "b", shards32, "train.max_steps=2", *common).fit()
    resumed = _trainer(tmp_path / "b", shards32, "train.max_steps=4", *common)
    resumed.fit()
    state = resumed.state_dict()
    assert "G_ema" in state and state["G_ema_updates"] == 4
    for key, value in straight.task.ema.module.state_dict().items():
        assert torch.equal(value, resumed.task.ema.module.state_dict()[key]), key


def test_samples_use_the_ema_generator(tmp_path, shards32):
    t = _trainer(tmp_path / "run", shards32, "train.ema=0.5")
    batch, out = _step(t, 0)
    with torch.no_grad():
        t.task.ema.module.conv_img.bias.add_(0.5)  # the grid must change with the average, not with G
    grid_a = t.task.sample_grid(batch, out)
    with torch.no_grad():
        t.task.ema.module.conv_img.bias.sub_(0.5)
    assert (grid_a != t.task.sample_grid(batch, out)).any()


def test_learning_rates_decay_linearly_over_the_last_steps(tmp_path, shards32):
    t = _trainer(tmp_path / "run", shards32, "train.max_steps=6", "optim.decay_steps=4", "optim.lr_g=1e-3",
                 "optim.lr_d=4e-3")
    seen = []
    for step in range(6):
        _step(t, step)
        seen.append(t.task.engine.learning_rates())
    factors = [1, 1, 1, 0.75, 0.5, 0.25]
    assert [round(lr["G"] / 1e-3, 6) for lr in seen] == factors
    assert [round(lr["D"] / 4e-3, 6) for lr in seen] == factors
