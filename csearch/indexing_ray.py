"""Indexing on Ray Data: `csearch index CATALOGUE --out INDEX_DIR --ray [ADDRESS]`.

The same images, models and store as `indexing.add_records`, with each stage on its own actor
pool, and each actor loading its one model once:

    records (driver) -> decode + localize (+ local features)   actors holding the localizer
                     -> classify the unlabelled images          actors holding the classifier (if any)
                     -> embed                                   actors holding the extractor
                     -> driver: store.add every CHUNK images or COMMIT_SECONDS, in catalogue order

Every stage calls the plain path's own code (`indexing._prepare_records`, `indexing._label`,
`indexing._embed`), so the vectors, masks and categories are those of the plain loop. Rows travel
between stages as pickled tuples of the plain path's dataclasses. The driver is the only writer,
so the store, the commits and the resume after an interruption are the plain path's too.

`--ray` alone starts a private local Ray (its own temp folder, stopped at the end); an ADDRESS
joins that cluster. Ray is imported only here, when needed (the `[ray]` extra).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import pickle
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from .config import Config
from .errors import CSearchError, one_line
from .resolve import Models, load_models
from .types import Record

log = logging.getLogger("csearch")

LOCAL = "local"  # `--ray` without an address: a private local Ray
INSTALL_HINT = 'pip install -e ".[ray]"'
# what the actors reserve of the cluster's CPUs; the rest stays free for Ray Data's own tasks
# (measured for issue 13: 2 actors x num_cpus=1 on a 2-CPU node left no CPU for the read tasks, which hung)
CPU_SHARE = 0.75
BLOCK_ROWS = 32  # most catalogue records per Ray Data block
LOCALIZE_BATCH, CLASSIFY_BATCH = 4, 16  # rows per actor call (embedding uses embed.batch_size)
CONNECT_TIMEOUT_S = 5.0
# measured here: a driver without RAY_AUTH_MODE=token is refused by `ray start --head`'s cluster
AUTH_HINT = (
    "; if the cluster uses token authentication (the default of `ray start --head`), set RAY_AUTH_MODE=token "
    "here, with its token in ~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
)
ROW = "row"  # the one column between stages: a pickled (record, payload, error) tuple


class RayUnavailable(CSearchError):
    """Ray is not installed, a cluster cannot be reached, or the Ray pipeline failed."""


def import_ray():
    """The `ray` module with Ray Data, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is a separate part of the `ray` package
    except ImportError as exc:
        raise RayUnavailable(
            f"--ray needs Ray Data, which is not installed ({one_line(exc)}): {INSTALL_HINT}"
        ) from None
    return ray


def check_address(address: Optional[str]) -> None:
    """Refuse an ADDRESS nothing listens on, at once (measured: ray.init retried for over 3 minutes)."""
    if address in (None, LOCAL, "auto"):
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    host = host.strip("[]")
    if not (sep and host and port.isdigit()):
        raise RayUnavailable(
            f"--ray {address}: expected HOST:PORT (the head node's address, e.g. 10.0.0.5:6379), "
            f"ray://HOST:PORT (Ray Client) or auto"
        )
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise RayUnavailable(
            f"cannot reach a Ray cluster at {address} ({one_line(exc)}); start one with `ray start --head`, "
            f"or use --ray alone for a private local Ray"
        ) from None


@contextlib.contextmanager
def ray_session(address: Optional[str] = None) -> Iterator[object]:
    """Ray, connected: the caller's own session when Ray is already initialized (e.g. a test
    session's); else a private local Ray (address None or "local": its own temp folder, so a stale
    `ray_current_cluster` of another Ray is never joined; stopped and removed at the end); else
    the cluster at `address`."""
    ray = import_ray()
    check_address(address)
    if ray.is_initialized():
        yield ray
        return
    temp = None
    try:
        if address in (None, LOCAL):
            temp = tempfile.mkdtemp(prefix="csearch-ray-", dir=tempfile.gettempdir())
            ray.init(
                address="local",
                _temp_dir=temp,
                num_cpus=os.cpu_count() or 1,
                include_dashboard=False,
                configure_logging=False,
            )
        else:
            ray.init(address=address, configure_logging=False)
    except Exception as exc:  # noqa: BLE001 - any failure to start or join is the user's one line
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
            raise RayUnavailable(f"could not start a private local Ray: {one_line(exc)}") from None
        hint = "" if os.environ.get("RAY_AUTH_MODE") == "token" else AUTH_HINT
        raise RayUnavailable(f"could not join the Ray cluster at {address}: {one_line(exc)}{hint}") from None
    try:
        yield ray
    finally:
        ray.shutdown()
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


