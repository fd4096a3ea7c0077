"""A trained generator (or sketch segmenter) from a checkpoint, run deterministically: shared
by evaluate, evaluate_segmenter and generate.

The model is rebuilt from the config the checkpoint itself holds (never from a preset), so
a checkpoint always gets the architecture it was trained with. G runs in eval mode: its
BatchNorms use the running statistics, so an image does not depend on the other images of
its batch, nor on how the inputs are split over ranks. Noise is a pure function of
(seed, input index, style), for the same reason.

Weights: a checkpoint of a run with ``train.ema`` holds, beside G, the exponential moving
average of G's weights as ``G_ema``; inference uses it when present (``--weights auto``, as
SPADE-family papers report their EMA generators), or either one on request (``ema``, ``raw``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ssgan_dist import checkpoint as ckpt
from ssgan_dist.config import Config, ModelConfig, config_from_dict
from ssgan_dist.errors import SetupError
from ssgan_dist.labels import onehot
from ssgan_dist.models import build_generator, build_segmenter
from ssgan_dist.models.segmenter import predict_labels
from ssgan_dist.rng import seeded_generator


class CheckpointError(SetupError):
    """A checkpoint that cannot be used for inference; the message names the path."""


# --weights: which of a checkpoint's generators inference runs.
WEIGHTS = ("auto", "ema", "raw")
EMA_KEY = "G_ema"


@dataclass
class LoadedGenerator:
    G: nn.Module
    cfg: Config
    step: int
    path: Path
    config_hash: str  # sha256 of the checkpoint's config, to tell runs apart in results
    weights: str = "G"  # the checkpoint entry G was loaded from: "G" or "G_ema"


@dataclass
class LoadedSegmenter:
    S: nn.Module
    cfg: Config
    step: int
    path: Path


# Per run.task: the network its checkpoint holds, what to call it, and where it is used.
_TASKS = {"gan": ("G", "generator", "generate and evaluate take it as --checkpoint"),
          "segmenter": ("S", "sketch segmenter", "generate takes it as --segmenter, evaluate_segmenter as --checkpoint")}


def find_checkpoint(path: Path, option: str = "--checkpoint") -> Path:
    """The checkpoint itself, or the newest checkpoint of a run directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{option}: no such file or directory {path}")
    found = ckpt.list_checkpoints(path) if path.is_dir() else []
    return found[-1] if found else path


