"""Images from a sketch and its label map, or from a shard set.

``python -m ssgan_dist.evaluation.generate`` (console script ``ssgan-generate``). One input
(``--sketch S.png --label L.png --out out.png``), a bare sketch whose label map M0 a sketch
segmenter predicts (``--sketch S.png --segmenter SEG.pt --out out.png``, M0 written
as ``out.label.png``), or every sample of a shard set (``--shards SPEC --out DIR``, one
``<key>.png`` each). Beside each image, ``<name>.mask.png`` shows the SFM's last output M_i
(argmax over classes, coloured like the label maps), the paper's Figure 3(c).
``--num-styles K`` draws K noise vectors per input (``<name>-style<k>.png``);
``--grid G.png`` puts inputs x styles side by side: sketch | label | K outputs | real | mask.
The generator and its config come from the checkpoint (its EMA weights ``G_ema`` when it has
them, see ``--weights``); noise from (seed, input index, style).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from ssgan_dist.config import Config
from ssgan_dist.data.ordered import OrderedSamples
from ssgan_dist.data.schema import BadSample
from ssgan_dist.data.shards import resolve_shards
from ssgan_dist.distributed.env import setup
from ssgan_dist.errors import SetupError
from ssgan_dist.evaluation.inference import (WEIGHTS, LoadedGenerator, check_segmenter_fits, load_generator,
                                             load_segmenter, noise, run_generator, run_segmenter)
from ssgan_dist.grid import make_grid, mask_argmax
from ssgan_dist.images import rgb_arrays, save_png, sketch_tensor
from ssgan_dist.labels import STROKE_THRESHOLD, colorize, stroke_mask
from ssgan_dist.shell import command_parser, run_cli, setup_logging, track

# Where a lone --sketch can get its label map from, as named in the error when none is given.
LABEL_SOURCES = ("--label PNG (class index per pixel, 0 = none)",
                 "--segmenter CKPT (a sketch segmenter's checkpoint, run.task=segmenter, predicts it)")


class InputError(SetupError):
    """An input that does not fit the checkpoint's model; the message names the file and option."""


# -- inputs ---------------------------------------------------------------------------------


def _open_image(path: str, option: str) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{option}: no such file {p}")
    try:
        img = Image.open(p)
        img.load()
    except Exception as exc:  # PIL raises many types for data it cannot decode
        raise InputError(f"{option}: {p} cannot be read as an image ({exc})") from None
    return img


