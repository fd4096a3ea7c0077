"""Random numbers that are pure functions of their keys, so a resumed or re-split run draws
exactly what an uninterrupted one would, with no generator state to save."""

from __future__ import annotations

import numpy as np
import torch


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU torch generator seeded by ``keys`` (e.g. (seed, step)); CPU so that CPU and GPU
    runs draw the same values. The seed is Python's tuple hash of the keys, fixed for ints."""
    return torch.Generator().manual_seed(hash(keys) & 0x7FFFFFFFFFFFFFFF)


def seeded_numpy(*keys: int) -> np.random.Generator:
    """A numpy generator seeded by ``keys`` (each taken modulo 2^32) through a SeedSequence."""
    return np.random.default_rng(np.random.SeedSequence([k & 0xFFFFFFFF for k in keys]))