def _load(path: Path, option: str, task: str, pick: Callable[[dict, Path], str] | None = None
          ) -> tuple[dict, Config, Path, nn.Module, str]:
    """(state, config, path, network in eval mode on the CPU, the state entry it was loaded from)
    of a checkpoint of ``task``; ``pick`` chooses that entry (default: the task's network)."""
    net, what, _ = _TASKS[task]
    path = find_checkpoint(path, option)
    try:
        state = ckpt.load(path)
    except Exception as exc:  # a truncated zip, a foreign pickle, a directory: all unusable
        raise CheckpointError(f"{option}: {path} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not {"config", "step"} <= state.keys():
        raise CheckpointError(f"{option}: {path} is not an ssgan-dist checkpoint (no config, {net} and step)")
    saved = state["config"].get("run", {}).get("task", "gan")
    if saved != task:
        _, other, use = _TASKS[saved]
        raise CheckpointError(f"{option}: {path} is a {other} checkpoint (run.task={saved}), not a {what}'s "
                              f"({use})")
    if net not in state:
        raise CheckpointError(f"{option}: {path} is not an ssgan-dist checkpoint (no config, {net} and step)")
    try:
        cfg = config_from_dict(state["config"])
    except SetupError as exc:
        raise CheckpointError(f"{option}: {path} holds a config this version cannot use: {exc}") from None
    entry = pick(state, path) if pick else net
    model = build_generator(cfg.model) if task == "gan" else build_segmenter(cfg.segmenter, cfg.model.num_classes)
    try:
        model.load_state_dict(state[entry])
    except RuntimeError as exc:
        raise CheckpointError(f"{option}: {path}: {entry}'s weights do not fit its own config: {exc}") from None
    return state, cfg, path, model.eval(), entry


def generator_entry(weights: str) -> Callable[[dict, Path], str]:
    """The checkpoint entry ``--weights`` asks for: G_ema when there is one (auto), G_ema (ema), G (raw)."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"--weights {weights!r}: expected one of {', '.join(WEIGHTS)}")

    def pick(state: dict, path: Path) -> str:
        if weights == "raw":
            return "G"
        if EMA_KEY in state:
            return EMA_KEY
        if weights == "ema":
            raise CheckpointError(f"--weights ema: {path} holds no EMA of G (no {EMA_KEY}: trained with "
                                  "train.ema=0); use --weights auto or raw")
        return "G"

    return pick


def load_generator(path: Path, device: torch.device, weights: str = "auto") -> LoadedGenerator:
    """G in eval mode on ``device``, built from the checkpoint's own config; its weights as
    ``weights`` chooses (WEIGHTS: the EMA of G when the checkpoint has one, by default)."""
    state, cfg, path, G, entry = _load(path, "--checkpoint", "gan", generator_entry(weights))
    digest = hashlib.sha256(json.dumps(state["config"], sort_keys=True).encode()).hexdigest()[:16]
    return LoadedGenerator(G.to(device), cfg, int(state["step"]), path, digest, entry)


def load_segmenter(path: Path, device: torch.device, option: str = "--segmenter") -> LoadedSegmenter:
    """The sketch segmenter S in eval mode on ``device``; ``option`` is named in errors."""
    state, cfg, path, S, _ = _load(path, option, "segmenter")
    return LoadedSegmenter(S.to(device), cfg, int(state["step"]), path)


def check_segmenter_fits(seg: LoadedSegmenter, gen: LoadedGenerator) -> None:
    """The segmenter's M0 must fit the generator: the same classes and image size."""
    s, g = seg.cfg.model, gen.cfg.model
    if s.num_classes != g.num_classes:
        raise CheckpointError(f"--segmenter {seg.path} predicts {s.num_classes} classes (model.num_classes="
                              f"{s.num_classes}), but --checkpoint {gen.path} takes {g.num_classes} (model.num_classes="
                              f"{g.num_classes}): train the segmenter with the generator's model.num_classes")
    if s.image_size != g.image_size:
        raise CheckpointError(f"--segmenter {seg.path} was trained on {s.image_size}x{s.image_size} sketches, but "
                              f"--checkpoint {gen.path} makes {g.image_size}x{g.image_size} images (model.image_size)")


@torch.no_grad()
def run_segmenter(S: nn.Module, sketch: torch.Tensor) -> torch.Tensor:
    """Predicted M0 [B,H,W] (int64, on S's device) for sketches [B,1,H,W] in [0, 1]: 0 off the strokes."""
    sketch = sketch.to(next(S.parameters()).device)
    return predict_labels(S(sketch), sketch)


def noise(model: ModelConfig, seed: int, indices: list[int], style: int = 0) -> torch.Tensor | None:
    """z for the given input indices: a pure function of (seed, index, style) (rng.py), so
    CPU and GPU runs draw the same values; None when the model takes no z."""
    if not model.use_z:
        return None
    return torch.stack([torch.randn(model.z_dim, generator=seeded_generator(seed, index, style)) for index in indices])


@torch.no_grad()
def run_generator(G: nn.Module, model: ModelConfig, label: torch.Tensor, z: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images in [-1, 1] for a [B,H,W] label batch, and the SFM's last learned mask M_i (its output)
    ([B,C,h,w]; None without SFM)."""
    device = next(G.parameters()).device
    m0 = onehot(label.to(device), model.num_classes)
    image, masks = G(m0, None if z is None else z.to(device), return_masks=True)
    return image, (masks[-1] if masks else None)
