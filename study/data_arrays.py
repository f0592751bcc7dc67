"""What every dataset loader returns (``DataArrays``) and the error it raises for a user's
mistake (``DataError``): shared by ``study.data`` and ``study.imagefolder``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from study.image_format import IMAGE_SIZE


class DataError(Exception):
    """A user-facing data problem: the message is shown as one line, exit 2."""


@dataclass(frozen=True, eq=False)
class DataArrays:
    """A dataset's official train and test splits as uint8 (N, 3, 32, 32) arrays."""

    name: str
    classes: tuple[str, ...]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
                raise ValueError(f"{split}_x must be uint8 (N, 3, 32, 32), not {x.dtype} {x.shape}")
            if y.dtype != np.int64 or y.shape != (len(x),):
                raise ValueError(f"{split}_y must be int64 ({len(x)},), not {y.dtype} {y.shape}")
