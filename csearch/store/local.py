"""IndexStore: an index folder on this machine's file system, read and written in-process.

Layout of INDEX_DIR (log-structured, so adding or removing never rewrites the index)::

    manifest.json        the commit point (see `manifest`)
    seg-000001/          an immutable segment, never modified once committed (see `segments`)
    tomb-000012.npy      int64 sorted ids removed but still physically inside a segment
    writer.lock          flock()ed by the one writer; the kernel drops it when a writer dies

Every write builds new files under a ``tmp-`` name, fsyncs them and renames them into place, then
replaces manifest.json (fsynced, then the directory fsynced). Until that replace nothing a reader
sees has changed, so a crash at any moment leaves the previous index; once a method returns its
change is durable. The next writer deletes whatever no manifest refers to. Nothing inside refers
to the directory's own location, so an index can be moved; image paths are stored absolute.

Ids only ever grow (`next_id`), so a removed id is never reused. Segment ids are disjoint,
ascending ranges, so live items are always in ascending id order.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import numbers
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import StoreError
from ..masks import mask_bytes
from .ann import ANN_PREFIX
from .durable import TMP_PREFIX, fsync_dir, write_npy
from .manifest import FORMAT, MANIFEST, VERSION, read_manifest, write_manifest
from .segments import (
    SEGMENT_PREFIX,
    Source,
    check_extras,
    merge_start,
    segment_name,
    segment_number,
    validate_add,
    write_segment,
)
from .snapshot import Snapshot, load_snapshot

LOCK_FILE = "writer.lock"
TOMB_PREFIX = "tomb-"


class IndexStore:
    """An index directory, implementing `base.VectorStore`: read through `snapshot`, change it
    with `add`, `remove`, `update_meta` and `compact`, see other processes' changes with `refresh`.

    One writer at a time (other writers wait up to `lock_timeout` seconds, None: forever);
    readers never wait. Safe to share between threads.
    """

    def __init__(self, directory: Path, snapshot: Snapshot, lock_timeout: Optional[float]):
        self.directory = directory
        self.lock_timeout = lock_timeout
        self._snapshot = snapshot

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        directory,
        meta: dict,
        dim: int,
        mask_size: int = 64,
        overwrite: bool = False,
        lock_timeout: Optional[float] = 60.0,
    ) -> IndexStore:
        """Create an empty index. With `overwrite` an existing index there is replaced in one
        atomic commit (its readers see the new, empty index on refresh). A directory holding
        anything else is refused, so a mistyped path never loses files."""
        directory = Path(directory).expanduser().absolute()
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in (dim, mask_size)):
            raise StoreError(f"dim and mask_size must be positive integers, got {dim!r} and {mask_size!r}")
        dim, mask_size = int(dim), int(mask_size)
        meta = _check_meta(meta)
        if directory.exists() and not directory.is_dir():
            raise StoreError(f"index path exists and is not a directory: {directory}")
        directory.mkdir(parents=True, exist_ok=True)
        fsync_dir(directory.parent)
        has_index = (directory / MANIFEST).exists()
        if has_index and not overwrite:
            raise StoreError(f"an index already exists in {directory}; pass overwrite to replace it")
        foreign = sorted(p.name for p in directory.iterdir() if not _is_ours(p.name))
        if foreign and not has_index:
            raise StoreError(
                f"{directory} is not empty and not a csearch index (holds {foreign[0]!r}); refusing to write there"
            )
        with _writer_lock(directory, lock_timeout):
            try:
                generation = read_manifest(directory)["generation"] if has_index else 0
            except StoreError:  # overwriting a damaged index is how one repairs it
                generation = 0
            # fresh segment names, so nothing of the old index is ever overwritten in place
            numbers_used = [n for n in map(segment_number, os.listdir(directory)) if n is not None]
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "uuid": uuid.uuid4().hex,
                "generation": generation + 1,
                "dim": dim,
                "mask_size": mask_size,
                "next_id": 0,
                "next_segment": max(numbers_used, default=0) + 1,
                "live": 0,
                "segments": [],
                "tombstones": None,
                "meta": meta,
            }
            write_manifest(directory, manifest)
            _collect_garbage(directory, manifest)
        return cls.open(directory, lock_timeout=lock_timeout)

    @classmethod
    def open(cls, directory, lock_timeout: Optional[float] = 60.0) -> IndexStore:
        """Open an existing index for reading (and writing); StoreError if it is not one."""
        directory = Path(directory).expanduser().absolute()
        return cls(directory, load_snapshot(directory), lock_timeout)

    # -- reading ------------------------------------------------------------------------------
    @property
    def snapshot(self) -> Snapshot:
        """The latest commit this store has loaded: read everything a request needs from one
        snapshot (a later add or remove never changes it)."""
        return self._snapshot

    meta = property(lambda self: self._snapshot.meta)
    dim = property(lambda self: self._snapshot.dim)
    mask_size = property(lambda self: self._snapshot.mask_size)

    def __len__(self) -> int:
        return len(self._snapshot)

    def __repr__(self) -> str:
        return (
            f"IndexStore({str(self.directory)!r}, items={len(self)}, dim={self.dim}, "
            f"mask_size={self.mask_size}, generation={self._snapshot.generation})"
        )

    def refresh(self) -> bool:
        """Load the latest commit if another process (or thread) changed the index; cheap when
        nothing changed (one small file read). True when the snapshot changed."""
        manifest = read_manifest(self.directory)
        current = self._snapshot.manifest
        if (manifest["uuid"], manifest["generation"]) == (current["uuid"], current["generation"]):
            return False
        self._reload()
        return True

    def _reload(self) -> None:
        new = load_snapshot(self.directory, reuse=self._snapshot)
        current = self._snapshot  # another thread may have loaded a later commit meanwhile
        if new.manifest["uuid"] != current.manifest["uuid"] or new.generation >= current.generation:
            self._snapshot = new

    # -- writing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _writing(self) -> Iterator[dict]:
        """Hold the writer's lock, starting from the latest commit (whoever made it); yield a
        private copy of its manifest to edit and pass to `_commit`."""
        with _writer_lock(self.directory, self.lock_timeout):
            self.refresh()
            yield json.loads(json.dumps(self._snapshot.manifest))

    def _commit(self, manifest: dict, tombstones: np.ndarray) -> None:
        manifest["generation"] += 1
        unsynced = []
        if not len(tombstones):
            manifest["tombstones"] = None
        elif not np.array_equal(tombstones, self._snapshot.tombstones):
            path = self.directory / f"{TOMB_PREFIX}{manifest['generation']:06d}.npy"
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # left by a writer that died before committing
            write_npy(path, np.int64, tombstones.shape, [tombstones], sync=False)
            unsynced.append(path)
            manifest["tombstones"] = {"file": path.name, "count": int(len(tombstones))}
        write_manifest(self.directory, manifest, unsynced)
        self._reload()
        _collect_garbage(self.directory, manifest)

    def _write(self, manifest: dict, sources: list[Source]) -> dict:
        name = segment_name(manifest["next_segment"])
        manifest["next_segment"] += 1
        return write_segment(
            self.directory, name, sources, manifest["dim"], mask_bytes(manifest["mask_size"]), manifest.get("extras")
        )

    def add(
        self,
        vectors: np.ndarray,
        masks: np.ndarray,
        boxes: np.ndarray,
        paths: Sequence[str],
        categories: Optional[Sequence[Optional[str]]] = None,
        products: Optional[Sequence[Optional[str]]] = None,
        extras: Optional[Mapping[str, np.ndarray]] = None,
    ) -> np.ndarray:
        """Append items; return their new ids (int64, ascending). Durable when it returns.

        vectors float32 (n, dim); masks bool (n, S, S) with S = mask_size (see `masks.resize_mask`);
        boxes float (n, 4) normalised (see `masks.normalized_box`); paths are stored absolute.
        extras: named per-item columns, one fixed-shape row per item; the first add into an index
        that never held an item declares them, and every later add must carry the same ones
        (`segments.check_extras`). When the new segment completes a size tier, the tier is merged
        into it in the same commit.
        """
        with self._writing() as manifest:
            new = validate_add(
                vectors, masks, boxes, paths, categories, products, manifest["dim"], manifest["mask_size"]
            )
            columns, schema = check_extras(extras, len(new), manifest.get("extras") or {}, manifest["next_id"] == 0)
            if not len(new):
                return np.zeros(0, np.int64)
            if schema:
                manifest["extras"] = schema
                new = replace(new, extras=columns)
            ids = np.arange(manifest["next_id"], manifest["next_id"] + len(new), dtype=np.int64)
            snapshot = self._snapshot
            start = merge_start(snapshot.segment_rows() + [len(ids)])
            entry = self._write(manifest, snapshot.sources(start) + [(replace(new, ids=ids), None)])
            kept = manifest["segments"][:start]
            manifest["segments"] = kept + [entry]
            manifest["next_id"] += len(ids)
            manifest["live"] += len(ids)
            # every tombstone names a row still on disk, which remove() relies on to count
            self._commit(manifest, _within(snapshot.tombstones, kept))
        return ids

    def remove(self, ids, missing_ok: bool = False) -> int:
        """Remove items by id; return how many were removed. Durable when it returns.

        An id not in the index (never added, or already removed) is a StoreError naming it and
        nothing is removed, unless `missing_ok`. Segments left with no live item are dropped.
        """
        try:
            ids = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        except (TypeError, ValueError):
            raise StoreError(f"ids to remove must be integers, got {ids!r}"[:200]) from None
        with self._writing() as manifest:
            snapshot = self._snapshot
            if missing_ok:
                ids = ids[np.isin(ids, snapshot.ids)]
            else:
                snapshot.rows_for_ids(ids)  # raises, naming the unknown ids
            if not len(ids):
                return 0
            tombstones = np.union1d(snapshot.tombstones, ids)
            manifest["segments"] = [e for e in manifest["segments"] if len(_within(tombstones, [e])) < e["rows"]]
            manifest["live"] -= len(ids)
            self._commit(manifest, _within(tombstones, manifest["segments"]))
        return int(len(ids))

    def update_meta(self, values: dict) -> None:
        """Merge `values` into the index's meta (top-level keys) in one atomic commit."""
        values = _check_meta(values)
        with self._writing() as manifest:
            manifest["meta"].update(values)
            self._commit(manifest, self._snapshot.tombstones)

    def compact(self) -> None:
        """Rewrite all live items as one segment without tombstones, so loading maps the files
        with no copy. Atomic like every write; costs one pass over the index."""
        with self._writing() as manifest:
            snapshot = self._snapshot
            if len(manifest["segments"]) <= 1 and not len(snapshot.tombstones):
                return
            manifest["segments"] = [self._write(manifest, snapshot.sources())] if len(snapshot) else []
            self._commit(manifest, np.zeros(0, np.int64))

    def commit_ann(self, write: Callable[[Path, dict], None]) -> None:
        """Replace the index's ANN file (`store.ann`, see `ann`) in one atomic commit: under the
        writer's lock, `write(directory, manifest)` writes the new file (named ANN_PREFIX...) and
        sets manifest["ann"] (None: no ANN) in the manifest copy it gets, which is then committed.
        Later commits keep the entry; the file it replaces is deleted."""
        with self._writing() as manifest:
            write(self.directory, manifest)
            self._commit(manifest, self._snapshot.tombstones)


