"""The per-rank Prometheus exporter: names, labels, values, ports, targets, restarts, MFU."""

from __future__ import annotations

import json
import math
import socket
import time
import urllib.request
from collections import defaultdict

import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import tiny_config
from ssgan_dist import telemetry as tm
from ssgan_dist.config import load_config
from ssgan_dist.distributed.env import DistEnv
from ssgan_dist.errors import SetupError
from ssgan_dist.tasks.gan import SERIES, GANTask
from ssgan_dist.telemetry import PrometheusTelemetry, Telemetry, build_telemetry

PHASES = SERIES.phases

LOSSES = {"g_gan": 0.5, "g_fm": 1.5, "g_vgg": 0.0, "g_total": 2.0, "d_hinge": 1.9}
LRS = {"G": 2e-4, "D": 4e-4}
Samples = dict[str, list[tuple[dict[str, str], float]]]


def _env(rank: int = 0, local_rank: int = 0) -> DistEnv:
    return DistEnv(rank, 1, local_rank, "node-a", torch.device("cpu"), "gloo")


def _exporter(*overrides: str, env: DistEnv | None = None) -> PrometheusTelemetry:
    cfg = load_config("demo", ["metrics.enabled=true", "metrics.port=0", "run.name=unit", *overrides])
    return PrometheusTelemetry(cfg.metrics, env or _env(), job=cfg.run.name, series=SERIES, flops_per_image=1e9,
                               precision=cfg.train.precision)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse(text: str) -> Samples:
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def _scrape(t: PrometheusTelemetry) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{t.port}/metrics", timeout=5) as r:
        return _parse(r.read().decode())


def _value(samples: Samples, name: str, **labels: str) -> float:
    found = [v for lab, v in samples[name] if labels.items() <= lab.items()]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


class SlowSGD(torch.optim.SGD):
    """An optimizer whose step takes a known time: what the optimizer-step hooks must split off."""

    def __init__(self, seconds: float = 0.0):
        super().__init__([torch.zeros(1, requires_grad=True)], lr=0.1)
        self.seconds = seconds

    def step(self, closure=None):
        time.sleep(self.seconds)


def _step(t: Telemetry, losses: dict[str, float] = LOSSES, images: int = 4, skipped: bool = False) -> None:
    """What the trainer does: wait for data, G step (backward + optimizer), D step (same)."""
    opt = SlowSGD()
    t.begin_step()
    t.lap("data_wait")
    opt.step()
    t.lap("g_step")
    opt.step()
    t.lap("d_step")
    t.end_step(images, losses, LRS, skipped)


def test_disabled_is_the_do_nothing_base():
    cfg = load_config("demo", [])
    t = build_telemetry(cfg.metrics, _env(), job=cfg.run.name, series=SERIES, flops_per_image=lambda: 1e9,
                        precision=cfg.train.precision)
    assert type(t) is Telemetry
    _step(t)
    t.samples_skipped(3)
    t.checkpoint_saved()
    t.at_step(1, 10)
    t.evaluated(1, {"fid": 1.0})
    t.close()


def test_exports_every_metric_with_job_rank_node_labels():
    t = _exporter("train.precision=fp32", "metrics.peak_flops=1e12", env=_env(rank=3))
    try:
        _step(t)
        _step(t, {**LOSSES, "d_hinge": math.nan}, skipped=True)
        t.samples_skipped(2)
        t.at_step(2, 100)
        t.evaluated(2, {"fid": 123.8, "ssim": 0.285, "unknown": 1.0})
        s = _scrape(t)
    finally:
        t.close()
    base = {"job": "unit", "rank": "3", "node": "node-a"}
    for name, values in s.items():
        if name.startswith("ssgan_"):
            assert all(base.items() <= lab.items() for lab, _ in values), name
    assert _value(s, "ssgan_images_trained_total") == 8
    assert _value(s, "ssgan_steps_total") == 2
    for phase in PHASES:
        assert _value(s, "ssgan_step_phase_seconds_count", phase=phase) == 2
        assert _value(s, "ssgan_step_phase_seconds_sum", phase=phase) >= 0
    assert _value(s, "ssgan_loss", term="g_total") == 2.0
    assert math.isnan(_value(s, "ssgan_loss", term="d_hinge"))
    assert _value(s, "ssgan_nonfinite_steps_skipped_total") == 1
    assert _value(s, "ssgan_learning_rate", net="D") == 4e-4
    assert _value(s, "ssgan_gpu_memory_allocated_bytes") == 0  # CPU: 0, not absent
    assert _value(s, "ssgan_gpu_memory_peak_bytes") == 0
    assert 0 < _value(s, "ssgan_mfu_ratio")
    assert _value(s, "ssgan_data_samples_skipped_total") == 2
    assert _value(s, "ssgan_restarts_total") == 0
    assert abs(_value(s, "ssgan_last_checkpoint_timestamp_seconds") - time.time()) < 60  # process start
    assert not [n for n in s if "checkpoint_age" in n]  # a timestamp, not an age (Prometheus computes that)
    assert (_value(s, "ssgan_step"), _value(s, "ssgan_max_steps")) == (2, 100)
    assert (_value(s, "ssgan_eval_fid"), _value(s, "ssgan_eval_ssim"), _value(s, "ssgan_eval_step")) == (123.8, 0.285, 2)
    assert "ssgan_eval_unknown" not in s  # only the task's declared scores: a fixed set of series
    assert abs(_value(s, "ssgan_last_step_timestamp_seconds") - time.time()) < 60
    assert not [n for n in s if n.endswith("_created")]


