"""Durable file writes: once one of these returns, the file survives a crash or power loss.

POSIX makes a write durable only after fsync of the file, and a creation or rename durable only
after fsync of the folder holding it. A file that must never be seen half-written is written
under a temporary name in the same folder (so the rename cannot cross file systems), fsynced,
then renamed over the final name with `os.replace`, which readers see as one atomic change.

Temporary names start with TMP_PREFIX; a crash can leave such a file behind, and the folder's
owner deletes them (the index store's garbage collection does, for index folders).
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

TMP_PREFIX = "tmp-"


def fsync_dir(path) -> None:
    """Make a rename/creation inside folder `path` durable (POSIX needs the folder itself fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_paths(paths: Sequence[Path]) -> None:
    """fsync files and folders concurrently: the file system commits concurrent fsyncs together,
    so a segment's six files cost about one fsync's latency instead of six."""
    if not paths:
        return
    with ThreadPoolExecutor(max_workers=len(paths)) as pool:
        for future in [pool.submit(fsync_dir, p) for p in paths]:  # fsync_dir works on files too
            future.result()  # re-raises a failed fsync


def tmp_name(label: str) -> str:
    """A fresh temporary name: unique across processes and threads, starting with TMP_PREFIX."""
    return f"{TMP_PREFIX}{label}-{os.getpid()}-{secrets.token_hex(4)}"


def write_new(path: Path, data: bytes, sync: bool = True) -> None:
    """Create `path` (it must not exist) holding `data`; fsync it unless the caller fsyncs later."""
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        if sync:
            os.fsync(handle.fileno())


def write_npy(path: Path, dtype, shape: tuple, chunks: Iterable[np.ndarray], sync: bool = True) -> None:
    """Create the .npy file `path` from row chunks (never holding the whole array); fsync it
    unless the caller fsyncs later. ValueError (and no file) if the chunks do not fill `shape`."""
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    written = 0
    with open(path, "xb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
            handle.write(chunk.data)
            written += len(chunk)
        handle.flush()
        if sync and written == shape[0]:
            os.fsync(handle.fileno())
    if written != shape[0]:
        path.unlink()
        raise ValueError(f"the chunks for {path.name} hold {written} rows, its shape says {shape[0]}")


@contextlib.contextmanager
def _replacing(path: Path, sync: bool, also_sync: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a temporary path next to `path` to write; then fsync it (and `also_sync`) unless
    not `sync`, rename it over `path` and fsync the folder. On any failure the temporary file
    is deleted and `path` is left as it was."""
    tmp = path.parent / tmp_name(path.name)
    try:
        yield tmp
        if sync:
            fsync_paths([tmp, *also_sync])
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync:
        fsync_dir(path.parent)


def write_bytes_atomic(path, data: bytes, sync: bool = True, also_sync: Sequence[Path] = ()) -> None:
    """Replace `path` by a file holding `data`, atomically: readers see the old file or the new
    one, never a partial one. With `sync` (the default) it is durable on return; `also_sync`
    names further files or folders to fsync before the replace (e.g. files the new one refers to)."""
    with _replacing(Path(path), sync, also_sync) as tmp:
        write_new(tmp, data, sync=False)


def save_npy_atomic(path, array: np.ndarray, sync: bool = True) -> None:
    """`np.save(path, array)`, atomically and (with `sync`) durably, like `write_bytes_atomic`;
    streams the array to disk instead of building the file in memory. Never pickles."""
    array = np.asarray(array)
    if array.dtype.hasobject:  # np.load(allow_pickle=False) could not read it back
        raise ValueError(f"cannot save an object array to {Path(path).name}")
    if array.ndim == 0:  # no rows to stream
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        write_bytes_atomic(path, buffer.getvalue(), sync=sync)
        return
    with _replacing(Path(path), sync) as tmp:
        write_npy(tmp, array.dtype, array.shape, [array], sync=False)