def _is_ours(name: str) -> bool:
    return name in (MANIFEST, LOCK_FILE) or name.startswith((SEGMENT_PREFIX, TOMB_PREFIX, TMP_PREFIX, ANN_PREFIX))


def _collect_garbage(directory: Path, manifest: dict) -> None:
    """Delete what the committed manifest no longer refers to (merged segments, old tombstones,
    temp files of writers that died). Runs under the writer's lock, so no write is in progress.
    A failure only leaves files behind, so it warns instead of failing a committed write."""
    keep = {e["name"] for e in manifest["segments"]} | {MANIFEST, LOCK_FILE}
    if manifest.get("tombstones"):
        keep.add(manifest["tombstones"]["file"])
    if manifest.get("ann"):
        keep.add(manifest["ann"]["file"])
    for path in directory.iterdir():
        if path.name in keep or not _is_ours(path.name):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            warnings.warn(f"index {directory}: could not delete unused {path.name}: {exc}", stacklevel=3)


def _check_meta(meta) -> dict:
    try:
        return json.loads(json.dumps(dict(meta), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"index meta must be a JSON-serialisable dict: {exc}") from None


def _within(tombstones: np.ndarray, entries: Sequence[dict]) -> np.ndarray:
    """The tombstones that still point into one of `entries` (segments have disjoint id ranges)."""
    keep = np.zeros(len(tombstones), bool)
    for entry in entries:
        keep |= (tombstones >= entry["first_id"]) & (tombstones <= entry["last_id"])
    return tombstones[keep]


@contextlib.contextmanager
def _writer_lock(directory: Path, timeout: Optional[float]) -> Iterator[None]:
    """Exclusive flock on INDEX_DIR/writer.lock. Closing the file (or the process dying, even by
    SIGKILL) releases it, so a crashed writer never leaves a stale lock."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot write to index {directory}: {exc.strerror}") from None
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if deadline is None else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise StoreError(
                        f"index {directory} is being written by another process "
                        f"(pid {holder}); waited {timeout:g} s, try again"
                    ) from None
                time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # only to name the holder in the error above
        yield
    finally:
        os.close(fd)
