"""Scaling model: gradient and synchronized-BatchNorm traffic of one training step, measured gloo
timings of those collectives on this machine, and the projected data-parallel efficiency on
published interconnect bandwidths.

    python bench/scaling.py [--config sketchycoco-256] [--gloo] [--json OUT]

What is counted from the model (meta device, nothing computed): parameters and forward FLOPs
of every G block and of D, the perceptual loss's VGG19, and every BatchNorm of G (one SPADE
norm each: synchronized across ranks, one collective per forward and one per backward).

The step's time on one GPU is its FLOPs over an assumed MFU of the peak (the issue's 40%
target on an H100's 989 dense bf16 TFLOP/s); the gradient all-reduce is then laid on that
step's timeline: every G block's gradients become ready when its backward finishes (backward
runs from the image back to z), enter the link in that order, and whatever is still on the
link when the backward ends is exposed (DDP makes the compute stream wait for it at the end
of the backward); D's likewise in the D step. The synchronized norms' small collectives sit on
the critical path (each norm waits for its statistics): count x latency. ``--gloo`` measures
the same collectives between 2 local processes over gloo (wall time, best of several
repeats: on a loaded machine the best is the one least disturbed): a 25 MiB bucket (DDP's
default) and all of G+D's gradients in one all-reduce, fp32 and bf16, and one G step's
synchronized-norm collectives (forward all-gather + its backward, per norm).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Published figures (leads, not measurements): H100 SXM dense bf16 989 TFLOP/s and NVLink 4 at
# 900 GB/s per GPU (450 GB/s each way), NDR InfiniBand 400 Gb/s = 50 GB/s per NIC each way.
# Achieved all-reduce bus bandwidth is taken as 80% of the link rate (nccl-tests on such systems
# land near there); small-message collective latency 15 us within a node, 40 us across 4 nodes.
PEAK_BF16 = 989e12
MFU = 0.40
LINK_EFFICIENCY = 0.8
SYSTEMS = {
    "8x H100 SXM, NVLink 4": {"nodes": 1, "gpus": 8, "nvlink": 450e9, "nic_per_node": None, "latency": 15e-6},
    "4 nodes x 8 H100, 400 Gb/s IB per GPU": {"nodes": 4, "gpus": 8, "nvlink": 450e9, "nic_per_node": 8 * 50e9,
                                               "latency": 40e-6},
    "4 nodes x 8 H100, one 400 Gb/s IB per node": {"nodes": 4, "gpus": 8, "nvlink": 450e9, "nic_per_node": 50e9,
                                                    "latency": 40e-6},
}


def model_counts(config: str, overrides: list[str]) -> dict:
    """Per-block params and forward FLOPs per image of G (in forward order), D's, VGG19's, and
    G's BatchNorm widths, from the config's networks on the meta device."""
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    from ssgan_dist.config import load_config
    from ssgan_dist.models import VGG19Features, build_discriminator, build_generator

    cfg = load_config(config, overrides)
    m = cfg.model
    with torch.device("meta"):
        g, d, vgg = build_generator(m), build_discriminator(m), VGG19Features()
        m0 = torch.zeros(1, m.num_classes, m.image_size, m.image_size)
        image = torch.zeros(1, 3, m.image_size, m.image_size)
        with FlopCounterMode(display=False) as counter:
            g(m0)
        g_flops = counter.get_flop_counts()
        with FlopCounterMode(display=False) as counter:
            d(m0, image)
        d_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            vgg(image)
        vgg_flops = counter.get_total_flops()
    blocks = []
    names = ["fc", *[name for name, _ in g.schedule], "conv_img"]
    for name in names:
        params = sum(p.numel() for p in getattr(g, name).parameters())
        flops = sum(g_flops.get(f"SSGANGenerator.{name}", {}).values())
        blocks.append({"name": name, "params": params, "flops": flops})
    extra_params = sum(p.numel() for p in g.parameters()) - sum(b["params"] for b in blocks)  # SFMs, ToMasks
    extra_flops = sum(g_flops["Global"].values()) - sum(b["flops"] for b in blocks)
    blocks.append({"name": "sfm+tomask", "params": extra_params, "flops": extra_flops})
    norms = [mod.num_features for mod in g.modules() if isinstance(mod, nn.BatchNorm2d)]
    return {"config": config, "image_size": m.image_size, "batch": cfg.train.batch_size, "g_blocks": blocks,
            "g_params": sum(p.numel() for p in g.parameters()), "g_flops": sum(g_flops["Global"].values()),
            "d_params": sum(p.numel() for p in d.parameters()), "d_flops": d_flops,
            "vgg_flops": vgg_flops if (cfg.loss.vgg and cfg.loss.lambda_vgg) else 0, "bn_widths": norms,
            "d_fakes": cfg.train.d_fakes, "grad_checkpoint": cfg.train.grad_checkpoint}


def sync_bn_traffic(counts: dict, ranks: int) -> dict:
    """Synchronized-BatchNorm collectives per step and their bytes per rank (torch's
    SyncBatchNorm on CUDA: forward all-gathers (mean, invstd, count) = 2C+1 floats per rank,
    backward all-reduces (sum_dy, sum_dy_xmu) = 2C floats)."""
    widths = counts["bn_widths"]
    forwards = 1 + (counts["d_fakes"] == "regenerate") + counts["grad_checkpoint"]  # G forwards per step
    gather = sum(4 * (2 * c + 1) * ranks for c in widths)
    reduce = sum(4 * 2 * c for c in widths)
    return {"norms": len(widths), "collectives": len(widths) * (forwards + 1),
            "forward_bytes": forwards * gather, "backward_bytes": reduce}


def allreduce_seconds(nbytes: float, system: dict, compressed: bool) -> float:
    """Ring all-reduce time of ``nbytes`` (fp32 gradients; halved when compressed to 16 bits):
    within a node over NVLink (reduce-scatter + all-gather); across nodes hierarchically, the
    node's reduced shards all-reduced over its NICs between the nodes, then gathered."""
    b = nbytes / (2 if compressed else 1)
    g, n = system["gpus"], system["nodes"]
    nvlink = system["nvlink"] * LINK_EFFICIENCY
    t = b * 2 * (g - 1) / g / nvlink
    if n > 1:
        t += b * 2 * (n - 1) / n / (system["nic_per_node"] * LINK_EFFICIENCY)
    return t


