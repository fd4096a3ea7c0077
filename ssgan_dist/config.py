"""One typed config for every part of ssgan-dist.

A run is described by dataclasses; YAML presets shipped in ``ssgan_dist/configs`` and dotted
``key=value`` overrides from the command line are merged onto them. Every value is checked
against the field's type (and its allowed values) before any work starts, so a typo fails in
the first second and names the key, not after an hour in a queue.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Literal, get_args, get_origin

import yaml

from ssgan_dist.errors import SetupError
from ssgan_dist.files import write_text
from ssgan_dist.labels import BACKGROUND_CLASSES

PRESET_DIR = Path(__file__).parent / "configs"
# run.name (and the SLURM job name): a Prometheus job label, a log prefix, a file name in the
# file_sd targets directory and an #SBATCH line; nothing there may start a path or a line.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_PRESET = "demo"
# model.num_upsampling -> x2 upsamplings of the generator: image_size is 2^n times its start size.
NUM_UPSAMPLING = {"normal": 5, "more": 6, "most": 7}


class ConfigError(SetupError):
    """A config key or value that cannot be used; the message names the key."""


def setting(default: Any, doc: str, *, low: float | None = None, high: float | None = None,
            above: float | None = None, resume: bool = False) -> Any:
    """A config key: its default, its one-line doc (``--help`` lists it), its range (``low`` <=
    value <= ``high``, value > ``above``; checked for every number and every list element) and
    whether it may change when a run resumes from a checkpoint (``resume``: cadences, logging,
    paths that may move; anything else must be named in checkpoint.allow_changes)."""
    meta = {"doc": doc, "low": low, "high": high, "above": above, "resume": resume}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """Where a run lives and what it trains."""

    dir: str = setting("runs/demo", "run directory: checkpoints, samples, logs and the resolved config", resume=True)
    seed: int = setting(0, "seed of weights, data order, flips and noise (every rank alike)", low=0)
    name: str = setting("ssgan", "run name: the Prometheus job label and the file_sd file name", resume=True)
    task: Literal["gan", "segmenter"] = setting("gan", "what to train: the GAN (SSGAN/SPADE) or the sketch "
                                                "segmenter (sketch -> M0, segmenter.*)")


@dataclass
class ModelConfig:
    """The GAN's networks (shapes: a checkpoint must match them)."""

    num_classes: int = setting(20, "label channels C of M0; index 0 = no label", low=2, high=256)
    background_classes: list[int] = setting(list(BACKGROUND_CLASSES), "classes the SFM treats as background "
                                            "(zeroed in Mf); SketchyCOCO: clouds, grass, sky, tree", low=1)
    image_size: int = setting(256, "square image size in px; a multiple of 2^upsamplings", low=8, high=4096)
    ngf: int = setting(64, "generator width (SPADE's ngf)", low=1, high=1024)
    ndf: int = setting(64, "discriminator width (SPADE's ndf)", low=1, high=1024)
    spade_hidden: int = setting(128, "SPADE norm's shared conv width (128 in NVlabs SPADE)", low=1, high=4096)
    z_dim: int = setting(256, "noise dimension (model.use_z)", low=1, high=65536)
    use_z: bool = setting(True, "start from z through a linear layer; false: from the downsampled label map "
                          "through a conv (SPADE without its VAE)")
    num_upsampling: Literal["normal", "more", "most"] = setting("normal", "x2 upsamplings of G: normal 5, more 6, "
                                                                "most 7 (SPADE's num_upsampling_layers)")
    spectral_norm: bool = setting(True, "spectral norm on G's block convs and D's convs")
    sfm: bool = setting(True, "Semantic Fusion Modules (SSGAN); false: exactly SPADE's generator (the baseline)")
    sfm_hidden: int = setting(32, "width of the SFM's F1 and F2 conv nets", low=1, high=4096)
    # Where the paper leaves a choice (models/sfm.py states the reading; bench/learning.py measures it):
    sfm_form: Literal["paper", "residual"] = setting("paper", "SFM output: paper M_i = f (eqs. 4-5); residual "
                                                      "M_i = M0 + f")
    sfm_init: Literal["kaiming", "default", "zero", "xavier"] = setting(
        "kaiming", "SFM and ToMask init: He-normal F1/F2 (kaiming, measured best); PyTorch's (default); default "
        "with F1's and F2's last convs zeroed (zero); SPADE's xavier gain 0.02 (xavier: M_i ~1e-4 at step 0)")
    sfm_resize: Literal["maxpool", "nearest"] = setting("maxpool", "how M0 reaches a block's lower resolution: "
                                                        "maxpool keeps 1-px strokes; nearest is SPADE's resize")
    sfm_tomask: Literal["block", "upsampled"] = setting("block", "ToMask reads x_i at block i's size, mask "
                                                        "upsampled (block), or reads the upsampled x_i (upsampled)")
    sync_bn: bool = setting(True, "synchronize the SPADE BatchNorm statistics across ranks")
    d_scales: int = setting(2, "discriminator scales (multi-scale PatchGAN)", low=1, high=8)
    d_layers: int = setting(4, "layers per discriminator scale", low=1, high=10)


