"""`python -m csearch.train embedder`: a product embedding learned from the catalogue's own labels.

The backbone stays frozen (an ONNX extractor cut before its global pooling: `embedder.trunk`);
its feature map is pooled (R-MAC by default) and a linear head is trained with the normalised-
softmax loss on the product labels, over the cut-out and whole-photo views of every catalogue
image plus augmented copies. Training stops on the Recall@1 of a held-out part of the catalogue.

RUN_DIR holds: embedder.onnx (image -> embedding, what `csearch index --embedder RUN_DIR` runs),
embedder.keras (feature map -> embedding; the ONNX file is checked equal to it), trunk.onnx (the
derived backbone file), embedder.json (what an index reads), products.json, config.yaml,
history.csv, summary.json and curves.png. An interrupted run resumes with the same command.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import yaml

from .. import __version__, errors
from ..data import read_catalogue
from .data import stratified_split
from .embedder_config import EmbedderConfig

log = logging.getLogger("csearch.train")
MARKER = "embedder.json"  # what makes a folder an embedder RUN_DIR
MODEL_ONNX, MODEL_KERAS, TRUNK_ONNX, HEAD_ONNX = "embedder.onnx", "embedder.keras", "trunk.onnx", "head.onnx"
MAX_EXPORT_DIFF = 1e-4  # |onnxruntime - keras| on the same feature maps
# the settings that change the cached pooled features (the number of copies does not: see embedder_data)
FEATURE_KEYS = ("extractor", "pooling", "levels", "gem_p", "flip", "rotation", "zoom", "shift", "color", "seed",
                "image_size", "localizer")  # fmt: skip


def _specs(data: Union[str, Sequence[str]]) -> list[str]:
    return [data] if isinstance(data, (str, Path)) else list(data)


def _labelled(data: Union[str, Sequence[str]], say) -> tuple[list, list[str]]:
    """The labelled records of one catalogue or several (e.g. the catalogue images and in-use
    photos of the same products: measured far better than either alone), each image once."""
    catalogues = [read_catalogue(spec) for spec in _specs(data)]
    spec = " + ".join(c.spec for c in catalogues)
    everything = list({r.path: r for c in catalogues for r in c.records}.values())
    records = [r for r in everything if r.product is not None]
    if len(records) < len(everything):
        say(f"{len(everything) - len(records)} images without a product label ignored")
    if not records:
        raise errors.CatalogueError(f"catalogue {spec} has no product labels: an embedder learns products")
    counts = Counter(r.product for r in records)
    if max(counts.values()) < 2:
        raise errors.CatalogueError(
            f"catalogue {spec}: no product has two images, so nothing can be held out to stop training "
            f"on; add in-use photos of some products (--data CATALOGUE PHOTOS)"
        )
    singles = sum(1 for n in counts.values() if n == 1)
    if singles:
        log.warning(
            "%d of %d products have a single image: they train on augmented copies of it only", singles, len(counts)
        )
    return records, sorted(counts)


def frozen_extractor(config: EmbedderConfig):
    """The frozen ONNX extractor the embedder trains on (an `OnnxExtractor`: its file, input and
    output names, layout, preprocessing and input size); a Keras backbone is a one-line error."""
    from ..models import get_spec, load_extractor, names

    if not str(config.extractor).endswith(".onnx") and config.extractor in names("backbone"):
        raise errors.ConfigError(
            f"extractor {config.extractor!r} is a Keras backbone; an embedder trains on an ONNX extractor: "
            f"use efficientnet_lite0, or `csearch export {config.extractor} --out FILE.onnx` and pass that file"
        )
    if not str(config.extractor).endswith(".onnx"):
        get_spec(config.extractor)
    extractor = load_extractor(config.extractor, "imagenet", image_size=config.image_size)
    return extractor


def resolved_run_config(
    config: EmbedderConfig, data: Union[str, Sequence[str]], command: Optional[str], extractor_sha: str
) -> dict:
    specs = [str(Path(spec).expanduser().resolve()) for spec in _specs(data)]
    return {
        "train": config.to_dict(),
        "data": specs[0] if len(specs) == 1 else specs,
        "command": command,
        "csearch_version": __version__,
        "extractor_sha256": extractor_sha,
    }


def check_run_dir(run_dir: Path, resolved: dict) -> Optional[dict]:
    """The classifier trainer's resume rules, plus: a non-empty folder that holds no run is refused."""
    from .classifier import check_run_dir as check_same_run

    if not (run_dir / "config.yaml").is_file() and run_dir.is_dir() and any(run_dir.iterdir()):
        raise errors.ConfigError(f"{run_dir} is not empty and holds no embedder run; use a new --out")
    return check_same_run(run_dir, resolved, identity=("data", "extractor_sha256"))


def _index_config(config: EmbedderConfig, extractor):
    """The index settings the views are made with (the defaults `csearch index` uses), resolved."""
    from dataclasses import replace

    from ..config import Config, merge
    from ..resolve import resolve_config

    chosen = merge(Config(), {"preprocess.image_size": extractor.input_size, "localize.method": config.localizer})
    # the extractor is the embedder's own (resolved here only to find the localizer's files)
    chosen = replace(chosen, embed=replace(chosen.embed, extractor=str(extractor.path), weights=None))
    return resolve_config(chosen)


