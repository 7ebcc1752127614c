"""`csearch models fetch`: model files from their official source into $CSEARCH_HOME.

Each registered model says where its file comes from (`ModelSpec.download_url`: the publisher's
URL, or Keras' own file for Keras backbones) and how to check it (`sha256`, else the publisher's
md5). Models with no ready-made file (`ModelSpec.converter`: EfficientNet-Lite0) are built from
the official release by `models.convert` and checked by their outputs instead.

- Nothing else downloads: library constructors only look files up (`weights.find_weights`).
- A download goes to `<file>.part` next to its final place, is checked, then renamed over the
  final name (`os.replace`), so a final name never holds a partial or unchecked file. An
  interrupted download keeps its `.part`; the next attempt (a retry in the same run, or the
  next run) asks for the rest with an HTTP Range request, and starts afresh when the server
  ignores it.
- `source` (the CLI's `--from`, default $CSEARCH_MODEL_MIRROR) replaces the official URLs by a
  local folder or an http(s) mirror holding the same file names: the final file (e.g.
  `u2netp.onnx`, checked against the pinned sha256) or the official download's file name.
- Every failure is one `FetchError` line.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Optional
from urllib.parse import quote, urlsplit

from .. import __version__, errors
from ..store.durable import fsync_dir, write_bytes_atomic
from .registry import REGISTRY, ModelSpec, get_spec
from .weights import csearch_home, file_sha256

log = logging.getLogger(__name__)

MIRROR_ENV = "CSEARCH_MODEL_MIRROR"  # default for `source`: a folder or an http(s) base URL
PART = ".part"  # suffix of a download in progress (resumed by the next attempt)
RECORD = ".json"  # suffix of the record written beside a converted file
ATTEMPTS = 3  # tries per download; a retry happens only after an attempt that received bytes
TIMEOUT_S = 30.0  # per network operation (connect, each read)
CHUNK = 1 << 16
OFFLINE_HINT = " (offline? `csearch models fetch --from DIR` copies the files from a local folder)"


FetchError = errors.WeightsNotFound  # every failure: the file could not be had (network, HTTP, digest, disk)


class _Missing(Exception):
    """This candidate location does not hold the file (404, no such local file): try the next."""


@dataclass(frozen=True)
class Fetched:
    """One model's file after `fetch`: where it is, its sha256, and where it came from."""

    name: str
    path: Path
    sha256: str
    source: str  # the URL or local file it came from (or the file itself, when already present)
    action: str  # downloaded | copied | built | present

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


@dataclass(frozen=True)
class _Candidate:
    location: str  # URL or local path
    kind: str  # "final": the finished file | "download": the official download (converted if the model says so)


def default_names() -> list[str]:
    """The registered models the default config uses (extractor, U²-Net, FBA when on)."""
    from ..config import Config
    from ..localize import DEFAULT_FBA, DEFAULT_U2NET

    config = Config()
    wanted = [config.embed.extractor]
    if config.localize.method == "u2net":
        wanted.append(config.localize.model or DEFAULT_U2NET)
    if config.localize.matting == "fba":
        wanted.append(config.localize.matting_model or DEFAULT_FBA)
    return [name for name in wanted if name in REGISTRY]


def fetch_command(name: str) -> str:
    return f"csearch models fetch {name}"


def fetch_models(
    names: Sequence[str] = (),
    source: Optional[str] = None,
    force: bool = False,
    home: Optional[Path] = None,
    progress: bool = True,
) -> list[Fetched]:
    """Fetch each model (default: `default_names()`) into `home` (default $CSEARCH_HOME).
    All are tried; any failures become one FetchError line naming each."""
    names = list(dict.fromkeys(names or default_names()))
    specs = [get_spec(name) for name in names]  # an unknown name fails before any download
    home = Path(home or csearch_home())
    source = source or os.environ.get(MIRROR_ENV) or None
    if source and not _is_url(source) and not Path(source).expanduser().is_dir():
        raise FetchError(f"--from {source}: not a folder (nor an http(s) URL)")
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create the model folder {home}: {errors.one_line(exc)}") from None
    done, failed = [], []
    for spec in specs:
        try:
            done.append(fetch_model(spec, home, source, force, progress))
        except errors.CSearchError as exc:
            failed.append(str(exc))
    if failed:
        note = f"; fetched: {', '.join(f.name for f in done)}" if done else ""
        raise FetchError(
            (failed[0] if len(failed) == 1 else f"{len(failed)} models failed: {'; '.join(failed)}") + note
        )
    return done


