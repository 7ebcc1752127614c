"""The on-disk index: per catalogue image a float32 vector, a bit-packed object mask, the mask's
box, the image's absolute path, category and product, plus index-wide metadata.

- `base`: the vector-store interface (`VectorStore`, `VectorSnapshot`) a backend implements.
- `local`: `IndexStore`, the crash-safe, log-structured index folder (layout and guarantees there).
- `snapshot`: `Snapshot`, the consistent, immutable read view of one commit.
- `ann`: the optional FAISS ANN index (store.ann) that proposes candidates for unrestricted searches.
- `segments`: the immutable segment format, the merge policy, checking an add's items.
- `manifest`: manifest.json, the commit point.
- `durable`: durable and atomic file writes (fsync, temp file + rename), for any module.
- `open`: which backend holds an index's items (STORE strings, store.json); `create_store`,
  `open_store`. The second backend: `milvus` (`MilvusStore`, with `milvus_io` and the in-memory
  snapshot `memory.MemorySnapshot`), imported only when an index uses it.
"""

from .base import VectorSnapshot, VectorStore
from .durable import fsync_dir, save_npy_atomic, write_bytes_atomic
from .local import LOCK_FILE, TOMB_PREFIX, IndexStore
from .manifest import FORMAT, MANIFEST, VERSION
from .segments import MERGE_FACTOR, SEGMENT_PREFIX
from .snapshot import Snapshot

__all__ = [
    "FORMAT",
    "LOCK_FILE",
    "MANIFEST",
    "MERGE_FACTOR",
    "SEGMENT_PREFIX",
    "TOMB_PREFIX",
    "VERSION",
    "IndexStore",
    "Snapshot",
    "VectorSnapshot",
    "VectorStore",
    "fsync_dir",
    "save_npy_atomic",
    "write_bytes_atomic",
]
