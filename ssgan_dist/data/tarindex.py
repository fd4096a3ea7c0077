"""DALI's webdataset index files (``<shard>.idx``) and a tar's sample table.

Without an index DALI scans every tar when a pipeline starts; with one it reads only the
index. The format (DALI's ``wds2idx``, version v1.2) is a header ``v1.2 <samples>`` and one
line per sample with ``<ext> <data offset> <size> <member name>`` for each member, samples
being runs of consecutive members that share the name before the first dot. DALI's own
tool writes the file when it is installed; otherwise the same lines come from Python's
tarfile, so a machine without DALI still builds shards that DALI reads without a scan.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from ssgan_dist.files import atomic_path

Member = tuple[str, int, int, str]  # ext, data offset, size, member name
INDEX_VERSION = "v1.2"


def index_path(tar_path: str | os.PathLike) -> Path:
    """``a/shard-000001.tar`` -> ``a/shard-000001.idx`` (the name wds2idx picks)."""
    path = Path(tar_path)
    return path.with_name(path.name.split(".", 1)[0] + ".idx")


def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member name, as DALI's wds2idx and reader split it: the key
    runs to the first dot of the base name. None for members that are no sample's part
    (hidden files, whose base name starts with a dot). Every reader of shards uses this
    rule, so the torch loader, DALI and ``verify`` see the same samples."""
    dot = name.find(".", name.rfind("/") + 1)
    key, ext = (name, "") if dot < 0 else (name[:dot], name[dot + 1:])
    return None if not key or key.endswith("/") else (key, ext)


def scan_tar(tar_path: str | os.PathLike) -> list[tuple[str, list[Member]]]:
    """(key, members) per sample in stored order; tarfile.TarError/OSError if unreadable."""
    samples: list[tuple[str, list[Member]]] = []
    with tarfile.open(tar_path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            split = split_name(info.name)
            if split is None:
                continue  # hidden files: neither webdataset nor DALI reads them
            key, ext = split
            if not samples or samples[-1][0] != key:
                samples.append((key, []))
            samples[-1][1].append((ext, info.offset_data, info.size, info.name))
    return samples


def _format(samples: list[tuple[str, list[Member]]]) -> str:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members)
              for _, members in samples]
    return "\n".join(lines) + "\n"


def write_index(tar_path: str | os.PathLike) -> Path:
    """Write ``<shard>.idx`` beside the tar (atomically) with DALI's wds2idx when it is
    installed, else from :func:`scan_tar`; returns the index path."""
    out = index_path(tar_path)
    with atomic_path(out) as tmp:
        try:
            from wds2idx import IndexCreator  # shipped with nvidia-dali
        except ImportError:
            tmp.write_text(_format(scan_tar(tar_path)))
        else:
            with IndexCreator(str(tar_path), str(tmp), verbose=False) as creator:
                creator.create_index()
    return out


def read_index(idx: str | os.PathLike) -> list[tuple[str, list[Member]]]:
    """(key, members) per sample of an index file; ValueError naming it if malformed."""
    lines = Path(idx).read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit() or int(head[1]) != len(lines) - 1:
        raise ValueError(f"{idx}: not a {INDEX_VERSION} webdataset index of {len(lines) - 1} samples")
    samples = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields or len(fields) % 4 or not all(f.isdigit() for f in fields[1::4] + fields[2::4]):
            raise ValueError(f"{idx} line {number}: expected '<ext> <offset> <size> <name>' records")
        members = [(e, int(o), int(n), name) for e, o, n, name in zip(*[iter(fields)] * 4)]
        split = split_name(members[0][3])
        if split is None:
            raise ValueError(f"{idx} line {number}: {members[0][3]!r} is no sample's member")
        samples.append((split[0], members))
    return samples


def fresh_index(tar_path: str | os.PathLike, data: bytes | None = None) -> list[tuple[str, list[Member]]] | None:
    """The samples of the shard's index if it describes the tar as it is now, else None;
    ``data``: the tar's bytes when they are already read.

    A tar appended to after its index was written (tarfile's "a" mode, ``tar -r``) would be
    read at stale offsets, so the archive must end right after the last indexed member:
    the 512-byte block there is the zero end-of-archive marker. Timestamps cannot tell:
    an append within the file system's clock tick keeps the same mtime.
    """
    try:
        samples = read_index(index_path(tar_path))
        end = -(-max(offset + size for _, members in samples for _, offset, size, _ in members) // 512) * 512
        if data is None:
            with open(tar_path, "rb") as tar:
                tar.seek(end)
                block = tar.read(512)
        else:
            block = data[end:end + 512]
    except (OSError, ValueError):  # also max() of an index without members
        return None
    return samples if len(block) == 512 and not block.strip(b"\0") else None


def headers_match(data: bytes, samples: list[tuple[str, list[Member]]]) -> bool:
    """Whether every indexed member of a tar held in ``data`` has its own header right
    before its data: a regular file of the indexed size (and name, when it fits the
    header's 100-byte name field). A few microseconds per member, against the tens that
    parsing the headers takes; an index that fails it is not used."""
    for _, members in samples:
        for _, offset, size, name in members:
            head = data[offset - 512:offset] if offset >= 512 else b""
            if len(head) != 512 or head[156:157] not in (b"0", b"\0", b"7"):
                return False
            field = head[124:136]
            if not field[0] & 0x80:  # octal; base-256 sizes (over 8 GiB) are not checked
                try:
                    if int(field.rstrip(b"\0 ").strip() or b"0", 8) != size:
                        return False
                except ValueError:
                    return False
            encoded = name.encode("utf-8", "surrogateescape")
            if len(encoded) <= 100 and head[:len(encoded)] != encoded or len(encoded) < 100 and head[len(encoded)]:
                return False
    return True