def fetch_model(spec: ModelSpec, home: Path, source: Optional[str], force: bool, progress: bool) -> Fetched:
    if not force:
        present = next((p for p in _installed_names(spec) if (home / p).is_file()), None)
        if present:
            return _present(spec, home / present)
    candidates = _candidates(spec, source)
    if not candidates:
        raise FetchError(
            f"{spec.name}: no official download ({spec.source}); then `{fetch_command(spec.name)} --from DIR`"
        )
    for candidate in candidates:
        try:
            return _get(spec, candidate, home, force, progress)
        except _Missing as exc:
            missing = str(exc)
    if source is None:
        raise FetchError(f"{spec.name}: {missing}")
    wanted = " or ".join(Path(urlsplit(c.location).path).name for c in candidates)
    raise FetchError(f"{spec.name}: {source} has no {wanted}")


def _installed_names(spec: ModelSpec) -> list[str]:
    """File names under which the model counts as installed in $CSEARCH_HOME."""
    download = None if spec.converter else _download_name(spec)
    return list(dict.fromkeys([spec.weights_file] + ([download] if download else [])))


def _candidates(spec: ModelSpec, source: Optional[str]) -> list[_Candidate]:
    download = _download_name(spec)
    if source is None:
        return [_Candidate(spec.download_url, "download")] if spec.download_url else []
    names = [(spec.weights_file, "final")] + ([(download, "download")] if download else [])
    if download == spec.weights_file:
        names = [(download, "download")]
    return [_Candidate(_join(source, name), kind) for name, kind in names]


def _download_name(spec: ModelSpec) -> Optional[str]:
    url = spec.download_url
    return Path(urlsplit(url).path).name if url else None


def _join(source: str, name: str) -> str:
    if _is_url(source):
        return source.rstrip("/") + "/" + quote(name)
    return str(Path(source).expanduser() / name)


def _is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


# ----------------------------------------------------------------------------------- one file


def _get(spec: ModelSpec, candidate: _Candidate, home: Path, force: bool, progress: bool) -> Fetched:
    """Fetch one candidate into home (converting the official download where the model needs
    it); raises _Missing when the candidate does not exist."""
    converting = candidate.kind == "download" and spec.converter is not None
    path = home / (_download_name(spec) if converting else spec.weights_file)
    if converting and path.is_file() and not force:  # kept by an earlier run whose build failed
        log.info("%s: reusing %s", spec.name, path)
    else:
        _transfer(spec, candidate.location, path, progress)
    if converting:
        return _build(spec, path, home, candidate.location)
    action = "downloaded" if _is_url(candidate.location) else "copied"
    return Fetched(spec.name, path, file_sha256(path), candidate.location, action)


def _transfer(spec: ModelSpec, location: str, path: Path, progress: bool) -> None:
    """Download or copy `location` to `path` through `path.part`; check it, then install it
    (with the build record that vouches for it, where there is one)."""
    part = path.with_name(path.name + PART)
    with _locked(part, spec.name) as handle:
        if _is_url(location):
            _download(location, handle, part, spec.name, progress)
        else:
            _copy(Path(location), handle, spec.name, progress)
        handle.flush()
        os.fsync(handle.fileno())
        record = _verify(spec, part, location, path.name)
        try:
            if record:
                write_bytes_atomic(path.with_name(path.name + RECORD), json.dumps(record, indent=1).encode())
            os.replace(part, path)
            fsync_dir(path.parent)
        except OSError as exc:
            raise FetchError(f"{spec.name}: cannot write {path}: {errors.one_line(exc)}") from None


