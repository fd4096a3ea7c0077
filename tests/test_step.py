"""The training step's speed machinery against what it promises, in one process: a step reads
nothing on the host (the loop reads when it logs), a skipped update is skipped on the device,
k accumulated micro-batches train like one batch k times larger, and the settings that cannot
combine are refused by name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from conftest import tiny_config
from ssgan_dist.config import ConfigError, EngineConfig, load_config
from ssgan_dist.distributed.deepspeed_engine import deepspeed_config
from ssgan_dist.distributed.engine import DDPEngine
from ssgan_dist.distributed.env import setup
from ssgan_dist.distributed.optim import NetSpec
from ssgan_dist.train import Trainer

HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy}
PACKAGE = str(Path(__file__).resolve().parents[1] / "ssgan_dist")


class HostReads(TorchFunctionMode):
    """Records every read of a tensor's value by the host (on a GPU: a wait for the device),
    with the ssgan_dist function that made it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            frame = sys._getframe(1)
            while frame is not None and not frame.f_code.co_filename.startswith(PACKAGE):
                frame = frame.f_back
            where = f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}" if frame else "outside ssgan_dist"
            self.seen.append((func.__name__, where))
        return func(*args, **(kwargs or {}))


def _trainer(run_dir: Path, shards: Path, *extra: str) -> Trainer:
    return Trainer(tiny_config(run_dir, shards, *extra), setup())


def _batch(t: Trainer) -> dict:
    batch = next(t.data)
    batch.pop("skipped")
    return batch


@pytest.mark.parametrize("extra", [
    ["train.d_fakes=reuse", "train.ema=0.9", "optim.decay_steps=3", "train.accum_steps=2"],
    ["train.d_fakes=regenerate", "train.ema=0.9"],
    ["run.task=segmenter", "train.accum_steps=2"],
], ids=["gan-reuse", "gan-regenerate", "segmenter"])
def test_a_step_reads_nothing_on_the_host(tmp_path, shards32, extra):
    """Not the loss, not the non-finite flag, not the EMA's counter: on a GPU any such read
    makes the host wait for the device at every step."""
    t = _trainer(tmp_path / "run", shards32, *extra)
    t.task.train_step(_batch(t), 0, lambda phase: None)  # first step: optimizer state is created
    batch = _batch(t)
    with HostReads() as reads:
        out = t.task.train_step(batch, 1, lambda phase: None)
    assert reads.seen == []
    losses, skipped = out.read()  # what the loop does when it logs
    assert set(losses) == set(t.task.series.terms) and all(isinstance(v, float) for v in losses.values())
    assert skipped is False


def test_the_loop_reads_only_when_it_logs_or_checkpoints(tmp_path, shards32):
    """Steps 1-6, logging every 3: the steps' outputs are read twice, three steps at a time,
    and no step reads anything itself."""
    t = _trainer(tmp_path / "run", shards32, "train.max_steps=6", "train.log_every=3", "checkpoint.every=1000")
    in_steps: list[tuple[str, str]] = []
    reads: list[tuple[int, int]] = []  # (step, outputs read)
    original_step, original_read = t.train_step, t.read_steps

    def train_step(batch):
        with HostReads() as seen:
            out = original_step(batch)
        in_steps.extend(seen.seen)
        return out

    def read_steps():
        if t._unread:
            reads.append((t.step, len(t._unread)))
        return original_read()

    t.train_step, t.read_steps = train_step, read_steps
    t.fit()
    assert in_steps == []
    assert reads == [(3, 3), (6, 3)]


def _engine(precision: str = "fp32") -> DDPEngine:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    return DDPEngine(EngineConfig(), setup(), {"N": NetSpec(net, 1e-2, (0.0, 0.999))}, precision=precision,
                     channels_last=False)


def _state(engine: DDPEngine) -> list[torch.Tensor]:
    opt = engine.opt["N"]
    return [p.detach().clone() for p in engine.module("N").parameters()] + \
        [v.clone() for s in opt.state.values() for v in s.values()]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_skipped_step_leaves_weights_and_adam_untouched(precision):
    """The device flag skips the update, Adam's moments and its step count (fused Adam's
    found_inf); fp16's scaler also backs its scale off, as for an overflow."""
    engine = _engine(precision)
    x = torch.randn(16, 4)
    for skip in (0.0, 0.0):  # two real steps: Adam's state exists
        engine.backward("N", engine.module("N")(x).square().mean())
        engine.step("N", torch.tensor(skip))
    before, scale = _state(engine), engine.scaler["N"].get_scale()
    engine.backward("N", engine.module("N")(x).square().mean())
    engine.step("N", torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, _state(engine)))
    assert all(p.grad is None for p in engine.module("N").parameters())  # dropped all the same
    if precision == "fp16":
        assert engine.scaler["N"].get_scale() == scale * 0.5
    engine.backward("N", engine.module("N")(x).square().mean())
    engine.step("N", torch.tensor(0.0))
    assert not torch.equal(before[0], _state(engine)[0])


