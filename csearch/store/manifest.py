"""manifest.json, the index's commit point: reading and checking it, and replacing it durably.

It holds format, version, uuid, generation, dim, mask_size, next_id, next_segment, live,
segments [{name, rows, first_id, last_id}, ...], tombstones ({file, count} or null), meta {...}
and, once declared, extras {column: {shape, dtype}} (optional per-item columns, `segments`).
A reader sees exactly the segments and tombstones one manifest lists; a writer's change exists
once `write_manifest` has replaced the file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..errors import StoreError
from .durable import write_bytes_atomic

FORMAT = "csearch-index"
VERSION = 1
MANIFEST = "manifest.json"

_MANIFEST_KEYS = {
    "format": str,
    "version": int,
    "uuid": str,
    "generation": int,
    "dim": int,
    "mask_size": int,
    "next_id": int,
    "next_segment": int,
    "live": int,
    "segments": list,
    "meta": dict,
}


def read_manifest(directory: Path) -> dict:
    """The committed manifest of the index in `directory`; StoreError if there is none or it is
    damaged or of a newer format."""
    if not directory.exists():
        raise StoreError(f"index directory not found: {directory}")
    if not directory.is_dir():
        raise StoreError(f"index path is not a directory: {directory}")
    path = directory / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StoreError(
            f"{directory} is not a csearch index (no {MANIFEST}); build one with `csearch index`"
        ) from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreError(f"index {directory}: {MANIFEST} is corrupt ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"index {directory}: {MANIFEST} is not a csearch index manifest")
    for key, kind in _MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            raise StoreError(f"index {directory}: {MANIFEST} lacks a valid {key!r}")
    if not isinstance(manifest.get("extras", {}), dict):
        raise StoreError(f"index {directory}: {MANIFEST} has an invalid 'extras'")
    if manifest["version"] > VERSION:
        raise StoreError(
            f"index {directory} has format version {manifest['version']}; this csearch "
            f"reads up to {VERSION}, upgrade csearch"
        )
    return manifest


def write_manifest(directory: Path, manifest: dict, unsynced: Sequence[Path] = ()) -> None:
    """Commit: make the new manifest, the folder's new entries (renamed segments) and the
    `unsynced` files durable, then atomically replace the manifest and make that durable."""
    write_bytes_atomic(
        directory / MANIFEST,
        json.dumps(manifest, indent=1, ensure_ascii=False).encode(),
        also_sync=[directory, *unsynced],
    )
