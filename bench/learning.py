"""Learning benchmark: held-out quality of model variants along training, for several seeds.

    python bench/learning.py --train-shards TRAIN --heldout-shards HELDOUT --out OUT \\
        --variant spade=model.sfm=false --variant ssgan= --seeds 0,1 --steps 1200 --every 200

Every variant is a name and a (possibly empty) list of config overrides, separated by spaces
(``--variant "paper=model.sfm_form=paper model.sfm_resize=nearest"``). All variants train the
same preset (``--config``, default demo) on the same shards for the same number of steps, each
(variant, seed) in its own subprocess through the real entry point (``python -m
ssgan_dist.train``), at most ``--jobs`` at a time with ``--threads`` torch threads each. Every
saved checkpoint (``checkpoint.every = --every``) is scored on the held-out shards: one image
per held-out scene, G in eval mode, z fixed by (``--noise-seed``, scene index) as ``generate
--seed`` draws it; SSIM (Gaussian 11x11, RGB in [0, 1]) and L1 against the real image in [0, 1],
FID and KID when ``--inception-weights`` is given (skipped, and said so, without them): the
project's own evaluation (ssgan_dist.evaluation.evaluate), with G_ema when the run has one
(``--weights``).

Resumable: a finished run (its checkpoint at --steps exists) is not trained again, an
interrupted one resumes from its newest checkpoint, and a scored checkpoint keeps its score
(OUT/scores/*.json) unless its checkpoint file changed. Writes OUT/learning.json (every
figure, per seed and the mean over seeds), OUT/learning.png (SSIM and L1 against steps: mean
bold, seeds thin) and OUT/samples.png (sketch | label | real | one column per variant for a
few held-out scenes at the last step of the first seed, and for SSGAN variants the argmax of
every learned SFM mask M_i, coarse to fine) and OUT/learning.md (the table, for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout: use this checkout's package
    sys.path.insert(0, str(ROOT))


@dataclass
class Variant:
    name: str
    overrides: list[str]


def parse_variant(text: str) -> Variant:
    """``name=key=value key=value`` (overrides may be empty: ``name=``)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or "/" in name or name.startswith("."):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=[key=value ...]")
    overrides = shlex.split(rest)
    for o in overrides:
        if "=" not in o:
            raise argparse.ArgumentTypeError(f"--variant {name}: override {o!r} is not key=value")
    return Variant(name, overrides)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-shards", required=True, help="training shard set (dir, pattern, comma list)")
    p.add_argument("--heldout-shards", required=True, help="held-out shard set: every sample is scored")
    p.add_argument("--out", required=True, help="output dir: runs/, scores/, learning.json, *.png")
    p.add_argument("--variant", action="append", type=parse_variant, required=True,
                   help="NAME=[key=value ...], repeatable; e.g. spade=model.sfm=false, ssgan=")
    p.add_argument("--config", default="demo", help="preset or YAML every variant starts from")
    p.add_argument("--seeds", default="0,1", help="run.seed values, comma separated")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--every", type=int, default=200, help="checkpoint (and score) every N steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every variant (before the variant's own), repeatable")
    p.add_argument("--jobs", type=int, default=2, help="training runs at a time")
    p.add_argument("--threads", type=int, default=1, help="train.threads (and OMP_NUM_THREADS) per run")
    p.add_argument("--noise-seed", type=int, default=0, help="z of held-out scene i from (seed, i), as generate --seed")
    p.add_argument("--max-samples", type=int, default=0, help="score only the first N held-out scenes; 0: all")
    p.add_argument("--inception-weights", default="", help="Inception weights for FID/KID; empty: skipped")
    p.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                   help="G's weights scored: auto = G_ema when the run has train.ema, else G (as evaluate)")
    p.add_argument("--sample-rows", type=int, default=6, help="held-out scenes in samples.png")
    p.add_argument("--sample-seed", type=int, default=None, help="run.seed shown in samples.png; default: the first")
    p.add_argument("--train-only", action="store_true", help="train, score nothing")
    p.add_argument("--report-only", action="store_true", help="train nothing: score what exists, write reports")
    p.add_argument("--report-dir", default="", help="where learning.{json,md,png} and samples.png go; default: --out")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    names = [v.name for v in args.variant]
    if len(set(names)) != len(names):
        p.error(f"--variant names must differ: {names}")
    if args.steps < 1 or args.every < 1 or args.jobs < 1 or args.threads < 1 or not args.seeds:
        p.error("--steps, --every, --jobs, --threads: at least 1; --seeds: at least one")
    return args


