"""The on-disk index: round trips, stable ids, validation, crash safety, locking, size."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from csearch import store as store_module
from csearch.errors import StoreError
from csearch.masks import normalized_box as mask_box
from csearch.masks import unpack_masks
from csearch.store import IndexStore

REPO = Path(__file__).resolve().parents[1]
DIM, SIZE = 8, 16


def items(n, seed=0, dim=DIM, size=SIZE, prefix="img"):
    """n synthetic items: (vectors, masks, boxes, paths, categories, products)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        x0, y0 = rng.integers(0, size // 2, 2)
        masks[i, y0 : y0 + size // 3, x0 : x0 + size // 4] = True
    boxes = np.array([mask_box(m) for m in masks], np.float32).reshape(n, 4)
    paths = [f"/catalogue/{prefix}{seed}-{i}.jpg" for i in range(n)]
    categories = [["bottle", "jar", None][i % 3] for i in range(n)]
    products = [f"p{i % 5}" for i in range(n)]
    return rng.standard_normal((n, dim)).astype(np.float32), masks, boxes, paths, categories, products


@pytest.fixture
def index(tmp_path):
    return IndexStore.create(tmp_path / "index", {"model": {"name": "tiny", "sha256": "ab"}}, dim=DIM, mask_size=SIZE)


def state(directory):
    """What a fresh reader sees: comparable across processes and crashes."""
    s = IndexStore.open(directory).snapshot
    return (s.ids.tolist(), s.paths, s.categories, s.vectors.round(5).tolist(), s.meta)


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text and text
    return text


# ----------------------------------------------------------------------------------- round trip


def test_create_add_reopen_round_trip(index, tmp_path):
    vectors, masks, boxes, paths, categories, products = items(7)
    ids = index.add(vectors, masks, boxes, paths, categories, products)
    assert ids.dtype == np.int64 and ids.tolist() == list(range(7))
    reopened = IndexStore.open(tmp_path / "index")
    assert len(reopened) == 7 and reopened.dim == DIM and reopened.mask_size == SIZE
    assert reopened.meta == {"model": {"name": "tiny", "sha256": "ab"}}
    snapshot = reopened.snapshot
    np.testing.assert_array_equal(snapshot.vectors, vectors)
    np.testing.assert_array_equal(snapshot.masks(np.arange(7)), masks)
    np.testing.assert_array_equal(snapshot.boxes, boxes)
    np.testing.assert_allclose(snapshot.sq_norms, (vectors.astype(np.float64) ** 2).sum(1), rtol=1e-5)
    assert snapshot.paths == paths and snapshot.categories == categories and snapshot.products == products
    assert snapshot.item(3) == {
        "id": 3,
        "path": paths[3],
        "category": categories[3],
        "product": products[3],
        "box": boxes[3].tolist(),
    }
    assert snapshot.rows_for_categories(["jar", "nope"]).tolist() == [1, 4]
    assert snapshot.rows_for_categories([None]).tolist() == [2, 5]
    assert snapshot.category_counts() == {"bottle": 3, "jar": 2, None: 2}


def test_relative_paths_are_stored_absolute(index, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    vectors, masks, boxes, _, _, _ = items(1)
    index.add(vectors, masks, boxes, ["photos/a.jpg"])
    assert index.snapshot.paths == [str(tmp_path / "photos" / "a.jpg")]
    assert index.snapshot.categories == [None] and index.snapshot.products == [None]


def test_index_directory_can_be_moved(index, tmp_path):
    index.add(*items(3))
    moved = tmp_path / "elsewhere"
    shutil.move(str(tmp_path / "index"), moved)
    again = IndexStore.open(moved)
    assert len(again) == 3
    again.add(*items(2, seed=1))
    assert IndexStore.open(moved).snapshot.ids.tolist() == [0, 1, 2, 3, 4]


def test_empty_index_has_empty_columns(index):
    assert len(index) == 0
    snapshot = index.snapshot
    assert snapshot.vectors.shape == (0, DIM) and snapshot.mask_bits.shape == (0, SIZE * SIZE // 8)
    assert snapshot.ids.shape == (0,) and snapshot.paths == [] and snapshot.rows_for_categories(["x"]).size == 0
    assert index.add(*items(0)).shape == (0,)
    from csearch.knn import knn

    assert knn(snapshot.blocks(), np.zeros(DIM, np.float32), 5)[0].shape == (1, 0)


# -------------------------------------------------------------------------------------- ids


def test_ids_are_stable_and_never_reused(index, tmp_path):
    index.add(*items(5))
    assert index.remove([4, 1]) == 2
    assert index.add(*items(2, seed=1)).tolist() == [5, 6]
    assert index.snapshot.ids.tolist() == [0, 2, 3, 5, 6]
    index.compact()
    assert index.snapshot.ids.tolist() == [0, 2, 3, 5, 6]
    assert index.snapshot.item(5)["path"] == "/catalogue/img1-0.jpg"
    index.remove(index.snapshot.ids)
    assert len(index) == 0
    assert index.add(*items(1, seed=2)).tolist() == [7]
    assert IndexStore.open(tmp_path / "index").snapshot.ids.tolist() == [7]


def test_remove_unknown_ids_names_them_and_changes_nothing(index):
    index.add(*items(3))
    index.remove([1])
    with pytest.raises(StoreError) as error:
        index.remove([0, 1, 99])
    assert "1, 99" in one_line(error)
    assert index.snapshot.ids.tolist() == [0, 2]
    assert index.remove([0, 1, 99], missing_ok=True) == 1
    with pytest.raises(StoreError):
        index.snapshot.item(0)


def test_rows_for_ids_follow_the_given_order(index):
    index.add(*items(6))
    index.remove([2])
    assert index.snapshot.rows_for_ids([5, 0, 3]).tolist() == [4, 0, 2]


# ------------------------------------------------------------------------------ segments/merge


def test_small_adds_are_merged_and_tombstones_dropped(index, tmp_path):
    for i in range(25):
        index.add(*items(1, seed=i))
        if i == 3:
            index.remove([1])
    rows = index.snapshot.segment_rows()
    assert len(rows) < store_module.MERGE_FACTOR and sum(rows) == 24
    assert index.snapshot.ids.tolist() == [i for i in range(25) if i != 1]  # still in id order
    assert not len(index.snapshot.tombstones)  # the merge dropped the removed row
    assert index.snapshot.paths[:2] == ["/catalogue/img0-0.jpg", "/catalogue/img2-0.jpg"]
    assert len(list((tmp_path / "index").glob("seg-*"))) == len(rows)  # merged ones were deleted


def test_fully_removed_segment_is_dropped(index, tmp_path):
    index.add(*items(2))
    index.add(*items(2, seed=1))
    index.remove([2, 3])
    assert index.snapshot.segment_rows() == [2]
    assert index.snapshot.manifest["tombstones"] is None
    assert len(list((tmp_path / "index").glob("seg-*"))) == 1


def test_compact_gives_one_memory_mapped_segment(index, tmp_path):
    for seed in range(3):
        index.add(*items(4, seed=seed))
    index.remove([0, 5])
    before = state(tmp_path / "index")
    index.compact()
    assert index.snapshot.segment_rows() == [10]
    assert state(tmp_path / "index") == before
    assert isinstance(IndexStore.open(tmp_path / "index").snapshot.vectors.base, np.memmap)  # no copy
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["manifest.json", "seg-000004", "writer.lock"]


def test_update_meta_merges_keys(index, tmp_path):
    index.update_meta({"classifier": "/runs/a", "model": {"name": "other"}})
    assert IndexStore.open(tmp_path / "index").meta == {"model": {"name": "other"}, "classifier": "/runs/a"}
    with pytest.raises(StoreError):
        index.update_meta({"bad": object()})


def test_segmented_reads_match_the_whole_columns(index):
    """blocks/gather/records/rows_for_categories read the segments in place; they must agree
    with the concatenated columns, removed rows included."""
    from csearch.knn import knn

    for seed in range(4):
        index.add(*items(6, seed=seed))
    index.remove([0, 7, 8, 20])
    snapshot = index.snapshot
    assert len(snapshot.segment_rows()) == 4 and len(snapshot) == 20
    rows = np.array([19, 0, 5, 6, 12])
    for column, whole in [
        ("ids", snapshot.ids),
        ("vectors", snapshot.vectors),
        ("masks", snapshot.mask_bits),
        ("boxes", snapshot.boxes),
        ("sq_norms", snapshot.sq_norms),
    ]:
        np.testing.assert_array_equal(snapshot.gather(column, rows), whole[rows])
    np.testing.assert_array_equal(snapshot.masks(rows), unpack_masks(snapshot.mask_bits[rows], SIZE))
    assert snapshot.records(rows) == [
        {
            "id": int(snapshot.ids[r]),
            "path": snapshot.paths[r],
            "category": snapshot.categories[r],
            "product": snapshot.products[r],
            "box": snapshot.boxes[r].tolist(),
        }
        for r in rows
    ]
    for category in ("bottle", "jar", None):
        expected = [r for r, c in enumerate(snapshot.categories) if c == category]
        assert snapshot.rows_for_categories([category]).tolist() == expected
    queries = np.random.default_rng(0).standard_normal((3, DIM)).astype(np.float32)
    for restrict in (None, snapshot.rows_for_categories(["jar"])):
        got = knn(snapshot.blocks(), queries, 5, rows=restrict)
        expected = knn(snapshot.vectors, queries, 5, rows=restrict)
        np.testing.assert_array_equal(got[0], expected[0])
    with pytest.raises(StoreError):
        snapshot.gather("ids", [20])


# ------------------------------------------------------------------------------ other process


def test_refresh_sees_another_instances_changes(index, tmp_path):
    other = IndexStore.open(tmp_path / "index")
    assert other.refresh() is False
    index.add(*items(3))
    snapshot = other.snapshot
    assert other.refresh() is True and len(other) == 3 and other.refresh() is False
    assert len(snapshot) == 0 and len(snapshot.ids) == 0  # an old snapshot never changes
    index.remove([1])
    other.refresh()
    assert other.snapshot.ids.tolist() == [0, 2]
    other.add(*items(1, seed=1))  # a writer always starts from the latest commit
    index.refresh()
    assert index.snapshot.ids.tolist() == [0, 2, 3]


def test_overwrite_replaces_atomically_and_readers_follow(index, tmp_path):
    index.add(*items(3))
    reader = IndexStore.open(tmp_path / "index")
    with pytest.raises(StoreError):
        IndexStore.create(tmp_path / "index", {}, dim=4, mask_size=8)
    IndexStore.create(tmp_path / "index", {"v": 2}, dim=4, mask_size=8, overwrite=True)
    assert reader.refresh() and len(reader) == 0 and reader.dim == 4 and reader.meta == {"v": 2}
    assert len(list((tmp_path / "index").glob("seg-*"))) == 0
    (tmp_path / "index" / "manifest.json").write_text("{broken")
    IndexStore.create(tmp_path / "index", {}, dim=4, mask_size=8, overwrite=True)  # repairs it
    assert len(IndexStore.open(tmp_path / "index")) == 0


# --------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda a: {**a, "vectors": a["vectors"][:, :4].copy()}, "dimension 4"),
        (lambda a: {**a, "vectors": a["vectors"].astype(np.float64)}, "float32"),
        (lambda a: {**a, "vectors": a["vectors"][0]}, "float32 (n, 8)"),
        (lambda a: {**a, "vectors": np.full_like(a["vectors"], np.nan)}, "NaN"),
        (lambda a: {**a, "masks": a["masks"][:, :8]}, "masks must be bool (3, 16, 16)"),
        (lambda a: {**a, "masks": a["masks"].astype(np.uint8)}, "masks must be bool"),
        (lambda a: {**a, "boxes": a["boxes"][:2]}, "boxes must be float (3, 4)"),
        (lambda a: {**a, "boxes": a["boxes"] * 5}, "normalised"),
        (lambda a: {**a, "paths": a["paths"][:2]}, "paths must be a sequence of 3"),
        (lambda a: {**a, "paths": "one.jpg"}, "paths must be a sequence of 3"),
        (lambda a: {**a, "categories": ["a", 1, "b"]}, "categories must hold strings"),
        (lambda a: {**a, "products": ["a"]}, "products must be a sequence of 3"),
    ],
)
def test_add_validates_inputs(index, change, expected):
    names = ("vectors", "masks", "boxes", "paths", "categories", "products")
    arguments = change(dict(zip(names, items(3))))
    with pytest.raises(StoreError) as error:
        index.add(**arguments)
    assert expected in one_line(error)
    assert len(index) == 0


def test_create_validates(tmp_path):
    with pytest.raises(StoreError):
        IndexStore.create(tmp_path / "a", {}, dim=0, mask_size=8)
    with pytest.raises(StoreError):
        IndexStore.create(tmp_path / "b", {"x": {1, 2}}, dim=4, mask_size=8)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    with pytest.raises(StoreError) as error:
        IndexStore.create(tmp_path / "photos", {}, dim=4, mask_size=8, overwrite=True)
    assert "not a csearch index" in one_line(error)
    assert (tmp_path / "photos" / "cat.jpg").exists()


def test_open_errors_are_one_line(tmp_path, index):
    with pytest.raises(StoreError) as error:
        IndexStore.open(tmp_path / "missing")
    assert "not found" in one_line(error)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError) as error:
        IndexStore.open(tmp_path / "file")
    assert "not a directory" in one_line(error)
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError) as error:
        IndexStore.open(tmp_path / "plain")
    assert "not a csearch index" in one_line(error)

    index.add(*items(2))
    manifest = tmp_path / "index" / "manifest.json"
    good = manifest.read_text()
    for text, expected in [
        ("{not json", "corrupt"),
        ("[]", "not a csearch index manifest"),
        (json.dumps({**json.loads(good), "dim": "8"}), "'dim'"),
        (json.dumps({**json.loads(good), "version": 99}), "upgrade csearch"),
    ]:
        manifest.write_text(text)
        with pytest.raises(StoreError) as error:
            IndexStore.open(tmp_path / "index")
        assert expected in one_line(error)
    manifest.write_text(good)
    segment = next((tmp_path / "index").glob("seg-*"))
    (segment / "masks.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(StoreError) as error:
        IndexStore.open(tmp_path / "index")
    assert "masks.npy is corrupt" in one_line(error)
    shutil.rmtree(segment)
    with pytest.raises(StoreError) as error:
        IndexStore.open(tmp_path / "index")
    assert "incomplete" in one_line(error)


# ------------------------------------------------------------------------------ crash safety

OPERATIONS = {
    "add": lambda s: s.add(*items(2, seed=9)),
    "add+merge": lambda s: s.add(*items(1, seed=9)),  # the 10th small segment: merges in the same commit
    "remove": lambda s: s.remove([0, 3]),
    "remove segment": lambda s: s.remove([8]),
    "compact": lambda s: s.compact(),
    "update_meta": lambda s: s.update_meta({"k": 1}),
}


@pytest.mark.parametrize("operation", OPERATIONS)
def test_a_crash_at_any_step_leaves_the_old_or_the_new_index(tmp_path, monkeypatch, operation):
    """Fail each fsync/rename/replace in turn (what a crash between steps leaves on disk); the
    index must load as either the state before the operation or the one after it."""
    template = tmp_path / "template"
    s = IndexStore.create(template, {"k": 0}, dim=DIM, mask_size=SIZE)
    s.add(*items(3))
    s.remove([1])
    for seed in range(1, 7):
        s.add(*items(1, seed=seed))  # 7 segments: 3, then 6 x 1
    s.add(*items(1, seed=7))  # 8 segments, ids 0..9, id 8 alone in the last-but-one
    s.add(*items(1, seed=8))
    before = state(template)
    real = {name: getattr(os, name) for name in ("fsync", "rename", "replace")}
    outcomes = set()
    for fail_at in range(200):
        directory = tmp_path / f"run{fail_at}"
        shutil.copytree(template, directory)
        calls = iter(range(10_000))

        def crashing(name):
            def call(*args, **kwargs):
                if next(calls) == fail_at:  # noqa: B023 (called at once, in this iteration)
                    raise OSError(f"injected crash at {name}")
                return real[name](*args, **kwargs)

            return call

        store = IndexStore.open(directory)
        for name in real:
            monkeypatch.setattr(os, name, crashing(name))
        try:
            OPERATIONS[operation](store)
            crashed = False
        except OSError:
            crashed = True
        finally:
            for name, function in real.items():
                monkeypatch.setattr(os, name, function)
        if not crashed:
            break
        after_crash = state(directory)
        expected = (before, state_after(template, tmp_path, operation))
        assert after_crash in expected
        outcomes.add(expected.index(after_crash))
        store = IndexStore.open(directory)
        store.add(*items(1, seed=99))  # the next write works and sweeps the dead writer's files
        assert not [p for p in directory.iterdir() if p.name.startswith("tmp-")]
        shutil.rmtree(directory)
    # crashes before and after the commit point were both exercised (compact changes no item)
    assert outcomes == {0, 1} or operation == "compact"


def state_after(template, tmp_path, operation, _cache={}):  # noqa: B006 (a deliberate per-process memo)
    key = (str(template), operation)
    if key not in _cache:
        directory = tmp_path / "expected"
        shutil.copytree(template, directory)
        OPERATIONS[operation](IndexStore.open(directory))
        _cache[key] = state(directory)
        shutil.rmtree(directory)
    return _cache[key]


WRITER = """
import sys, numpy as np
sys.path.insert(0, sys.argv[3])
from csearch.store import IndexStore
store = IndexStore.open(sys.argv[1])
rng = np.random.default_rng(int(sys.argv[2]))
print("ready", flush=True)
while True:
    n = int(rng.integers(1, 4))
    ids = store.add(rng.standard_normal((n, 8)).astype(np.float32), np.ones((n, 16, 16), bool),
                    np.tile(np.float32([0, 0, 1, 1]), (n, 1)), ["x.jpg"] * n)
    print("+", *ids, flush=True)
    if rng.random() < 0.3:
        store.remove(ids[:1])
        print("-", ids[0], flush=True)
"""


def test_sigkill_mid_write_keeps_exactly_the_acknowledged_items(index, tmp_path):
    """A writer process adds/removes in a loop and prints each acknowledged change; it is
    SIGKILLed at random moments. Meanwhile this process keeps refreshing as a reader."""
    rng = np.random.default_rng(0)
    acknowledged: set = set()
    printed = 0
    for round_ in range(4):
        with subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path / "index"), str(round_), str(REPO)],
            stdout=subprocess.PIPE,
            text=True,
        ) as writer:
            try:
                assert writer.stdout.readline().strip() == "ready"
                deadline = time.monotonic() + rng.uniform(0.1, 0.6)
                while time.monotonic() < deadline:  # readers never block and always see a whole commit
                    index.refresh()
                    snapshot = index.snapshot
                    assert len(snapshot.ids) == len(snapshot) == len(snapshot.paths) == len(snapshot.vectors)
            finally:
                writer.send_signal(signal.SIGKILL)
            lines = [line.split() for line in writer.stdout.read().splitlines()]
        for sign, *ids in lines:
            (acknowledged.update if sign == "+" else acknowledged.difference_update)(map(int, ids))
        printed += len(lines)
        live = set(IndexStore.open(tmp_path / "index").snapshot.ids.tolist())
        # the one operation in flight may have committed without being acknowledged:
        # an add (new ids above every id seen) or the remove of the last batch's first id
        newest = max(acknowledged | live | {-1})
        extra, missing = live - acknowledged, acknowledged - live
        assert len(extra) <= 3 and all(i > max(acknowledged, default=-1) for i in extra), (extra, newest)
        if missing:
            assert lines and lines[-1][0] == "+" and missing == {int(lines[-1][1])} and not extra
        acknowledged = live
    assert printed > 4


