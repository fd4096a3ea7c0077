"""How a run starts from a checkpoint: what may differ from the checkpoint's config, what is
refused, what ``checkpoint.init_from`` copies, and the record of it in run.dir.

Resume compares the whole saved config with the new one, key by key (a key the checkpoint
predates counts as its default):

* keys declared ``setting(..., resume=True)`` (cadences, max_steps, logging, metrics, eval,
  progress, threads, paths that may move, data.num_workers whose data position the loader
  itself vets) may change: the new value is used and the change logged;
* any other difference is refused, naming every key with its old and new value, unless
  ``checkpoint.allow_changes`` lists the key: then the new value is applied (the engines set
  the optimizer's lr, betas and eps from the run's config after loading its moments; a new
  train.precision starts fresh loss scalers; everything else is read from the config at
  each step);
* keys that fix what the checkpoint holds cannot change even when listed (:data:`FROZEN`
  and the task's signature: the networks' shapes): train a new run, starting from these
  weights with ``checkpoint.init_from``.

The decision is taken before anything is written: ``config.yaml`` (the config in force) is
written after it, and ``config-history.jsonl`` gets one line per start (time, step, how the
run started, from which checkpoint, every changed key old -> new).
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssgan_dist.checkpoint import CheckpointMismatch
from ssgan_dist.config import Config, flat_values, keys, save_config
from ssgan_dist.files import append_jsonl

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config-history.jsonl"
# Keys that cannot change under a running state whatever checkpoint.allow_changes says, and why.
FROZEN = {
    "run.task": "the checkpoint holds another task's networks",
    "engine.name": "the checkpoint's layout is the engine's (one file for DDP, ZeRO shards for DeepSpeed)",
    "engine.zero_stage": "ZeRO partitions the optimizer state by stage",
}
SHAPES = "fixes the networks' shapes"


@dataclass(frozen=True)
class Change:
    """One key whose value differs between the checkpoint and this run."""

    key: str
    old: Any
    new: Any
    kind: str  # "free" (may change on resume), "allowed" (listed), "refused", "frozen"
    why: str = ""

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def compare(saved: dict[str, Any], cfg: Config, signature_keys: set[str]) -> list[Change]:
    """Every key whose saved value differs from ``cfg``'s, classified; ``signature_keys``: the
    task's keys that fix its networks (frozen like :data:`FROZEN`)."""
    old, unknown = flat_values(saved)
    if unknown:
        log.warning("the checkpoint's config has key(s) this version does not know, ignored: %s", ", ".join(unknown))
    allowed = set(cfg.checkpoint.allow_changes)
    changes = []
    for key, f, new in keys(cfg):
        if old[key] == new:
            continue
        if key in FROZEN or key in signature_keys:
            changes.append(Change(key, old[key], new, "frozen", FROZEN.get(key, SHAPES)))
        elif f.metadata["resume"]:
            changes.append(Change(key, old[key], new, "free"))
        elif key in allowed:
            changes.append(Change(key, old[key], new, "allowed"))
        else:
            changes.append(Change(key, old[key], new, "refused"))
    return changes


def check(changes: list[Change], source: Path) -> None:
    """Refuse the resume if any change is refused or frozen, naming every such key."""
    refused = [c for c in changes if c.kind == "refused"]
    frozen = [c for c in changes if c.kind == "frozen"]
    if not (refused or frozen):
        return
    lines = [f"cannot resume from {source}: this run's config differs from the checkpoint's in "
             f"{len(refused) + len(frozen)} key(s) that may not change silently:"]
    lines += [f"  {c}" for c in refused]
    lines += [f"  {c} (cannot change on a running state: {c.why})" for c in frozen]
    if refused:
        listed = ",".join(c.key for c in refused)
        lines.append(f"to continue with the new value(s), say so: checkpoint.allow_changes=[{listed}] "
                     "(applied from the resumed step on and recorded in config-history.jsonl); or restore the "
                     "old value(s)")
    if frozen:
        lines.append("for the frozen key(s): train a new run (another run.dir), optionally from these weights with "
                     f"checkpoint.init_from={source}")
    raise CheckpointMismatch("\n".join(lines))


def log_changes(changes: list[Change]) -> None:
    for c in changes:
        why = "may change on resume" if c.kind == "free" else "checkpoint.allow_changes: applied"
        log.info("resume: %s (%s)", c, why)


def adapt_state(state: dict[str, Any], fresh: dict[str, Any], changes: list[Change]) -> dict[str, Any]:
    """The checkpoint's engine state with what an allowed change replaces: a new
    train.precision starts with this run's fresh loss scalers (an fp32 run saved none)."""
    if any(c.key == "train.precision" for c in changes):
        state = {**state, **{k: v for k, v in fresh.items() if k.startswith("scaler_")}}
    return state


def weights_only(source: dict[str, Any], fresh: dict[str, Any], path: Path) -> dict[str, Any]:
    """An engine state for checkpoint.init_from: the networks' weights of ``source`` (every
    key of this run's engine state that is not an optimizer or a loss scaler: G and D, or S,
    and an EMA copy where the engine keeps one), this run's fresh optimizers and scalers."""
    nets = [k for k in fresh if not k.startswith(("opt_", "scaler_"))]
    missing = [k for k in nets if k not in source]
    if missing:
        raise CheckpointMismatch(f"checkpoint.init_from: {path} holds no weights for {', '.join(missing)}")
    return {**fresh, **{k: source[k] for k in nets}}


def record(run_dir: Path, cfg: Config, *, how: str, step: int, source: Path | None, changes: list[Change],
           world_size: int) -> None:
    """Write config.yaml (the config now in force) and append this start to the history (rank 0)."""
    save_config(cfg, run_dir / CONFIG_FILE)
    append_jsonl(run_dir / HISTORY_FILE, {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "how": how, "step": step,
        "from": str(source) if source else None, "world_size": world_size, "host": socket.gethostname(),
        "changes": {c.key: {"old": c.old, "new": c.new, "by": c.kind} for c in changes},
    })