@dataclass(frozen=True)
class Pool:
    """One stage's actor pool: `actors` actors of `num_cpus` CPUs each, `batch_size` rows a call."""

    stage: str
    actors: int
    num_cpus: float
    batch_size: int


def plan_pools(workers: int, cpus: float, classify: bool, batch_size: int) -> list[Pool]:
    """The actor pools, in pipeline order: `workers` localizer actors (the heaviest stage), half
    as many embedding actors and a quarter as many classifying ones (at least one each), all with
    the same fractional CPU share so that together they reserve at most CPU_SHARE of `cpus`."""
    localize = max(1, int(workers))
    counts = {
        "localize": localize,
        "classify": max(1, localize // 4) if classify else 0,
        "embed": max(1, localize // 2),
    }
    share = min(1.0, max(0.01, math.floor(100 * CPU_SHARE * cpus / sum(counts.values())) / 100))
    batches = {"localize": LOCALIZE_BATCH, "classify": CLASSIFY_BATCH, "embed": int(batch_size)}
    return [Pool(stage, n, share, batches[stage]) for stage, n in counts.items() if n]


@dataclass(frozen=True)
class ClassifierInput:
    """What `prepare_image` reads of a classifier to build its input: enough for the localizer
    actors, which do not load the classifier itself."""

    image_size: int
    color: str


def _pack(row: tuple) -> bytes:
    return pickle.dumps(row, protocol=5)


def _unpack(data) -> tuple:
    return pickle.loads(data)


class _Stage:
    """One pipeline stage as a Ray Data callable class: each actor builds one and keeps its model."""

    def __init__(self, config: Config, classifier_input: Optional[ClassifierInput], local):
        self.config = config
        self.classifier_input = classifier_input  # the driver's classifier's input size and colour
        self.local = local  # the index's geometric.LocalSpec, or None

    def __call__(self, batch: dict) -> dict:
        rows = self.process([_unpack(data) for data in batch[ROW]])
        packed = np.empty(len(rows), object)
        for i, row in enumerate(rows):
            packed[i] = _pack(row)
        return {ROW: packed}

    def process(self, rows: list[tuple]) -> list[tuple]:
        raise NotImplementedError


class _Localize(_Stage):
    """(record,) -> (record, Prepared without the full-size localization, error)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.models = Models(load_models(self.config, only=("localizer",)).localizer, None, self.classifier_input)

    def process(self, rows):
        from .indexing import _prepare_records

        records = [row[0] for row in rows]
        return [
            (record, None if prepared is None else replace(prepared, localization=None, timings_ms={}), error)
            for record, prepared, error in _prepare_records(records, self.config, self.models, 1, self.local)
        ]


class _Classify(_Stage):
    """Unlabelled records get the predicted category (`indexing._label`, one image at a time as
    in the plain path); the classifier input is dropped."""

    def __init__(self, *args):
        super().__init__(*args)
        self.models = load_models(self.config, only=("classifier",))

    def process(self, rows):
        from .indexing import _label

        out = []
        for record, prepared, error in rows:
            if prepared is not None and prepared.classifier_input is not None:
                record = replace(record, category=_label(record, prepared, self.models))
                prepared = replace(prepared, classifier_input=None)
            out.append((record, prepared, error))
        return out


class _Embed(_Stage):
    """(record, Prepared, error) -> (record, indexing._Embedded, error), the prepared images of
    each batch embedded together (`indexing._embed`)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.models = load_models(self.config, only=("extractor",))

    def process(self, rows):
        from .indexing import _embed

        ready = [(record, prepared) for record, prepared, _ in rows if prepared is not None]
        items = iter(_embed(ready, self.config, self.models) if ready else [])
        return [(record, None if prepared is None else next(items), error) for record, prepared, error in rows]


STAGES = {"localize": _Localize, "classify": _Classify, "embed": _Embed}


@contextlib.contextmanager
def _data_context(ray):
    """Ray Data settings for this run, restored afterwards: results in catalogue order (the ids
    follow it, as in the plain path), and no Ray progress bars beside csearch's own."""
    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars, context.enable_auto_log_stats)
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.enable_auto_log_stats = False
    try:
        yield context
    finally:
        (context.execution_options.preserve_order, context.enable_progress_bars, context.enable_auto_log_stats) = saved


def _results(
    ray, records: Sequence[Record], config: Config, models: Models, workers: int, local
) -> Iterator[tuple[Record, object, Optional[str]]]:
    """(record, indexing._Embedded or None, error) per record, in catalogue order."""
    classifier = models.classifier
    needs = None if classifier is None else ClassifierInput(int(classifier.image_size), str(classifier.color))
    classify = needs is not None and any(record.category is None for record in records)
    pools = plan_pools(workers, ray.cluster_resources().get("CPU", 1.0), classify, config.embed.batch_size)
    log.info("Ray: %s", ", ".join(f"{p.stage} {p.actors} actor(s) x {p.num_cpus:g} CPU" for p in pools))
    rows = max(1, min(BLOCK_ROWS, math.ceil(len(records) / (4 * pools[0].actors))))
    ds = ray.data.from_items(
        [{ROW: _pack((record,))} for record in records], override_num_blocks=math.ceil(len(records) / rows)
    )
    for pool in pools:
        ds = ds.map_batches(
            STAGES[pool.stage],
            fn_constructor_args=(config, needs, local),
            batch_size=pool.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool.actors),
            num_cpus=pool.num_cpus,
        )
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for data in batch[ROW]:
                yield _unpack(data)
    except ray.exceptions.RayError as exc:
        cause = _csearch_cause(exc)
        if cause is not None:
            raise cause from None
        raise RayUnavailable(f"the Ray indexing pipeline failed: {one_line(exc)}") from exc


