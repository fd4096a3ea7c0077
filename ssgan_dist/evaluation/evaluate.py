"""FID, KID and SSIM of a checkpoint on held-out shards (the paper's Table 1).

``python -m ssgan_dist.evaluation.evaluate`` (console script ``ssgan-evaluate``). One image
is generated for every sample of the shard set, with noise fixed by (seed, sample index),
and compared with the sample's photo: FID and KID over Inception pool3 features, SSIM on the
images in [0, 1]. M0 is the shard's label, or, with ``--segmenter``, the M0 a sketch segmenter
predicts from the sample's sketch: the paper's full pipeline sketch -> M0 -> image. Without
Inception weights FID and KID are skipped (said in the table and the JSON) and SSIM is still
computed. Under torchrun sample i is handled by rank i % world_size and the results are
gathered in index order, so the numbers do not depend on the number of ranks. The real
images' Inception features are cached (see ``fid.stats_key``). ``evaluate_generator`` is the
same evaluation for a Trainer to call every ``eval.every`` steps.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ssgan_dist.cache import cache_root
from ssgan_dist.config import DataConfig, EvalConfig, ModelConfig
from ssgan_dist.data.ordered import OrderedSamples
from ssgan_dist.data.schema import BadSample
from ssgan_dist.data.shards import resolve_shards
from ssgan_dist.distributed.collectives import from_main, gather_to_all
from ssgan_dist.distributed.env import DistEnv, setup, teardown
from ssgan_dist.errors import SetupError
from ssgan_dist.evaluation.fid import feature_stats, frechet_distance, load_features, save_features, stats_key
from ssgan_dist.evaluation.inception import NUM_FEATURES, WEIGHTS_FILE, load_inception
from ssgan_dist.evaluation.inference import (WEIGHTS, check_segmenter_fits, load_generator, load_segmenter, noise,
                                             run_generator, run_segmenter)
from ssgan_dist.evaluation.kid import kernel_inception_distance
from ssgan_dist.evaluation.ssim import ssim
from ssgan_dist.files import sha256_file
from ssgan_dist.images import to_uint8
from ssgan_dist.shell import command_parser, run_cli, setup_logging, track, write_record

log = logging.getLogger("ssgan_dist.evaluation.evaluate")

# The paper's Table 1 (SketchyCOCO scene level, 256x256): method, FID, SSIM. It has five rows;
# only these two could be checked against a source (DESIGN.md); the other three are not printed
# rather than guessed (PAPER_ROWS_NOTE says so under the table).
PAPER_ROWS = (("SSGAN (paper)", 123.8, 0.285), ("GauGAN-semantic sketch (paper)", 215.1, 0.285))
PAPER_ROWS_NOTE = ("The paper's Table 1 has five rows; its other three could not be verified from a source "
                   "and are not shown. The paper reports no KID.")
# FID's covariance is D x D (D = 2048 pool3 features): estimated from fewer samples it is
# rank-deficient and FID is biased upward, more so the fewer the samples.
FID_MIN_SAMPLES = NUM_FEATURES
FID_SKIPPED = (f"FID and KID skipped: no Inception weights ({WEIGHTS_FILE}, never downloaded; give "
               "--inception-weights or eval.inception_weights). SSIM needs none.")


class EvalError(SetupError):
    """An evaluation that cannot run as asked; the message names the option or file."""


@dataclass
class EvalSpec:
    """What to evaluate on; the option names are those the user set, for error messages.
    An empty ``inception_weights`` skips FID and KID."""

    shards: str
    inception_weights: str
    cache_dir: Path  # real-image features (fid_cache_dir)
    max_samples: int = 0
    batch_size: int = 8
    seed: int = 0
    on_error: str = "raise"
    shards_option: str = "eval.shards"
    weights_option: str = "eval.inception_weights"

    @classmethod
    def for_training(cls, evaluation: EvalConfig, data: DataConfig) -> "EvalSpec":
        """The in-training evaluation: eval.*; bad samples follow data.on_error, as training does."""
        return cls(evaluation.shards, evaluation.inception_weights, fid_cache_dir(data.cache_dir),
                   evaluation.max_samples, evaluation.batch_size, on_error=data.on_error)


def fid_cache_dir(cache_dir: str) -> Path:
    """Beside the synthetic shards, under the cache root (data.cache_dir, see cache.py)."""
    return cache_root(cache_dir) / "fid-stats"


def _features(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, NUM_FEATURES), np.float32)


@torch.no_grad()
def _local_pass(G: nn.Module, m: ModelConfig, env: DistEnv, spec: EvalSpec, reader: OrderedSamples,
                inception: nn.Module | None, need_real: bool, segmenter: nn.Module | None) -> dict[str, Any]:
    """This rank's share: sample indices, generated (and real) features, per-image SSIM."""
    out: dict[str, Any] = {"index": [], "fake": [], "real": [], "ssim": [], "l1": []}
    try:
        for batch in track(reader.batches(spec.batch_size), "evaluate", reader.expected(), unit="sample",
                           size=lambda b: len(b["index"]), enabled=env.is_main, leave=False):
            label = run_segmenter(segmenter, batch["sketch"]) if segmenter is not None else batch["label"]
            fake, _ = run_generator(G, m, label, noise(m, spec.seed, batch["index"]))
            real = batch["image"].to(env.device)
            fake01, real01 = to_uint8(fake) / 255.0, to_uint8(real) / 255.0
            out["ssim"] += ssim(fake01, real01).tolist()
            out["l1"] += (fake01 - real01).abs().mean(dim=(1, 2, 3)).tolist()
            if inception is not None:
                out["fake"].append(inception(fake).cpu().numpy())
            if need_real:
                out["real"].append(inception(real).cpu().numpy())
            out["index"] += batch["index"]
    except BadSample as bad:
        raise EvalError(f"{spec.shards_option}: {bad} (this model takes {m.image_size}x{m.image_size} "
                        f"samples with class indices below {m.num_classes})") from None
    return {"index": out["index"], "fake": _features(out["fake"]), "real": _features(out["real"]),
            "ssim": out["ssim"], "l1": out["l1"], "skipped": reader.skipped}