# -- training -----------------------------------------------------------------------------


def run_dir(args: argparse.Namespace, variant: Variant, seed: int) -> Path:
    return Path(args.out) / "runs" / f"{variant.name}-s{seed}"


def train_command(args: argparse.Namespace, variant: Variant, seed: int) -> list[str]:
    keep = max(10, args.steps // args.every + 1)
    return [sys.executable, "-m", "ssgan_dist.train", "--config", args.config, *args.set, *variant.overrides,
            f"train.max_steps={args.steps}", f"checkpoint.every={args.every}", f"checkpoint.keep={keep}",
            f"data.shards={args.train_shards}", f"run.dir={run_dir(args, variant, seed)}", f"run.seed={seed}",
            f"train.threads={args.threads}", "train.progress=false", "checkpoint.resume=true"]


def finished(args: argparse.Namespace, variant: Variant, seed: int) -> bool:
    from ssgan_dist import checkpoint as ckpt

    return any(ckpt.step_of(p) >= args.steps for p in ckpt.list_checkpoints(run_dir(args, variant, seed)))


def train_all(args: argparse.Namespace) -> None:
    """Every (variant, seed) not yet finished, ``--jobs`` subprocesses at a time."""
    todo = [(v, s) for s in args.seeds for v in args.variant if not finished(args, v, s)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    running: list[tuple[subprocess.Popen, Variant, int, float, Any]] = []
    failed: list[str] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            variant, seed = todo.pop(0)
            rd = run_dir(args, variant, seed)
            rd.mkdir(parents=True, exist_ok=True)
            cmd = train_command(args, variant, seed)
            log = open(rd / "bench-train.out", "a")
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            print(f"train {variant.name} seed {seed}: {rd}", flush=True)
            running.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                            variant, seed, time.perf_counter(), log))
        time.sleep(2)
        for item in list(running):
            proc, variant, seed, t0, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            took = time.perf_counter() - t0
            if proc.returncode:
                failed.append(f"{variant.name} seed {seed} (exit {proc.returncode}, see "
                              f"{run_dir(args, variant, seed) / 'bench-train.out'})")
                print(f"FAILED {failed[-1]}", flush=True)
            else:
                print(f"done {variant.name} seed {seed} in {took:.0f} s", flush=True)
                (run_dir(args, variant, seed) / "bench-seconds.txt").write_text(f"{took:.1f}\n")
    if failed:
        raise SystemExit("training failed: " + "; ".join(failed))


# -- scoring ------------------------------------------------------------------------------


class Scorer:
    """Scores a checkpoint on the held-out shards with the project's own evaluation
    (evaluation/evaluate.py: SSIM, L1, and FID/KID when Inception weights are given)."""

    def __init__(self, args: argparse.Namespace):
        from ssgan_dist.distributed.env import setup
        from ssgan_dist.evaluation.evaluate import EvalSpec

        self.args, self.env = args, setup()
        self.spec = EvalSpec(args.heldout_shards, args.inception_weights, Path(args.out) / "fid-stats",
                             max_samples=args.max_samples, batch_size=16, seed=args.noise_seed,
                             shards_option="--heldout-shards", weights_option="--inception-weights")
        if not args.inception_weights:
            print("FID/KID skipped: no --inception-weights (Inception weights cannot be downloaded here); "
                  "scoring SSIM and L1 only", flush=True)

    def score(self, path: Path) -> dict[str, Any]:
        from ssgan_dist.evaluation.evaluate import evaluate_generator
        from ssgan_dist.evaluation.inference import load_generator

        loaded = load_generator(path, self.env.device, self.args.weights)
        result = evaluate_generator(loaded.G, loaded.cfg.model, self.env, self.spec)
        out = {"step": loaded.step, "weights": loaded.weights, "config_hash": loaded.config_hash,
               **{k: result[k] for k in ("ssim", "l1", "samples", "seconds")}}
        if self.args.inception_weights:
            out.update({"fid": result["fid"], "kid": result["kid"]})
        return out


