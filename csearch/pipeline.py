"""The pipeline's public face: `build_index` (offline) and `Engine` (online), composed from
one module per job:

    resolve.py    config -> model files (recorded by sha256) -> loaded Models; an index's config
    prepare.py    one image -> Prepared (cut-out, view inputs, mask, box) -> index vector
    indexing.py   build_index / add_records: catalogue -> committed index chunks (resumable)
    engine.py     Engine: open an index, query (one search path: csearch.search), add, remove

No model code lives in any of them: each stage is a callable from csearch's plain types to plain
types, and these modules only wire them, time them and record which models produced an index.
"""

from .engine import Engine, searched_categories
from .indexing import CHUNK, IndexReport, add_records, build_index, index_meta
from .prepare import Prepared, embed_prepared, photo_view, prepare_image, vector_dim
from .resolve import (
    LEGACY_DEFAULTS,
    Models,
    describe_files,
    index_config,
    load_models,
    resolve_config,
)

__all__ = [
    "CHUNK",
    "LEGACY_DEFAULTS",
    "Engine",
    "IndexReport",
    "Models",
    "Prepared",
    "add_records",
    "build_index",
    "describe_files",
    "embed_prepared",
    "index_config",
    "index_meta",
    "load_models",
    "photo_view",
    "prepare_image",
    "resolve_config",
    "searched_categories",
    "vector_dim",
]