def read_sketch(path: str) -> np.ndarray:
    """8-bit grey [H,W], strokes dark on white as in the shards. Grey stored as RGB is fine and
    transparency is laid on white paper, but a colour image is refused: it is not a sketch."""
    img = _open_image(path, "--sketch")
    if img.mode in ("1", "L"):
        return np.array(img.convert("L"))
    rgba = img.convert("RGBA")
    rgb = np.array(Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB"))
    if (rgb != rgb[..., :1]).any():
        raise InputError(f"--sketch: {path} is a colour image ({img.mode}); a sketch is grey or black strokes "
                         "on white paper (class maps go to --label as class indices)")
    return rgb[..., 0].copy()


def read_label(path: str, num_classes: int) -> np.ndarray:
    """A class-index PNG (grey or palette) as uint8 [H,W]; refused if an index is >= num_classes."""
    img = _open_image(path, "--label")
    if img.mode not in ("L", "P"):
        raise InputError(f"--label: {path} is a {img.mode} image; expected class indices, one 8-bit value "
                         "per pixel (grey or palette PNG, 0 = none), not a coloured map")
    label = np.array(img)
    top = int(label.max())
    if top >= num_classes:
        raise InputError(f"--label: {path} holds class {top}, but the checkpoint's model has "
                         f"model.num_classes={num_classes} (indices 0..{num_classes - 1})")
    return label


def predict_label(args: argparse.Namespace, loaded: LoadedGenerator, sketch: np.ndarray) -> np.ndarray:
    """M0 of --sketch predicted by --segmenter, whose classes and size must be the generator's."""
    seg = load_segmenter(Path(args.segmenter), next(loaded.G.parameters()).device)
    check_segmenter_fits(seg, loaded)
    pixels = sketch_tensor(sketch)
    if not stroke_mask(pixels).any():
        raise InputError(f"--sketch {args.sketch} is blank (no pixel darker than {STROKE_THRESHOLD}/255): "
                         "--segmenter labels strokes, and there are none")
    return run_segmenter(seg.S, pixels)[0].cpu().numpy().astype(np.uint8)


def label_for(args: argparse.Namespace, loaded: LoadedGenerator, sketch: np.ndarray) -> np.ndarray:
    """The label map of a single --sketch, from the one source given (see LABEL_SOURCES)."""
    if args.label:
        return read_label(args.label, loaded.cfg.model.num_classes)
    if args.segmenter:
        return predict_label(args, loaded, sketch)
    raise InputError(f"no label map for --sketch {args.sketch}: give {' or '.join(LABEL_SOURCES)}")


def single_input(args: argparse.Namespace, loaded: LoadedGenerator) -> dict:
    """The one input of --sketch as a batch of one, checked against the model's size."""
    sketch = read_sketch(args.sketch)
    size = loaded.cfg.model.image_size
    if args.segmenter and sketch.shape != (size, size):  # checked before the segmenter runs on it
        raise InputError(f"--sketch {args.sketch} is {sketch.shape[1]}x{sketch.shape[0]}, but --checkpoint "
                         f"{loaded.path} makes {size}x{size} images (model.image_size={size})")
    label = label_for(args, loaded, sketch)
    if sketch.shape != label.shape:
        raise InputError(f"--sketch {args.sketch} is {sketch.shape[1]}x{sketch.shape[0]} but the label map "
                         f"is {label.shape[1]}x{label.shape[0]}: they must be the same size")
    if label.shape != (size, size):
        raise InputError(f"--sketch {args.sketch} and its label map are {label.shape[1]}x{label.shape[0]}, but "
                         f"--checkpoint {loaded.path} makes {size}x{size} images (model.image_size={size})")
    return {
        "index": [0],
        "sketch": sketch_tensor(sketch),
        "label": torch.from_numpy(label).long()[None],
    }


def set_inputs(args: argparse.Namespace, loaded: LoadedGenerator) -> Iterator[dict]:
    """Batches of every sample of --shards, in shard order."""
    m = loaded.cfg.model
    reader = OrderedSamples(resolve_shards(args.shards, "--shards"), num_classes=m.num_classes,
                            image_size=m.image_size, max_samples=args.max_samples)
    try:
        yield from track(reader.batches(args.batch_size), "generate", reader.expected(), unit="sample",
                         size=lambda b: len(b["index"]))
    except BadSample as bad:
        raise InputError(f"--shards: {bad} (--checkpoint {loaded.path} takes {m.image_size}x{m.image_size} "
                         f"samples with class indices below {m.num_classes})") from None


# -- outputs --------------------------------------------------------------------------------


def inside(root: Path, path: Path, key: str) -> Path:
    """``path`` if it lies inside the directory ``root`` (both resolved: '..', absolute keys and
    symlinks out of it count as outside), else InputError: a sample key never picks where a
    file goes (the shard readers refuse such keys too; this holds on its own)."""
    resolved, base = path.resolve(), root.resolve()
    if resolved == base or not resolved.is_relative_to(base):
        raise InputError(f"--shards: sample key {key!r} would write {resolved}, outside --out {base}; "
                         "nothing is written outside --out (sample keys must be plain names)")
    return path


def output_path(base: Path, style: int, num_styles: int) -> Path:
    return base if num_styles == 1 else base.with_name(f"{base.stem}-style{style}.png")


def mask_path(image_path: Path) -> Path:
    return image_path.with_name(f"{image_path.stem}.mask.png")


def label_path(out: Path) -> Path:
    """Where the M0 predicted by --segmenter goes, in the label colours."""
    return out.with_name(f"{out.stem}.label.png")


@dataclass
class GridRows:
    """The first rows of the grid, collected while the batches stream by."""

    limit: int
    parts: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    count: int = 0

    def add(self, **columns: torch.Tensor | None) -> None:
        take = min(self.limit - self.count, next(iter(columns.values())).shape[0])
        if take <= 0:
            return
        for name, value in columns.items():
            if value is not None:
                self.parts.setdefault(name, []).append(value[:take].cpu())
        self.count += take

    def get(self, name: str) -> torch.Tensor | None:
        return torch.cat(self.parts[name]) if name in self.parts else None


def generate(args: argparse.Namespace, loaded: LoadedGenerator) -> list[Path]:
    """Write every output image and mask; returns the image paths."""
    cfg, k = loaded.cfg, args.num_styles
    out = Path(args.out)
    if args.shards:
        if out.exists() and not out.is_dir():
            raise InputError(f"--out: {out} is a file; with --shards it is the directory for the images")
        batches, bases = set_inputs(args, loaded), lambda batch: [out / f"{key}.png" for key in batch["key"]]
    else:
        if out.suffix.lower() != ".png":
            raise InputError(f"--out: {out} must end in .png for one input")
        single = single_input(args, loaded)
        if args.segmenter:
            save_png(colorize(single["label"][0]), label_path(out))
        batches, bases = iter([single]), lambda batch: [out]
    grid = GridRows(args.grid_rows)
    written: list[Path] = []
    for batch in batches:
        fakes = []
        for style in range(k):
            fake, mask = run_generator(loaded.G, cfg.model, batch["label"],
                                       noise(cfg.model, args.seed, batch["index"], style))
            images = rgb_arrays(fake)
            masks = mask_argmax(mask, cfg.model.image_size).cpu().numpy() if mask is not None else None
            for i, base in enumerate(bases(batch)):
                path = output_path(base, style, k)
                paths = [path, mask_path(path)]
                if args.shards:  # a sample key names the file (the user named --out itself)
                    paths = [inside(out, p, batch["key"][i]) for p in paths]
                written.append(save_png(images[i], paths[0]))
                if masks is not None:
                    save_png(colorize(masks[i]), paths[1])
            fakes.append(fake)
            if style == 0:
                first_mask = mask
        grid.add(sketch=batch["sketch"], label=batch["label"], real=batch.get("image"), mask=first_mask,
                 **{f"fake{s}": f for s, f in enumerate(fakes)})
    if not written:
        raise InputError(f"--shards {args.shards}: no samples")
    if args.grid:
        array = make_grid(grid.get("sketch"), grid.get("label"), [grid.get(f"fake{s}") for s in range(k)],
                          grid.get("real"), grid.get("mask"), max_rows=args.grid_rows)
        save_png(array, Path(args.grid))
    return written


# -- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = command_parser("ssgan_dist.evaluation.generate", __doc__)
    p.add_argument("--checkpoint", required=True, help="ckpt-*.pt, or a run directory (its newest checkpoint)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--sketch", help="one scene sketch (PNG); its label map from --label or --segmenter")
    source.add_argument("--shards", help="a shard set (dir, brace pattern, comma list): every sample")
    p.add_argument("--label", help="class-index PNG for --sketch (0 = none), the semantic sketch M0")
    p.add_argument("--segmenter", help="a sketch segmenter's checkpoint (or run directory): predicts M0 "
                                       "of --sketch, written as <out stem>.label.png")
    p.add_argument("--out", required=True, help="output PNG for one input, output directory for --shards")
    p.add_argument("--seed", type=int, default=0, help="noise seed; z depends on (seed, input index, style)")
    p.add_argument("--num-styles", type=int, default=1, help="images per input, each with its own z")
    p.add_argument("--grid", default="", help="also write a PNG of inputs x styles side by side, with column "
                                              "names (sketch | label | style 1..K | real | learned mask)")
    p.add_argument("--grid-rows", type=int, default=8, help="inputs shown in --grid")
    p.add_argument("--max-samples", type=int, default=0, help="--shards: only the first N samples; 0: all")
    p.add_argument("--batch-size", type=int, default=8, help="--shards: inputs per forward pass")
    p.add_argument("--weights", choices=WEIGHTS, default="auto",
                   help="G's weights: auto = the EMA of G (G_ema) when the checkpoint has one (train.ema), else G; "
                        "ema = G_ema or an error; raw = G")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace, cfg: Config) -> None:
    if args.shards and (args.label or args.segmenter):
        option = "--label" if args.label else "--segmenter"
        raise InputError(f"{option} goes with --sketch; the samples of --shards carry their own label maps")
    if args.label and args.segmenter:
        raise InputError("--label and --segmenter both give the label map of --sketch: give one")
    for option, value in (("--num-styles", args.num_styles), ("--grid-rows", args.grid_rows),
                          ("--batch-size", args.batch_size)):
        if value < 1:
            raise InputError(f"{option}: must be at least 1, got {value}")
    if args.num_styles > 1 and not cfg.model.use_z:
        raise InputError(f"--num-styles {args.num_styles}: this model takes no noise (model.use_z=false), "
                         "so it makes one image per input")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    return run_cli(lambda: _generate(args))


def _generate(args: argparse.Namespace) -> int:
    loaded = load_generator(Path(args.checkpoint), setup().device, args.weights)
    check_args(args, loaded.cfg)
    written = generate(args, loaded)
    masks = "" if loaded.cfg.model.sfm else " (no SFM masks: model.sfm=false)"
    print(f"wrote {len(written)} image(s) from {loaded.path} (step {loaded.step}, weights {loaded.weights}) "
          f"to {args.out}{masks}"
          + (f"; grid: {args.grid}" if args.grid else "")
          + (f"; predicted M0: {label_path(Path(args.out))}" if args.segmenter else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
