"""Scalars where GAN users look: run.dir/scalars.jsonl always, TensorBoard event files when the
package is installed; both read back (TensorBoard's with its own reader) and compared with
the losses the training loop saw."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from conftest import tiny_config
from ssgan_dist import checkpoint as ckpt
from ssgan_dist.distributed.env import setup
from ssgan_dist.scalars import JSONL, TENSORBOARD_DIR, ScalarWriter
from ssgan_dist.train import Trainer

TERMS = ("g_gan", "g_fm", "g_vgg", "g_total", "d_hinge")
needs_fidelity = pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None,
                                    reason="torch-fidelity not installed (pip install -e '.[eval]')")


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / JSONL).read_text().splitlines()]


def _accumulator(run_dir):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(run_dir / TENSORBOARD_DIR),
                                             size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
    acc.Reload()
    return acc


class Recording(Trainer):
    """The trainer, remembering every step's losses as the loop got them."""

    def train_step(self, batch):
        out = super().train_step(batch)
        self.seen = {**getattr(self, "seen", {}), self.step + 1: dict(out.losses)}
        return out


def test_jsonl_and_tensorboard_hold_each_logged_steps_losses_lr_and_throughput(tmp_path, shards32):
    run = tmp_path / "run"
    trainer = Recording(tiny_config(run, shards32, "train.max_steps=5", "train.log_every=2", "train.sample_every=4"),
                        setup())
    last = trainer.fit()
    records = _records(run)
    assert [r["step"] for r in records] == [2, 4, 5]  # every log_every steps and the last
    for r in records:
        assert {f"loss/{t}" for t in TERMS} | {"lr/G", "lr/D", "perf/img_per_s", "step", "time"} == set(r)
        assert all(r[f"loss/{t}"] == trainer.seen[r["step"]][t] for t in TERMS), r  # exact: JSON keeps doubles
        assert r["lr/G"] == trainer.cfg.optim.lr_g and r["perf/img_per_s"] > 0 and r["time"] > 1.7e9
    assert {f"loss/{t}": v for t, v in last.items()} == {k: v for k, v in records[-1].items() if k.startswith("loss/")}

    acc = _accumulator(run)
    for t in TERMS:
        events = acc.Scalars(f"loss/{t}")
        assert [e.step for e in events] == [2, 4, 5]
        for e, r in zip(events, records):
            assert math.isclose(e.value, r[f"loss/{t}"], rel_tol=1e-6, abs_tol=1e-7)  # float32 in the event file
    assert [e.value for e in acc.Scalars("lr/D")] == pytest.approx([trainer.cfg.optim.lr_d] * 3)
    assert [e.step for e in acc.Scalars("perf/img_per_s")] == [2, 4, 5]
    images = acc.Images("samples")
    assert [i.step for i in images] == [4, 5]  # every sample grid
    assert images[-1].width > 0 and images[-1].height > 0


def test_a_resumed_run_logs_every_step_once(tmp_path, shards32):
    """A run that dies after logging steps 3 and 4 but before their checkpoint: the resumed run
    drops those lines and events and logs the steps again, so each step appears once."""
    run = tmp_path / "run"
    common = ["train.log_every=1", "checkpoint.every=2"]
    Trainer(tiny_config(run, shards32, "train.max_steps=4", *common), setup()).fit()
    ckpt.list_checkpoints(run)[-1].unlink()  # as if killed after step 4's lines, before its checkpoint
    with (run / JSONL).open("a") as f:
        f.write('{"step": 5, "loss/g_ga')  # and a line cut short by the kill
    resumed = Trainer(tiny_config(run, shards32, "train.max_steps=6", *common), setup())
    resumed.fit()
    assert [r["step"] for r in _records(run)] == [1, 2, 3, 4, 5, 6]
    acc = _accumulator(run)
    assert sorted(e.step for e in acc.Scalars("loss/g_total")) == [1, 2, 3, 4, 5, 6]
    # Also in the files themselves, for readers that ignore purge_step (TensorBoard's Rust loader).
    assert sorted(_raw_steps(run, "loss/g_total")) == [1, 2, 3, 4, 5, 6]


def _raw_steps(run_dir, tag: str) -> list[int]:
    """The steps of every event of ``tag`` in every event file, read record by record."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    steps = []
    for path in sorted((run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*")):
        for event in map(Event.FromString, RawEventFileLoader(str(path)).Load()):
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps


def test_scalar_writer_without_tensorboard_writes_jsonl_only(tmp_path):
    writer = ScalarWriter(tmp_path, tensorboard=False)
    writer.log(3, {"loss/x": 1.5, "eval/fid": 20.0})
    writer.image("samples", 3, np.zeros((8, 8, 3), np.uint8))
    writer.close()
    (record,) = _records(tmp_path)
    assert record["step"] == 3 and record["loss/x"] == 1.5 and record["eval/fid"] == 20.0
    assert not (tmp_path / TENSORBOARD_DIR).exists()


@pytest.mark.slow
@needs_fidelity
def test_evaluation_during_training_lands_in_jsonl_tensorboard_and_metrics(tmp_path, shards32):
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    import torch

    from test_evaluate import _random_inception_state

    weights = tmp_path / "inception.pth"
    torch.save(_random_inception_state(tmp_path), weights)
    run = tmp_path / "run"
    cfg = tiny_config(run, shards32, "train.max_steps=3", "train.log_every=2", "eval.every=3",
                      f"eval.shards={shards32}", f"eval.inception_weights={weights}", "eval.max_samples=4",
                      f"data.cache_dir={tmp_path / 'cache'}", "metrics.enabled=true", "metrics.port=0")
    trainer = Trainer(cfg, setup())
    trainer.fit()
    records = {r["step"]: r for r in _records(run)}
    assert set(records) == {2, 3}
    assert "eval/fid" not in records[2]
    assert records[3]["eval/fid"] == trainer.last_eval["fid"] and records[3]["eval/ssim"] == trainer.last_eval["ssim"]
    acc = _accumulator(run)
    assert [(e.step, round(e.value, 3)) for e in acc.Scalars("eval/fid")] == [(3, round(trainer.last_eval["fid"], 3))]
    metrics = {s.name: s.value for f in text_string_to_metric_families(generate_latest(trainer.telemetry.registry)
                                                                       .decode()) for s in f.samples}
    assert metrics["ssgan_eval_fid"] == pytest.approx(trainer.last_eval["fid"])
    assert metrics["ssgan_eval_ssim"] == pytest.approx(trainer.last_eval["ssim"])
    assert metrics["ssgan_eval_step"] == 3 and metrics["ssgan_step"] == 3 and metrics["ssgan_max_steps"] == 3