def _combine(parts: list[dict[str, Any]], key: str) -> np.ndarray:
    """One array of every rank's rows, in sample-index order."""
    index = np.concatenate([np.asarray(p["index"], np.int64) for p in parts])
    return np.concatenate([np.asarray(p[key]) for p in parts])[np.argsort(index, kind="stable")]


def few_samples_warning(n: int) -> str | None:
    """The warning for an FID over fewer samples than pool3 has features, or None."""
    if n >= FID_MIN_SAMPLES:
        return None
    return (f"FID over {n} samples, fewer than the {FID_MIN_SAMPLES} Inception features: the covariance is "
            "rank-deficient and FID is biased upward (compare FIDs only at equal sample counts; KID is unbiased "
            "at any count; the paper's test set has 2816 scenes)")


def evaluate_generator(G: nn.Module, model: ModelConfig, env: DistEnv, spec: EvalSpec,
                       segmenter: nn.Module | None = None) -> dict[str, Any]:
    """FID, KID, mean SSIM and mean L1 (RGB in [0, 1]) of G (of ``model``) on a shard set, M0 from the shards or predicted
    by ``segmenter`` from the sketches; call on every rank, every rank gets the result. G is
    switched to eval mode for the pass and back to its previous mode after it.
    """
    t0 = time.perf_counter()
    if not spec.shards:
        raise EvalError(f"{spec.shards_option} is empty: give the held-out shards to evaluate on")
    shards = resolve_shards(spec.shards, spec.shards_option)
    inception = load_inception(spec.inception_weights, spec.weights_option).to(env.device) \
        if spec.inception_weights else None
    cache_dir, key, cached = spec.cache_dir, "", False
    if inception is not None:
        key = stats_key(shards, sha256_file(spec.inception_weights), {
            "max_samples": spec.max_samples, "image_size": model.image_size,
            "num_classes": model.num_classes, "on_error": spec.on_error, "entry": "pool3 features",
        })
        cached = from_main(lambda: load_features(cache_dir, key) is not None)
    reader = OrderedSamples(shards, num_classes=model.num_classes, image_size=model.image_size,
                            on_error=spec.on_error, rank=env.rank, world_size=env.world_size,
                            max_samples=spec.max_samples)
    was_training = G.training
    G.eval()
    try:
        local = _local_pass(G, model, env, spec, reader, inception, inception is not None and not cached, segmenter)
    finally:
        G.train(was_training)
    parts = gather_to_all(local)
    skipped = [reason for p in parts for reason in p["skipped"]]
    if env.is_main:
        for reason in skipped[:5]:
            log.warning("evaluation skipped a bad sample: %s", reason)

    def summarize() -> dict[str, Any]:
        scores = _combine(parts, "ssim")
        n = len(scores)
        need = 1 if inception is None else 2
        if n < need:
            first = f"; first skipped: {skipped[0]}" if skipped else ""
            raise EvalError(f"{spec.shards_option}: {n} usable samples, {'FID needs' if need == 2 else 'need'} "
                            f"at least {need}{first}")
        result: dict[str, Any] = {"ssim": float(np.mean(scores)), "l1": float(np.mean(_combine(parts, "l1"))),
                                  "samples": int(n), "skipped": len(skipped),
                                  "seed": spec.seed, "labels": "segmenter" if segmenter is not None else "shards",
                                  "fid": None, "kid": None, "kid_std": None, "warnings": []}
        if inception is None:
            result["metrics_skipped"] = FID_SKIPPED
            return result
        fake = _combine(parts, "fake")
        if cached:
            real = load_features(cache_dir, key)
        else:
            real = _combine(parts, "real")
            save_features(cache_dir, key, real)
        (mu_f, sigma_f), (mu_r, sigma_r) = feature_stats(fake), feature_stats(real)
        kid = kernel_inception_distance(fake, real)
        result.update({
            "fid": frechet_distance(mu_f, sigma_f, mu_r, sigma_r),
            "kid": kid.mean, "kid_std": kid.std, "kid_subsets": kid.subsets, "kid_subset_size": kid.subset_size,
            "real_stats_file": str(cache_dir / f"{key}.npz"), "real_stats_cached": bool(cached),
        })
        if (warning := few_samples_warning(n)) is not None:
            result["warnings"].append(warning)
        return result

    result = from_main(summarize)
    if env.is_main:
        for line in (result.get("metrics_skipped"), *result["warnings"]):
            if line:
                log.warning("%s", line)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def method_name(model: ModelConfig) -> str:
    return "SSGAN" if model.sfm else "GauGAN-semantic sketch"


