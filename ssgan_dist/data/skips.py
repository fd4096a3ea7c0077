"""Bad samples the loaders skip (``data.on_error=skip``): told as they happen, counted, summed up.

* ``SkipLog``: a warning for each of the first FIRST_WARNINGS skips of a reader (a loader
  process or DALI pipeline), then one summary line at most every SUMMARY_EVERY_S seconds,
  by kind. Logged where the sample is read, not when a batch reaches the trainer: a reader
  that finds nothing usable for a long time is not silent.
* ``Skipped``: what a batch carries to the trainer (which counts it into the
  ``ssgan_data_samples_skipped_total`` metric and the checkpoint): the number skipped
  since the previous batch and the first KEPT_REASONS reasons, never a growing list.
* ``Tally``: every bad sample of a pass, by kind, in bounded memory; ``NoUsableSample``
  quotes it when a full pass over every shard finds not one usable sample.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from ssgan_dist.data.schema import BadSample
from ssgan_dist.errors import SetupError

log = logging.getLogger(__name__)

FIRST_WARNINGS = 10  # skips warned about one by one, per reader
SUMMARY_EVERY_S = 60.0  # then at most one summary line per this many seconds
KEPT_REASONS = 5  # reasons a batch carries beside its count
KIND_TITLES = {"tar": "unreadable shard", "key": "bad key", "missing": "missing member", "json": "bad JSON",
               "undecodable": "undecodable image", "size": "wrong size", "mode": "wrong image mode",
               "format": "wrong format", "class": "class out of range", "empty": "shard without samples"}


@dataclass
class Skipped:
    """Bad samples skipped since the previous batch: how many, and the first few reasons."""

    count: int = 0
    reasons: list[str] = field(default_factory=list)

    def add(self, reason: str) -> None:
        self.count += 1
        if len(self.reasons) < KEPT_REASONS:
            self.reasons.append(reason)


class Tally:
    """Bad samples by kind: a count, the first example and the variants' count per kind."""

    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()
        self.first: dict[str, BadSample] = {}
        self.reasons: dict[str, set[str]] = {}

    def add(self, bad: BadSample) -> None:
        kind = bad.kind or "other"
        self.kinds[kind] += 1
        self.first.setdefault(kind, bad)
        variants = self.reasons.setdefault(kind, set())
        if len(variants) < 100:  # enough to tell one cause from many
            variants.add(bad.reason or "")

    def lines(self, hints: dict[str, str] | None = None) -> list[str]:
        """One line per kind, the commonest first: title, first reason, how often met, where first."""
        out = []
        for kind, n in self.kinds.most_common():
            bad, variants = self.first[kind], len(self.reasons[kind])
            where = bad.shard if bad.key == "<tar>" or kind == "empty" else f"{bad.key!r} in {bad.shard}"
            more = f"; {variants - 1}{'+' if variants >= 100 else ''} other variant(s)" if variants > 1 else ""
            hint = f" ({hints[kind]})" if hints and kind in hints else ""
            out.append(f"{KIND_TITLES.get(kind, kind)}: {bad.reason}{hint} ({n} met, first: {where}{more})")
        return out


def hints(image_size: int, num_classes: int) -> dict[str, str]:
    """What a summary adds to a kind of bad sample: the setting it was checked against."""
    return {"size": f"model.image_size is {image_size}", "class": f"model.num_classes is {num_classes}"}


class NoUsableSample(SetupError):
    """A full pass over every shard found no sample a step could use."""

    @classmethod
    def after(cls, what: str, tally: Tally, hints: dict[str, str] | None = None) -> "NoUsableSample":
        """The error for a pass over ``what`` (e.g. "the 3 shards of data.shards=DIR")."""
        sample_kinds = [k for k in tally.kinds if k not in ("tar", "empty")]
        head = "every sample is bad" if sample_kinds else "no sample could be read"
        return cls(f"no usable sample in a full pass over {what}: {head}:\n  " + "\n  ".join(tally.lines(hints))
                   + "\n(`python -m ssgan_dist.data.build verify DIR` lists every problem)")


class SkipLog:
    """Rate-limited warnings of one reader's skips; see the module doc."""

    def __init__(self, where: str = "") -> None:
        self.where = f"{where}: " if where else ""
        self.total = 0
        self._since: Counter[str] = Counter()
        self._last = time.monotonic()

    def skip(self, bad: BadSample) -> None:
        self.total += 1
        if self.total <= FIRST_WARNINGS:
            last = " (later skips are summed up every %.0f s)" % SUMMARY_EVERY_S if self.total == FIRST_WARNINGS else ""
            log.warning("%sskipped %s%s", self.where, bad, last)
            self._last = time.monotonic()
            return
        self._since[bad.kind or "other"] += 1
        if time.monotonic() - self._last >= SUMMARY_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """Log the summary of the skips not yet told, if any."""
        if self._since:
            kinds = ", ".join(f"{n} {KIND_TITLES.get(k, k)}" for k, n in self._since.most_common())
            log.warning("%sskipped %d more bad samples (%s); %d in all", self.where, sum(self._since.values()), kinds,
                        self.total)
            self._since.clear()
        self._last = time.monotonic()
