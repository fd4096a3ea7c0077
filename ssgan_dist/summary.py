"""Parameter counts and forward FLOPs per image of a config's networks.

G and D, or the sketch segmenter for ``run.task=segmenter``:

    python -m ssgan_dist.summary [--config NAME|PATH] [key=value ...] [--json]   (or ssgan-summary)

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (one multiply-add = 2
FLOPs) on the meta device, so nothing is computed or allocated and the 256x256 model is
summarized in a second. They are per image: a batch of 2 divided by 2. G is one forward
from M0 (and z); D is one forward on one image (concat(M0, image)), all scales; the
segmenter one forward on one sketch.
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ssgan_dist.config import Config, ModelConfig, SegmenterConfig, load_config
from ssgan_dist.models import build_discriminator, build_generator, build_segmenter
from ssgan_dist.shell import command_parser, print_config, run_cli

BATCH = 2


def _params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _forward_flops(net: nn.Module, *inputs: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        net(*inputs)
    return counter.get_total_flops()


def count_flops(cfg: Config | ModelConfig) -> dict[str, dict[str, int]]:
    """{"generator" | "discriminator" | "total": {"params": n, "flops": forward FLOPs per image}}."""
    m = cfg.model if isinstance(cfg, Config) else cfg
    with torch.device("meta"):
        g, d = build_generator(m), build_discriminator(m)
        m0 = torch.zeros(BATCH, m.num_classes, m.image_size, m.image_size)
        image = torch.zeros(BATCH, 3, m.image_size, m.image_size)
        g_flops = _forward_flops(g, m0) // BATCH
        d_flops = _forward_flops(d, m0, image) // BATCH
    result = {
        "generator": {"params": _params(g), "flops": g_flops},
        "discriminator": {"params": _params(d), "flops": d_flops},
    }
    result["total"] = {k: result["generator"][k] + result["discriminator"][k] for k in ("params", "flops")}
    return result


def count_segmenter_flops(segmenter: SegmenterConfig, num_classes: int, image_size: int) -> dict[str, int]:
    """{"params": n, "flops": forward FLOPs per image} of the sketch segmenter (run.task=segmenter)."""
    with torch.device("meta"):
        s = build_segmenter(segmenter, num_classes)
        flops = _forward_flops(s, torch.zeros(BATCH, 1, image_size, image_size)) // BATCH
    return {"params": _params(s), "flops": flops}


def summarize(cfg: Config) -> dict[str, dict[str, int]]:
    """The counts of the networks ``cfg``'s run.task trains."""
    if cfg.run.task == "segmenter":
        return {"segmenter": count_segmenter_flops(cfg.segmenter, cfg.model.num_classes, cfg.model.image_size)}
    return count_flops(cfg.model)


def format_table(cfg: Config, counts: dict[str, dict[str, int]]) -> str:
    m, s = cfg.model, cfg.segmenter
    if cfg.run.task == "segmenter":
        settings = f"width={s.width}, levels={s.levels}, dilations={s.dilations}"
    else:
        settings = f"ngf={m.ngf}, ndf={m.ndf}, sfm={m.sfm}, use_z={m.use_z}, upsampling={m.num_upsampling}"
    lines = [
        f"image {m.image_size}x{m.image_size}, C={m.num_classes}, {settings}",
        f"{'network':<14}{'params':>14}{'GFLOPs/image':>14}",
    ]
    for name, row in counts.items():
        lines.append(f"{name:<14}{row['params']:>14,}{row['flops'] / 1e9:>14.3f}")
    lines.append("GFLOPs: one forward pass per image, 1 multiply-add = 2 FLOPs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("ssgan_dist.summary", __doc__, config=True)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_intermixed_args(argv)

    def command() -> int:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            return print_config(cfg, [parser.prog, *(sys.argv[1:] if argv is None else argv)])
        counts = summarize(cfg)
        print(json.dumps(counts, indent=2) if args.json else format_table(cfg, counts))
        return 0

    return run_cli(command)


if __name__ == "__main__":
    sys.exit(main())
