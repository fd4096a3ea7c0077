"""Turn a dataset into webdataset shards, or check shards.

``python -m ssgan_dist.data.build`` (console script ``ssgan-shards``) with one of:

    sketchycoco --root DIR --split train|test|trainInTrain|valInTrain|val[,...] --out DIR
    folder --sketch DIR --label DIR --image DIR --out DIR
    synthetic --count N --out DIR
    verify DIR

Builders share --size, --samples-per-shard, --seed (the pre-shuffle), --workers and
--on-error: a source sample that cannot be used (a missing file, an unreadable image or
.mat, a class out of range, sizes that disagree) is skipped, logged and listed in the
manifest's ``extra.skipped`` (skip, the default) or stops the build naming its files
(raise). Exit status: 0 done, 1 ``verify`` found problems, 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ssgan_dist.data import folder, sketchycoco
from ssgan_dist.data.verify import verify
from ssgan_dist.data.writer import BadSource, Encoded, Sample, build_synthetic_shards, parallel_encode, write_encoded
from ssgan_dist.errors import SetupError
from ssgan_dist.shell import HelpFormatter, command_parser, run_cli, setup_logging

log = logging.getLogger("ssgan_dist.shards")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build(items: Sequence[Any], load: Callable[[Any], Sample], missing: list[BadSource], args: argparse.Namespace, *,
          source: str, num_classes: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Shuffle the complete items by --seed, encode them in parallel, write the shards;
    bad items (``missing`` ones and those that fail to load) are skipped or raised."""
    if missing and args.on_error == "raise":
        raise missing[0]
    skipped = [str(bad) for bad in missing]
    for reason in skipped:
        log.warning("skipped: %s", reason)
    order = [items[i] for i in np.random.default_rng(args.seed).permutation(len(items))]

    def good() -> Iterator[Encoded]:
        written = 0
        for result in parallel_encode(load, order, workers=args.workers, num_classes=num_classes,
                                      resolution=args.size, desc=source):
            if isinstance(result, BadSource):
                if args.on_error == "raise":
                    raise result
                log.warning("skipped: %s", result)
                skipped.append(str(result))
                continue
            written += 1
            yield result
        if not written:
            raise SetupError(f"no usable samples ({len(skipped)} skipped, see the warnings above)")

    # write_encoded stores ``extra`` after the last sample, so "skipped" is complete by then.
    settings = {**extra, "seed": args.seed, "size": args.size, "skipped": skipped}
    manifest = write_encoded(good(), args.out, name=args.name, samples_per_shard=args.samples_per_shard,
                             num_classes=num_classes, source=source, resolution=args.size, extra=settings)
    _summary(manifest, args.out, len(skipped))
    return manifest


def _partition(items: Sequence[Any], missing_parts: Callable[[Any], BadSource | None]) -> tuple[list[Any], list[BadSource]]:
    """(complete items, BadSource for each incomplete one)."""
    checked = [(item, missing_parts(item)) for item in items]
    return [item for item, bad in checked if bad is None], [bad for _, bad in checked if bad is not None]


def _summary(manifest: dict[str, Any], out: str, skipped: int) -> None:
    print(f"{manifest['samples']} samples in {len(manifest['shards'])} shards of {manifest['resolution']} px "
          f"-> {out}" + (f"; {skipped} skipped (manifest.json extra.skipped)" if skipped else ""))


def _sketchycoco(args: argparse.Namespace) -> int:
    complete, missing = _partition(sketchycoco.scan(args.root, args.split), sketchycoco.missing_parts)
    build(complete, partial(sketchycoco.load, size=args.size), missing, args, source="sketchycoco",
          num_classes=sketchycoco.NUM_CLASSES,
          extra={"root": os.path.abspath(args.root), "split": args.split,
                 "folders": list(sketchycoco.split_folders(args.split)), "label": sketchycoco.LABEL_RULE})
    return 0


