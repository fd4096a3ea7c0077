"""Reading shards, in one place: which tars a spec names, and a tar's samples with the one rule
for a tar that cannot be read (it is one bad sample, ``<tar>``, of its shard)."""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Iterator
from contextlib import nullcontext
from typing import IO, Any

import braceexpand
from webdataset.tariterators import group_by_keys, tar_file_expander

from ssgan_dist.data.schema import BadSample
from ssgan_dist.errors import SetupError

# What reading a broken or truncated tar raises (webdataset passes tarfile's errors through).
TAR_ERRORS = (tarfile.TarError, OSError, ValueError)


class ShardSpecError(SetupError):
    """``data.shards`` (or another shard option) names nothing readable."""


def resolve_shards(spec: str, option: str = "data.shards") -> list[str]:
    """A directory, a brace pattern ("a-{000000..000009}.tar"), a glob, or a comma list;
    ``option`` is the setting the spec came from, named in errors."""
    if not spec:
        raise ShardSpecError(f"{option} is empty: give a directory of .tar shards or a pattern")
    paths: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
            if not found:
                raise ShardSpecError(f"{option}: directory {part} holds no .tar shards")
            paths += found
            continue
        for item in braceexpand.braceexpand(part):
            matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
            if not matches:
                raise ShardSpecError(f"{option}: {item} matches no file")
            paths += matches
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ShardSpecError(f"{option}: no such shard {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return paths


def unreadable_tar(path: str, exc: BaseException) -> BadSample:
    """The bad sample a tar that cannot be read counts as."""
    return BadSample(os.path.basename(path), "<tar>", f"unreadable tar: {exc}")


def iter_tar(path: str, stream: IO[bytes] | None = None) -> Iterator[dict[str, Any]]:
    """The raw samples of one tar (members grouped by key) in stored order, read from ``path``
    or from ``stream``; where the tar breaks, BadSample (see ``unreadable_tar``)."""
    try:
        with open(path, "rb") if stream is None else nullcontext(stream) as f:
            yield from group_by_keys(tar_file_expander([{"url": path, "stream": f}]))
    except TAR_ERRORS as exc:
        raise unreadable_tar(path, exc) from exc