def _number(value: float | None, spec: str) -> str:
    return "skipped" if value is None else format(value, spec)


def format_table(record: dict[str, Any]) -> str:
    """The paper's Table 1 layout: method | FID | KID | SSIM, the paper's verified rows for
    reference, then what this row was measured on."""
    ours = f"{record['method']}, this checkpoint (step {record['step']}, {record['weights']})"
    kid = "skipped" if record["kid"] is None else f"{record['kid']:.4f} ± {record['kid_std']:.4f}"
    rows = [(name, f"{fid:.1f}", "-", f"{s:.3f}") for name, fid, s in PAPER_ROWS]
    rows.append((ours, _number(record["fid"], ".1f"), kid, _number(record["ssim"], ".3f")))
    width = max(len(r[0]) for r in rows)
    kid_w = max(len(r[2]) for r in rows)
    lines = [f"{'method':<{width}}  {'FID':>8}  {'KID':>{kid_w}}  {'SSIM':>6}"]
    lines += [f"{name:<{width}}  {fid:>8}  {k:>{kid_w}}  {s:>6}" for name, fid, k, s in rows]
    m0 = (f"M0 predicted from the sketches by --segmenter {record['segmenter']} (step {record['segmenter_step']})"
          if record.get("segmenter") else "M0 = the shards' labels")
    lines.append(f"({record['samples']} samples at {record['image_size']} px, {m0}; the paper: SketchyCOCO's "
                 "test set, val + valInTrain, 2816 scenes at 256 px)")
    lines.append(PAPER_ROWS_NOTE)
    lines += [line for line in (record.get("metrics_skipped"), *record.get("warnings", [])) if line]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = command_parser("ssgan_dist.evaluation.evaluate", __doc__)
    p.add_argument("--checkpoint", required=True, help="ckpt-*.pt, or a run directory (its newest checkpoint)")
    p.add_argument("--shards", default="", help="held-out shards (dir, brace pattern, comma list); "
                                                "default: the checkpoint's eval.shards")
    p.add_argument("--inception-weights", default="", help="pt_inception-2015-12-05-6726825d.pth; default: the "
                   "checkpoint's eval.inception_weights; neither: FID and KID are skipped, SSIM is computed")
    p.add_argument("--segmenter", default="", help="a sketch segmenter's checkpoint (or run directory): M0 is "
                   "predicted from each sample's sketch instead of read from the shard (the full pipeline)")
    p.add_argument("--weights", choices=WEIGHTS, default="auto", help="G's weights: auto = the EMA of G (G_ema) "
                   "when the checkpoint has one (train.ema), else G; ema = G_ema or an error; raw = G")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--batch-size", type=int, default=0, help="images per forward; default: eval.batch_size")
    p.add_argument("--max-samples", type=int, default=-1, help="only the first N samples; 0: all; "
                                                               "default: eval.max_samples")
    p.add_argument("--seed", type=int, default=0, help="noise seed (z of sample i depends on seed and i)")
    p.add_argument("--cache-dir", default="", help="cache of real-image Inception features; default: "
                                                   "$SSGAN_CACHE/fid-stats or ~/.cache/ssgan_dist/fid-stats")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="a bad sample stops the evaluation (default) or is skipped and counted")
    return p.parse_args(argv)