def _folder(args: argparse.Namespace) -> int:
    complete, missing = _partition(folder.scan(args.sketch, args.label, args.image), folder.missing_parts)
    build(complete, partial(folder.load, size=args.size, num_classes=args.num_classes), missing, args,
          source="folder", num_classes=args.num_classes,
          extra={key: os.path.abspath(getattr(args, key)) for key in ("sketch", "label", "image")})
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    manifest = build_synthetic_shards(args.out, count=args.count, samples_per_shard=args.samples_per_shard,
                                      size=args.size, seed=args.seed, num_classes=args.num_classes,
                                      workers=args.workers)
    _summary(manifest, args.out, 0)
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = verify(args.dir, workers=args.workers, num_classes=args.num_classes, image_size=args.size)
    for line in report.bad:
        print(f"BAD {line}")
    for line in report.problems:
        print(f"PROBLEM {line}")
    print(f"{args.dir}: {report.samples} samples, {len(report.bad)} bad, {len(report.problems)} other problems")
    return 0 if report.ok else 1


def parser() -> argparse.ArgumentParser:
    top = command_parser("ssgan_dist.data.build", __doc__)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND",
                             help="what to build or check (COMMAND --help lists its options)")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)

    def builder(name: str, help: str) -> argparse.ArgumentParser:
        p = command(name, help)
        p.add_argument("--out", required=True, help="output directory for <name>-NNNNNN.tar, .idx and manifest.json")
        p.add_argument("--size", type=int, default=256, help="square resolution of the stored samples (px)")
        p.add_argument("--samples-per-shard", type=int, default=1000,
                       help="samples per .tar (about 1,000 keeps shards near 100 MB at 256 px)")
        p.add_argument("--seed", type=int, default=0, help="seed of the pre-shuffle (and of synthetic scenes)")
        p.add_argument("--workers", type=int, default=_cpus(), help="encoding processes; default: all CPUs")
        p.add_argument("--name", default="shard", help="shard file prefix")
        return p

    p = builder("sketchycoco", "SketchyCOCO scene level -> shards")
    p.add_argument("--root", required=True, help="directory holding Scene/ (or Scene itself)")
    p.add_argument("--split", required=True,
                   help="train (= trainInTrain), test (= val + valInTrain: the paper's held-out 20%%, 2816 scenes), "
                        "a folder (trainInTrain, valInTrain, val), or a comma list of them")
    p = builder("folder", "sketch / label / image folders matched by file stem -> shards")
    for part in folder.PARTS:
        p.add_argument(f"--{part}", required=True, help=f"directory of {part} files")
    p.add_argument("--num-classes", type=int, default=20, help="label classes C (indices 0..C-1, 0 = none)")
    p = builder("synthetic", "generated SketchyCOCO-like scenes -> shards")
    p.add_argument("--count", type=int, required=True, help="scenes to generate")
    p.add_argument("--num-classes", type=int, default=20, help="label classes C (SketchyCOCO's 20)")
    for name in ("sketchycoco", "folder"):
        sub.choices[name].add_argument("--on-error", choices=("skip", "raise"), default="skip",
                                       help="a bad source sample: skip and report it (default) or stop")
    p = command("verify", "decode every sample of a shard directory and check it against its manifest")
    p.add_argument("dir", help="the shard directory (its manifest.json beside the .tar files)")
    p.add_argument("--workers", type=int, default=_cpus(), help="checking processes; default: all CPUs")
    p.add_argument("--num-classes", type=int, default=None, help="only for a directory without a manifest")
    p.add_argument("--size", type=int, default=None, help="only for a directory without a manifest")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging()
    command = {"sketchycoco": _sketchycoco, "folder": _folder, "synthetic": _synthetic, "verify": _verify}
    return run_cli(lambda: command[args.command](_checked(args)))


def _checked(args: argparse.Namespace) -> argparse.Namespace:
    for option in ("size", "samples_per_shard", "count", "num_classes"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise SetupError(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    return args


if __name__ == "__main__":
    sys.exit(main())
