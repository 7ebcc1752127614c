"""The on-disk cache of the frozen bottom's activations (one .npy per split and copy)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..store.durable import save_npy_atomic


def digest(*parts: Any) -> str:
    """A short digest of JSON-able parts (dict key order does not matter)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ActivationCache:
    """Copies of the bottom's output, one .npy per (split, copy), memory-mapped on reading.
    Keys cover everything that changes the numbers, so a stale file is never reused."""

    def __init__(self, folder: Path, key_parts: tuple):
        self.folder = Path(folder)
        self.key = digest(*key_parts)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, split: str, copy: int) -> Path:
        return self.folder / f"{self.key}-{split}-{copy}.npy"

    def get(self, split: str, copy: int, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached array, computed and written first when missing (atomically: an
        interrupted run never leaves a half-written file to be reused)."""
        path = self.path(split, copy)
        if not path.is_file():
            save_npy_atomic(path, compute())
        return np.load(path, mmap_mode="r")