@dataclass
class SegmenterConfig:
    """The sketch segmenter (paper step (i)): a small U-Net; its classes are model.num_classes
    and its input size model.image_size, so that its M0 fits the generator it feeds."""

    width: int = setting(32, "channels of the first U-Net level, doubled at every level below", low=1, high=4096)
    levels: int = setting(3, "U-Net resolutions; model.image_size must be a multiple of 2^(levels-1)", low=1, high=10)
    dilations: list[int] = setting([1, 2, 4, 8], "dilations of the bottleneck convs (context along strokes)", low=1)
    lr: float = setting(1e-3, "Adam learning rate (betas 0.9, 0.999)", above=0.0, high=1.0)


@dataclass
class LossConfig:
    """The generator's loss terms (the hinge GAN loss is always on)."""

    lambda_fm: float = setting(10.0, "weight of D's feature-matching loss", low=0.0)
    lambda_vgg: float = setting(10.0, "weight of the VGG19 perceptual loss", low=0.0)
    vgg: bool = setting(True, "the VGG19 perceptual loss; false skips it (the demo, without weights)")
    vgg_weights: str = setting("", "torchvision VGG19 state dict (vgg19-dcbb9e9d.pth); empty: the torch hub cache",
                               resume=True)
    vgg_input: Literal["raw", "imagenet"] = setting("raw", "what VGG19 sees: raw [-1, 1] images as NVlabs SPADE "
                                                    "feeds them, or ImageNet-normalised [0, 1] images")


@dataclass
class OptimConfig:
    """Adam for G and D (the paper: lr 2e-4 both, betas (0, 0.999); SPADE's TTUR: 1e-4 / 4e-4, (0, 0.9))."""

    lr_g: float = setting(2e-4, "G's learning rate", above=0.0, high=1.0)
    lr_d: float = setting(2e-4, "D's learning rate", above=0.0, high=1.0)
    beta1: float = setting(0.0, "Adam beta1", low=0.0, high=0.9999)
    beta2: float = setting(0.999, "Adam beta2", low=0.0, high=0.9999999)
    eps: float = setting(1e-8, "Adam epsilon", above=0.0, high=1.0)
    decay_steps: int = setting(0, "linear decay of both learning rates to 0 over the last N steps of "
                               "train.max_steps (SPADE's niter_decay); 0: constant", low=0)


