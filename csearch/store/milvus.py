"""MilvusStore: an index whose items live in a Milvus collection (Milvus Lite or a server),
implementing `base.VectorStore`. Chosen per index: `csearch index ... --store milvus-lite:PATH`
or `--store milvus://HOST:PORT/COLLECTION` (see `open`).

Every per-item field is in the items collection (vector, category, path, product, box, mask,
extras); a second collection, COLLECTION__csearch, holds the store's records: its layout, the
index's meta, the id claims (`milvus_claims`) and the change log. The index folder only says
where they are (store.json), so a copy of it on another machine sees the same items: several
`csearch serve` replicas can share one Milvus server.

Reads: `snapshot` is an in-memory copy of the live items (`memory.MemorySnapshot`), so a request
reads one consistent version and search is csearch's exact numpy KNN, giving the same top-k as
the local store. Opening reads every item once; after that only changes are read.

Changes: every write, once Milvus acknowledged it, inserts a change row (the id range it added,
the ids it removed, or "meta changed"). `refresh` reads the change rows of the last
CHANGE_SKEW_MS at Bounded consistency (one small query, ~1 ms; a Strong read waits for the
server's time tick, ~200 ms on 2.3) and applies those it has not applied yet, fetching only the
added items (Strong, so they are at least as new as their change row). So a process sees its own
writes at once and another's within the server's bounded staleness (common.gracefulTime, 5 s by
default). Change rows older than CHANGE_TTL_MS are pruned, leaving a watermark: a store that
has not refreshed since then reads everything again. This assumes that clocks agree, and that a
write's change row lands, within CHANGE_SKEW_MS. `add` and `remove` first catch up at Strong
consistency, so a writer never works from a stale view.
"""

from __future__ import annotations

import json
import numbers
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import StoreError
from ..masks import mask_bytes
from .memory import MemorySnapshot, concat_columns, take_rows
from .milvus_claims import IdClaims
from .milvus_io import (
    INDEX_TYPES,
    PAGE_IDS,
    PAGE_ROWS,
    Target,
    b64_chars,
    calling,
    columns_of,
    connect,
    create_collection,
    items_schema,
    json_record,
    meta_record,
    meta_schema,
    page_through,
    read_page_rows,
    rows_of,
)
from .segments import check_extras, validate_add

FORMAT = "csearch-milvus"
VERSION = 1
ITEM_FIELDS = ["id", "vector", "item", "mask", "extras"]
STRONG, SESSION, BOUNDED = "Strong", "Session", "Bounded"
CHANGE_SKEW_MS = 60_000  # change rows are looked for this long after their time
CHANGE_TTL_MS = 3_600_000  # older change rows are pruned
PRUNE_EVERY = 64  # writes between two prunings of the change log
REMOVED_PER_ROW = 4000  # removed ids per change row (a record holds at most 64 KB of JSON)


def now_ms() -> int:
    return int(time.time() * 1000)


def merged_ranges(ranges) -> list[tuple[int, int]]:
    """[start, stop) ranges, overlapping and adjacent ones merged (fewer reads: each waits ~200 ms)."""
    merged: list[list[int]] = []
    for start, stop in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return [(a, b) for a, b in merged]


