"""What the Prometheus exporter adds to a training step, against the demo step time.

    python bench/telemetry_overhead.py [--steps 10] [--calls 20000] [--json]

1. The demo step: the `demo` preset's Trainer (metrics off) timed over --steps steps after
   two warm-up steps: waiting for the batch plus train_step, as in Trainer.fit.
2. The per-step telemetry calls (begin_step, three laps, two optimizer steps seen by the
   step hooks, end_step with the five losses and two learning rates, samples_skipped),
   --calls times with the exporter on, minus the same loop with metrics off: the difference
   is what metrics.enabled=true costs the step. Nothing is scraped meanwhile.
3. One scrape: rendering the registry as the HTTP thread does (it holds the GIL while it
   renders), amortized over a 15 s scrape interval.
On CPU only: on CUDA the timer records events instead of reading the clock (a few us more).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from prometheus_client import generate_latest

from ssgan_dist.config import load_config
from ssgan_dist.distributed.env import DistEnv, setup
from ssgan_dist.tasks.gan import SERIES
from ssgan_dist.telemetry import PrometheusTelemetry, Telemetry

LOSSES = {"g_gan": 0.5, "g_fm": 1.5, "g_vgg": 0.0, "g_total": 2.0, "d_hinge": 1.9}
LRS = {"G": 2e-4, "D": 2e-4}
SCRAPE_INTERVAL_S = 15.0


def demo_step_seconds(steps: int, run_dir: str) -> float:
    """Mean seconds of one demo step (data wait + train_step), metrics off."""
    from ssgan_dist.train import Trainer

    trainer = Trainer(load_config("demo", [f"run.dir={run_dir}", "train.progress=false"]), setup())
    for _ in range(2):
        trainer.train_step(next(trainer.data))
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(trainer.data)
        batch.pop("skipped")
        trainer.train_step(batch)
    return (time.perf_counter() - start) / steps


def calls_seconds(telemetry: Telemetry, calls: int) -> float:
    """Mean seconds of one step's telemetry calls, around two (near-empty) optimizer steps."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    start = time.perf_counter()
    for _ in range(calls):
        telemetry.begin_step()
        telemetry.lap("data_wait")
        telemetry.samples_skipped(0)
        opt.step()
        telemetry.lap("g_step")
        opt.step()
        telemetry.lap("d_step")
        telemetry.end_step(4, LOSSES, LRS, False)
    return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed demo steps")
    parser.add_argument("--calls", type=int, default=20000, help="timed telemetry call loops")
    parser.add_argument("--run-dir", default="runs/bench-telemetry", help="where the demo Trainer may write")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    step = demo_step_seconds(args.steps, args.run_dir)
    cfg = load_config("demo", ["metrics.enabled=true", "metrics.port=0", "run.name=bench"])
    env = DistEnv(0, 1, 0, "bench", torch.device("cpu"), "gloo")
    exporter = PrometheusTelemetry(cfg.metrics, env, job=cfg.run.name, series=SERIES, flops_per_image=1e9,
                                   precision=cfg.train.precision)
    try:
        off = calls_seconds(Telemetry(), args.calls)
        on = calls_seconds(exporter, args.calls)
        start = time.perf_counter()
        for _ in range(100):
            generate_latest(exporter.registry)
        scrape = (time.perf_counter() - start) / 100
    finally:
        exporter.close()
    result = {
        "device": "cpu", "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "demo_step_s": step, "calls_off_us": off * 1e6, "calls_on_us": on * 1e6,
        "overhead_us": (on - off) * 1e6, "overhead_pct_of_step": 100 * (on - off) / step,
        "scrape_ms": scrape * 1e3, "scrape_pct_at_15s": 100 * scrape / SCRAPE_INTERVAL_S,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"demo step {step * 1e3:.1f} ms ({result['threads']} threads); telemetry per step: "
              f"{result['overhead_us']:.1f} us = {result['overhead_pct_of_step']:.4f}% of the step "
              f"(off {result['calls_off_us']:.2f} us, on {result['calls_on_us']:.2f} us); one scrape "
              f"{result['scrape_ms']:.2f} ms = {result['scrape_pct_at_15s']:.4f}% at a 15 s interval")
    return 0


if __name__ == "__main__":
    sys.exit(main())