@dataclass
class TrainConfig:
    """The loop: length, batch, precision, the step's options and its reporting."""

    max_steps: int = setting(1000, "optimizer steps to train", low=1, resume=True)
    batch_size: int = setting(1, "images per rank per micro-batch", low=1)
    accum_steps: int = setting(1, "micro-batches per optimizer step (gradient accumulation); effective batch = "
                               "batch_size x accum_steps x ranks", low=1, high=1024)
    precision: Literal["fp32", "bf16", "fp16"] = setting("fp32", "autocast dtype; fp16 adds a loss scaler per network")
    grad_checkpoint: bool = setting(False, "recompute each SPADE block in backward (less memory, same results)",
                                    resume=True)
    channels_last: bool = setting(False, "NHWC activations: faster convolutions on tensor-core GPUs", resume=True)
    compile: bool = setting(False, "torch.compile G, D and the VGG loss", resume=True)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = setting(
        "default", "torch.compile mode", resume=True)
    compile_cache: str = setting("", "on-disk compile cache, kept across restarts; empty: <cache root>/compile",
                                 resume=True)
    d_fakes: Literal["reuse", "regenerate"] = setting("reuse", "the D step's fakes: the G step's, detached (one G "
                                                      "forward less), or a new G forward after G's update (SPADE); measured alike, reuse 22% faster")
    ema: float = setting(0.0, "decay of an exponential moving average of G's weights (e.g. 0.999); samples, "
                         "evaluation and generate use it; 0: off", low=0.0, high=0.999999)
    log_every: int = setting(10, "every N steps: a log line (step/total, img/s, ETA, losses, learning rates) and "
                               "a line of run.dir/scalars.jsonl (and TensorBoard)", low=1, resume=True)
    sample_every: int = setting(100, "write a sample grid every N steps", low=1, resume=True)
    threads: int = setting(0, "torch intra-op threads per process; 0: torch's default", low=0, high=1024, resume=True)
    progress: bool = setting(True, "a progress bar when stderr is a terminal (off a terminal: "
                          "only the log_every lines)", resume=True)
    tensorboard: bool = setting(True, "TensorBoard scalars and sample grids in run.dir/tb (needs "
                                "the tensorboard package: pip install -e '.[tensorboard]')",
                                resume=True)


@dataclass
class DataConfig:
    """Where batches come from and what happens to bad samples."""

    shards: str = setting("", "training shards: a dir, brace pattern or comma list of .tar; empty: synthetic "
                          "scenes (data.allow_synthetic)")
    allow_synthetic: bool = setting(True, "with data.shards empty, train on generated synthetic scenes; paper "
                                    "presets set false so they never train on toy data by accident", resume=True)
    loader: Literal["auto", "torch", "dali"] = setting("auto", "auto: DALI when installed and on a GPU, else torch")
    num_workers: int = setting(1, "loader processes (torch) or threads (DALI) per rank", low=0, high=256,
                               resume=True)
    on_error: Literal["skip", "raise"] = setting("skip", "a bad sample: skip, log and count it, or stop the run",
                                                 resume=True)
    flip: bool = setting(True, "random horizontal flips (sketch, label and image alike)")
    synthetic_count: int = setting(256, "synthetic scenes generated for the embedded default", low=1)
    synthetic_per_shard: int = setting(64, "synthetic scenes per shard", low=1)
    cache_dir: str = setting("", "cache of synthetic shards, FID statistics and compiled kernels; empty: "
                             "$SSGAN_CACHE or ~/.cache/ssgan_dist", resume=True)


@dataclass
class CheckpointConfig:
    """Run-state checkpoints in run.dir: cadence, retention, resume."""

    every: int = setting(500, "write a checkpoint every N steps (and at the end)", low=1, resume=True)
    keep: int = setting(3, "newest readable checkpoints kept", low=1, resume=True)
    resume: bool = setting(True, "continue from the newest checkpoint in run.dir", resume=True)
    allow_changes: list[str] = setting([], "config keys allowed to differ from the checkpoint's on resume (applied, "
                                       "e.g. [optim.lr_g]); any other difference is refused", resume=True)
    init_from: str = setting("", "a new run starts from this checkpoint's weights (no optimizer state, step 0); "
                             "ignored when run.dir holds checkpoints to resume", resume=True)


@dataclass
class EngineConfig:
    """How networks are wrapped and their gradients reduced."""

    name: Literal["ddp", "deepspeed"] = setting("ddp", "DDP, or one DeepSpeed engine per network")
    zero_stage: int = setting(1, "DeepSpeed ZeRO stage", low=0, high=2)
    grad_compression: Literal["none", "bf16", "fp16"] = setting("none", "DDP gradient all-reduce in a 16-bit format",
                                                                resume=True)
    bucket_mb: float = setting(25.0, "DDP gradient bucket size in MiB", above=0.0, high=4096.0, resume=True)