def project(counts: dict, batch: int, system: dict, compressed: bool) -> dict:
    """One step's compute, its exposed gradient traffic and sync-BN latency, the efficiency."""
    per_image = 3 * counts["g_flops"] + 12 * counts["d_flops"] + 3 * counts["vgg_flops"]
    if counts["d_fakes"] == "regenerate":
        per_image += counts["g_flops"]
    rate = PEAK_BF16 * MFU
    compute = per_image * batch / rate
    # G step timeline: forward G, D (fake+real), VGG; backward VGG (input grads), D (x2), then G's
    # blocks from the image back to z (2x their forward), each releasing its gradients.
    t = batch * (counts["g_flops"] + 2 * counts["d_flops"] + 2 * counts["vgg_flops"]
                 + counts["vgg_flops"] + 4 * counts["d_flops"]) / rate
    link_free = 0.0
    for block in reversed(counts["g_blocks"]):
        t += batch * 2 * block["flops"] / rate
        link_free = max(link_free, t) + allreduce_seconds(4 * block["params"], system, compressed)
    g_exposed = max(0.0, link_free - t)
    # D step: D's gradients are ready by the end of its backward, its own traffic mostly hidden
    # behind it; count its last quarter as exposed.
    d_exposed = allreduce_seconds(4 * counts["d_params"], system, compressed) / 4
    bn = sync_bn_traffic(counts, system["gpus"] * system["nodes"])
    latency = bn["collectives"] * system["latency"]
    total = compute + g_exposed + d_exposed + latency
    return {"compute_ms": 1e3 * compute, "g_allreduce_ms": 1e3 * allreduce_seconds(4 * counts["g_params"], system,
                                                                                 compressed),
            "g_exposed_ms": 1e3 * g_exposed, "d_exposed_ms": 1e3 * d_exposed, "sync_bn_ms": 1e3 * latency,
            "efficiency": compute / total}


