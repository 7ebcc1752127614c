"""Which models a config needs: model names resolved to files (recorded by sha256 in every index),
the models loaded, and an index's recorded config read back. A recorded file is found again by
its name and sha256 wherever the index and the model folder have moved (`locate_files`), and an
index carries a copy of its trained classifier (`carry_classifier`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from .config import Config, config_from_dict
from .errors import ConfigError, ModelMismatch

log = logging.getLogger("csearch")

# what an index written before a config key existed was built with (its meta lacks the key)
LEGACY_DEFAULTS = {"embed": {"views": "cutout"}, "classify": {"input": "cutout"}}
# config keys naming model files or folders (embed.extractor only when it is an .onnx file)
MODEL_PATH_KEYS = (
    "embed.extractor",
    "embed.embedder",
    "embed.weights",
    "localize.model",
    "localize.matting_model",
    "classify.classifier",
)
CARRIED_MODELS = "models"  # INDEX_DIR/models: the trained models an index carries
CARRIED_CLASSIFIER = Path(CARRIED_MODELS) / "classifier"
CARRIED_EMBEDDER = Path(CARRIED_MODELS) / "embedder"
EMBEDDER_FILES = ("embedder.onnx", "embedder.json", "products.json")  # what queries read of an embedder RUN_DIR


@dataclass
class Models:
    """The models a config needs, loaded once."""

    localizer: object
    extractor: object
    classifier: Optional[object] = None

    def files(self) -> list[Path]:
        found = []
        for model in (self.localizer, self.extractor, self.classifier):
            found.extend(Path(f) for f in (getattr(model, "files", None) or []))
        return found


def query_threads(workers: int = 1) -> int:
    """ONNX Runtime threads for the localizer of each of `workers` query streams: the cores shared
    among them. One query stream on 2 cores localizes in 150 ms with 2 threads against 210 ms with
    1, with identical masks (docs/results/query_speed.md); indexing keeps 1 thread per worker thread."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def load_models(
    config: Config, localizer_threads: Optional[int] = None, only: Optional[Iterable[str]] = None
) -> Models:
    """The models `config` names. `localize.threads`, when set, wins over `localizer_threads` (the
    caller's policy; None: the localizer's own default, 1). `only` loads just those of "localizer",
    "extractor", "classifier" (the others are None): a Ray indexing actor loads its one model."""
    from .localize import make_localizer
    from .models import load_extractor

    wanted = {"localizer", "extractor", "classifier"} if only is None else set(only)
    if config.embed.embedder:
        config = with_embedder(config)
    localizer = extractor = classifier = None
    if "localizer" in wanted:
        localizer = make_localizer(config.localize, threads=config.localize.threads or localizer_threads)
    if "extractor" in wanted:
        extractor = load_extractor(
            config.embed.extractor, config.embed.weights, image_size=config.preprocess.image_size
        )
    if config.classify.classifier and "classifier" in wanted:
        from .classify import Classifier

        classifier = Classifier.load(config.classify.classifier)
    return Models(localizer, extractor, classifier)


def describe_files(files: Iterable[Path]) -> list[dict]:
    from .models import file_sha256

    return [{"path": str(Path(f).resolve()), "sha256": file_sha256(f)} for f in files]


def locate_files(recorded: Sequence[dict], index_dir: Optional[Path] = None) -> dict[str, Path]:
    """Where each model file an index recorded is now: {recorded path: file with its bytes}.

    A file is found by its name and accepted only with the recorded sha256, looked for at the
    recorded path, then in INDEX_DIR/models (the trained models an index carries), then in
    $CSEARCH_HOME and Keras' cache. So an index and its model folder can move (or be copied to
    another machine), while a changed model is still refused."""
    from .models import file_sha256

    found = {}
    for entry in recorded:
        path, sha256 = Path(entry["path"]), entry["sha256"]
        places = _search_places(path, index_dir)
        others = []
        for candidate in _candidates(path, places):
            if file_sha256(candidate) == sha256:
                found[entry["path"]] = candidate
                break
            others.append(candidate)
        else:
            looked = ", ".join(str(folder) for folder, _ in places)
            if others:
                raise ModelMismatch(
                    f"model file {path.name} changed since the index was built: {others[0]} has another sha256 "
                    f"(looked in: {looked}); put back the file the index was built with, or rebuild the index"
                )
            raise ModelMismatch(
                f"model file {path.name} recorded by the index is missing (looked in: {looked}); put it back "
                f"(or in $CSEARCH_HOME){_origin_hint(path.name)}, or rebuild the index"
            )
    return found