def test_mfu_is_model_flops_over_wall_time_and_peak():
    t = _exporter("metrics.peak_flops=1e10")
    try:
        t.begin_step()
        time.sleep(0.05)
        t.lap("g_step")
        t.end_step(4, LOSSES, LRS)
        mfu = _value(_parse(generate_latest(t.registry).decode()), "ssgan_mfu_ratio")
    finally:
        t.close()
    ceiling = 1e9 * 4 / 0.05 / 1e10  # the step took at least 50 ms
    assert ceiling / 20 < mfu <= ceiling


def test_port_taken_fails_naming_metrics_port():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(SetupError, match=rf"metrics\.port.*127\.0\.0\.1:{port}.*metrics\.port=0") as err:
            _exporter(f"metrics.port={port}")
    message = str(err.value)
    assert "another run" not in message.lower()  # it says what to do, not whom to blame
    assert f"sport = :{port}" in message and "metrics.port=N" in message and "metrics.enabled=false" in message


def test_rank_serves_on_port_plus_local_rank():
    base = _free_port() - 1
    t = _exporter(f"metrics.port={base}", env=_env(rank=5, local_rank=1))
    try:
        assert t.port == base + 1
        assert _value(_scrape(t), "ssgan_steps_total", rank="5") == 0
    finally:
        t.close()


def test_port_zero_picks_free_ports_and_targets_list_them(tmp_path):
    targets = tmp_path / "targets"
    a = _exporter("run.name=run-a", f"metrics.file_sd={targets}/")
    b = _exporter("run.name=run-b", f"metrics.file_sd={targets}/")
    try:
        assert a.port != b.port
        groups = {p.name: json.loads(p.read_text()) for p in targets.iterdir()}
        assert groups == {
            "run-a.json": [{"targets": [f"127.0.0.1:{a.port}"], "labels": {"job": "run-a", "rank": "0", "node": "node-a"}}],
            "run-b.json": [{"targets": [f"127.0.0.1:{b.port}"], "labels": {"job": "run-b", "rank": "0", "node": "node-a"}}],
        }
    finally:
        a.close()
    assert sorted(p.name for p in targets.iterdir()) == ["run-b.json"]  # a finished run withdraws its targets
    b.close()


def test_targets_path_file_or_directory(tmp_path):
    cfg = load_config("demo", ["run.name=x", f"metrics.file_sd={tmp_path}/t.json"])
    assert tm.targets_path(cfg.metrics, cfg.run.name) == tmp_path / "t.json"
    cfg.metrics.file_sd = str(tmp_path)  # an existing directory, no trailing slash
    assert tm.targets_path(cfg.metrics, cfg.run.name) == tmp_path / "x.json"
    cfg.metrics.file_sd = ""
    assert tm.targets_path(cfg.metrics, cfg.run.name) is None


def test_targets_are_written_atomically_for_every_rank(tmp_path):
    path = tmp_path / "t.json"
    endpoints = [tm.Endpoint(1, "n2", "n2", 9401), tm.Endpoint(0, "n1", "::1", 9400)]
    tm.write_targets(path, endpoints, "job")
    assert json.loads(path.read_text()) == [
        {"targets": ["[::1]:9400"], "labels": {"job": "job", "rank": "0", "node": "n1"}},
        {"targets": ["n2:9401"], "labels": {"job": "job", "rank": "1", "node": "n2"}},
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]  # no temp file left behind


def test_restarts_from_launchers_and_checkpoints(monkeypatch):
    assert Telemetry().restarts == 0
    base = Telemetry()
    base.load_state_dict({"restarts": 0})
    assert base.state_dict() == {"restarts": 1}  # a resumed run is one restart more
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    t = _exporter()
    try:
        assert _value(_scrape(t), "ssgan_restarts_total") == 3
        t.load_state_dict({"restarts": 4})
        assert _value(_scrape(t), "ssgan_restarts_total") == 5
        assert t.state_dict() == {"restarts": 5}
    finally:
        t.close()


def test_checkpoint_timestamp_is_the_time_of_the_last_checkpoint(monkeypatch):
    t = _exporter()
    try:
        later = time.time() + 120.0
        monkeypatch.setattr(tm.time, "time", lambda: later)
        t.checkpoint_saved()
        assert _value(_parse(generate_latest(t.registry).decode()), "ssgan_last_checkpoint_timestamp_seconds") == later
    finally:
        monkeypatch.undo()
        t.close()


