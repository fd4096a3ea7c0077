"""Training-step benchmark: images/s, the step split into phases, peak memory, MFU.

    python bench/train_throughput.py --config demo --steps 20 --warmup 3
    python bench/train_throughput.py --config sketchycoco-256 --steps 3 --warmup 1 \\
        --variants ssgan,spade,ssgan-ckpt,spade-ckpt
    python bench/train_throughput.py --config demo,sketchycoco-256 --steps 10,2 --repeats 3,2 \\
        --variants ssgan,ssgan-compiled --threads 1 --workers 0 --no-memory   # compiled vs eager, loaded machine
    python bench/train_throughput.py --config sketchycoco-256 --precision bf16 --channels-last  # on a GPU

Each variant runs in a fresh process: SSGAN, the SPADE baseline (``model.sfm=false``), either
with gradient checkpointing (``-ckpt``) or compiled (``-compiled``: train.compile). A variant
builds the real Trainer (engine, loader over synthetic shards at the config's size, losses;
the perceptual loss uses random VGG19 weights in torchvision's layout so its cost is counted)
and times whole training steps after warm-up, split by telemetry's PhaseTimer into data_wait /
g_step / d_step / optimizer. Besides wall time each step's CPU time of the process (all its
threads) is recorded: on a machine shared with other jobs it is the figure that their load
disturbs least (with --threads 1 it is the single core's busy time).

Compiled variants share one compile cache (train.compile_cache, a fresh directory per run of
this script unless --compile-cache names one): the first process compiles cold, the later
repeats find the cache warm. Compile time = the first warm-up step's time minus a timed step's,
in wall time and in CPU time: the process's and its finished children's (with --threads 1
inductor compiles in the process, TORCHINDUCTOR_COMPILE_THREADS=1, and its C++ compiler runs are
waited-for children, so the CPU time counts all of the compilation).

Several configs (``--config demo,sketchycoco-256``, with --steps/--warmup/--repeats per config
or one for all) run one after the other in one invocation, each printed when done.

Peak memory is the rise above the memory held before a timed step (weights, optimizer state):
on CUDA from the allocator; on CPU from the kernel's peak-RSS counter, reset before the timed
steps, with every large allocation mmap'ed so that freed memory leaves the RSS. MFU = counted
model FLOPs per image (tasks.gan.GANTask.flops_per_image: summary.count_flops, backward = 2x
forward) x images/s / the device's peak; "MFU
with VGG" adds the frozen VGG19 of the perceptual loss: forward on the fake and the real image
and the fake's input-gradient backward (about one forward), 3 VGG forwards per image. On a
CPU the peak is a large fp32 matmul's rate per CPU-second of one thread (best of several, in
CPU time, so other jobs' load does not lower it), and besides MFU by wall time the rows give
``mfu_cpu`` by the step's CPU time: with --threads 1, the fraction of one busy core's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "ssgan": [],
    "spade": ["model.sfm=false"],
    "ssgan-ckpt": ["train.grad_checkpoint=true"],
    "spade-ckpt": ["model.sfm=false", "train.grad_checkpoint=true"],
    "ssgan-compiled": ["train.compile=true"],
    "spade-compiled": ["model.sfm=false", "train.compile=true"],
    "ssgan-compiled-ckpt": ["train.compile=true", "train.grad_checkpoint=true"],
}


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _random_vgg19(path: Path) -> None:
    """Random weights in torchvision's vgg19 ``features`` layout, for the perceptual loss's cost."""
    import torch

    convs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 256),
             (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    idx = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
    state = {}
    for i, (cin, cout) in zip(idx, convs):
        state[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3) * 0.01
        state[f"features.{i}.bias"] = torch.zeros(cout)
    torch.save(state, path)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (inductor's C++ compiler runs)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def cpu_matmul_peak(threads: int) -> float:
    """FLOP/s of a large fp32 matmul on this CPU (``threads`` threads, per CPU-second x threads,
    best of 5): the MFU denominator when there is no GPU table. CPU time, not wall time, so that
    other processes on the machine do not lower the peak."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(5):
        c0 = time.process_time()
        for _ in range(2):
            a @ b
        best = min(best, (time.process_time() - c0) / threads)
    return 2 * 2048**3 * 2 / best