LOCK_HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from csearch.store.local import _writer_lock
with _writer_lock(Path(sys.argv[1]), None):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_killed_writer_leaves_no_stale_lock(index, tmp_path):
    with subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(tmp_path / "index"), str(REPO)], stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout.readline().strip() == "locked"
            index.lock_timeout = 0.2
            with pytest.raises(StoreError) as error:
                index.add(*items(1))
            assert f"pid {holder.pid}" in one_line(error)
            assert len(IndexStore.open(tmp_path / "index")) == 0  # readers are not blocked
        finally:
            holder.send_signal(signal.SIGKILL)
    index.lock_timeout = 5
    assert index.add(*items(1)).tolist() == [0]


# ---------------------------------------------------------------------------- durable writes


def test_atomic_writes_replace_whole_files_and_leave_no_temp(tmp_path, monkeypatch):
    from csearch.store import save_npy_atomic, write_bytes_atomic

    for array in (
        np.arange(12.0).reshape(3, 4),
        np.asfortranarray(np.eye(3, dtype=np.int16)),
        np.float32(2),
        np.zeros((0, 5), np.uint8),
    ):
        save_npy_atomic(tmp_path / "a.npy", array)
        loaded = np.load(tmp_path / "a.npy", allow_pickle=False)
        assert loaded.dtype == array.dtype and loaded.shape == np.shape(array) and (loaded == array).all()
    write_bytes_atomic(tmp_path / "b", b"old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("injected crash")))
    with pytest.raises(OSError):
        write_bytes_atomic(tmp_path / "b", b"new")
    assert (tmp_path / "b").read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["a.npy", "b"]


def test_index_store_implements_the_vector_store_interface(index):
    from csearch.store import VectorSnapshot, VectorStore

    assert isinstance(index, VectorStore) and isinstance(index.snapshot, VectorSnapshot)


# --------------------------------------------------------------------------------------- size


def test_bytes_per_item_beyond_the_vector_is_under_1kb(tmp_path):
    dim, n = 32, 2000
    s = IndexStore.create(tmp_path / "index", {"model": "x" * 500}, dim=dim, mask_size=64)
    for batch in range(2):
        vectors, masks, boxes, _, _, _ = items(n // 2, seed=batch, dim=dim, size=64)
        paths = [
            f"/data/catalogues/grocery/train/Fruit/Apple/Golden-Delicious/IMG_{batch}{i:05d}.jpg" for i in range(n // 2)
        ]
        s.add(vectors, masks, boxes, paths, ["Fruit"] * (n // 2), ["Golden-Delicious"] * (n // 2))
    total = sum(p.stat().st_size for p in (tmp_path / "index").rglob("*") if p.is_file())
    per_item = (total - n * dim * 4) / n
    assert per_item <= 1024, per_item
