"""Content-keyed caches that make the retrieval ablation cheap.

U²-Net-p costs ~0.3 s an image here and matting more, while every ablation row needs the same
localizations. A cache entry is keyed by a digest of the *decoded, downscaled* image array (what
the localizer actually sees) plus the settings that produce it, so renaming a file costs nothing
and editing it, or changing a model file or setting, misses the cache instead of returning a
stale result. Entries are float32 and written atomically and durably (csearch.store.durable): a
cached run returns exactly what an uncached one would, and an interrupted run leaves no
half-written file. Model and source files are keyed by `csearch.models.file_sha256`.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..localize.base import composite_on_white
from ..masks import pixel_box
from ..models import file_sha256
from ..store.durable import write_bytes_atomic
from ..types import Localization


def array_digest(array: np.ndarray) -> str:
    """A digest of an array's shape, dtype and bytes."""
    h = hashlib.sha1()
    h.update(f"{array.shape}{array.dtype}".encode())
    h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()[:24]


def settings_digest(settings: Any) -> str:
    """A digest of JSON-able settings (dict key order does not matter)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def files_digest(files) -> list[str]:
    """Content digests of model files (memoised by file_sha256 on path, size and mtime)."""
    return [file_sha256(f) for f in (files or [])]


def source_digest(cls) -> str:
    """Digest of the source file defining `cls`."""
    import inspect

    return file_sha256(inspect.getfile(cls))


def localize_source_digest() -> str:
    """Digest of csearch.localize's code, the ONNX wrapper u2net.py included: its pre- and
    post-processing (min-max stretch, minimum object area) are part of every localization, and so
    is csearch.models (the sessions, the registry's input names, mean and std)."""
    root = Path(__file__).resolve().parents[1]
    files = sorted(root.glob("localize/*.py")) + sorted(root.glob("models/*.py"))
    return settings_digest([file_sha256(p) for p in files])


class ArrayCache:
    """A folder of .npz entries, one per key, written atomically and durably.

    With `defer=True` entries are kept in memory until `flush()`, so compressing them never
    lands inside a timed query."""

    def __init__(self, root: str | Path, defer: bool = False, sync: bool = True):
        self.root = Path(root)
        self.defer = defer
        # sync=False: atomic but not fsynced (much faster for many small entries); an entry a crash
        # left unreadable reads as a miss and is computed again
        self.sync = sync
        self.pending: list[tuple[str, dict]] = []
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def get(self, key: str) -> Optional[dict[str, np.ndarray]]:
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                entry = {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def put(self, key: str, **arrays: np.ndarray) -> None:
        if self.defer:
            self.pending.append((key, arrays))
            return
        self._write(key, arrays)

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for key, arrays in pending:
            self._write(key, arrays)

    def _write(self, key: str, arrays: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, npz_bytes(arrays), sync=self.sync)


def npz_bytes(arrays: dict) -> bytes:
    """`arrays` as the bytes of a compressed .npz file."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


class CachedSaliency:
    """Wraps a saliency model (`predict(image) -> float32 (H, W)`) with an ArrayCache.

    It sits *under* the matting step, so U²-Net runs once for both 'u2net' and
    'u2net + matting'.
    """

    def __init__(self, model, cache: ArrayCache):
        self.model = model
        self.cache = cache
        self.name = model.name
        self.files = list(getattr(model, "files", []))
        # the source file counts too, also for an ONNX model: its pre- and post-processing (e.g.
        # U²-Net's min-max stretch and minimum object area) change the map. Keying by the model
        # file alone once kept maps from before the minimum-area rule (docs/results/retrieval.md).
        self.settings = {
            "saliency": model.name,
            "files": files_digest(self.files),
            "input_size": getattr(model, "input_size", None),
        }
        extra = {"work_side": getattr(model, "work_side", None), "source": source_digest(type(model))}
        self.settings.update({k: v for k, v in extra.items() if v is not None})
        self._prefix = settings_digest(self.settings)

    def predict(self, image: np.ndarray) -> np.ndarray:
        key = f"{self._prefix}-{array_digest(image)}"
        entry = self.cache.get(key)
        if entry is not None:
            return entry["saliency"]
        saliency = self.model.predict(image).astype(np.float32, copy=False)
        self.cache.put(key, saliency=saliency)
        return saliency


class CachedLocalizer:
    """Wraps any localizer; caches its alpha, mask and backend string per image.

    The cut-out is rebuilt as `composite_on_white(image, alpha)` and the box from the mask, which
    is how every csearch backend derives them, so a hit equals a fresh call (tested). When the
    wrapped localizer is a `SaliencyLocalizer`, its saliency model is cached too (see
    CachedSaliency). `settings` must name everything that changes the result besides the image
    (the localize config and model file digests). `read=False` computes and stores but never
    reads, so timings stay honest (the headline queries).
    """

    def __init__(self, localizer, cache: ArrayCache, settings: Any, read: bool = True):
        self.localizer = localizer
        self.cache = cache
        self.read = read
        self.name = getattr(localizer, "name", type(localizer).__name__)
        self.files = list(getattr(localizer, "files", []))
        if hasattr(localizer, "saliency") and hasattr(localizer.saliency, "predict") and read:
            # a shallow copy: the caller's localizer (e.g. the one timed queries use) stays uncached
            self.localizer = copy.copy(localizer)
            self.localizer.saliency = CachedSaliency(localizer.saliency, cache)
        # all of csearch.localize's code is part of the result (the saliency cache below is keyed
        # by its own model file and source)
        self._prefix = settings_digest(
            {
                "name": self.name,
                "files": files_digest(self.files),
                "settings": settings,
                "source": localize_source_digest(),
            }
        )

    def __call__(self, image: np.ndarray) -> Localization:
        key = f"{self._prefix}-{array_digest(image)}"
        entry = self.cache.get(key) if self.read else None
        if entry is not None:
            return _from_entry(image, entry)
        loc = self.localizer(image)
        self.cache.put(
            key,
            alpha=loc.alpha.astype(np.float32, copy=False),
            mask=np.packbits(loc.mask),
            produced_by=np.array(loc.produced_by),
        )
        return loc


def _from_entry(image: np.ndarray, entry: dict) -> Localization:
    height, width = image.shape[:2]
    alpha = entry["alpha"]
    mask = np.unpackbits(entry["mask"], count=height * width).reshape(height, width).astype(bool)
    return Localization(
        alpha=alpha,
        mask=mask,
        cutout=composite_on_white(image, alpha),
        produced_by=str(entry["produced_by"]),
        box=pixel_box(mask),
    )


class CachedExtractor:
    """Wraps an extractor (uint8 (N, S, S, 3) -> float32 (N, D)); caches each image's raw
    feature vector by the digest of its input array, so the same image under the same setting is
    embedded once whatever catalogue or subset it appears in. Misses run as one batch;
    `read=False` computes everything and only stores (timed queries)."""

    def __init__(self, extractor, cache: ArrayCache, read: bool = True):
        self.extractor = extractor
        self.cache = cache
        self.read = read
        self.name = extractor.name
        self.dim = extractor.dim
        self.input_size = extractor.input_size
        self.files = list(getattr(extractor, "files", []))
        self._prefix = "x" + settings_digest(
            {
                "name": Path(str(extractor.name)).name,
                "files": files_digest(self.files),
                "dim": int(extractor.dim),
                "input_size": int(extractor.input_size),
                "preprocessing": getattr(extractor, "preprocessing", None),
                "layout": getattr(extractor, "layout", None),
            }
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        keys = [f"{self._prefix}-{array_digest(image)}" for image in images]
        out = np.zeros((len(images), self.dim), np.float32)
        missing = []
        for i, key in enumerate(keys):
            entry = self.cache.get(key) if self.read else None
            if entry is None:
                missing.append(i)
            else:
                out[i] = entry["vector"]
        if missing:
            computed = np.asarray(self.extractor(images[missing]), np.float32)
            for i, vector in zip(missing, computed):
                out[i] = vector
                self.cache.put(keys[i], vector=vector)
        return out
