"""Stroke-pixel accuracy and IoU of a sketch segmenter on held-out shards.

``python -m ssgan_dist.evaluation.evaluate_segmenter`` (console script
``ssgan-evaluate-segmenter``). Every sample of a held-out shard set is segmented once, in shard order (under torchrun,
sample i on rank i % world_size, the confusion matrices summed, so any rank count gives the
same numbers), and scored on its labelled stroke pixels, the pixels the segmenter is trained
on (models/segmenter.py): pixel accuracy, per-class IoU and accuracy (recall), mean IoU over
the classes that occur in the labels or the predictions, and, for scale, the majority
baseline (the accuracy of always answering the most frequent labelled class). Blank pixels
are 0 in label and prediction alike and are not scored; unlabelled stroke pixels (class 0)
are counted but not scored.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssgan_dist.data.ordered import OrderedSamples
from ssgan_dist.data.schema import BadSample
from ssgan_dist.data.shards import resolve_shards
from ssgan_dist.distributed.collectives import sum_over_ranks
from ssgan_dist.distributed.env import DistEnv
from ssgan_dist.errors import SetupError
from ssgan_dist.evaluation.evaluate import run_command
from ssgan_dist.evaluation.inference import LoadedSegmenter, load_segmenter, run_segmenter
from ssgan_dist.labels import class_name, stroke_mask
from ssgan_dist.shell import command_parser, track, write_record


def confusion(pred: torch.Tensor, label: torch.Tensor, sketch: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C,C] int64 counts (row: label, column: prediction) over the stroke pixels of a batch;
    row 0 holds the unlabelled stroke pixels, which are not scored."""
    stroke = stroke_mask(sketch[:, 0]).to(label.device)
    index = label[stroke] * num_classes + pred.to(label.device)[stroke]
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes).cpu()


def scores(conf: np.ndarray) -> dict[str, Any]:
    """Accuracy, IoU and baseline of a confusion matrix (see the module docstring)."""
    scored = conf[1:, 1:].astype(np.float64)  # labelled strokes; the segmenter never predicts 0 on a stroke
    total, truth, predicted, hit = scored.sum(), scored.sum(1), scored.sum(0), np.diag(scored)
    union = truth + predicted - hit
    classes = {
        class_name(c + 1): {"index": int(c + 1), "pixels": int(truth[c]), "predicted": int(predicted[c]),
                            "iou": float(hit[c] / union[c]), "accuracy": float(hit[c] / truth[c]) if truth[c] else None}
        for c in np.flatnonzero(union)
    }
    if not total:
        raise SetupError("no labelled stroke pixels to score: every sketch is blank or unlabelled")
    return {
        "pixel_accuracy": float(hit.sum() / total),
        "mean_iou": float(np.mean([c["iou"] for c in classes.values()])),
        "majority_baseline": float(truth.max() / total),
        "labelled_stroke_pixels": int(total),
        "unlabelled_stroke_pixels": int(conf[0].sum()),
        "classes": classes,
    }


@torch.no_grad()
def evaluate_segmenter(loaded: LoadedSegmenter, shards: list[str], env: DistEnv, *, batch_size: int = 16,
                       max_samples: int = 0, on_error: str = "raise", shards_option: str = "--shards") -> dict[str, Any]:
    """Scores of the segmenter on a shard set; call on every rank, every rank gets them."""
    m = loaded.cfg.model
    reader = OrderedSamples(shards, num_classes=m.num_classes, image_size=m.image_size, on_error=on_error,
                            rank=env.rank, world_size=env.world_size, max_samples=max_samples)
    conf, samples = torch.zeros(m.num_classes, m.num_classes, dtype=torch.int64), 0
    try:
        for batch in track(reader.batches(batch_size), "evaluate_segmenter", reader.expected(), unit="sample",
                           size=lambda b: len(b["index"]), enabled=env.is_main, leave=False):
            pred = run_segmenter(loaded.S, batch["sketch"])
            conf += confusion(pred.cpu(), batch["label"], batch["sketch"], m.num_classes)
            samples += len(batch["index"])
    except BadSample as bad:
        raise SetupError(f"{shards_option}: {bad} ({loaded.path} takes {m.image_size}x{m.image_size} samples "
                         f"with class indices below {m.num_classes})") from None
    counts = sum_over_ranks(torch.cat([conf.flatten(), torch.tensor([samples, len(reader.skipped)])]).to(env.device))
    counts = counts.cpu().numpy()
    if counts[-2] == 0:
        raise SetupError(f"{shards_option}: no usable samples")
    return {**scores(counts[:-2].reshape(m.num_classes, m.num_classes)), "samples": int(counts[-2]),
            "skipped": int(counts[-1])}


def format_table(record: dict[str, Any]) -> str:
    lines = [f"{'class':<16}{'pixels':>9}{'IoU':>8}{'acc':>8}"]
    for name, c in record["classes"].items():
        acc = f"{c['accuracy']:.3f}" if c["accuracy"] is not None else "-"
        lines.append(f"{name:<16}{c['pixels']:>9}{c['iou']:>8.3f}{acc:>8}")
    lines.append(f"pixel accuracy {record['pixel_accuracy']:.4f} (majority baseline {record['majority_baseline']:.4f}), "
                 f"mean IoU {record['mean_iou']:.4f}; {record['labelled_stroke_pixels']} labelled stroke pixels "
                 f"of {record['samples']} samples, step {record['step']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = command_parser("ssgan_dist.evaluation.evaluate_segmenter", __doc__)
    p.add_argument("--checkpoint", required=True, help="a segmenter's ckpt-*.pt, or its run directory (newest)")
    p.add_argument("--shards", required=True, help="held-out shards (dir, brace pattern, comma list)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--batch-size", type=int, default=16, help="sketches per forward pass")
    p.add_argument("--max-samples", type=int, default=0, help="only the first N samples; 0: all")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="a bad sample stops the evaluation (default) or is skipped and counted")
    return p.parse_args(argv)


def run(args: argparse.Namespace, env: DistEnv) -> dict[str, Any] | None:
    """Evaluate; the record (rank 0) or None (other ranks)."""
    if args.batch_size < 1 or args.max_samples < 0:
        raise SetupError("--batch-size: at least 1; --max-samples: 0 or more")
    loaded = load_segmenter(Path(args.checkpoint), env.device, option="--checkpoint")
    shards = resolve_shards(args.shards, "--shards")
    result = evaluate_segmenter(loaded, shards, env, batch_size=args.batch_size, max_samples=args.max_samples,
                                on_error=args.on_error)
    if not env.is_main:
        return None
    record = {**result, "checkpoint": str(loaded.path), "step": loaded.step, "shards": args.shards,
              "image_size": loaded.cfg.model.image_size, "num_classes": loaded.cfg.model.num_classes,
              "world_size": env.world_size}
    write_record(args.out, record)
    return record


def main(argv: list[str] | None = None) -> int:
    return run_command(parse_args(argv), run, format_table)


if __name__ == "__main__":
    sys.exit(main())
