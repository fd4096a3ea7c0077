"""Per-rank Prometheus exporter and step-phase timers.

Every rank serves its own ``/metrics`` on ``metrics.addr:metrics.port + local_rank``;
Prometheus does the cross-rank aggregation (sum of throughput, median step time), so the
training step pays no collective for its metrics, only a few lock-protected additions
(measured in bench/telemetry_overhead.py). Names follow Prometheus conventions: prefix
``ssgan_``, base units (seconds, bytes, ratio), ``_total`` on counters; labels are job
(run.name), rank and node, plus one small fixed label where a metric has parts (phase,
term, net). ``metrics.enabled=false`` gives the base :class:`Telemetry`, whose methods do
nothing, so the trainer calls it unconditionally.

Rank 0 writes the Prometheus file_sd targets (host:port and labels of every rank) when
``metrics.file_sd`` is set, and removes them when the run finishes, so a finished run does
not look like a dead rank while a crashed one does.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ssgan_dist.config import MetricsConfig
from ssgan_dist.distributed.collectives import gather_to_all
from ssgan_dist.distributed.env import DistEnv, launcher_restarts
from ssgan_dist.errors import SetupError
from ssgan_dist.files import write_json

log = logging.getLogger(__name__)
# Step phases last from ~1 ms (tiny CPU tests, small GPU phases) to tens of seconds (256 px on CPU).
PHASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Dense peak FLOP/s per device by train.precision, first name match wins. fp32 counts TF32
# tensor-core rates because cuDNN convolutions (most of SSGAN's FLOPs) use TF32 by default.
GPU_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
)
# Per process on CPU: about the fp32 matmul peak of the 2-core CI machine (~119 GFLOP/s
# measured); set metrics.peak_flops for a real CPU host.
CPU_PEAK_FLOPS = 1.0e11


# Exporters serving in this process. A forked child (a DataLoader worker) must not keep their
# listening sockets: an orphaned child of a killed trainer would hold the port. The hook runs
# in every child forked after this module is imported and closes its copies of them.
_SERVERS: weakref.WeakSet[Any] = weakref.WeakSet()


def _close_servers_in_child() -> None:
    for server in list(_SERVERS):
        server.socket.close()  # the child's copy of the descriptor; the parent keeps serving


os.register_at_fork(after_in_child=_close_servers_in_child)


@dataclass(frozen=True)
class MetricSeries:
    """The label values a task's metrics take, fixed at start (no high-cardinality labels):
    its step phases (lapped by its step), loss terms and networks, and the scores its
    evaluation during training reports (each one gauge, ``ssgan_eval_<score>``)."""

    step_phases: tuple[str, ...]
    terms: tuple[str, ...]
    nets: tuple[str, ...]
    scores: tuple[str, ...] = ()

    @property
    def phases(self) -> tuple[str, ...]:
        """Every phase of a step: waiting for the batch, the task's own, the optimizer steps."""
        return ("data_wait", *self.step_phases, "optimizer")


@dataclass(frozen=True)
class Endpoint:
    """One rank's exporter as the others learn of it (or why it could not start)."""
    rank: int
    node: str
    host: str
    port: int
    error: str = ""

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def peak_flops(metrics: MetricsConfig, precision: str, device: torch.device) -> float | None:
    """metrics.peak_flops, else the table's value for this device and train.precision; None if unknown."""
    if metrics.peak_flops > 0:
        return metrics.peak_flops
    if device.type != "cuda":
        return CPU_PEAK_FLOPS
    name = torch.cuda.get_device_name(device)
    for key, by_precision in GPU_PEAK_FLOPS:
        if key in name:
            return by_precision[precision]
    return None


def targets_path(metrics: MetricsConfig, job: str) -> Path | None:
    """Where rank 0 writes the file_sd targets: metrics.file_sd, or <dir>/<job>.json for a directory."""
    value = metrics.file_sd
    if not value:
        return None
    path = Path(value)
    if value.endswith(os.sep) or path.is_dir():
        target = path / f"{job}.json"
        if target.resolve().parent != path.resolve():  # config.SAFE_NAME already keeps run.name plain
            raise SetupError(f"run.name: {job!r} would put the file_sd targets outside metrics.file_sd={value}")
        return target
    return path


def write_targets(path: Path, endpoints: list[Endpoint], job: str) -> None:
    """Atomically replace ``path`` with one file_sd target group per rank (Prometheus may read it any time)."""
    groups = [{"targets": [e.target], "labels": {"job": job, "rank": str(e.rank), "node": e.node}}
              for e in sorted(endpoints, key=lambda e: e.rank)]
    write_json(path, groups)