def test_adam_state_of_another_implementation_loads_and_steps():
    """A checkpoint whose Adam was not fused (another device, an older version) keeps this
    engine's fused Adam, so the device-side skip still works after resume."""
    engine = _engine()
    plain = torch.optim.Adam(engine.module("N").parameters(), lr=1e-2, foreach=False)
    engine.module("N")(torch.randn(2, 4)).sum().backward()
    plain.step()
    engine.load_state_dict({"N": engine.module("N").state_dict(), "opt_n": plain.state_dict(),
                            "scaler_n": engine.scaler["N"].state_dict()})
    assert engine.opt["N"].param_groups[0]["fused"]
    before = _state(engine)
    engine.backward("N", engine.module("N")(torch.randn(2, 4)).sum())
    engine.step("N", torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, _state(engine)))


def _applied(t: Trainer, batch: dict) -> dict[str, list[torch.Tensor]]:
    """The gradients each network's optimizer step applies in one step on ``batch``."""
    engine, applied = t.task.engine, {}
    original = engine.step

    def step(name: str, skip: torch.Tensor) -> None:
        applied[name] = [p.grad.detach().clone() for p in engine.module(name).parameters()]
        original(name, skip)

    engine.step = step
    t.task.train_step(batch, 0, lambda phase: None)
    return applied


def _worst(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest difference of a tensor, relative to its norm plus 1e-3 of the network's: a
    tensor whose exact gradient is 0 (D's last bias under a balanced hinge, a conv bias before
    a BatchNorm) holds rounding noise, which no two summation orders share."""
    total = float(torch.cat([g.flatten() for g in a]).norm())
    return max(float((x - y).norm()) / (float(x.norm()) + 1e-3 * total) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("d_fakes", ["reuse", "regenerate"])
def test_accumulated_micro_batches_train_like_one_larger_batch(tmp_path, shards32, d_fakes):
    """2 micro-batches of 2 == 1 batch of 4 (same samples, same z), compared on the gradients
    the step applies. What differs is batch statistics, so they are switched off: G's SPADE
    BatchNorms in eval mode, no spectral norm (each training forward runs one more power
    iteration). With the BatchNorms in training mode the two do differ, as documented."""
    common = ["model.spectral_norm=false", f"train.d_fakes={d_fakes}", "train.batch_size=4"]
    results = {}
    for bn_eval in (True, False):
        for name, extra in (("large", []), ("accumulated", ["train.batch_size=2", "train.accum_steps=2"])):
            t = _trainer(tmp_path / f"{name}-{bn_eval}", shards32, *common, *extra)
            if bn_eval:
                for m in t.task.G.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.eval()
            results[name, bn_eval] = _applied(t, _batch(t))
    for net in ("G", "D"):
        assert _worst(results["large", True][net], results["accumulated", True][net]) < 1e-3, net
    assert _worst(results["large", False]["G"], results["accumulated", False]["G"]) > 1e-2


def test_segmenter_accumulation_is_exactly_one_larger_batch(tmp_path, shards32):
    """Per-sample GroupNorms and the loss weighted by labelled stroke pixels: nothing differs."""
    large = _trainer(tmp_path / "a", shards32, "run.task=segmenter", "train.batch_size=4")
    accumulated = _trainer(tmp_path / "b", shards32, "run.task=segmenter", "train.batch_size=2",
                           "train.accum_steps=2")
    a, b = _applied(large, _batch(large)), _applied(accumulated, _batch(accumulated))
    assert _worst(a["S"], b["S"]) < 1e-4


@pytest.mark.parametrize("key", ["train.accum_steps=2", "train.compile=true"])
def test_deepspeed_refuses_what_it_cannot_do(key):
    with pytest.raises(ConfigError) as err:
        load_config("demo", ["engine.name=deepspeed", key])
    assert key.split("=")[0] in str(err.value) and "engine.name=ddp" in str(err.value)


def test_deepspeed_gets_the_bucket_and_the_compression():
    ds = deepspeed_config(EngineConfig(grad_compression="bf16", bucket_mb=8.0, zero_stage=2), "bf16", 4)
    assert ds["communication_data_type"] == "bf16"
    assert ds["zero_optimization"]["reduce_bucket_size"] == 8 * 2**20 // 4
    assert "communication_data_type" not in deepspeed_config(EngineConfig(), "fp32", 4)


def test_regenerated_fakes_count_one_more_g_forward_in_mfu(tmp_path):
    from ssgan_dist.summary import count_flops
    from ssgan_dist.tasks.gan import GANTask

    reuse = tiny_config(tmp_path, tmp_path)
    regenerate = tiny_config(tmp_path, tmp_path, "train.d_fakes=regenerate")
    g = count_flops(reuse)["generator"]["flops"]
    assert GANTask.flops_per_image(regenerate) - GANTask.flops_per_image(reuse) == g > 0