def _csearch_cause(exc: BaseException) -> Optional[CSearchError]:
    """The csearch error behind a Ray error, if any: the exception itself when Ray kept it (an
    error in a stage), else rebuilt from the traceback text that an actor which failed to start
    leaves (e.g. a model file missing on a worker node: "csearch.errors.WeightsNotFound: ...")."""
    from . import errors

    seen, texts = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, CSearchError):
            return exc
        texts.append(str(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(texts))  # Ray colours the actor's name
    found = re.findall(r"csearch\.errors\.(\w+): (.+)", text)
    for name, message in reversed(found):
        kind = getattr(errors, name, None)
        if isinstance(kind, type) and issubclass(kind, CSearchError):
            return kind(message.strip())
    return None


def add_records_ray(
    store,
    records: Sequence[Record],
    config: Config,
    models: Models,
    progress: Optional[Callable[[int], None]] = None,
    workers: int = 2,
    on_commit: Optional[Callable[[int], None]] = None,
    *,
    address: Optional[str] = None,
) -> tuple[np.ndarray, list]:
    """`indexing.add_records` on Ray Data (the same arguments and result): `workers` is the
    number of localizer actors. The driver writes: `progress(1)` per image as its result arrives,
    a commit every CHUNK images or COMMIT_SECONDS (`on_commit(items in the store)`), so an
    interrupted run keeps what was committed and a rerun resumes. Durable on return."""
    from . import indexing
    from .geometric import LOCAL_FEATURES, LocalSpec

    local = LocalSpec.from_meta(store.meta.get(LOCAL_FEATURES))  # as add_records: the index decides
    added, failures, ready = [np.zeros(0, np.int64)], [], []
    last_commit = indexing.clock()

    def commit() -> None:
        nonlocal last_commit
        if ready:
            added.append(indexing._store(store, ready))
            ready.clear()
            if on_commit:
                on_commit(len(store))
        last_commit = indexing.clock()

    if records:
        with ray_session(address) as ray, _data_context(ray):
            for record, item, error in _results(ray, records, config, models, workers, local):
                if item is None:
                    failures.append((record.path, error))
                else:
                    ready.append(item)
                if progress:
                    progress(1)
                if len(ready) >= indexing.CHUNK or indexing.clock() - last_commit >= indexing.COMMIT_SECONDS:
                    commit()
    commit()
    return np.concatenate(added), failures


def ray_adder(address: Optional[str] = None) -> Callable:
    """What `build_index(..., adder=...)` takes to index on Ray: a private local Ray when
    `address` is None or "local", else the cluster at `address`. Checks at once (before any
    model loads) that Ray is installed and that the address answers."""
    import_ray()
    check_address(address)
    return functools.partial(add_records_ray, address=None if address == LOCAL else address)