class PhaseTimer:
    """Splits one step into named phases, the optimizer steps split off by hooks.

    The trainer marks the end of each phase with ``lap``; the engines run backward and the
    optimizer step in one call, so torch's global optimizer-step hooks mark where each
    optimizer step begins and ends, and that time goes to "optimizer" instead of the phase
    it falls in. Marks outside a timed step are ignored.

    On CUDA the marks are events recorded on the stream, because kernels run after the CPU
    has moved on: host timers would charge every phase to whichever call synchronizes. The
    step does not synchronize, so a step's events are read once the device has passed them,
    at the end of a later step (``stop`` returns the steps whose timings are known by then):
    timing never makes the host wait for the device.
    """

    _OPT_BEGIN, _OPT_END = "<optimizer", "optimizer>"

    def __init__(self, device: torch.device):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._cuda = device.type == "cuda"
        self._events: list[torch.cuda.Event] = []
        self._stamps: list[float] = []
        self._labels: list[str] = []
        self._pending: deque[tuple[list[str], list[torch.cuda.Event]]] = deque()  # CUDA steps not yet read
        self._running = False
        self._t0 = 0.0
        self._hooks = [register_optimizer_step_pre_hook(lambda *_: self._mark(self._OPT_BEGIN)),
                       register_optimizer_step_post_hook(lambda *_: self._mark(self._OPT_END))]

    def start(self) -> None:
        self._labels, self._stamps, self._events = [], [], []  # the pending steps keep theirs
        self._running = True
        self._t0 = time.perf_counter()
        self._mark("")

    def lap(self, phase: str) -> None:
        self._mark(phase)

    def stop(self, wait: bool = False) -> list[tuple[dict[str, float], float]]:
        """[({phase: seconds}, step seconds)] of the steps whose timings are known now: on CPU
        this one (its wall time since start); on CUDA those whose last event the device has
        passed (the device's time from start to the last lap), oldest first, or with ``wait``
        all of them (a benchmark's last step). Time after the last lap is left out of the phases."""
        self._running = False
        if not self._cuda:
            return [(self._split(self._labels, self._stamps), time.perf_counter() - self._t0)]
        self._pending.append((self._labels, self._events))
        if wait:
            self._events[-1].synchronize()
        done = []
        while self._pending and self._pending[0][1][-1].query():
            labels, events = self._pending.popleft()
            times = [0.0] + [events[0].elapsed_time(e) / 1e3 for e in events[1:]]
            done.append((self._split(labels, times), times[-1]))
        return done

    def _split(self, labels: list[str], times: list[float]) -> dict[str, float]:
        n = len(labels)
        out: dict[str, float] = {}
        owner: str | None = None  # the phase a segment belongs to: the next lap after it
        for i in range(n - 1, 0, -1):
            if labels[i] not in (self._OPT_BEGIN, self._OPT_END):
                owner = labels[i]
            name = "optimizer" if labels[i - 1] == self._OPT_BEGIN else owner
            if name is not None:
                out[name] = out.get(name, 0.0) + times[i] - times[i - 1]
        return out

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def _mark(self, label: str) -> None:
        if not self._running:
            return
        self._labels.append(label)
        if not self._cuda:
            self._stamps.append(time.perf_counter())
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self._events.append(event)


class Telemetry:
    """What the trainer reports; this base does nothing (metrics.enabled=false) but count restarts.

    The restart count lives here, not in the exporter, so that it is saved in checkpoints
    whether or not metrics are on: a run resumed with metrics on still shows its history.
    """

    def __init__(self) -> None:
        self.restarts = launcher_restarts()

    def begin_step(self) -> None:
        """Start timing a step (before waiting for its batch)."""

    def lap(self, phase: str) -> None:
        """End the current phase of the step: data_wait or one of the task's step phases (see PhaseTimer)."""

    def end_step(self, images: int, losses: Mapping[str, float], lrs: Mapping[str, float],
                 skipped: int = 0) -> None:
        """Record a finished step: this rank's images, loss terms (the trainer reads them only
        when it logs: empty otherwise), learning rates, and how many steps the trainer found
        skipped for a non-finite loss since it last read them."""

    def samples_skipped(self, count: int) -> None:
        """Bad data samples the loader skipped."""

    def checkpoint_saved(self) -> None:
        """The step's checkpoint is written (every rank calls it, so every rank reports its time)."""

    def at_step(self, step: int, max_steps: int) -> None:
        """The run's step (after a step, and on resume) and where it ends: the ETA's inputs."""

    def evaluated(self, step: int, scores: Mapping[str, float]) -> None:
        """The scores (fid, ssim, ...) of the evaluation at ``step``."""

    def state_dict(self) -> dict[str, int]:
        return {"restarts": self.restarts}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Called on resume: this process is one restart more than the checkpoint's."""
        self.restarts = max(int(state.get("restarts", 0)) + 1, launcher_restarts())

    def close(self) -> None:
        """The run finished normally."""


