"""One typed config for every part of ssgan-dist.

A run is described by dataclasses; YAML presets shipped in ``ssgan_dist/configs`` and dotted
``key=value`` overrides from the command line are merged onto them. Every value is checked
against the field's type (and its allowed values) before any work starts, so a typo fails in
the first second and names the key, not after an hour in a queue.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from ssgan_dist.errors import SetupError
from ssgan_dist.labels import BACKGROUND_CLASSES

PRESET_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "demo"
# model.num_upsampling -> x2 upsamplings of the generator: image_size is 2^n times its start size.
NUM_UPSAMPLING = {"normal": 5, "more": 6, "most": 7}


class ConfigError(SetupError):
    """A config key or value that cannot be used; the message names the key."""


@dataclass
class RunConfig:
    dir: str = "runs/demo"  # checkpoints, samples, resolved config and logs go here
    seed: int = 0
    name: str = "ssgan"  # the Prometheus `job` label and the log prefix
    task: Literal["gan", "segmenter"] = "gan"  # segmenter: train the sketch -> M0 network (segmenter.*)


@dataclass
class ModelConfig:
    num_classes: int = 20  # label channels C, index 0 = no label
    background_classes: list[int] = field(default_factory=lambda: list(BACKGROUND_CLASSES))
    image_size: int = 256
    ngf: int = 64
    ndf: int = 64
    spade_hidden: int = 128  # SPADE's shared conv width (hard-coded 128 in NVlabs SPADE)
    z_dim: int = 256
    use_z: bool = True  # z -> linear; false: downsampled label map -> conv (SPADE without VAE)
    num_upsampling: Literal["normal", "more", "most"] = "normal"
    spectral_norm: bool = True
    sfm: bool = True  # false gives exactly the SPADE generator (the GauGAN baseline)
    sfm_hidden: int = 32  # width of the SFM's F1 and F2 conv nets
    sync_bn: bool = True  # synchronize the SPADE BatchNorm statistics across ranks
    d_scales: int = 2
    d_layers: int = 4


@dataclass
class SegmenterConfig:
    """The sketch segmenter (paper step (i)): a small U-Net; its classes are model.num_classes
    and its input size model.image_size, so that its M0 fits the generator it feeds."""

    width: int = 32  # channels of the first level, doubled at every level below it
    levels: int = 3  # resolutions of the U-Net: image_size must be a multiple of 2^(levels - 1)
    dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # bottleneck convs: context along strokes
    lr: float = 1e-3  # Adam, betas (0.9, 0.999)


@dataclass
class LossConfig:
    lambda_fm: float = 10.0
    lambda_vgg: float = 10.0
    vgg: bool = True  # false skips the perceptual loss (the demo does, and logs it)
    vgg_weights: str = ""  # torchvision VGG19 state dict; empty: look in the torch hub cache


@dataclass
class OptimConfig:
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.0
    beta2: float = 0.999
    eps: float = 1e-8  # Adam's epsilon


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 1  # per rank
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_checkpoint: bool = False
    channels_last: bool = False  # NHWC activations: faster convolutions on tensor-core GPUs
    log_every: int = 10
    sample_every: int = 100
    threads: int = 0  # torch intra-op threads per process; 0 keeps torch's default
    progress: bool = True


@dataclass
class DataConfig:
    shards: str = ""  # dir, brace pattern or comma list of .tar; empty: synthetic cache
    loader: Literal["auto", "torch", "dali"] = "auto"
    num_workers: int = 1
    on_error: Literal["skip", "raise"] = "skip"
    flip: bool = True
    synthetic_count: int = 256  # samples generated for the embedded default
    synthetic_per_shard: int = 64
    cache_dir: str = ""  # where the embedded default's shards live; empty: ~/.cache/ssgan_dist


@dataclass
class CheckpointConfig:
    every: int = 500
    keep: int = 3
    resume: bool = True  # continue from the newest checkpoint in run.dir


@dataclass
class EngineConfig:
    name: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0, 1 or 2


@dataclass
class MetricsConfig:
    enabled: bool = False
    addr: str = "127.0.0.1"
    port: int = 9400  # rank r serves on port + local rank; 0: each rank picks a free port (see file_sd)
    file_sd: str = ""  # Prometheus file_sd JSON listing every rank's exporter (a dir: <dir>/<run.name>.json); empty: none
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0: from telemetry's device table
    linger_s: float = 0.0  # keep serving this long after the last step so the final values get scraped


@dataclass
class EvalConfig:
    every: int = 0  # evaluate FID/SSIM every N training steps; 0: never during training
    shards: str = ""  # held-out shards; empty: no evaluation during training
    inception_weights: str = ""  # pytorch-fid / torch-fidelity Inception weights file
    max_samples: int = 0  # 0: every sample of eval.shards
    batch_size: int = 8


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


def validate(cfg: Config) -> None:
    """Cross-field checks that a single field's type cannot express."""
    m = cfg.model
    n_up = NUM_UPSAMPLING[m.num_upsampling]
    if m.image_size % (2**n_up) != 0:
        raise ConfigError(
            f"model.image_size: {m.image_size} is not a multiple of {2**n_up} "
            f"(2^upsamplings for model.num_upsampling={m.num_upsampling})"
        )
    if m.num_classes < 2:
        raise ConfigError("model.num_classes: at least 2 (0 = no label, plus one class)")
    for c in m.background_classes:
        if not 0 < c < m.num_classes:
            raise ConfigError(
                f"model.background_classes: {c} is outside 1..{m.num_classes - 1} (model.num_classes)"
            )
    positive = {
        "model.ngf": m.ngf, "model.ndf": m.ndf, "model.spade_hidden": m.spade_hidden,
        "model.z_dim": m.z_dim, "model.sfm_hidden": m.sfm_hidden, "model.d_scales": m.d_scales,
        "model.d_layers": m.d_layers, "train.batch_size": cfg.train.batch_size,
        "train.max_steps": cfg.train.max_steps, "train.log_every": cfg.train.log_every,
        "train.sample_every": cfg.train.sample_every, "checkpoint.every": cfg.checkpoint.every,
        "checkpoint.keep": cfg.checkpoint.keep, "data.synthetic_count": cfg.data.synthetic_count,
        "data.synthetic_per_shard": cfg.data.synthetic_per_shard,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    e = cfg.eval
    if e.batch_size < 1 or e.max_samples < 0 or e.every < 0:
        raise ConfigError("eval.batch_size: at least 1; eval.max_samples and eval.every: 0 or more")
    if e.every and not (e.shards and e.inception_weights):
        raise ConfigError(f"eval.every={e.every} needs eval.shards (held-out shards) and eval.inception_weights "
                          "(pt_inception-2015-12-05-6726825d.pth); eval.every=0 trains without evaluating")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers: must be 0 or more, got {cfg.data.num_workers}")
    if not 0 <= cfg.metrics.port < 65536:
        raise ConfigError(f"metrics.port: {cfg.metrics.port} is not a TCP port")
    if cfg.metrics.peak_flops < 0 or cfg.metrics.linger_s < 0:
        raise ConfigError("metrics.peak_flops and metrics.linger_s: must be 0 or more")
    if cfg.run.task == "segmenter":
        _validate_segmenter(cfg)


def _validate_segmenter(cfg: Config) -> None:
    """What a segmenter run needs; GAN-only features are refused rather than ignored.

    Here, not in tasks/segmenter.py: every command that loads a config must refuse these
    before any work (the SLURM submitter before queueing, evaluation when it reads a
    checkpoint's config), and neither may import the training tasks.
    """
    s = cfg.segmenter
    if s.width < 1 or s.levels < 1 or not s.dilations or min(s.dilations) < 1 or s.lr <= 0:
        raise ConfigError("segmenter.width, segmenter.levels, segmenter.dilations (non-empty) and segmenter.lr: "
                          "must be positive")
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
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
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
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
