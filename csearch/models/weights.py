"""Where model files are found: weights resolution and the file digest.

Weights are resolved in this order (`resolve_weights`): an explicit path, `$CSEARCH_HOME`
(default `~/.cache/csearch`), then Keras' own cache (`~/.keras/models`, where earlier Keras
downloads are). Nothing here downloads: `csearch models fetch NAME` (`models.fetch`) is the one
place that gets files, so a missing file is a one-line `WeightsNotFound` naming that command.
"""

from __future__ import annotations

import hashlib
import os
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
    download. A Keras backbone's file may be csearch's (`weights_file`) or Keras' own
    (`keras_file`, which `csearch models fetch` saves in $CSEARCH_HOME)."""
    spec = get_spec(name)
    candidates = [csearch_home() / spec.weights_file]
    if spec.keras_file:
        candidates += [csearch_home() / spec.keras_file, keras_cache_dir() / spec.keras_file]
    return next((p for p in candidates if p.is_file()), None)


def fetch_hint(spec: ModelSpec) -> str:
    """The command that gets a model's file, and from where (for messages and `csearch models`)."""
    if spec.converter:
        return f"`csearch models fetch {spec.name}` (builds it from {spec.download_url})"
    if spec.download_url:
        return f"`csearch models fetch {spec.name}` (downloads {spec.download_url})"
    return f"`csearch models fetch {spec.name} --from DIR` ({spec.source})"


def missing_message(spec: ModelSpec) -> str:
    """The one line for a registered model whose file is not on disk."""
    where = f"{csearch_home()}" + (f" or Keras' cache ({keras_cache_dir()})" if spec.keras_file else "")
    return (
        f"{spec.name}: model file {spec.weights_file} not found in {where}. Get it with {fetch_hint(spec)}, "
        "or pass a file path (or set CSEARCH_HOME to the folder holding it)"
    )


def resolve_weights(name: str, weights: WeightsArg = "imagenet") -> Optional[Path]:
    """Turn a `weights` argument into a file path, or None for random initialisation.

    `None`/"none": random init (Keras backbones only). A path: that file (it must exist).
    "imagenet" (or "default"): `find_weights`. Never downloads: every failure is a one-line
    `WeightsNotFound` naming the file, where it was looked for and the command that gets it.
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
        found = find_weights(name)
        if found is None:
            raise errors.WeightsNotFound(missing_message(spec))
        return found.resolve()
    path = Path(weights).expanduser()
    if not path.is_file():
        raise errors.WeightsNotFound(
            f"{name}: weights file not found: {path} (`csearch models fetch {name}` gets the registered file)"
        )
    return path.resolve()


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
                "url": spec.download_url,
                "fetch": None if found else fetch_hint(spec),
                "description": spec.description,
            }
        )
    return rows