@contextlib.contextmanager
def _locked(part: Path, name: str) -> Iterator[IO[bytes]]:
    """The `.part` file, open for reading and appending and locked against a second fetch of the
    same file (where the platform has fcntl). An empty one is removed afterwards."""
    try:
        handle = open(part, "a+b")  # noqa: SIM115 - closed in the finally below
    except OSError as exc:
        raise FetchError(f"{name}: cannot write {part}: {errors.one_line(exc)}") from None
    try:
        with contextlib.suppress(ImportError):
            import fcntl

            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise FetchError(f"{name}: another `csearch models fetch` is writing {part}") from None
        yield handle
    finally:
        with contextlib.suppress(OSError):
            if part.is_file() and not os.fstat(handle.fileno()).st_size:
                part.unlink()
        handle.close()


def _download(url: str, handle: IO[bytes], part: Path, name: str, progress: bool) -> None:
    """HTTP(S) GET into `handle`, resuming what it already holds; up to ATTEMPTS tries while
    each one makes progress."""
    for attempt in range(1, ATTEMPTS + 1):
        handle.seek(0, os.SEEK_END)
        start = handle.tell()
        try:
            _download_once(url, handle, start, name, progress)
            return
        except errors.CSearchError:
            raise
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and start:  # a stale .part at least as long as the file: start afresh
                handle.truncate(0)
                continue
            if exc.code in (404, 410):
                raise _Missing(f"{url}: HTTP {exc.code} {exc.reason}") from None
            raise FetchError(f"{name}: download of {url} failed: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            handle.seek(0, os.SEEK_END)
            got = handle.tell()
            reason = errors.one_line(getattr(exc, "reason", None) or exc, 120)
            if got > start and attempt < ATTEMPTS:
                log.info("%s: download interrupted at %d bytes (%s); resuming", name, got, reason)
                continue
            hint = f"; {got} bytes kept in {part}, rerun to resume" if got else OFFLINE_HINT
            raise FetchError(f"{name}: download of {url} failed: {reason}{hint}") from None
    raise FetchError(f"{name}: download of {url} kept failing; rerun to resume")


def _download_once(url: str, handle: IO[bytes], start: int, name: str, progress: bool) -> None:
    headers = {"User-Agent": f"csearch/{__version__}"}
    if start:
        headers["Range"] = f"bytes={start}-"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as response:
        if response.status == 206 and _range_start(response) != start:
            raise FetchError(f"{name}: {url} answered a range other than the one asked for")
        if response.status != 206:  # first request, or the server ignored the Range: the whole file comes
            handle.truncate(0)
            start = 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        with _bar(name, total, start, progress) as bar:
            for chunk in iter(lambda: response.read(CHUNK), b""):
                handle.write(chunk)
                bar.update(len(chunk))
        handle.flush()
        if total is not None and handle.tell() != total:
            raise http.client.IncompleteRead(b"", total - handle.tell())


def _range_start(response) -> Optional[int]:
    """The first byte of a 206 response ("Content-Range: bytes START-END/TOTAL")."""
    value = response.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _copy(path: Path, handle: IO[bytes], name: str, progress: bool) -> None:
    if not path.is_file():
        raise _Missing(f"{path} not found")
    handle.truncate(0)
    try:
        with path.open("rb") as source, _bar(name, path.stat().st_size, 0, progress) as bar:
            for chunk in iter(lambda: source.read(CHUNK), b""):
                handle.write(chunk)
                bar.update(len(chunk))
    except OSError as exc:
        raise FetchError(f"{name}: cannot copy {path}: {errors.one_line(exc)}") from None


def _bar(name: str, total: Optional[int], initial: int, progress: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=name,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,  # a log file gets a line every 10 s, not a flood
    )


# ----------------------------------------------------------------------------------- checks


def _verify(spec: ModelSpec, part: Path, location: str, name: str) -> Optional[dict]:
    """Check what was transferred against the digests pinned for that file name; a converted
    model's file may instead match the build record beside it at the source (returned, to be
    installed with it). A mismatch deletes the `.part`: nothing is installed."""
    if spec.converter and name == spec.weights_file and file_sha256(part) != spec.sha256:
        record = _read_record(location + RECORD)
        if record.get("sha256") == file_sha256(part):
            return record
        part.unlink(missing_ok=True)
        raise FetchError(
            f"{spec.name}: {location} is neither the reference file (sha256 {spec.sha256}) nor a file built "
            f"by `{fetch_command(spec.name)}` (no {name}{RECORD} with its sha256 beside it); nothing was installed"
        )
    pins = _pins(spec, name)
    for algorithm, want in pins.items():
        got = _digest(part, algorithm)
        if got != want:
            part.unlink(missing_ok=True)
            raise FetchError(
                f"{spec.name}: {algorithm} mismatch for {name} from {location}: got {got}, expected {want}; "
                "nothing was installed"
            )
    if not pins and not spec.converter:
        log.info("%s: %s has no published digest; its sha256 is %s", spec.name, name, file_sha256(part))
    return None


def _pins(spec: ModelSpec, name: str) -> dict[str, str]:
    """{algorithm: digest} pinned for the file `name` of this model."""
    pins = {}
    if name == spec.weights_file and spec.sha256:
        pins["sha256"] = spec.sha256
    if name == _download_name(spec):
        digest = spec.url_md5 or (spec.keras_hash if not spec.url else None)
        if digest:
            pins["sha256" if len(digest) == 64 else "md5"] = digest  # Keras pins either (by length)
    return pins


def _digest(path: Path, algorithm: str) -> str:
    if algorithm == "sha256":
        return file_sha256(path)
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_record(location: str) -> dict:
    """A build record (`<file>.json`) from a folder or mirror; {} when absent or unreadable."""
    try:
        if _is_url(location):
            with urllib.request.urlopen(location, timeout=TIMEOUT_S) as response:
                return json.loads(response.read())
        return json.loads(Path(location).read_text())
    except (OSError, ValueError, urllib.error.URLError, http.client.HTTPException):
        return {}


def _present(spec: ModelSpec, target: Path) -> Fetched:
    """A file already in place: kept when it matches what is pinned for it (or, for a converted
    model, the sha256 in its build record)."""
    sha256 = file_sha256(target)
    if spec.converter and target.name == spec.weights_file:
        ok = sha256 in {spec.sha256, _read_record(str(target) + RECORD).get("sha256")}
    else:
        ok = all(_digest(target, algorithm) == want for algorithm, want in _pins(spec, target.name).items())
    if not ok:
        raise FetchError(
            f"{spec.name}: {target} is there but is not the expected file (sha256 {sha256}); "
            f"`{fetch_command(spec.name)} --force` replaces it"
        )
    return Fetched(spec.name, target, sha256, str(target), "present")


def _build(spec: ModelSpec, archive: Path, home: Path, location: str) -> Fetched:
    """Convert the downloaded release into the model file, record how, and drop the archive."""
    from .convert import convert

    log.info("%s: building %s from %s (TensorFlow + tf2onnx, under a minute)", spec.name, spec.weights_file, archive)
    try:
        built = convert(spec, archive)
    except errors.CSearchError as exc:
        raise FetchError(
            f"{spec.name}: building {spec.weights_file} from {archive} failed: {exc} (the archive is kept for "
            "the next try)"
        ) from None
    target = home / spec.weights_file
    sha256 = hashlib.sha256(built.data).hexdigest()
    record = {**built.record, "file": spec.weights_file, "sha256": sha256}
    record["source"]["from"] = location
    try:
        write_bytes_atomic(home / (spec.weights_file + RECORD), json.dumps(record, indent=1).encode())
        write_bytes_atomic(target, built.data)
        archive.unlink()
    except OSError as exc:
        raise FetchError(f"{spec.name}: cannot write {target}: {errors.one_line(exc)}") from None
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in record["check"]["max_relative_diff"].items())
    log.info("%s: checked against the TFLite model (max relative difference: %s)", spec.name, diffs)
    return Fetched(spec.name, target, sha256, location, "built")