@dataclass
class DistConfig:
    """The process group."""

    timeout_s: float = setting(1800.0, "collective timeout: a rank waiting longer for a dead or stuck peer fails "
                               "instead of hanging", above=0.0, high=86400.0, resume=True)


@dataclass
class MetricsConfig:
    """The per-rank Prometheus exporter."""

    enabled: bool = setting(False, "serve Prometheus metrics from every rank", resume=True)
    addr: str = setting("127.0.0.1", "bind address (SLURM jobs bind the node's address)", resume=True)
    port: int = setting(18400, "rank r serves on port + local rank (18400-18407 for 8 GPUs: clear of exporters' "
                        "9100-9999 and torchrun's 29400/29500); 0: every rank picks a free port (see file_sd)",
                        low=0, high=65535, resume=True)
    file_sd: str = setting("", "Prometheus file_sd JSON of every rank's exporter (a dir: <dir>/<run.name>.json); "
                           "empty: none", resume=True)
    peak_flops: float = setting(0.0, "per-device peak FLOP/s for MFU; 0: a built-in table (H100, H200, A100; "
                                "1e11 on CPU)", low=0.0,
                                resume=True)
    linger_s: float = setting(0.0, "keep serving this long after the last step so the final values get scraped",
                              low=0.0, high=3600.0, resume=True)


@dataclass
class EvalConfig:
    """FID/SSIM during training."""

    every: int = setting(0, "evaluate every N steps; 0: never during training", low=0, resume=True)
    shards: str = setting("", "held-out shards to evaluate on (dir, brace pattern or comma list)", resume=True)
    inception_weights: str = setting("", "pytorch-fid Inception weights (pt_inception-2015-12-05-6726825d.pth)",
                                     resume=True)
    max_samples: int = setting(0, "evaluate the first N samples; 0: all", low=0, resume=True)
    batch_size: int = setting(8, "images per evaluation forward", low=1, resume=True)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------
# Type checking of single values


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: got {value!r}, allowed values: {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")
        (inner,) = get_args(tp)
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in the config")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: got {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: got {value!r}, expected an integer")
    if tp is float:
        # YAML reads 0 and 1e-4 differently; every float field accepts ints (Adam's betas
        # must be Python floats, so they are converted here once).
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: got {value!r}, expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: got {value!r}, expected a string")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _section_fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _resolved_hints(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def _set(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(
            f"{dotted}: keys are section.name; sections: {', '.join(_section_fields(cfg))}"
        )
    section_name, name = parts
    sections = _section_fields(cfg)
    if section_name not in sections:
        raise ConfigError(f"{dotted}: unknown section {section_name!r}; sections: {', '.join(sections)}")
    section = getattr(cfg, section_name)
    names = _section_fields(section)
    if name not in names:
        raise ConfigError(
            f"{dotted}: unknown key; keys of {section_name}: {', '.join(names)}"
        )
    setattr(section, name, _coerce(dotted, value, _resolved_hints(section)[name]))


def _flatten(tree: dict[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(tree).__name__}")
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat


# ---------------------------------------------------------------------------------------
# Presets, overrides and validation


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _preset_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"--config: no such file {path}")
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(
            f"--config: {name_or_path!r} is neither a file nor a preset; presets: {', '.join(preset_names())}"
        )
    return candidate


def parse_override(text: str) -> tuple[str, Any]:
    """``model.sfm=false`` -> ("model.sfm", False); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"{text!r}: overrides are key=value, e.g. train.max_steps=100")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot read value {raw!r}: {exc}") from None
    return key.strip(), value


def keys(cfg: Config | None = None) -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, value) of every config key, in declaration order."""
    cfg = cfg or Config()
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            yield f"{section.name}.{f.name}", f, getattr(values, f.name)