def vgg_flops_per_image(image_size: int) -> float:
    """Forward FLOPs of the perceptual loss's VGG19 trunk on one image (meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ssgan_dist.models import VGG19Features

    with torch.device("meta"):
        vgg = VGG19Features()
        with FlopCounterMode(display=False) as counter:
            vgg(torch.zeros(1, 3, image_size, image_size))
    return float(counter.get_total_flops())


def worker(args: argparse.Namespace) -> dict:
    import torch

    from ssgan_dist.config import load_config
    from ssgan_dist.data.writer import build_synthetic_shards
    from ssgan_dist.distributed.env import setup
    from ssgan_dist.summary import count_flops
    from ssgan_dist.tasks.gan import GANTask
    from ssgan_dist.telemetry import PhaseTimer, Telemetry, peak_flops
    from ssgan_dist.train import Trainer

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="ssgan-bench-"))
    probe = load_config(args.config, args.overrides)
    size = probe.model.image_size
    shards = Path(args.cache) / f"bench-{size}px"
    if not (shards / "manifest.json").is_file():
        build_synthetic_shards(shards, count=64, samples_per_shard=32, size=size, seed=0,
                               num_classes=probe.model.num_classes)
    vgg = tmp / "vgg19.pth"
    _random_vgg19(vgg)
    overrides = [*args.overrides, *VARIANTS[args.variant], f"data.shards={shards}", f"run.dir={tmp / 'run'}",
                 f"loss.vgg_weights={vgg}", f"train.precision={args.precision}",
                 f"train.channels_last={str(args.channels_last).lower()}", "train.progress=false",
                 "metrics.enabled=false", "checkpoint.every=1000000", "train.sample_every=1000000",
                 "train.log_every=1000000", f"data.num_workers={args.workers}",
                 f"train.compile_cache={args.compile_cache}"]
    if args.batch:
        overrides.append(f"train.batch_size={args.batch}")
    cfg = load_config(args.config, overrides)
    env = setup()
    trainer = Trainer(cfg, env)

    timer = PhaseTimer(env.device)

    class Laps(Telemetry):
        def lap(self, phase: str) -> None:
            timer.lap(phase)

    trainer.telemetry = Laps()

    cuda = env.device.type == "cuda"

    def one_step(wait: bool = False) -> list[tuple[dict[str, float], float]]:
        timer.start()
        batch = next(trainer.data)
        timer.lap("data_wait")
        trainer.train_step(batch)
        trainer.step += 1
        return timer.stop(wait=wait)

    first: list[float] = []
    for i in range(args.warmup):
        t0, c0 = time.perf_counter(), cpu_seconds()
        one_step(wait=True)
        if i == 0:
            first = [time.perf_counter() - t0, cpu_seconds() - c0]
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
        base = _rss_bytes("VmRSS")
    phases: dict[str, float] = {}
    t0, c0 = time.perf_counter(), cpu_seconds()
    for i in range(args.steps):
        for p, _ in one_step(wait=i == args.steps - 1):  # on CUDA: read as they complete, all by the last
            for k, v in p.items():
                phases[k] = phases.get(k, 0.0) + v
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss_bytes("VmHWM")) - base
    if args.measure == "memory":
        return {"peak_step_memory_bytes": peak}
    images = args.steps * cfg.train.batch_size * cfg.train.accum_steps
    counts = count_flops(cfg)
    flops = GANTask.flops_per_image(cfg)
    vgg = 3 * vgg_flops_per_image(size) if (cfg.loss.vgg and cfg.loss.lambda_vgg) else 0.0
    device_peak = peak_flops(cfg.metrics, cfg.train.precision, env.device) if cuda else cpu_matmul_peak(args.threads)
    step_s = wall / args.steps
    return {
        "variant": args.variant, "config": args.config, "image_size": size, "batch": cfg.train.batch_size,
        "accum_steps": cfg.train.accum_steps, "precision": cfg.train.precision,
        "channels_last": cfg.train.channels_last, "compiled": cfg.train.compile,
        "device": torch.cuda.get_device_name(env.device) if cuda else f"cpu x{args.threads} threads",
        "step_s": step_s, "step_cpu_s": cpu / args.steps, "images_per_s": images / wall,
        "first_step_s": first[0] if first else None, "first_step_cpu_s": first[1] if first else None,
        "compile_s": (first[0] - step_s) if (first and cfg.train.compile) else None,
        "compile_cpu_s": (first[1] - cpu / args.steps) if (first and cfg.train.compile) else None,
        "phases_s": {k: v / args.steps for k, v in sorted(phases.items())},
        "peak_step_memory_bytes": peak,
        "train_gflop_per_image": flops / 1e9, "vgg_gflop_per_image": vgg / 1e9,
        "g_params": counts["generator"]["params"], "d_params": counts["discriminator"]["params"],
        "mfu": (flops * images / wall / device_peak) if device_peak else None,
        "mfu_with_vgg": ((flops + vgg) * images / wall / device_peak) if device_peak else None,
        "mfu_cpu": None if cuda else flops * images / cpu / device_peak,
        "mfu_cpu_with_vgg": None if cuda else (flops + vgg) * images / cpu / device_peak,
        "device_peak_tflops": device_peak / 1e12 if device_peak else None,
        "max_memory_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f}%" if x is not None else "-"


def table(rows: list[dict]) -> str:
    head = ("| variant | img/s | step s | step CPU s | data_wait | g_step | d_step | optimizer | peak step mem MiB "
            "| MFU | MFU with VGG | MFU with VGG, CPU time |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        p = r["phases_s"]
        lines.append(f"| {r['variant']} | {r['images_per_s']:.2f} | {r['step_s']:.3f} | {r['step_cpu_s']:.3f} | "
                     f"{p.get('data_wait', 0):.3f} | {p.get('g_step', 0):.3f} | {p.get('d_step', 0):.3f} | "
                     f"{p.get('optimizer', 0):.3f} | {r['peak_step_memory_bytes'] / 2**20:.0f} | {_pct(r['mfu'])} | "
                     f"{_pct(r['mfu_with_vgg'])} | {_pct(r.get('mfu_cpu_with_vgg'))} |")
    by = {r["variant"]: r for r in rows}
    notes = []
    for v in ("ssgan", "spade"):
        if v in by and f"{v}-compiled" in by:
            a, b = by[v], by[f"{v}-compiled"]
            notes.append(f"{v} compiled: step time {a['step_s'] / b['step_s']:.2f}x faster wall, "
                         f"{a['step_cpu_s'] / b['step_cpu_s']:.2f}x CPU time (all repeats, wall: "
                         f"{', '.join(f'{x:.3f}' for x in b['step_s_all'])} vs {', '.join(f'{x:.3f}' for x in a['step_s_all'])}; "
                         f"CPU: {', '.join(f'{x:.3f}' for x in b['step_cpu_s_all'])} vs "
                         f"{', '.join(f'{x:.3f}' for x in a['step_cpu_s_all'])}); compile {b['compile_cold_s']:.0f} s "
                         f"cold, {b['compile_warm_s']:.0f} s warm (CPU: {b['compile_cold_cpu_s']:.0f} s, "
                         f"{b['compile_warm_cpu_s']:.0f} s)")
    if "ssgan" in by and "spade" in by:
        notes.append(f"SSGAN / SPADE step time: {by['ssgan']['step_s'] / by['spade']['step_s']:.3f}x (target <= 1.15x)")
    for v in ("ssgan", "spade"):
        if v in by and f"{v}-ckpt" in by:
            a, b = by[v], by[f"{v}-ckpt"]
            notes.append(f"{v} checkpointing: memory {b['peak_step_memory_bytes'] / a['peak_step_memory_bytes']:.2f}x "
                         f"(target <= 0.6x), step time {b['step_s'] / a['step_s']:.2f}x (target <= 1.3x)")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def _worker_run(variant: str, measure: str, env: dict, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--measure", measure, *argv]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{variant} ({measure}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _per_config(value: str, n: int, name: str) -> list[int]:
    """'10' or '10,2' (one per config) -> n ints."""
    items = [int(x) for x in value.split(",")]
    if len(items) == 1:
        return items * n
    if len(items) != n:
        raise SystemExit(f"--{name} {value}: give one value or one per config ({n})")
    return items


def bench_config(args: argparse.Namespace, config: str, steps: int, warmup: int, repeats: int) -> list[dict]:
    """Every variant of one config, ``repeats`` times interleaved (a noisy minute hits every
    variant alike); per variant the best repeat's row with every repeat's times."""
    import torch

    on_gpu = torch.cuda.is_available()
    argv = ["--config", config, "--steps", str(steps), "--warmup", str(warmup), "--threads", str(args.threads),
            "--workers", str(args.workers), "--precision", args.precision, "--cache", args.cache,
            "--compile-cache", args.compile_cache, *(["--batch", str(args.batch)] if args.batch else []),
            *(["--channels-last"] if args.channels_last else []), *args.overrides]
    timing_env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.threads == 1:  # inductor compiles in the process: its CPU time is the whole compilation
        timing_env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    memory_env = {**timing_env, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    variants = args.variants.split(",")
    timed: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(repeats):
        for variant in variants:
            timed[variant].append(_worker_run(variant, "time", timing_env, argv))
            r = timed[variant][-1]
            print(f"{config} {variant}: {r['images_per_s']:.2f} img/s, step {r['step_s']:.3f} s "
                  f"(CPU {r['step_cpu_s']:.3f} s)", file=sys.stderr)
    rows = []
    for variant in variants:
        row = min(timed[variant], key=lambda r: r["step_s"])  # best of the repeats
        row["step_s_all"] = [r["step_s"] for r in timed[variant]]
        row["step_cpu_s_all"] = [r["step_cpu_s"] for r in timed[variant]]
        row["step_cpu_s"] = min(row["step_cpu_s_all"])
        if not on_gpu:
            row["mfu_cpu"] = max(r["mfu_cpu"] for r in timed[variant])
            row["mfu_cpu_with_vgg"] = max(r["mfu_cpu_with_vgg"] for r in timed[variant])
        if row["compiled"]:  # the first process of a compiled variant found the cache cold
            for clock in ("", "_cpu"):
                values = [r[f"compile{clock}_s"] for r in timed[variant]]
                row[f"compile{clock}_s_all"] = values
                row[f"compile_cold{clock}_s"], row[f"compile_warm{clock}_s"] = values[0], min(values[1:], default=float("nan"))
        if not on_gpu and not args.no_memory:  # on a GPU the allocator's peak of the timed run is exact
            row.update(_worker_run(variant, "memory", memory_env, argv))
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo", help="a preset or YAML; several: comma-separated")
    parser.add_argument("--variants", default="ssgan,spade,ssgan-ckpt,spade-ckpt")
    parser.add_argument("--steps", default="10", help="timed steps (one, or one per config)")
    parser.add_argument("--warmup", default="2", help="warm-up steps (one, or one per config)")
    parser.add_argument("--repeats", default="1", help="timed runs per variant, interleaved; best is kept "
                        "(one, or one per config)")
    parser.add_argument("--batch", type=int, default=0, help="per-process batch; 0: the config's")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workers", type=int, default=1, help="data.num_workers")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="on CPU, skip the peak-memory runs")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "ssgan-bench-shards"))
    parser.add_argument("--compile-cache", default="", help="train.compile_cache of the compiled variants; "
                        "default: a fresh directory (the first compiled process is cold)")
    parser.add_argument("--json", default="", help="also write the rows here")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["time", "memory"], default="time", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.variant:
        args.steps, args.warmup = int(args.steps), int(args.warmup)
        print(json.dumps(worker(args)))
        return 0
    if not args.compile_cache:
        args.compile_cache = tempfile.mkdtemp(prefix="ssgan-bench-compile-")  # the workers share it
    configs = args.config.split(",")
    plan = zip(configs, *(_per_config(getattr(args, k), len(configs), k) for k in ("steps", "warmup", "repeats")))
    rows: list[dict] = []
    for config, steps, warmup, repeats in plan:
        part = bench_config(args, config, steps, warmup, repeats)
        rows += part
        print(f"{config}, batch {part[0]['batch']}, {part[0]['precision']}, {part[0]['device']}, "
              f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}, {steps} steps after "
              f"{warmup} warm-up, best of {repeats}\n", flush=True)
        print(table(part) + "\n", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