class MilvusStore:
    """A Milvus-backed index (see the module doc). Safe to share between threads."""

    def __init__(self, directory, target: Target, client):
        self.directory = Path(directory).expanduser().absolute()
        self.target, self._client = target, client
        self._reading, self._writing = threading.Lock(), threading.Lock()
        self._ids = IdClaims(client, target)
        self._seen: dict[str, int] = {}  # change rows applied, key -> time (those after the horizon)
        self._horizon = 0  # change rows from this time (ms) on are looked at
        self._watermark = 0  # the pruning watermark when this store last read everything
        self._writes = 0
        self._snapshot = self._load(STRONG, 1)

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        directory,
        target: Target,
        meta: dict,
        dim: int,
        mask_size: int = 64,
        overwrite: bool = False,
        index_type: str = "FLAT",
    ) -> MilvusStore:
        """Create the collections of an empty index. An existing collection of that name is
        refused unless `overwrite`, which drops it (and its csearch records) first. `index_type`
        (FLAT, HNSW, IVF_FLAT) is the server-side index; csearch's own search is exact either way."""
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in (dim, mask_size)):
            raise StoreError(f"dim and mask_size must be positive integers, got {dim!r} and {mask_size!r}")
        if index_type not in INDEX_TYPES:
            raise StoreError(f"unknown Milvus index type {index_type!r}; valid: {', '.join(INDEX_TYPES)}")
        dim, mask_size, meta = int(dim), int(mask_size), json_record(meta, "index meta")
        client = connect(target)
        with calling(target, "creating the collections"):
            existing = [c for c in (target.collection, target.meta_collection) if client.has_collection(c)]
            if existing and not overwrite:
                raise StoreError(
                    f"Milvus collection {existing[0]!r} already exists ({target.label}); "
                    f"pass --overwrite to replace it, or choose another collection"
                )
            for name in existing:
                client.drop_collection(name)
            # the records first: a collection without them is an interrupted creation, which open refuses
            create_collection(client, target.meta_collection, meta_schema(), "v")
            layout = {"format": FORMAT, "version": VERSION, "dim": dim, "mask_size": mask_size, "extras": {}}
            # the watermark: a store still reading a dropped index of this name reads everything again
            watermark = meta_record("pruned", {"before": now_ms()})
            client.insert(target.meta_collection, [meta_record("layout", layout), meta_record("meta", meta), watermark])
            schema = items_schema(dim, b64_chars(mask_bytes(mask_size)))
            create_collection(client, target.collection, schema, "vector", index_type)
        return cls(directory, target, client)

    @classmethod
    def open(cls, directory, target: Target) -> MilvusStore:
        """Open an existing Milvus index; StoreError when the server or the collection is missing."""
        client = connect(target)
        with calling(target, "opening the collections"):
            for name in (target.collection, target.meta_collection):
                if not client.has_collection(name):
                    raise StoreError(f"Milvus collection {name!r} does not exist ({target.label})")
                client.load_collection(name)
        return cls(directory, target, client)

    def close(self) -> None:
        """Disconnect; for Milvus Lite also stop this process's Lite server of the database, so
        another process may open it (any other store of it in this process stops working)."""
        with calling(self.target, "closing"):
            self._client.close()
            if self.target.lite:
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(self.target.uri)

    # -- reading ------------------------------------------------------------------------------
    @property
    def snapshot(self) -> MemorySnapshot:
        """The items as of the last refresh: read everything a request needs from one snapshot."""
        return self._snapshot

    meta = property(lambda self: self._snapshot.meta)
    dim = property(lambda self: self._snapshot.dim)
    mask_size = property(lambda self: self._snapshot.mask_size)

    def __len__(self) -> int:
        return len(self._snapshot)

    def __repr__(self) -> str:
        return f"MilvusStore({self.target.label!r}, items={len(self)}, dim={self.dim}, mask_size={self.mask_size})"

    def refresh(self) -> bool:
        """Follow other processes' writes (seen within the server's bounded staleness); one small
        query when nothing changed. True when the snapshot changed."""
        return self._refresh(BOUNDED)

    def _refresh(self, level: str) -> bool:
        with self._reading:
            changes, pruned, overflow = self._changes(self._horizon, level)
            new = [c for c in changes if c["key"] not in self._seen]
            # change rows may have been pruned since this store last read everything, or be unread
            behind = overflow or pruned > max(self._horizon, self._watermark)
            if not new and not behind:
                self._note(changes)
                return False
            current, level = self._snapshot, STRONG if level == BOUNDED else level  # items at least this new
            values = [json.loads(c["value"]) for c in new]
            if behind or any("layout" in v for v in values):
                self._snapshot = self._load(level, current.generation + 1)  # missed some, or new columns
                return True
            meta = self._state(level)["meta"] if any("meta" in v for v in values) else current.meta
            removed = np.array([i for v in values for i in v.get("removed", ())], np.int64)
            rows = []
            layout = {"dim": current.dim, "mask_size": current.mask_size, "extras": current.extras}
            with calling(self.target, "reading the items"):
                for start, stop in merged_ranges(v["added"] for v in values if "added" in v):
                    pages = page_through(
                        self._client, self.target.collection, ITEM_FIELDS, read_page_rows(layout), level, start, stop
                    )
                    rows += [row for page in pages for row in page]
            added = columns_of(rows, layout)
            fresh = ~np.isin(added["ids"], current.ids) & ~np.isin(added["ids"], removed)  # applying twice is harmless
            added = take_rows(added, fresh)
            keep = ~np.isin(current.ids, removed)
            self._snapshot = current.changed(keep, added, meta, current.generation + len(new))
            self._note(changes)
            return True

    def _changes(self, since: int, level: str) -> tuple[list[dict], int, bool]:
        """(the change rows from time `since` on, the pruning watermark, whether there were too
        many to read at once)."""
        with calling(self.target, "reading the index changes"):
            rows = self._client.query(
                self.target.meta_collection,
                filter=f'(kind == "change" and time >= {int(since)}) or key == "pruned"',
                output_fields=["key", "time", "value"],
                limit=PAGE_IDS,
                consistency_level=level,
            )
        pruned = [json.loads(r["value"])["before"] for r in rows if r["key"] == "pruned"]
        return [r for r in rows if r["key"] != "pruned"], max(pruned, default=0), len(rows) >= PAGE_IDS

    def _note(self, changes: list[dict]) -> None:
        """Remember the change rows applied; move the horizon up (to now less CHANGE_SKEW_MS)."""
        self._horizon = max(self._horizon, now_ms() - CHANGE_SKEW_MS)
        self._seen.update({c["key"]: int(c["time"]) for c in changes})
        self._seen = {key: t for key, t in self._seen.items() if t >= self._horizon}

    def _state(self, level: str) -> dict:
        """The store's records {"layout", "meta"} (one query)."""
        with calling(self.target, "reading the index records"):
            rows = self._client.query(
                self.target.meta_collection,
                filter='key in ["layout", "meta"]',
                output_fields=["key", "value"],
                consistency_level=level,
            )
        state = {r["key"]: json.loads(r["value"]) for r in rows}
        if len(state) != 2 or state["layout"].get("format") != FORMAT:
            raise StoreError(
                f"Milvus collection {self.target.collection!r} ({self.target.label}) is not a complete csearch "
                f"index (its creation was interrupted?); recreate it with --overwrite"
            )
        if state["layout"]["version"] > VERSION:
            raise StoreError(f"{self.target.label} was written by a newer csearch (store version {state['layout']})")
        return state

    def _load(self, level: str, generation: int) -> MemorySnapshot:
        """Every live item. The change rows are read first: a write landing meanwhile is applied
        (again, harmlessly) by the next refresh."""
        horizon = now_ms() - CHANGE_SKEW_MS
        changes, self._watermark, _ = self._changes(horizon, level)
        state = self._state(level)
        layout = state["layout"]
        parts = []  # each page becomes arrays at once: pymilvus rows (Python float lists) are ~10x their size
        with calling(self.target, "reading the items"):
            for page in page_through(self._client, self.target.collection, ITEM_FIELDS, read_page_rows(layout), level):
                parts.append(columns_of(page, layout))
        columns = concat_columns(parts) if parts else columns_of([], layout)
        columns = take_rows(columns, np.argsort(columns["ids"], kind="stable"))  # ascending already; never rely on it
        self._seen, self._horizon = {}, horizon
        self._note(changes)
        dim, mask_size, extras = layout["dim"], layout["mask_size"], layout["extras"]
        return MemorySnapshot(columns, dim, mask_size, state["meta"], extras, generation, self.target.label)

    def search_server(self, queries: np.ndarray, k: int, categories=None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by Milvus itself (its collection index: FLAT, exact, unless created otherwise),
        optionally only in `categories` (None: unlabelled): (ids (Q, <=k) int64, L2 distances
        float32), rows padded with -1 / inf. csearch's own search uses the snapshot instead; this
        is for comparisons and benchmarks. Reads at Strong consistency."""
        queries = np.asarray(queries, np.float32).reshape(-1, self.dim)
        where = ""
        if categories is not None:
            where = f"category in [{', '.join(json.dumps(c or '') for c in categories)}]"
        with calling(self.target, "searching"):
            found = self._client.search(
                self.target.collection,
                data=list(queries),
                limit=k,
                filter=where,
                output_fields=["id"],
                search_params={"metric_type": "L2"},
                consistency_level=STRONG,
            )
        ids, distances = np.full((len(queries), k), -1, np.int64), np.full((len(queries), k), np.inf, np.float32)
        for q, hits in enumerate(found):
            for j, hit in enumerate(hits):
                ids[q, j], distances[q, j] = hit["id"], np.sqrt(max(float(hit["distance"]), 0.0))  # Milvus: squared
        return ids, distances

    # -- writing ------------------------------------------------------------------------------
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
        """Append items; return their new ids (int64, ascending). Stored when it returns (Milvus
        acknowledged every row); a failure part-way takes back the rows already inserted and raises.

        extras: named per-item columns (one fixed-shape row per item); the first add into an index
        that never held an item declares them, and every later add must carry the same ones
        (`segments.check_extras`, the local store's rule). One item's extras may take at most
        milvus_io.EXTRAS_BYTES (they are one base64 VARCHAR)."""
        with self._writing:
            self._refresh(STRONG)
            snapshot = self._snapshot
            new = validate_add(vectors, masks, boxes, paths, categories, products, snapshot.dim, snapshot.mask_size)
            declare = not snapshot.extras and bool(extras) and self._ids.unused()  # as the local store: no item yet
            columns, schema = check_extras(extras, len(new), snapshot.extras, declare)
            if not len(new):
                return np.zeros(0, np.int64)
            rows = rows_of(new, columns, schema)  # checked before any id is reserved
            start = self._ids.claim(len(rows))
            changes = [{"added": [start, start + len(rows)]}]
            if schema != snapshot.extras:
                if start != 0:  # another writer added the first items meanwhile, without these columns
                    raise StoreError("this index now holds items without extras; build a new index to store them")
                layout = {"format": FORMAT, "version": VERSION, "dim": snapshot.dim, "mask_size": snapshot.mask_size}
                self._put("layout", {**layout, "extras": schema})
                changes.append({"layout": True})
            ids = np.arange(start, start + len(rows), dtype=np.int64)
            for row, item_id in zip(rows, ids):
                row["id"] = int(item_id)
            self._insert(rows, ids)
            self._changed(changes)
        return ids

    def _insert(self, rows: list[dict], ids: np.ndarray) -> None:
        done = 0
        try:
            with calling(self.target, f"adding {len(rows)} item(s)"):
                for start in range(0, len(rows), PAGE_ROWS):
                    self._client.insert(self.target.collection, rows[start : start + PAGE_ROWS])
                    done = start + PAGE_ROWS
        except StoreError:
            if done:  # not acknowledged as a whole: take back the part that was
                with calling(self.target, "taking back a failed add"):
                    self._delete(ids[:done])
            raise

    def remove(self, ids, missing_ok: bool = False) -> int:
        """Remove items by id; return how many were removed. An id not in the index is a
        StoreError naming it (nothing is removed), unless `missing_ok`."""
        try:
            ids = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        except (TypeError, ValueError):
            raise StoreError(f"ids to remove must be integers, got {ids!r}"[:200]) from None
        with self._writing:
            self._refresh(STRONG)
            snapshot = self._snapshot
            if missing_ok:
                ids = ids[np.isin(ids, snapshot.ids)]
            else:
                snapshot.rows_for_ids(ids)  # raises, naming the unknown ids
            if not len(ids):
                return 0
            with calling(self.target, f"removing {len(ids)} item(s)"):
                self._delete(ids)
            chunks = [ids[i : i + REMOVED_PER_ROW] for i in range(0, len(ids), REMOVED_PER_ROW)]
            self._changed([{"removed": chunk.tolist()} for chunk in chunks])
        return int(len(ids))

    def _delete(self, ids: np.ndarray) -> None:
        for start in range(0, len(ids), PAGE_ROWS * 4):
            chunk = ", ".join(str(int(i)) for i in ids[start : start + PAGE_ROWS * 4])
            self._client.delete(self.target.collection, filter=f"id in [{chunk}]")

    def update_meta(self, values: dict) -> None:
        """Merge `values` into the index's meta (top-level keys). Two processes updating the meta
        at the same moment: the later one wins (meta is written while indexing, by one process)."""
        values = json_record(values, "index meta")
        with self._writing:
            self._put("meta", {**self._state(STRONG)["meta"], **values})
            self._changed([{"meta": True}])

    def _put(self, key: str, value: dict) -> None:
        with calling(self.target, f"writing the index {key}"):
            self._client.upsert(self.target.meta_collection, [meta_record(key, value)])

    def _changed(self, changes: list[dict]) -> None:
        """Log acknowledged writes for every reader (this process's too), then follow them here."""
        with calling(self.target, "logging a change"):
            rows = [meta_record(f"change:{uuid.uuid4().hex}", change, "change") for change in changes]
            self._client.insert(self.target.meta_collection, rows)
        self._writes += 1
        if self._writes % PRUNE_EVERY == 0:
            cutoff = now_ms() - CHANGE_TTL_MS
            self._put("pruned", {"before": cutoff})  # first: a reader that could miss pruned rows reloads
            with calling(self.target, "pruning the change log"):
                self._client.delete(self.target.meta_collection, filter=f'kind == "change" and time < {cutoff}')
        self._refresh(SESSION)  # sees this client's writes


def read_milvus_meta(target: Target) -> dict:
    """The index meta a Milvus store holds, without loading its items."""
    client = connect(target)
    try:
        with calling(target, "reading the index records"):
            if not client.has_collection(target.meta_collection):
                raise StoreError(f"Milvus collection {target.meta_collection!r} does not exist ({target.label})")
            client.load_collection(target.meta_collection)
            rows = client.query(target.meta_collection, filter='key == "meta"', output_fields=["value"])
    finally:
        client.close()
    if not rows:
        raise StoreError(f"{target.label} is not a complete csearch index; recreate it with --overwrite")
    return json.loads(rows[0]["value"])
