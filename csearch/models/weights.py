"""Where model files are found: weights resolution, the one download, and the file digest.

Weights are resolved in this order (`resolve_weights`): an explicit path, `$CSEARCH_HOME`
(default `~/.cache/csearch`), Keras' own cache, and - for Keras backbones only - Keras' own
download. Nothing downloads at import or while an object is constructed: only inside
`resolve_weights(name, "imagenet")`. Keras is imported only for that download.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from pathlib import Path
from typing import Optional, Union

from .. import errors
from .registry import PRETRAINED, REGISTRY, ModelSpec, get_spec, names

WeightsArg = Union[None, str, os.PathLike]


def csearch_home() -> Path:
    """Where csearch looks for model files: $CSEARCH_HOME or ~/.cache/csearch."""
    return Path(os.environ.get("CSEARCH_HOME") or "~/.cache/csearch").expanduser()


def keras_cache_dir() -> Path:
    """Keras' own download cache (what `weights="imagenet"` uses): $KERAS_HOME/models."""
    return Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser() / "models"


def find_weights(name: str) -> Optional[Path]:
    """The registered file if it is already on disk ($CSEARCH_HOME, then Keras' cache); no
    download."""
    spec = get_spec(name)
    candidates = [csearch_home() / spec.weights_file]
    if spec.keras_file:
        candidates.append(keras_cache_dir() / spec.keras_file)
    return next((p for p in candidates if p.is_file()), None)


def resolve_weights(name: str, weights: WeightsArg = "imagenet") -> Optional[Path]:
    """Turn a `weights` argument into a file path, or None for random initialisation.

    `None`/"none": random init (Keras backbones only). A path: that file (it must exist).
    "imagenet" (or "default"): `find_weights`, then - Keras backbones only - Keras' own
    download. Every failure is a one-line `WeightsNotFound` naming the file and where to put it.
    """
    spec = get_spec(name)
    if weights is None or (isinstance(weights, str) and weights.lower() == "none"):
        if not spec.is_keras:
            raise errors.ConfigError(
                f"{name} is an ONNX model: weights must be 'imagenet' "
                f"(the file {spec.weights_file}) or a file path, not none"
            )
        return None
    if isinstance(weights, str) and weights.lower() in PRETRAINED:
        return find_weights(name) or _download(spec)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise errors.WeightsNotFound(f"{name}: weights file not found: {path}")
    return path.resolve()


def _download(spec: ModelSpec) -> Path:
    """Keras' own download (the same call `weights="imagenet"` makes); ONNX files never
    download. Any failure (offline, proxy, bad hash) becomes one WeightsNotFound line."""
    home = csearch_home()
    if not spec.is_keras or not spec.keras_file:
        raise errors.WeightsNotFound(
            f"{spec.name}: model file not found. Put {spec.weights_file} in {home} (or pass a "
            f"file path, or set CSEARCH_HOME to its folder); "
            f"{'download it from' if spec.source.startswith('http') else 'to make it:'} {spec.source}"
        )
    import keras

    try:
        # Broad on purpose: get_file raises bare Exception for network errors; the reason is
        # kept in the message, so nothing is swallowed.
        with contextlib.redirect_stdout(sys.stderr):  # Keras prints progress; stdout is for --json
            got = keras.utils.get_file(
                spec.keras_file, spec.keras_url, cache_subdir="models", file_hash=spec.keras_hash
            )
    except Exception as exc:  # noqa: BLE001
        raise errors.WeightsNotFound(
            f"{spec.name}: ImageNet weights not found. Put {spec.weights_file} in {home} (or "
            f"pass a file path); download of {spec.keras_file} failed: {errors.one_line(exc)}"
        ) from None
    return Path(got).resolve()


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """sha256 of a file, cached by (absolute path, size, mtime) so repeated checks are free."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def describe_models() -> list[dict]:
    """One row per registered model for `csearch models` (no download, no hashing)."""
    rows = []
    for name in names():
        spec = REGISTRY[name]
        found = find_weights(name)
        rows.append(
            {
                "name": name,
                "role": spec.role,
                "dim": spec.dim,
                "input_size": spec.input_size,
                "weights_file": spec.weights_file,
                "found": str(found) if found else None,
                "put_in": str(csearch_home()),
                "source": spec.source,
                "description": spec.description,
            }
        )
    return rows