@pytest.mark.parametrize("name, precision, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H200", "fp32", 495e12),
    ("NVIDIA A100-SXM4-80GB", "fp16", 312e12),
    ("Some Future GPU", "bf16", None),
])
def test_peak_flops_table(monkeypatch, name, precision, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cfg = load_config("demo", [])
    cfg.train.precision = precision
    assert tm.peak_flops(cfg.metrics, cfg.train.precision, torch.device("cuda", 0)) == expected
    cfg.metrics.peak_flops = 5e14
    assert tm.peak_flops(cfg.metrics, cfg.train.precision, torch.device("cuda", 0)) == 5e14


def test_peak_flops_on_cpu():
    cfg = load_config("demo", [])
    assert tm.peak_flops(cfg.metrics, cfg.train.precision, torch.device("cpu")) == tm.CPU_PEAK_FLOPS


def test_train_flops_count_forward_and_backward_of_both_steps(tmp_path):
    from ssgan_dist.summary import count_flops

    cfg = tiny_config(tmp_path, tmp_path)
    counts = count_flops(cfg)
    g, d = counts["generator"]["flops"], counts["discriminator"]["flops"]
    assert GANTask.flops_per_image(cfg) == 3 * g + 12 * d > 0


def test_phase_timer_splits_optimizer_steps_off_their_phase():
    timer = tm.PhaseTimer(torch.device("cpu"))
    opt = SlowSGD(0.02)
    try:
        opt.step()  # outside a timed step: ignored
        timer.start()
        time.sleep(0.01)
        timer.lap("data_wait")
        opt.step()
        timer.lap("g_step")
        time.sleep(0.03)
        opt.step()
        timer.lap("d_step")
        time.sleep(0.01)  # after the last lap: not a phase
        [(phases, wall)] = timer.stop()
    finally:
        timer.close()
    assert set(phases) == {"data_wait", "g_step", "d_step", "optimizer"}
    assert phases["optimizer"] >= 0.04
    assert phases["d_step"] >= 0.03 > phases["g_step"]  # the sleeps landed where they were, not in g_step
    assert phases["data_wait"] >= 0.01
    assert wall >= sum(phases.values()) + 0.01


def test_trainer_reports_steps_phases_checkpoints_and_restarts(tmp_path, shards32):
    from ssgan_dist.distributed.env import setup
    from ssgan_dist.train import Trainer

    def run(max_steps: int) -> tuple[Samples, Trainer]:
        cfg = tiny_config(tmp_path / "run", shards32, f"train.max_steps={max_steps}", "checkpoint.every=3",
                          "metrics.enabled=true", "metrics.port=0", "run.name=fit")
        trainer = Trainer(cfg, setup())
        trainer.fit()
        return _parse(generate_latest(trainer.telemetry.registry).decode()), trainer

    s, trainer = run(3)
    assert _value(s, "ssgan_steps_total") == 3
    assert _value(s, "ssgan_images_trained_total") == 3 * trainer.cfg.train.batch_size
    for phase in PHASES:
        assert _value(s, "ssgan_step_phase_seconds_count", phase=phase) == 3, phase
    assert _value(s, "ssgan_learning_rate", net="G") == trainer.cfg.optim.lr_g
    assert all(math.isfinite(v) for _, v in s["ssgan_loss"]) and len(s["ssgan_loss"]) == 5
    assert _value(s, "ssgan_restarts_total") == 0
    assert time.time() - _value(s, "ssgan_last_checkpoint_timestamp_seconds") < 30  # the checkpoint at step 3
    assert (_value(s, "ssgan_step"), _value(s, "ssgan_max_steps")) == (3, 3)

    s, _ = run(5)  # resumes from step 3
    assert _value(s, "ssgan_steps_total") == 2
    assert (_value(s, "ssgan_step"), _value(s, "ssgan_max_steps")) == (5, 5)  # the run's step, not this process's
    assert _value(s, "ssgan_restarts_total") == 1


def test_second_run_on_a_taken_port_stops_with_a_clear_message(tmp_path, shards32, capsys):
    from conftest import TINY
    from ssgan_dist.train import main

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code = main([*TINY, f"run.dir={tmp_path}", f"data.shards={shards32}", "metrics.enabled=true",
                     f"metrics.port={port}"])
    assert code == 2
    assert f"metrics.port: rank 0 cannot serve metrics on 127.0.0.1:{port}" in capsys.readouterr().err


def test_default_port_range_is_clear_of_exporters_and_torchrun():
    """Ranks 0..7 of a node on metrics.port..+7: outside the Prometheus exporters' allocated
    9100-9999 (dcgm-exporter 9400, node-exporter 9100, ...), torchrun's 29400/29500 and the
    Linux ephemeral range (a client socket could hold such a port)."""
    base = load_config("demo").metrics.port
    ports = set(range(base, base + 8))
    assert not ports & set(range(9100, 10000))
    assert not ports & {29400, 29500, 6006, 8265, 8888, 3000, 9090}
    assert not ports & set(range(32768, 61000))
