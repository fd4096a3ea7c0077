"""How a run starts: which checkpoint it resumes from, what may differ from that checkpoint's
config, what ``checkpoint.init_from`` copies, and the record of it in run.dir.

Rank 0 picks the checkpoint (:func:`pick`: temporaries of killed writes removed, unreadable
checkpoints moved aside, ``checkpoint.resume=false`` in a used run.dir refused unless this is
a launcher's restart of the same launch) and every rank loads that one
(:func:`read_on_every_rank`).

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
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssgan_dist.checkpoint import (STATE_FILE, CheckpointManager, CheckpointMismatch, Unreadable, list_checkpoints,
                                   newest_readable, read)
from ssgan_dist.config import Config, flat_values, keys, save_config
from ssgan_dist.distributed.collectives import gather_to_all
from ssgan_dist.distributed.env import launcher_restarts
from ssgan_dist.errors import SetupError
from ssgan_dist.files import append_jsonl, remove, stale_temps
from ssgan_dist.tasks.base import Task

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config-history.jsonl"
SAMPLES_DIR = "samples"  # train.py's sample grids, step-<9 digits>.png
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


def pick(manager: CheckpointManager, resume_enabled: bool) -> tuple[dict[str, Any], Path] | None:
    """Rank 0: the checkpoint (state, path) this run resumes from, None for a new run, or a
    refusal. Removes the temporaries of killed writes first; unreadable checkpoints are moved
    aside on the way."""
    manager.clean_stale_temps()
    for stale in [*stale_temps(manager.run_dir, re.escape(CONFIG_FILE)),
                  *stale_temps(manager.run_dir / SAMPLES_DIR, r"step-\d{9}\.png")]:
        remove(stale)
    existing = list_checkpoints(manager.run_dir)
    if not existing:
        return None
    if not resume_enabled:
        if not launcher_restarts():
            raise SetupError(
                f"checkpoint.resume=false, but run.dir {manager.run_dir} holds checkpoints (newest {existing[-1].name}); "
                "nothing is deleted for you: give this run another run.dir, continue the old one with "
                "checkpoint.resume=true, or move its ckpt-* files away yourself to start over here")
        log.info("restart %d of this launch: resuming its own checkpoint (checkpoint.resume=false applies to "
                 "the first start)", launcher_restarts())
    found = manager.load_latest(map_location="cpu")
    if found is None:
        raise SetupError(f"run.dir {manager.run_dir}: none of its {len(existing)} checkpoint(s) is readable (moved "
                         "aside to *.corrupt, see the warnings); start again to train from step 0 here, or "
                         "restore a checkpoint")
    return found


def read_on_every_rank(path: Path, state: dict[str, Any] | None, rank: int) -> dict[str, Any]:
    """The state at ``path``, rank 0's choice (``state``: rank 0 has it already); every rank
    fails alike, naming the ranks, if one cannot read it (a collective: call on every rank)."""
    problem = ""
    if state is None:
        try:
            state = read(path)
        except Unreadable as exc:
            problem = f"rank {rank}: {exc}"
    problems = [p for p in gather_to_all(problem) if p]
    if problems:
        raise SetupError(f"{path}, chosen by rank 0, cannot be read on every rank: {'; '.join(problems)} "
                         "(is run.dir on a filesystem every node sees?)")
    assert state is not None
    return state


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
    """The checkpoint's state with what an allowed change replaces (``fresh``: this run's task
    state before loading): a new
    train.precision starts with this run's fresh loss scalers (an fp32 run saved none)."""
    if any(c.key == "train.precision" for c in changes):
        state = {**state, **{k: v for k, v in fresh.items() if k.startswith("scaler_")}}
    return state


def read_init_from(source: Path) -> tuple[dict[str, Any], Path]:
    """checkpoint.init_from's state and path: a checkpoint (file, or a sharded checkpoint's
    directory) or a run directory's newest readable one (someone else's: nothing moved)."""
    if not source.exists():
        raise SetupError(f"checkpoint.init_from: no such file or directory {source}")
    if source.is_dir() and not (source / STATE_FILE).is_file():
        found = newest_readable(source, move_unreadable=False)
        if found is None:
            raise SetupError(f"checkpoint.init_from: {source} holds no readable checkpoint (ckpt-*.pt)")
        return found
    try:
        return read(source), source
    except Unreadable as exc:
        raise SetupError(f"checkpoint.init_from: {source} is not a usable checkpoint ({exc})") from None


def load_weights(task: Task, state: dict[str, Any], path: Path) -> None:
    """checkpoint.init_from: the networks' weights of ``state`` into ``task`` (its engine's
    networks, G and D or S, which the checkpoint must hold; the task's own weights, e.g. the
    EMA of G, where the checkpoint has them, else the task starts them from the loaded
    networks); optimizers and scalers stay fresh. The caller has checked the task's
    signature; a layout it does not cover is refused here."""
    fresh, engine_keys = task.state_dict(), set(task.engine.state_dict())
    nets = [k for k in engine_keys if not k.startswith(("opt_", "scaler_"))]
    missing = [k for k in nets if k not in state]
    if missing:
        raise CheckpointMismatch(f"checkpoint.init_from: {path} holds no weights for {', '.join(sorted(missing))}")
    own = [k for k in fresh if k not in engine_keys and k in state]
    merged = {**{k: v for k, v in fresh.items() if k in engine_keys}, **{k: state[k] for k in [*nets, *own]}}
    try:
        task.load_state_dict(merged)
    except RuntimeError as exc:
        raise CheckpointMismatch(f"checkpoint.init_from: {path} does not fit this model: {exc}") from None
    log.info("initialised from the weights of %s (its step %d: %s): fresh optimizers, step 0", path, state["step"],
             ", ".join(sorted([*nets, *own])))


def record(run_dir: Path, cfg: Config, *, how: str, step: int, source: Path | None, changes: list[Change],
           world_size: int) -> None:
    """Write config.yaml (the config now in force) and append this start to the history (rank 0)."""
    save_config(cfg, run_dir / CONFIG_FILE)
    append_jsonl(run_dir / HISTORY_FILE, {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "how": how, "step": step,
        "from": str(source) if source else None, "world_size": world_size, "host": socket.gethostname(),
        "changes": {c.key: {"old": c.old, "new": c.new, "by": c.kind} for c in changes},
    })
