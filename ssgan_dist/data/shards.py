"""Reading shards, in one place: which tars a spec names, and a tar's samples with the one rule
for a tar that cannot be read (it is one bad sample, ``<tar>``, of its shard).

A shard is read whole (tens of MB) and its members are cut out of the bytes where the tar
headers put them: taken from the shard's DALI index when it is fresh and its entries match
the headers they point at (a few microseconds per member), else from parsing the headers
(tarfile, ~25 us per member). Members group into samples by ``tarindex.split_name``, the
rule DALI reads by. Compressed tars (.tar.gz and the like, known by their magic bytes
whatever the file is called) are refused, not decompressed into memory.
"""

from __future__ import annotations

import glob
import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any

import braceexpand

from ssgan_dist.data.schema import BadSample
from ssgan_dist.data.tarindex import fresh_index, headers_match, split_name
from ssgan_dist.errors import SetupError

# What reading a broken or truncated tar raises.
TAR_ERRORS = (tarfile.TarError, OSError, ValueError)
# Magic bytes of the compressions tar files come in.
COMPRESSIONS = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
                (b"\x04\x22\x4d\x18", "lz4"))


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


def unreadable_tar(path: str, exc: BaseException | str) -> BadSample:
    """The bad sample a tar that cannot be read counts as."""
    return BadSample(os.path.basename(path), "<tar>", f"unreadable tar: {exc}", "tar")


def compressed_tar(path: str, head: bytes) -> BadSample | None:
    """The bad sample a compressed shard counts as (from its first bytes), or None."""
    for magic, name in COMPRESSIONS:
        if head.startswith(magic):
            return BadSample(os.path.basename(path), "<tar>",
                             f"{name}-compressed: shards are plain tar files, read by offset and never decompressed "
                             f"into memory; decompress it (e.g. `{name} -d`) or rebuild the shards", "tar")
    return None


def _members(path: str, data: bytes) -> Iterable[tuple[str, int, int]]:
    """(name, data offset, size) of the tar's regular files in stored order: from a fresh
    index that matches the headers, else from the headers themselves."""
    samples = fresh_index(path, data)
    if samples is not None and headers_match(data, samples):
        return [(name, offset, size) for _, members in samples for _, offset, size, name in members]
    return _headers(data)


def _headers(data: bytes) -> Iterator[tuple[str, int, int]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            if info.isfile():
                yield info.name, info.offset_data, info.size
            tar.members = []  # a table of every TarInfo would only grow


def iter_tar(path: str, data: bytes | None = None, *, use_index: bool = True) -> Iterator[dict[str, Any]]:
    """The raw samples of one tar ({"__key__": key, extension: bytes}) in stored order, read
    from ``path`` or from its bytes ``data``; where the tar breaks, BadSample (see
    ``unreadable_tar``) after the samples before the break. ``use_index=False`` parses the
    headers even where an index could be used (``verify`` checks the index against them)."""
    try:
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        if (compressed := compressed_tar(path, data[:6])) is not None:
            raise compressed
        sample: dict[str, Any] | None = None
        for name, offset, size in _members(path, data) if use_index else _headers(data):
            split = split_name(name)
            if split is None:
                continue
            key, ext = split
            if offset + size > len(data):
                raise ValueError(f"truncated: member {name!r} ends past the end of the file")
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key}
            if ext in sample:
                raise ValueError(f"member {name!r} appears twice in one sample")
            sample[ext] = data[offset:offset + size]
        if sample is not None:
            yield sample
    except BadSample:
        raise
    except TAR_ERRORS as exc:
        raise unreadable_tar(path, exc) from exc