def score_all(args: argparse.Namespace) -> dict[str, dict[int, dict[int, dict[str, Any]]]]:
    """{variant: {seed: {step: figures}}}, cached per checkpoint in OUT/scores/."""
    from ssgan_dist import checkpoint as ckpt

    scorer = None
    scores_dir = Path(args.out) / "scores"
    scores_dir.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict[int, dict[int, dict[str, Any]]]] = {}
    for variant in args.variant:
        for seed in args.seeds:
            for path in ckpt.list_checkpoints(run_dir(args, variant, seed)):
                step = ckpt.step_of(path)
                if step > args.steps or step % args.every and step != args.steps:
                    continue
                cache = scores_dir / f"{variant.name}-s{seed}-step{step:06d}.json"
                stamp = {"checkpoint": str(path), "mtime": path.stat().st_mtime,
                         "noise_seed": args.noise_seed, "heldout": args.heldout_shards,
                         "max_samples": args.max_samples, "inception": bool(args.inception_weights),
                         "weights": args.weights}
                record = json.loads(cache.read_text()) if cache.exists() else None
                if record is None or record.get("stamp") != stamp:
                    scorer = scorer or Scorer(args)
                    record = {**scorer.score(path), "stamp": stamp}
                    cache.write_text(json.dumps(record, indent=1) + "\n")
                    print(f"scored {variant.name} seed {seed} step {step}: SSIM {record['ssim']:.4f}  "
                          f"L1 {record['l1']:.4f}", flush=True)
                table.setdefault(variant.name, {}).setdefault(seed, {})[step] = record
    return table


def summarize(args: argparse.Namespace, table: dict) -> dict[str, Any]:
    """Per variant and step: mean, min and max over the seeds that reached that step."""
    metrics = ["ssim", "l1"] + (["fid", "kid"] if args.inception_weights else [])
    mean: dict[str, dict[int, dict[str, Any]]] = {}
    for name, seeds in table.items():
        steps = sorted({s for per in seeds.values() for s in per})
        for step in steps:
            rows = [per[step] for per in seeds.values() if step in per]
            entry = {"seeds": len(rows)}
            for m in metrics:
                vals = [r[m] for r in rows]
                entry[m] = float(np.mean(vals))
                entry[f"{m}_min"], entry[f"{m}_max"] = float(np.min(vals)), float(np.max(vals))
            mean.setdefault(name, {})[step] = entry
    return mean


def machine() -> dict[str, Any]:
    import torch

    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


# -- pictures -----------------------------------------------------------------------------