class PrometheusTelemetry(Telemetry):
    """The exporter of one rank; construction is collective when the process group is up."""

    def __init__(self, metrics: MetricsConfig, env: DistEnv, *, job: str, series: MetricSeries,
                 flops_per_image: float, precision: str):
        # Imported here so a run without metrics never loads the client.
        import prometheus_client as pc
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        super().__init__()
        pc.disable_created_metrics()  # one *_created series per counter doubles the series for nothing
        self.metrics, self.env, self.job = metrics, env, job
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process RSS and CPU: the memory panel on CPU hosts
        base = {"job": job, "rank": str(env.rank), "node": env.node}
        names = tuple(base)

        def metric(kind: Any, name: str, doc: str, extra: tuple[str, ...] = (), **kw: Any) -> Any:
            return kind(name, doc, (*names, *extra), registry=self.registry, **kw)

        self._images = metric(Counter, "ssgan_images_trained_total", "Images this rank trained on.").labels(**base)
        self._steps = metric(Counter, "ssgan_steps_total", "Training steps this process finished.").labels(**base)
        phase = metric(Histogram, "ssgan_step_phase_seconds",
                       "Time of each step phase: data_wait, g_step (G forward+backward), d_step (D forward+backward), "
                       "optimizer (the G and D optimizer steps); a segmenter run: data_wait, s_step, optimizer.",
                       ("phase",), buckets=PHASE_BUCKETS)
        self._phases = {p: phase.labels(**base, phase=p) for p in series.phases}
        self._loss = metric(Gauge, "ssgan_loss", "Loss terms of the last step on this rank.", ("term",))
        self._base = base
        self._losses = {t: self._loss.labels(**base, term=t) for t in series.terms}
        lr = metric(Gauge, "ssgan_learning_rate", "Learning rate of each network.", ("net",))
        self._lrs = {n: lr.labels(**base, net=n) for n in series.nets}
        self._cuda = env.device.type == "cuda"
        # 0 on a CPU device, so that dashboards and alerts see the series on every host.
        self._mem_alloc = metric(Gauge, "ssgan_gpu_memory_allocated_bytes",
                                 "CUDA memory held by tensors (0 without a GPU).").labels(**base)
        self._mem_peak = metric(Gauge, "ssgan_gpu_memory_peak_bytes",
                                "Peak CUDA memory held by tensors since start (0 without a GPU).").labels(**base)
        self._peak = peak_flops(metrics, precision, env.device)
        self._flops = flops_per_image
        if self._peak is None:
            log.warning("MFU not exported: no peak FLOP/s known for %s; set metrics.peak_flops",
                        torch.cuda.get_device_name(env.device))
            self._mfu = None
        else:
            self._mfu = metric(Gauge, "ssgan_mfu_ratio",
                               "Model FLOPs per second of the last step over the device's peak FLOP/s.").labels(**base)
        self._skipped = metric(Counter, "ssgan_data_samples_skipped_total",
                               "Bad data samples skipped by the loader.").labels(**base)
        self._nonfinite = metric(Counter, "ssgan_nonfinite_steps_skipped_total",
                                 "Steps whose update was skipped for a NaN or infinite loss on some rank.").labels(**base)
        self._restarts = metric(Counter, "ssgan_restarts_total",
                                "Times this run was restarted (resumed from a checkpoint or relaunched).").labels(**base)
        self._restarts.inc(self.restarts)
        self._last_step = metric(Gauge, "ssgan_last_step_timestamp_seconds",
                                 "Unix time of the last finished step (process start before the first).").labels(**base)
        self._last_step.set(time.time())
        # A timestamp, not an age: Prometheus computes the age (time() - ...) at query time, and a
        # dead process's last value still says when its last checkpoint was written.
        self._last_ckpt = metric(Gauge, "ssgan_last_checkpoint_timestamp_seconds",
                                 "Unix time of this rank's last checkpoint (process start before the first).").labels(
            **base)
        self._last_ckpt.set(time.time())
        self._step = metric(Gauge, "ssgan_step", "The run's training step (continues across restarts).").labels(**base)
        self._max_steps = metric(Gauge, "ssgan_max_steps", "The step the run ends at (train.max_steps).").labels(**base)
        self._eval_step = metric(Gauge, "ssgan_eval_step", "The training step of the last evaluation.").labels(**base)
        self._scores = {score: metric(Gauge, f"ssgan_eval_{score}",
                                      f"{score.upper()} of the last evaluation during training (eval.every).").labels(
            **base) for score in series.scores}

        self._server: Any = None
        self._targets: Path | None = None
        self._serve()
        self._timer = PhaseTimer(env.device)  # after _serve: a failed start leaves no global hooks behind

    # -- exporter and targets -------------------------------------------------------
    def _serve(self) -> None:
        """Start this rank's server, learn every rank's endpoint, fail together if any failed."""
        from prometheus_client import start_http_server

        m, env = self.metrics, self.env
        port = m.port + env.local_rank if m.port else 0
        host = env.node if m.addr in ("", "0.0.0.0", "::") else m.addr
        error = ""
        if port > 65535:
            error = f"metrics.port: {m.port} + local rank {env.local_rank} is past 65535"
        else:
            try:
                self._server, _ = start_http_server(port, addr=m.addr, registry=self.registry)
                _SERVERS.add(self._server)
                port = self._server.server_port
            except OSError as exc:
                error = (f"metrics.port: rank {env.rank} cannot serve metrics on {m.addr}:{port} of {env.node} "
                         f"(metrics.port={m.port} + local rank {env.local_rank}): {exc.strerror or exc}. "
                         f"Some program on {env.node} listens there (`ss -ltnp 'sport = :{port}'` names it). "
                         "Choose a free base: metrics.port=N (every rank uses N + its local rank, so N..N+7 on "
                         "an 8-GPU node), or metrics.port=0 to let every rank pick a free port (then "
                         "metrics.file_sd tells Prometheus where), or metrics.enabled=false to train without "
                         "metrics.")
        mine = Endpoint(env.rank, env.node, host, port, error)
        endpoints = gather_to_all(mine)  # every rank learns of every failure: none waits forever
        errors = [e.error for e in endpoints if e.error]
        if errors:
            self._shutdown()
            raise SetupError(mine.error or errors[0])
        log.info("metrics: rank %d serves http://%s/metrics", env.rank, mine.target)
        if env.is_main and (path := targets_path(self.metrics, self.job)) is not None:
            write_targets(path, endpoints, self.job)
            self._targets = path
            log.info("metrics: Prometheus file_sd targets of %d ranks in %s", len(endpoints), path)

    def _shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def port(self) -> int:
        """The port this rank serves on (the chosen one when metrics.port=0)."""
        return self._server.server_port

    # -- per step --------------------------------------------------------------------
    def begin_step(self) -> None:
        self._timer.start()

    def lap(self, phase: str) -> None:
        self._timer.lap(phase)

    def end_step(self, images: int, losses: Mapping[str, float], lrs: Mapping[str, float],
                 skipped: int = 0) -> None:
        for phases, wall in self._timer.stop():
            for name, seconds in phases.items():
                self._phases[name].observe(seconds)
            if self._mfu is not None and wall > 0:
                self._mfu.set(self._flops * images / wall / self._peak)
        self._images.inc(images)
        self._steps.inc()
        self._last_step.set(time.time())
        for term, value in losses.items():
            gauge = self._losses.get(term)
            if gauge is None:  # a term the trainer added later: still a small fixed set
                gauge = self._losses[term] = self._loss.labels(**self._base, term=term)
            gauge.set(value)
        if skipped:
            self._nonfinite.inc(int(skipped))
        for net, value in lrs.items():
            self._lrs[net].set(value)
        if self._cuda:
            self._mem_alloc.set(torch.cuda.memory_allocated(self.env.device))
            self._mem_peak.set(torch.cuda.max_memory_allocated(self.env.device))

    def samples_skipped(self, count: int) -> None:
        if count:
            self._skipped.inc(count)

    def checkpoint_saved(self) -> None:
        self._last_ckpt.set(time.time())

    def at_step(self, step: int, max_steps: int) -> None:
        self._step.set(step)
        self._max_steps.set(max_steps)

    def evaluated(self, step: int, scores: Mapping[str, float]) -> None:
        self._eval_step.set(step)
        for score, value in scores.items():
            if score in self._scores:
                self._scores[score].set(value)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        before = self.restarts
        super().load_state_dict(state)
        self._restarts.inc(max(self.restarts - before, 0))

    def close(self) -> None:
        """Serve metrics.linger_s more (the last scrape), withdraw the targets, stop serving."""
        if self.metrics.linger_s > 0:
            time.sleep(self.metrics.linger_s)
        if self._targets is not None:
            self._targets.unlink(missing_ok=True)
            self._targets = None
        self._shutdown()
        self._timer.close()


def build_telemetry(metrics: MetricsConfig, env: DistEnv, *, job: str, series: MetricSeries,
                    flops_per_image: Callable[[], float], precision: str) -> Telemetry:
    """The exporter when metrics.enabled, else the do-nothing base. ``flops_per_image`` (the
    task's model FLOPs per trained image, for MFU) is asked only then: counting builds the
    networks on the meta device."""
    if not metrics.enabled:
        return Telemetry()
    return PrometheusTelemetry(metrics, env, job=job, series=series, flops_per_image=flops_per_image(),
                               precision=precision)