def _gloo_worker(rank: int, counts: dict, out: str, port: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    grad_elems = counts["g_params"] + counts["d_params"]
    bucket = 25 * 2**20 // 4
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        buf = torch.randn(bucket, dtype=dtype)
        best = float("inf")
        for _ in range(3):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(4):
                dist.all_reduce(buf)
            best = min(best, (time.perf_counter() - t0) / 4)
        results[f"allreduce_25MiB_bucket_{name}_ms"] = 1e3 * best
        whole = torch.randn(grad_elems, dtype=dtype)  # G+D's gradients in one all-reduce
        best = float("inf")
        for _ in range(3):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(whole)
            best = min(best, time.perf_counter() - t0)
        results[f"allreduce_all_grads_{name}_ms"] = 1e3 * best
        results[f"allreduce_all_grads_{name}_GB_per_s"] = whole.numel() * whole.element_size() / best / 1e9
        del whole
    widths = counts["bn_widths"]
    best = float("inf")
    for _ in range(5):
        dist.barrier()
        t0 = time.perf_counter()
        for c in widths:  # what CrossRankBatchNorm2d does per norm: gather forward, its backward
            stats = torch.randn(2 * c + 1, requires_grad=True)
            torch.stack(dist_fn.all_gather(stats)).sum().backward()
        best = min(best, time.perf_counter() - t0)
    results["sync_bn_per_g_forward_backward_ms"] = 1e3 * best
    results["sync_bn_per_collective_us"] = 1e6 * best / (2 * len(widths))
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def measure_gloo(counts: dict) -> dict:
    import torch.multiprocessing as mp

    out = Path(tempfile.mkdtemp()) / "gloo.json"
    mp.spawn(_gloo_worker, args=(counts, str(out), 29500 + os.getpid() % 1000), nprocs=2)
    return json.loads(out.read_text())


def report(counts: dict, gloo: dict | None) -> str:
    mib = 2**20
    g, d = counts["g_params"], counts["d_params"]
    bn = sync_bn_traffic(counts, 8)
    lines = [f"{counts['config']}: G {g / 1e6:.1f} M params, D {d / 1e6:.2f} M; gradient all-reduce per step "
             f"{4 * (g + d) / mib:.0f} MiB fp32, {2 * (g + d) / mib:.0f} MiB bf16/fp16.",
             f"Synchronized BatchNorms in G: {bn['norms']} (one per SPADE norm), {bn['collectives']} collectives "
             f"per step (d_fakes={counts['d_fakes']}, grad_checkpoint={counts['grad_checkpoint']}); at 8 ranks "
             f"{bn['forward_bytes'] / 1024:.0f} KiB gathered in forward, {bn['backward_bytes'] / 1024:.0f} KiB "
             f"all-reduced in backward per rank.",
             "", "G blocks (forward order): " + ", ".join(
                 f"{b['name']} {b['params'] / 1e6:.1f} M / {b['flops'] / 1e9:.1f} GFLOP" for b in counts["g_blocks"]),
             ""]
    if gloo:
        lines += ["gloo, 2 processes on this machine: " + ", ".join(f"{k} {v:.2f}" for k, v in gloo.items()), ""]
    lines += ["| system | batch/GPU | compression | compute ms | G all-reduce ms | exposed G ms | exposed D ms "
              "| sync-BN ms | efficiency |", "|---|---|---|---|---|---|---|---|---|"]
    for name, system in SYSTEMS.items():
        for batch in (4, 8):
            for compressed in (False, True):
                p = project(counts, batch, system, compressed)
                lines.append(f"| {name} | {batch} | {'bf16' if compressed else 'none'} | {p['compute_ms']:.1f} | "
                             f"{p['g_allreduce_ms']:.2f} | {p['g_exposed_ms']:.2f} | {p['d_exposed_ms']:.2f} | "
                             f"{p['sync_bn_ms']:.2f} | {100 * p['efficiency']:.0f}% |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="sketchycoco-256")
    parser.add_argument("--gloo", action="store_true", help="also time the collectives over gloo, 2 local processes")
    parser.add_argument("--json", default="")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    counts = model_counts(args.config, args.overrides)
    gloo = measure_gloo(counts) if args.gloo else None
    print(report(counts, gloo))
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": counts, "gloo": gloo}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