def check_ranges(cfg: Config) -> None:
    """Every number (and list element) within its key's range, floats finite; names the key."""
    for key, f, value in keys(cfg):
        low, high, above = f.metadata.get("low"), f.metadata.get("high"), f.metadata.get("above")
        for i, v in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            name = f"{key}[{i}]" if isinstance(value, list) else key
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{name}: {v} is not a finite number ({f.metadata['doc']})")
            bounds = [f"at least {low}" if low is not None else "", f"more than {above}" if above is not None else "",
                      f"at most {high}" if high is not None else ""]
            if (low is not None and v < low) or (above is not None and v <= above) or (high is not None and v > high):
                raise ConfigError(f"{name}: {v} is out of range: must be {' and '.join(b for b in bounds if b)} "
                                  f"({f.metadata['doc']})")


def flat_values(tree: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A saved config (``Config.to_dict``) as {dotted key: typed value}, one per key this
    version knows (a key saved before it existed gets its default), and the saved keys it does
    not know. A saved value that no longer fits its key's type is kept as it was saved."""
    saved = _flatten(tree, "saved config")
    values: dict[str, Any] = {}
    hints = {section.name: typing.get_type_hints(type(getattr(Config(), section.name)))
             for section in dataclasses.fields(Config)}
    for key, _, default in keys():
        section, name = key.split(".")
        if key not in saved:
            values[key] = default
            continue
        try:
            values[key] = _coerce(key, saved[key], hints[section][name])
        except ConfigError:
            values[key] = saved[key]
    known = set(values)
    return values, sorted(k for k in saved if k not in known)


def _help_type(tp: Any) -> str:
    """A key's type for --help: int, float, str, bool, list of int, or the choices a|b|c."""
    if get_origin(tp) is Literal:
        return "|".join(map(str, get_args(tp)))
    if get_origin(tp) is list:
        return f"list of {_help_type(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def yaml_value(value: Any) -> str:
    """A value as it is written in YAML and in key=value overrides (true, 2.0e-04, '', [1, 2])."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def describe_keys(width: int = 100) -> str:
    """Every key, section by section: ``  section.key (type, default X): doc``, wrapped at
    ``width`` (generated from the dataclasses and their ``setting`` metadata, for --help)."""
    cfg = Config()
    lines = []
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        doc = (type(values).__doc__ or "").strip().split("\n\n")[0]
        lines.append(textwrap.fill(f" {section.name}: " + " ".join(doc.split()), width=width, subsequent_indent=" " * 3))
        hints = typing.get_type_hints(type(values))
        for f in dataclasses.fields(values):
            head = f"  {section.name}.{f.name} ({_help_type(hints[f.name])}, default {yaml_value(getattr(values, f.name))}): "
            lines.append(textwrap.fill(head + f.metadata["doc"], width=width, subsequent_indent=" " * 6,
                                       break_on_hyphens=False))
    return "\n".join(lines)


def preset_summary(name: str) -> str:
    """The first comment line of a preset file: what it is for, in one line."""
    for line in (PRESET_DIR / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def describe_presets() -> str:
    """One line per preset: its name and its first comment line (for --help)."""
    names = preset_names()
    width = max(map(len, names)) + 2
    return "\n".join(f"  {name:<{width}}{preset_summary(name)}" for name in names)


def dump_config(cfg: Config, comment: str = "") -> str:
    """The config as YAML that --config reads back to an equal config; ``comment`` on top."""
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    return head + yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def require_training_data(cfg: Config) -> None:
    """A run that is about to train must have real shards unless synthetic scenes are allowed:
    paper presets set data.allow_synthetic=false, so that an empty data.shards is an error
    before any work (checked by train and by the SLURM submitter) instead of a model trained
    on toy data."""
    if not cfg.data.shards and not cfg.data.allow_synthetic:
        raise ConfigError(
            "data.shards: empty, and this config trains on real data only (data.allow_synthetic=false, as every "
            "paper preset sets): give data.shards=DIR|PATTERN (shards built by ssgan-shards, e.g. "
            "`ssgan-shards sketchycoco --root SketchyCOCO --split trainInTrain --out DIR`), or "
            "data.allow_synthetic=true to train on generated synthetic scenes on purpose")


def validate(cfg: Config) -> None:
    """Ranges of every key, then the cross-field checks that a single key cannot express."""
    check_ranges(cfg)
    if not SAFE_NAME.fullmatch(cfg.run.name):  # fullmatch: "$" would let a trailing newline through
        raise ConfigError(f"run.name: {cfg.run.name!r} is not a plain name: 1-128 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit (it names files, a Prometheus job and a SLURM job)")
    known = {key for key, _, _ in keys()}
    unknown = [k for k in cfg.checkpoint.allow_changes if k not in known]
    if unknown:
        raise ConfigError(f"checkpoint.allow_changes: unknown key(s) {', '.join(unknown)}; list dotted config keys, "
                          "e.g. [optim.lr_g, optim.lr_d]")
    m = cfg.model
    n_up = NUM_UPSAMPLING[m.num_upsampling]
    if m.image_size % (2**n_up) != 0:
        raise ConfigError(
            f"model.image_size: {m.image_size} is not a multiple of {2**n_up} "
            f"(2^upsamplings for model.num_upsampling={m.num_upsampling})"
        )
    for c in m.background_classes:
        if not 0 < c < m.num_classes:
            raise ConfigError(
                f"model.background_classes: {c} is outside 1..{m.num_classes - 1} (model.num_classes)"
            )
    if cfg.engine.name == "deepspeed":
        # DeepSpeed counts micro-steps inside its own step(), which a step skipped for a
        # non-finite loss would put out of phase; and it wraps the forward in its engine.
        for key, on in (("train.accum_steps", cfg.train.accum_steps > 1), ("train.compile", cfg.train.compile)):
            if on:
                raise ConfigError(f"{key}={getattr(cfg.train, key.split('.')[1])}: not available with "
                                  "engine.name=deepspeed; use engine.name=ddp")
    e = cfg.eval
    if e.every and not (e.shards and e.inception_weights):
        raise ConfigError(f"eval.every={e.every} needs eval.shards (held-out shards) and eval.inception_weights "
                          "(pt_inception-2015-12-05-6726825d.pth); eval.every=0 trains without evaluating")
    if cfg.run.task == "segmenter":
        _validate_segmenter(cfg)


def _validate_segmenter(cfg: Config) -> None:
    """What a segmenter run needs; GAN-only features are refused rather than ignored.

    Here, not in tasks/segmenter.py: every command that loads a config must refuse these
    before any work (the SLURM submitter before queueing, evaluation when it reads a
    checkpoint's config), and neither may import the training tasks.
    """
    s = cfg.segmenter
    if not s.dilations:
        raise ConfigError("segmenter.dilations: give at least one dilation, e.g. [1, 2, 4, 8]")
    if cfg.model.image_size % 2 ** (s.levels - 1):
        raise ConfigError(f"model.image_size: {cfg.model.image_size} is not a multiple of {2 ** (s.levels - 1)} "
                          f"(2^(segmenter.levels - 1) for segmenter.levels={s.levels})")
    refused = {"engine.name=deepspeed": (cfg.engine.name == "deepspeed", "use engine.name=ddp"),
               "train.grad_checkpoint=true": (cfg.train.grad_checkpoint, "the segmenter is small"),
               f"eval.every={cfg.eval.every}": (cfg.eval.every > 0, "evaluate its checkpoints with "
                                                "python -m ssgan_dist.evaluation.evaluate_segmenter")}
    for setting, (on, hint) in refused.items():
        if on:
            raise ConfigError(f"{setting}: not available with run.task=segmenter; {hint}")


def load_config(preset: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- preset YAML <- ``key=value`` overrides, then validated."""
    cfg = Config()
    path = _preset_path(preset or DEFAULT_PRESET)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {exc.start}: {exc.reason}); a config is a YAML "
                          "file") from None
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot be read: {exc.strerror or exc}") from None
    for key, value in _flatten(tree, str(path)).items():
        _set(cfg, key, value)
    for text in overrides or []:
        _set(cfg, *parse_override(text))
    validate(cfg)
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config saved by ``to_dict`` (a checkpoint's or a run directory's)."""
    cfg = Config()
    for key, value in _flatten(tree, "saved config").items():
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    """The resolved config as YAML, written atomically (a reader never sees half of it)."""
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
