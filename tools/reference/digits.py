"""The reference data set: scikit-learn's handwritten digits (1797 real 8×8 images, 10 classes), which the
scikit-learn package carries, so nothing downloads. Pixels 0..16 are scaled to [−1, 1]. The held-out test
split is fixed (stratified, seed 0) and shared by training, the classifier and `dqc eval`."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

NUM_CLASSES = 10
TEST_SIZE = 360
SPLIT_SEED = 0


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, 1, 8, 8) float32 in [-1, 1]
    labels: np.ndarray  # (N,) int64


@lru_cache(maxsize=1)
def load_digits_split() -> tuple[Split, Split]:
    """(train, test): 1437 and 360 images, every class in both in proportion (read once per process;
    callers must not modify the arrays)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    y = data.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=TEST_SIZE, stratify=y, random_state=SPLIT_SEED)
    return Split(xtr, ytr), Split(xte, yte)
