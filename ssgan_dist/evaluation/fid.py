"""Frechet Inception Distance from pool3 features, and a cache of the real set's features.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). The last trace is computed as
tr((A S2 A)^(1/2)) with A = S1^(1/2), from two symmetric eigendecompositions: the same value
(S1 S2 is similar to A S2 A), but the matrix whose root is taken is symmetric positive
semi-definite, so no complex parts or singular-matrix fallbacks as with scipy's sqrtm on
the non-symmetric product, and it is several times faster at 2048 x 2048.

The real images' pool3 features depend only on the shard files, the Inception weights and
which samples are read, so they are computed once and kept in a cache directory under a key
made of exactly those. The features themselves are kept, not only their mean and covariance,
because KID (kid.py) needs the samples (2816 x 2048 float32: 23 MB for SketchyCOCO's test set).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ssgan_dist.errors import SetupError
from ssgan_dist.files import atomic_write


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, as pytorch-fid) of [N, D] features, in float64."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise SetupError(f"FID needs at least 2 samples, got features of shape {features.shape}")
    x = features.astype(np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def stats_key(shards: list[str], weights_sha256: str, settings: dict[str, Any]) -> str:
    """Cache key: each shard's path, size and mtime, the Inception weights' hash, and the
    settings that choose the samples (max_samples, image size, classes, bad-sample policy)."""
    h = hashlib.sha256()
    for path in shards:
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(weights_sha256.encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:32]


def load_features(cache_dir: Path, key: str) -> np.ndarray | None:
    """The cached [N, D] real features of ``key``, or None when absent or unreadable."""
    path = Path(cache_dir) / f"{key}.npz"
    try:
        with np.load(path) as f:
            return f["features"]
    except (OSError, KeyError, ValueError):
        return None


def save_features(cache_dir: Path, key: str, features: np.ndarray) -> Path:
    """Written atomically, so a concurrent reader never sees half an entry."""
    path = Path(cache_dir) / f"{key}.npz"
    with atomic_write(path) as f:
        np.savez(f, features=features.astype(np.float32), count=len(features))
    return path
