"""The one directory for data ssgan-dist generates and reuses across runs: synthetic shards and
the real images' FID statistics."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str = "") -> Path:
    """``cache_dir`` (data.cache_dir), else $SSGAN_CACHE, else ~/.cache/ssgan_dist."""
    return Path(cache_dir or os.environ.get("SSGAN_CACHE") or Path.home() / ".cache" / "ssgan_dist")