def _samples(vectors: np.ndarray, rows: np.ndarray, labels: np.ndarray, views: str) -> tuple[np.ndarray, np.ndarray]:
    picked = {"cutout": [0], "photo": [1], "cutout+photo": [0, 1]}[views]
    chosen = vectors[rows][:, :, picked]  # (n, copies, views, C)
    n, copies, v, c = chosen.shape
    return chosen.reshape(n * copies * v, c), np.repeat(labels[rows], copies * v)


class FeatureSource:
    """Pooled trunk features of catalogue records, as the trainer sees them (cached): writes the
    trunk to RUN_DIR, localizes as `csearch index` will, and pools with the config's pooling."""

    def __init__(self, config: EmbedderConfig, extractor, run_dir: Path):
        from ..embedder import layers
        from ..embedder.trunk import TrunkRunner, write_trunk
        from ..evaluation.cache import ArrayCache, CachedLocalizer, localize_source_digest
        from ..evaluation.features import default_cache_dir, localize_settings
        from ..localize import make_localizer
        from ..models import file_sha256
        from . import embedder_data
        from .cache import digest
        from .embedder_fit import pooling_layer

        self.config, self.extractor = config, extractor
        self.info = write_trunk(extractor.path, run_dir / TRUNK_ONNX, extractor.input_name, extractor.output_name)
        self.index_config = _index_config(config, extractor)
        cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
        self.cache_dir = cache_dir / "embedder"
        settings = localize_settings(self.index_config)
        self.localizer = CachedLocalizer(
            make_localizer(self.index_config.localize, threads=None), ArrayCache(cache_dir / "loc"), settings
        )
        self.trunk = TrunkRunner(run_dir / TRUNK_ONNX, self.info)
        self.pool_layer = pooling_layer(config, self.info)
        self.key = digest(
            file_sha256(run_dir / TRUNK_ONNX),
            {k: v for k, v in config.to_dict().items() if k in FEATURE_KEYS},
            settings,
            localize_source_digest(),
            [file_sha256(m.__file__) for m in (embedder_data, layers)],
        )

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        from ..models.preprocessing import preprocess_array

        x = preprocess_array(images, self.extractor.preprocessing)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if self.extractor.layout == "nchw" else x, np.float32)

    def pooling(self, maps: np.ndarray) -> np.ndarray:
        import keras

        return keras.ops.convert_to_numpy(self.pool_layer(maps))

    def __call__(self, records, progress: Callable[[int], None], copies: Optional[int] = None):
        from dataclasses import replace

        from .embedder_data import pooled_features

        config = self.config if copies is None else replace(self.config, copies=copies)
        return pooled_features(
            records, self.localizer, self.trunk, self.pooling, self.preprocess, self.index_config, config,
            self.cache_dir, self.key, progress,
        )  # fmt: skip