def run(args: argparse.Namespace, env: DistEnv) -> dict[str, Any] | None:
    """Evaluate; the record (rank 0) or None (other ranks)."""
    loaded = load_generator(Path(args.checkpoint), env.device, args.weights)
    cfg = loaded.cfg
    seg = load_segmenter(Path(args.segmenter), env.device) if args.segmenter else None
    if seg is not None:
        check_segmenter_fits(seg, loaded)
    spec = EvalSpec(
        shards=args.shards or cfg.eval.shards,
        inception_weights=args.inception_weights or cfg.eval.inception_weights,
        max_samples=cfg.eval.max_samples if args.max_samples < 0 else args.max_samples,
        batch_size=args.batch_size or cfg.eval.batch_size,
        seed=args.seed,
        cache_dir=Path(args.cache_dir) if args.cache_dir else fid_cache_dir(cfg.data.cache_dir),
        on_error=args.on_error,
        shards_option="--shards", weights_option="--inception-weights",
    )
    if spec.batch_size < 1:
        raise EvalError(f"--batch-size: must be at least 1, got {spec.batch_size}")
    log.info("evaluating %s (step %d, %s, weights %s) on %s%s, rank %d of %d", loaded.path, loaded.step,
             method_name(cfg.model), loaded.weights, spec.shards,
             f", M0 by the segmenter {seg.path}" if seg else "", env.rank, env.world_size)
    result = evaluate_generator(loaded.G, cfg.model, env, spec, seg.S if seg else None)
    if not env.is_main:
        return None
    record = {
        "method": method_name(cfg.model), **result, "checkpoint": str(loaded.path), "step": loaded.step,
        "config_hash": loaded.config_hash, "weights": loaded.weights, "shards": spec.shards,
        "image_size": cfg.model.image_size, "inception_weights": spec.inception_weights, "world_size": env.world_size,
        "segmenter": str(seg.path) if seg else None, "segmenter_step": seg.step if seg else None,
    }
    write_record(args.out, record)
    return record


def run_command(args: argparse.Namespace, run_fn: Callable[[argparse.Namespace, DistEnv], dict | None],
                table: Callable[[dict], str]) -> int:
    """An evaluation command on every rank: setup, run, rank 0 prints its table (shell.run_cli)."""

    def command() -> int:
        env = setup()
        setup_logging(env.rank, verbose=env.is_main)
        try:
            record = run_fn(args, env)
        finally:
            teardown()
        if record is not None:
            print(table(record))
            if args.out:
                print(f"results: {args.out}")
        return 0

    return run_cli(command)


def main(argv: list[str] | None = None) -> int:
    return run_command(parse_args(argv), run, format_table)


if __name__ == "__main__":
    sys.exit(main())