def _origin_hint(file_name: str) -> str:
    from .models import REGISTRY

    names = [spec.name for spec in REGISTRY.values() if file_name in (spec.weights_file, spec.keras_file)]
    return f" (`csearch models fetch {names[0]}` gets it)" if names else ""


def _search_places(recorded: Path, index_dir: Optional[Path]) -> list[tuple[Path, bool]]:
    """(folder, searched in depth) in the order a recorded model file is looked for."""
    from .models import csearch_home, keras_cache_dir

    places = [(recorded.parent, False)]
    if index_dir is not None:
        places.append((Path(index_dir) / CARRIED_MODELS, True))
    return places + [(csearch_home(), False), (keras_cache_dir(), False)]


def _candidates(recorded: Path, places: Sequence[tuple[Path, bool]]) -> Iterable[Path]:
    """The existing files named like `recorded` in `places`, each once."""
    seen = set()
    for folder, deep in places:
        files = sorted(folder.rglob(recorded.name)) if deep and folder.is_dir() else [folder / recorded.name]
        for file in files:
            if file.is_file() and file.resolve() not in seen:
                seen.add(file.resolve())
                yield file


def locate_config(config: Config, found: dict[str, Path]) -> Config:
    """`config` with every model file (or model folder, e.g. a classifier RUN_DIR) the index
    recorded replaced by where `locate_files` found it."""
    changes: dict[str, dict] = {}
    for key in MODEL_PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        moved = _located(value, found) if value else value
        if moved != value:
            changes.setdefault(section, {})[name] = moved
    sections = {section: replace(getattr(config, section), **values) for section, values in changes.items()}
    return replace(config, **sections)


def _located(value: str, found: dict[str, Path]) -> str:
    if value in found:
        return str(found[value])
    # a model folder: where the files recorded inside it were found (together, or it is refused)
    folders = {str(found[p].parent) for p in found if Path(p).parent == Path(value)}
    if len(folders) > 1:
        raise ModelMismatch(
            f"the files of {value} were found in different folders ({', '.join(sorted(folders))}); "
            f"keep them in one folder, or rebuild the index"
        )
    return folders.pop() if folders else value


def build_identity(meta: dict) -> tuple:
    """What makes two index builds the same: the settings (model locations aside) and the
    sha256 of every model file. A build resumes only into an index with the same identity."""
    config = index_config(meta).to_dict()
    for key in MODEL_PATH_KEYS:
        section, name = key.split(".")
        value = config[section][name]
        if value and (key != "embed.extractor" or value.endswith(".onnx")):
            config[section][name] = "<file>"
    return config, sorted(entry["sha256"] for entry in meta.get("models", []))


def carried_classifier(index_dir: str | Path) -> Path:
    """Where an index keeps the copy of its trained classifier: INDEX_DIR/models/classifier."""
    return (Path(index_dir) / CARRIED_CLASSIFIER).resolve()


def carry_classifier(run_dir: str | Path, classifier, index_dir: str | Path) -> Path:
    """Copy a trained classifier's files from its RUN_DIR into `carried_classifier(index_dir)`,
    each atomically and only if not there already, so the index carries it. The copy holds what
    `Classifier.load` reads: the model file it runs, classes.json, config.yaml and, for an ONNX
    model, export.json (which says the ONNX file is current). Returns the copy's folder."""
    from .classify import CONFIG_FILE, EXPORT_FILE
    from .models import file_sha256
    from .store.durable import fsync_dir, write_bytes_atomic

    source, target = Path(run_dir), carried_classifier(index_dir)
    if source.resolve() == target:
        return target
    names = [Path(f).name for f in classifier.files] + [CONFIG_FILE]
    if getattr(classifier, "runtime", None) == "onnx" and (source / EXPORT_FILE).is_file():
        names.append(EXPORT_FILE)
    for folder in (target.parent, target):
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(folder.parent)
    for stale in target.iterdir():  # e.g. an older model.keras, which Classifier.load would prefer
        if stale.name not in names and stale.is_file():
            stale.unlink()
    for name in names:
        copy = target / name
        if not (copy.is_file() and file_sha256(copy) == file_sha256(source / name)):
            write_bytes_atomic(copy, (source / name).read_bytes())
    return target


def carried_embedder(index_dir: str | Path) -> Path:
    """Where an index keeps the copy of its learned embedder: INDEX_DIR/models/embedder."""
    return (Path(index_dir) / CARRIED_EMBEDDER).resolve()