def train_embedder(
    config: EmbedderConfig,
    data: Union[str, Sequence[str]],
    out: str | Path,
    say: Callable[[str], None],
    command: Optional[str] = None,
) -> dict:
    """Train, export and check an embedder into RUN_DIR `out`; returns the summary."""
    from ..console import progress_bar
    from ..models import file_sha256
    from ..store.durable import write_bytes_atomic

    started = time.perf_counter()
    run_dir = Path(out).expanduser()
    records, products = _labelled(data, say)
    extractor = frozen_extractor(config)
    resolved = resolved_run_config(config, data, command, file_sha256(extractor.path))
    finished = check_run_dir(run_dir, resolved)
    if finished is not None:
        say(f"{run_dir} is already trained (held-out Recall@1 {finished.get('held_out_recall_at_1')})")
        return finished
    run_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False).encode())

    compute = FeatureSource(config, extractor, run_dir)
    say(f"{len(records)} images of {len(products)} products: localizing, {1 + config.copies} copies x 2 views each")
    localize_start = time.perf_counter()
    with progress_bar(len(records), "views") as bar:
        features = compute(records, bar.update)
    features_seconds = time.perf_counter() - localize_start
    for path, reason in features.failures[:5]:
        say(f"skipped {path}: {reason}")
    labels = np.array([products.index(r.product) for r in records])
    usable = np.flatnonzero(features.ok)
    train_rows, val_rows, _ = stratified_split(labels[usable].astype(str), config.val_fraction, config.seed)
    train_rows, val_rows = usable[train_rows], usable[val_rows]
    samples, sample_labels = _samples(features.vectors, train_rows, labels, config.views)

    from .embedder_fit import fit_head, map_model, recall_at_1, refit_head, save_state

    held_out = {
        "gallery": features.vectors[train_rows, 0],
        "gallery_labels": labels[train_rows],
        "queries": features.vectors[val_rows, 0],
        "query_labels": labels[val_rows],
    }
    say(f"training the head on {len(samples)} views of {len(train_rows)} images; {len(val_rows)} held out")
    fit_start = time.perf_counter()
    embed, best_epoch, best_recall = fit_head(config, samples, sample_labels, len(products), held_out, run_dir, say)
    if config.refit:
        say(f"refitting on all {len(train_rows) + len(val_rows)} images for {best_epoch} epochs")
        all_samples, all_labels = _samples(features.vectors, np.sort(np.r_[train_rows, val_rows]), labels, config.views)
        embed = refit_head(config, all_samples, all_labels, len(products), best_epoch)
    fit_seconds = time.perf_counter() - fit_start
    frozen = recall_at_1(
        _unit_combined(held_out["gallery"]), held_out["gallery_labels"],
        _unit_combined(held_out["queries"]), held_out["query_labels"],
    )  # fmt: skip
    head = map_model(config, compute.info, embed)
    head.save(run_dir / MODEL_KERAS)
    diff = _export(run_dir, head, compute.info, extractor, config)
    say(f"exported {MODEL_ONNX} (max |onnxruntime - keras| = {diff:.1e})")
    summary = {
        "products": len(products),
        "images": len(records),
        "train_images": int(len(train_rows)),
        "held_out_images": int(len(val_rows)),
        "single_image_products": sum(1 for n in Counter(r.product for r in records).values() if n == 1),
        "failed_images": len(features.failures),
        "best_epoch": best_epoch,
        "held_out_recall_at_1": round(best_recall, 4),
        "held_out_recall_at_1_frozen": round(frozen, 4),
        "dim": config.dim,
        "export_max_abs_diff": diff,
        "seconds_features": round(features_seconds, 1),
        "seconds_training": round(fit_seconds, 1),
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    save_state(run_dir / "products.json", {"products": products})
    write_marker(run_dir, config, extractor, compute.info)
    _draw_curves(run_dir)
    save_state(run_dir / "summary.json", summary)
    return summary


def _unit_combined(pooled: np.ndarray) -> np.ndarray:
    """The frozen baseline: pooled views L2-normalised and combined as the index does."""
    from ..embed import l2_normalize
    from .embedder_fit import combine

    return combine(l2_normalize(pooled))


def _export(run_dir: Path, head, info, extractor, config: EmbedderConfig) -> float:
    """head.onnx from Keras (checked), merged with the trunk into embedder.onnx, checked again end
    to end against trunk + Keras head on seeded random images."""
    import keras

    from ..embedder.trunk import TrunkRunner, merge_head
    from ..export import export_onnx
    from ..models import META_LAYOUT, META_MODEL, META_PREPROCESSING, META_ROLE, load_extractor

    trunk = TrunkRunner(run_dir / TRUNK_ONNX, info)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, extractor.input_size, extractor.input_size, 3), dtype=np.uint8)
    from ..models.preprocessing import preprocess_array

    x = preprocess_array(images, extractor.preprocessing)
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2) if extractor.layout == "nchw" else x, np.float32)
    maps = trunk(x)
    export_onnx(head, run_dir / HEAD_ONNX, maps, opset=17)
    metadata = {
        META_ROLE: "extractor",
        META_MODEL: f"embedder:{Path(str(extractor.name)).name}",
        META_LAYOUT: extractor.layout,
        META_PREPROCESSING: extractor.preprocessing,
    }
    merge_head(run_dir / TRUNK_ONNX, run_dir / HEAD_ONNX, info, run_dir / MODEL_ONNX, metadata)
    expected = keras.ops.convert_to_numpy(head(maps))
    got = load_extractor(str(run_dir / MODEL_ONNX), None, image_size=extractor.input_size)(images)
    diff = float(np.max(np.abs(got - expected)))
    if diff > MAX_EXPORT_DIFF:
        raise errors.ModelMismatch(f"the exported {MODEL_ONNX} differs from Keras by {diff:.1e} (> {MAX_EXPORT_DIFF})")
    return diff


def write_marker(run_dir: Path, config: EmbedderConfig, extractor, info) -> None:
    from ..models import file_sha256
    from .embedder_fit import save_state

    save_state(
        run_dir / MARKER,
        {
            "format": "csearch-embedder",
            "model": MODEL_ONNX,
            "sha256": file_sha256(run_dir / MODEL_ONNX),
            "image_size": int(extractor.input_size),
            "extractor": Path(str(config.extractor)).name,
            "dim": config.dim,
            "pooling": config.pooling,
            "feature_map": [info.channels, info.height, info.width],
        },
    )


def _draw_curves(run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .history import read_history

    rows = read_history(run_dir / "history.csv")
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    fig, left = plt.subplots(figsize=(6, 3.5))
    left.plot(epochs, [float(r["loss"]) for r in rows], color="tab:blue", label="training loss")
    left.set_xlabel("epoch")
    left.set_ylabel("loss", color="tab:blue")
    right = left.twinx()
    right.plot(epochs, [float(r["val_recall_at_1"]) for r in rows], color="tab:green", label="held-out Recall@1")
    right.set_ylabel("held-out Recall@1", color="tab:green")
    fig.suptitle("embedder training")
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=110)
    plt.close(fig)