def plot_curves(args: argparse.Namespace, table: dict, mean: dict, path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        print("learning.png skipped: matplotlib is not installed (pip install -e '.[bench]')", flush=True)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=90)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, name in enumerate(mean):
        c = colors[k % len(colors)]
        for ax, metric in zip(axes, ("ssim", "l1")):
            for seed, per in table[name].items():
                steps = sorted(per)
                ax.plot(steps, [per[s][metric] for s in steps], color=c, lw=0.8, alpha=0.45)
            steps = sorted(mean[name])
            ax.plot(steps, [mean[name][s][metric] for s in steps], color=c, lw=2.2, marker="o", ms=3,
                    label=f"{name} ({len(table[name])} seeds)")
    for ax, title in zip(axes, ("held-out SSIM (higher is better)", "held-out L1 (lower is better)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{args.config} preset, {len(args.seeds)} seeds: mean (bold) and per seed (thin)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def sample_grid(args: argparse.Namespace, path: Path) -> Path | None:
    """sketch | label | real | per variant: image (and argmax of each M_i for SSGAN variants)."""
    import torch

    from ssgan_dist import checkpoint as ckpt
    from ssgan_dist.data.ordered import OrderedSamples
    from ssgan_dist.data.shards import resolve_shards
    from ssgan_dist.evaluation.inference import load_generator, noise
    from ssgan_dist.grid import mask_argmax, tile_grid
    from ssgan_dist.images import rgb_arrays, save_png, sketch_arrays
    from ssgan_dist.labels import colorize, onehot

    seed = args.seeds[0] if args.sample_seed is None else args.sample_seed
    columns: list[tuple[str, np.ndarray]] = []
    batch = None
    for variant in args.variant:
        found = ckpt.list_checkpoints(run_dir(args, variant, seed))
        if not found:
            continue
        loaded = load_generator(found[-1], torch.device("cpu"), args.weights)
        model = loaded.cfg.model
        if batch is None:
            reader = OrderedSamples(resolve_shards(args.heldout_shards, "--heldout-shards"),
                                    num_classes=model.num_classes, image_size=model.image_size,
                                    max_samples=args.sample_rows)
            batch = next(iter(reader.batches(args.sample_rows)))
            columns += [("sketch", sketch_arrays(batch["sketch"])),
                        ("label M0", np.stack([colorize(lbl) for lbl in batch["label"].numpy()])),
                        ("real", rgb_arrays(batch["image"]))]
        with torch.no_grad():
            m0 = onehot(batch["label"], model.num_classes)
            image, masks = loaded.G(m0, noise(model, args.noise_seed, batch["index"]), return_masks=True)
        columns.append((variant.name, rgb_arrays(image)))
        for i, m in enumerate(masks, start=1):
            columns.append((f"M{i} {m.shape[-1]}px", np.stack([colorize(k) for k in
                                                               mask_argmax(m, model.image_size).numpy()])))
    if not columns:
        return None
    return save_png(tile_grid(columns), path)


# -- report -------------------------------------------------------------------------------


def report(args: argparse.Namespace, table: dict, mean: dict) -> str:
    lines = [f"{'variant':<22} {'step':>5}  {'SSIM mean':>9}  {'L1 mean':>8}  per seed SSIM / L1"]
    for name, per_step in mean.items():
        for step, e in per_step.items():
            seeds = "  ".join(f"s{seed} {table[name][seed][step]['ssim']:.3f}/{table[name][seed][step]['l1']:.3f}"
                              for seed in sorted(table[name]) if step in table[name][seed])
            lines.append(f"{name:<22} {step:>5}  {e['ssim']:>9.4f}  {e['l1']:>8.4f}  {seeds}")
    return "\n".join(lines)


def markdown(table: dict, mean: dict) -> str:
    """One row per (variant, step): mean SSIM and L1 over the seeds, then each seed's SSIM / L1."""
    seeds = sorted({s for per in table.values() for s in per})
    head = "| variant | step | SSIM mean | L1 mean | " + " | ".join(f"seed {s} SSIM / L1" for s in seeds) + " |"
    lines = [head, "|" + "---|" * (4 + len(seeds))]
    for name, per_step in mean.items():
        for step, e in per_step.items():
            cells = [f"{table[name][s][step]['ssim']:.3f} / {table[name][s][step]['l1']:.3f}"
                     if s in table[name] and step in table[name][s] else "-" for s in seeds]
            lines.append(f"| {name} | {step} | {e['ssim']:.3f} | {e['l1']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.report_dir or args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.report_only:
        train_all(args)
    if args.train_only:
        return 0
    table = score_all(args)
    mean = summarize(args, table)
    record = {
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv),
        "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
        "config": args.config, "common_overrides": args.set, "steps": args.steps, "every": args.every,
        "seeds": args.seeds, "threads": args.threads, "noise_seed": args.noise_seed,
        "train_shards": args.train_shards, "heldout_shards": args.heldout_shards,
        "variants": {v.name: v.overrides for v in args.variant},
        "fid_kid": "computed" if args.inception_weights else "skipped: no --inception-weights",
        "train_seconds": {f"{v.name}-s{s}": float(p.read_text()) for v in args.variant for s in args.seeds
                          if (p := run_dir(args, v, s) / "bench-seconds.txt").exists()},
        "scores": {n: {str(s): {str(st): {k: v for k, v in r.items() if k != "stamp"} for st, r in per.items()}
                       for s, per in seeds.items()} for n, seeds in table.items()},
        "mean": {n: {str(st): e for st, e in per.items()} for n, per in mean.items()},
    }
    (out / "learning.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "learning.md").write_text(markdown(table, mean))
    plot = plot_curves(args, table, mean, out / "learning.png")
    grid = sample_grid(args, out / "samples.png")
    print(report(args, table, mean))
    print(f"wrote {out / 'learning.json'}" + (f", {plot}" if plot else "") + (f", {grid}" if grid else "")
          + f" ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