def record_carried_embedder(config: Config, files: list[dict], index_dir: Path) -> tuple[Config, list[dict]]:
    """(config, model files) as an index records them when it carries its embedder: both name the
    copy in INDEX_DIR/models/embedder, so the index keeps working when the RUN_DIR goes away."""
    copy = carried_embedder(index_dir)
    model = str(Path(config.embed.extractor).resolve())
    embed = replace(config.embed, embedder=str(copy), extractor=str(copy / Path(model).name))
    files = [{**f, "path": str(copy / Path(f["path"]).name)} if f["path"] == model else f for f in files]
    return replace(config, embed=embed), files


def carry_embedder(run_dir: str | Path, index_dir: str | Path) -> Path:
    """Copy what queries read of an embedder RUN_DIR into `carried_embedder(index_dir)`, each file
    atomically and only if not there already. Returns the copy's folder."""
    from .models import file_sha256
    from .store.durable import fsync_dir, write_bytes_atomic

    source, target = Path(run_dir), carried_embedder(index_dir)
    if source.resolve() == target:
        return target
    for folder in (target.parent, target):
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(folder.parent)
    for name in EMBEDDER_FILES:
        copy = target / name
        if (source / name).is_file() and not (copy.is_file() and file_sha256(copy) == file_sha256(source / name)):
            write_bytes_atomic(copy, (source / name).read_bytes())
    return target


def index_config(meta: dict) -> Config:
    """The config an index was built with; keys it predates take the values it was built with."""
    data = {section: dict(values) for section, values in meta["config"].items()}
    for section, values in LEGACY_DEFAULTS.items():
        for key, value in values.items():
            data.setdefault(section, {}).setdefault(key, value)
    return config_from_dict(data, notify_deprecated=False)


def with_embedder(config: Config) -> Config:
    """`config` with the extractor replaced by the embedder's model and its image size. The
    embedder fixes both: another one given beside it is an error, not silently ignored (the
    defaults give way)."""
    from .config import default_value
    from .embedder.run import read_embedder

    run = read_embedder(config.embed.embedder)
    extractor = config.embed.extractor
    if extractor not in (default_value("embed.extractor"), run.extractor, str(run.model)) and Path(
        extractor
    ).name not in (run.extractor, run.model.name):
        raise ConfigError(
            f"the embedder {run.folder} was trained on {run.extractor} and fixes the extractor; "
            f"drop --extractor {extractor} (or train an embedder on it)"
        )
    size = config.preprocess.image_size
    if size != run.image_size and size != default_value("preprocess.image_size"):
        raise ConfigError(
            f"the embedder {run.folder} takes {run.image_size} px images; drop --image-size "
            f"{config.preprocess.image_size} (preprocess.image_size)"
        )
    embed = replace(config.embed, extractor=str(run.model), weights=None, embedder=str(run.folder))
    return replace(config, embed=embed, preprocess=replace(config.preprocess, image_size=run.image_size))


def resolve_config(config: Config) -> Config:
    """Replace model names/"imagenet" by the absolute files they resolve to, so an index records
    (and its queries reuse) exactly the files it was built with."""
    from .models import get_spec, resolve_weights

    if config.embed.embedder:
        config = with_embedder(config)
    localize, embed = config.localize, config.embed
    if embed.extractor.endswith(".onnx"):  # an exported extractor file carries its own weights
        embed = replace(embed, extractor=str(Path(embed.extractor).expanduser().resolve()), weights=None)
    else:
        get_spec(embed.extractor)  # unknown names fail here, listing the valid ones
        weights = resolve_weights(embed.extractor, embed.weights)
        if weights is None:
            raise ConfigError(
                f"extractor {embed.extractor!r} has no weights (weights: {embed.weights}); an index "
                f"needs fixed weights: pass 'imagenet' or a weights file"
            )
        embed = replace(embed, weights=str(Path(weights).resolve()))
    if localize.method == "u2net" and not localize.model:
        localize = replace(localize, model=str(resolve_weights("u2netp", "imagenet")))
    if localize.matting == "fba" and not localize.matting_model:
        localize = replace(localize, matting_model=str(resolve_weights("fba", "imagenet")))
    for field_name in ("model", "matting_model"):
        value = getattr(localize, field_name)
        if value:
            localize = replace(localize, **{field_name: str(Path(value).expanduser().resolve())})
    classify = config.classify
    if classify.classifier:
        classify = replace(classify, classifier=str(Path(classify.classifier).expanduser().resolve()))
    return replace(config, localize=localize, embed=embed, classify=classify)
