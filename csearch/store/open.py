"""Which store holds an index's items, chosen when it is built (`csearch index --store STORE`,
config `store.uri`) and recorded in the index folder, so every later command just opens INDEX_DIR.

STORE is one of:

    local                        the index folder itself (`local.IndexStore`; the default)
    milvus-lite:PATH             a Milvus Lite database PATH (ending in .db), relative to
                                 INDEX_DIR unless absolute; one process at a time uses it
    milvus://HOST:PORT/COLLECTION  a collection on a Milvus server (`milvus.MilvusStore`)

A local index folder is recognised by its manifest.json, exactly as before. A Milvus index folder
holds store.json ({"format", "store": STORE}, written atomically) beside the build-time files
(config.yaml, the carried classifier). Server credentials never appear in STORE: they come from
$CSEARCH_MILVUS_TOKEN (or $MILVUS_TOKEN) or the file named by $CSEARCH_MILVUS_TOKEN_FILE.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from ..errors import StoreError
from .durable import write_bytes_atomic
from .local import IndexStore
from .manifest import MANIFEST, read_manifest

STORE_FILE = "store.json"
STORE_FORMAT = "csearch-store"
LITE_PREFIX = "milvus-lite:"
SERVER = re.compile(r"milvus://(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})/(?P<collection>[^/]*)")
COLLECTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
LITE_COLLECTION = "items"
EXAMPLES = "local, milvus-lite:items.db or milvus://HOST:PORT/COLLECTION"
MILVUS_INDEX = {"none": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT"}  # store.ann -> the collection's index


def is_local(uri: str) -> bool:
    return uri == "local"


def parse_store(uri: str, index_dir) -> Optional[object]:
    """A STORE string -> None for `local`, else the `milvus_io.Target` it names (a Lite PATH
    resolved against `index_dir`). StoreError, naming the valid forms, for anything else."""
    from .milvus_io import Target

    uri = str(uri).strip()
    if is_local(uri):
        return None
    if uri.startswith(LITE_PREFIX):
        path = Path(uri[len(LITE_PREFIX) :]).expanduser()
        if not path.name.endswith(".db") or path.name == ".db":
            raise StoreError(
                f"store {uri!r}: a Milvus Lite PATH must name a file ending in .db, e.g. {LITE_PREFIX}items.db"
            )
        path = path if path.is_absolute() else Path(index_dir).expanduser().absolute() / path
        return Target(str(path), LITE_COLLECTION, uri)
    if uri.startswith("milvus://"):
        if "@" in uri.split("/")[2]:
            raise StoreError(
                "store: credentials never go in STORE (it is saved with the index); set $CSEARCH_MILVUS_TOKEN "
                "or $CSEARCH_MILVUS_TOKEN_FILE instead"
            )
        match = SERVER.fullmatch(uri)
        if not match or not 0 < int(match["port"]) < 65536:
            raise StoreError(f"store {uri!r} is not milvus://HOST:PORT/COLLECTION")
        if not COLLECTION.fullmatch(match["collection"]):
            raise StoreError(
                f"store {uri!r}: COLLECTION must be letters, digits and _ (not starting with a digit), at most 200"
            )
        return Target(f"http://{match['host']}:{int(match['port'])}", match["collection"], uri)
    raise StoreError(f"unknown store {uri!r}; valid: {EXAMPLES}")


def store_uri(index_dir) -> Optional[str]:
    """The STORE an index folder records: "local" for a local index, None when there is no index."""
    directory = Path(index_dir).expanduser()
    if (directory / STORE_FILE).is_file():
        try:
            record = json.loads((directory / STORE_FILE).read_text(encoding="utf-8"))
            if record.get("format") != STORE_FORMAT or not isinstance(record.get("store"), str):
                raise ValueError("not a store record")
        except (OSError, ValueError, AttributeError) as exc:
            raise StoreError(f"{directory / STORE_FILE} is damaged ({exc}); rebuild the index folder") from None
        return record["store"]
    return "local" if (directory / MANIFEST).is_file() else None


def create_store(
    index_dir, uri: str, meta: dict, dim: int, mask_size: int = 64, overwrite: bool = False, ann: str = "none"
):
    """Create an empty index in `index_dir` whose items live in STORE `uri`. Without `overwrite`
    an existing index (of either kind) is refused; an index never changes kind in place. `ann`
    (config store.ann) picks a Milvus collection's own index (none: FLAT, exact; hnsw; ivf),
    which only Milvus' own search uses; the local store builds its ANN index after indexing."""
    directory = Path(index_dir).expanduser().absolute()
    target = parse_store(uri, directory)
    existing = store_uri(directory) if directory.is_dir() else None
    if target is None and existing in (None, "local"):  # the local store, exactly as it always was
        return IndexStore.create(directory, meta=meta, dim=dim, mask_size=mask_size, overwrite=overwrite)
    if existing is not None and existing != uri:
        raise StoreError(f"{directory} holds an index in store {existing}; use another folder for store {uri}")
    if existing is not None and not overwrite:
        raise StoreError(f"an index already exists in {directory}; pass overwrite to replace it")
    if existing is None and directory.is_dir() and any(directory.iterdir()):
        raise StoreError(f"{directory} is not empty and not a csearch index; refusing to write there")
    from .milvus import MilvusStore

    if directory.exists() and not directory.is_dir():
        raise StoreError(f"index path exists and is not a directory: {directory}")
    index_type = MILVUS_INDEX.get(ann)
    if index_type is None:
        raise StoreError(f"unknown store.ann {ann!r}; valid: {', '.join(MILVUS_INDEX)}")
    store = MilvusStore.create(directory, target, meta, dim, mask_size, overwrite=overwrite, index_type=index_type)
    directory.mkdir(parents=True, exist_ok=True)
    record = {"format": STORE_FORMAT, "store": uri}
    write_bytes_atomic(directory / STORE_FILE, (json.dumps(record, indent=1) + "\n").encode())
    return store


def open_store(index_dir, lock_timeout: Optional[float] = 60.0):
    """Open the index in `index_dir` with the store it records (`base.VectorStore`)."""
    directory = Path(index_dir).expanduser().absolute()
    uri = store_uri(directory)
    if uri is None or is_local(uri):
        return IndexStore.open(directory, lock_timeout=lock_timeout)  # its own error when there is no index
    from .milvus import MilvusStore

    return MilvusStore.open(directory, parse_store(uri, directory))


def read_meta(index_dir) -> Optional[dict]:
    """The meta of the index in `index_dir` (None when there is none), without loading its items."""
    directory = Path(index_dir).expanduser().absolute()
    uri = store_uri(directory)
    if uri is None:
        return None
    if is_local(uri):
        return read_manifest(directory)["meta"]
    from .milvus import read_milvus_meta

    return read_milvus_meta(parse_store(uri, directory))
