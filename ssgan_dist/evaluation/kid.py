"""Kernel Inception Distance from the pool3 features FID uses.

KID (Binkowski et al., "Demystifying MMD GANs", 2018) is the squared MMD between the fake and
real feature distributions under the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3,
estimated without bias, averaged over random subsets; the spread over subsets is reported as
its std. Unlike FID it is unbiased at any sample count, which is why it sits beside FID when
a test set has fewer samples than the feature dimension (SketchyCOCO's 2816 barely clears
2048; a quick evaluation on a few hundred does not).

This follows torch-fidelity's ``kid_features_to_metric`` (itself from the KID authors' code)
with its defaults: 100 subsets of 1000 samples (fewer when a set is smaller: all of the smaller
set), subsets drawn without replacement by ``numpy.random.RandomState(2020)``, fake set first,
so the same features give torch-fidelity's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUBSETS = 100
SUBSET_SIZE = 1000
SEED = 2020  # torch-fidelity's rng_seed


@dataclass(frozen=True)
class KID:
    mean: float
    std: float
    subsets: int
    subset_size: int


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(x.y / d + 1)^3 for every pair of rows, in float64."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equally sized samples: the within-set means leave out i = j."""
    m = len(x)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(fake: np.ndarray, real: np.ndarray, subsets: int = SUBSETS,
                              subset_size: int = SUBSET_SIZE, seed: int = SEED) -> KID:
    """KID of [N, D] fake and [M, D] real features: mean and std of the unbiased MMD^2 over
    ``subsets`` random subsets of min(subset_size, N, M) samples of each set."""
    if fake.ndim != 2 or real.ndim != 2 or fake.shape[1] != real.shape[1]:
        raise ValueError(f"KID: expected [N, D] and [M, D] features, got {fake.shape} and {real.shape}")
    size = min(subset_size, len(fake), len(real))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples in each set, got {len(fake)} and {len(real)}")
    f, r = fake.astype(np.float64), real.astype(np.float64)
    rng = np.random.RandomState(seed)
    values = np.array([mmd2_unbiased(f[rng.choice(len(f), size, replace=False)],
                                     r[rng.choice(len(r), size, replace=False)]) for _ in range(subsets)])
    return KID(float(values.mean()), float(values.std()), subsets, size)
