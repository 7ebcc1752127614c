"""Per-stage configuration: frozen dataclasses, loaded from YAML plus overrides.

A config file mirrors the dataclasses, one section per stage::

    localize: {backend: u2net, matting: pymatting}
    embed: {extractor: mobilenet, batch_size: 32}

Overrides use dotted keys (``{"embed.extractor": "resnet50"}``). An unknown section or key is
an error that names the closest valid keys. The resolved config is written beside every output
(`save_config`) so any result can be rerun.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import ConfigError, unknown_name

log = logging.getLogger("csearch")

Color = Literal["rgb", "gray"]
LocalizeMethod = Literal["none", "classical", "u2net"]
Matting = Literal["none", "pymatting", "fba"]
Views = Literal["cutout", "cutout+photo"]
ClassifierInput = Literal["photo", "cutout"]
Rerank = Literal["none", "iou", "fused", "iou_crop", "fused_crop", "geometric"]
KnnEngine = Literal["numpy", "faiss", "auto"]
AnnIndex = Literal["none", "hnsw", "ivf"]
LocalFeatures = Literal["orb", "sift"]

# old key -> new key: the old one still loads, with a one-line deprecation notice
RENAMED_KEYS = {"localize.backend": "localize.method"}  # "backend" named four different things

MAX_K = 100  # results per query, as the HTTP API allows
MAX_RERANK_TOP = 1000


def bounded(
    default: Any,
    *,
    ge: Optional[float] = None,
    le: Optional[float] = None,
    gt: Optional[float] = None,
    lt: Optional[float] = None,
    multiple_of: Optional[int] = None,
) -> Any:
    """A dataclass field with declared bounds, checked whenever a config is built."""
    return field(default=default, metadata={"ge": ge, "le": le, "gt": gt, "lt": lt, "multiple_of": multiple_of})


class _Section:
    """Base of every config section: validates its own values on construction (so `replace`,
    YAML, `--set`, CLI flags, HTTP parameters and index loading share one set of rules)."""

    def __post_init__(self) -> None:
        for spec in fields(self):
            _check_value(self, spec)


@dataclass(frozen=True)
class PreprocessConfig(_Section):
    image_size: int = bounded(224, ge=32, le=2048)  # extractor / classifier input side (the paper: 224)
    color: Color = "rgb"  # rgb | gray (the paper: gray replicated to 3 channels)
    max_pixels: int = bounded(40_000_000, ge=1)  # decompression-bomb guard: larger images are refused
    min_side: int = bounded(8, ge=1)  # smaller images carry no usable detail
    work_side: int = bounded(640, ge=32)  # images are downscaled to this longest side before localization


@dataclass(frozen=True)
class LocalizeConfig(_Section):
    method: LocalizeMethod = "u2net"  # none | classical | u2net (was `backend`, still read with a notice)
    model: Optional[str] = None  # U²-Net ONNX file (None: resolve u2netp.onnx, see `csearch models`)
    matting: Matting = "none"  # none | pymatting | fba (pymatting: no retrieval gain measured, +70 ms/image)
    matting_model: Optional[str] = None  # FBA ONNX file, for matting=fba
    # U²-Net input side (320 as trained; 256/224 faster, less accurate); its five 2x poolings need
    # a multiple of 32
    input_size: int = bounded(320, ge=64, le=1024, multiple_of=32)
    threads: Optional[int] = bounded(None, ge=1)  # ONNX Runtime intra-op threads per localizer (None: 1)
    threshold: float = bounded(0.5, gt=0.0, lt=1.0)  # alpha above this is object
    band: int = bounded(11, ge=1, le=255)  # width in px of the trimap's unknown band (matting cost grows with it)
    crop: bool = True  # crop the cut-out to the object's box before feature extraction
    margin: float = bounded(0.05, ge=0.0, le=1.0)  # box margin, as a fraction of the box's longer side


@dataclass(frozen=True)
class EmbedConfig(_Section):
    # a registry name (`csearch models`) or an exported .onnx file; measured best, retrieval.md
    extractor: str = "efficientnet_lite0"
    weights: Optional[str] = "imagenet"  # imagenet | none | a file path
    batch_size: int = bounded(32, ge=1, le=4096)
    normalize: bool = True  # L2-normalise vectors (Euclidean on unit vectors ~ cosine)
    # cutout | cutout+photo: also embed the whole photo and search both views at once (measured
    # best on average, and far better without a classifier: docs/results/retrieval.md)
    views: Views = "cutout+photo"
    photo_weight: float = bounded(0.5, gt=0.0, lt=1.0)  # cutout+photo: share of the whole photo in the distance
    # RUN_DIR of `python -m csearch.train embedder`: a product embedding learned from the catalogue's
    # labels; it fixes the extractor and the image size (None: the frozen extractor's features)
    embedder: Optional[str] = None


@dataclass(frozen=True)
class ClassifyConfig(_Section):
    classifier: Optional[str] = None  # RUN_DIR of `python -m csearch.train classifier`
    top_n: int = bounded(1, ge=1)  # search the top-n predicted categories
    input: ClassifierInput = "photo"  # what the classifier sees: photo (measured best) | cutout (the paper)


@dataclass(frozen=True)
class SearchConfig(_Section):
    k: int = bounded(5, ge=1, le=MAX_K)
    restrict: bool = True  # restrict to the predicted category when the index has a classifier
    rerank: Rerank = "none"  # none | iou | fused | iou_crop | fused_crop (see csearch.search)
    rerank_top: int = bounded(10, ge=1, le=MAX_RERANK_TOP)  # how many KNN candidates the re-ranker re-orders
    rerank_weight: float = bounded(0.5, ge=0.0, le=1.0)  # fused: weight of the IoU term
    mask_size: int = bounded(64, ge=8, le=512)  # masks are compared at mask_size x mask_size
    # the exact KNN engine: numpy | faiss | auto (exact either way; numpy measured fastest on 2 cores)
    engine: KnnEngine = "numpy"
    # rerank: geometric (csearch.geometric). The local features and their number are fixed when the
    # index is built with rerank: geometric; min_inliers may change per query
    geometric_features: LocalFeatures = "sift"  # orb | sift (4-bit RootSIFT); measured, docs/results/geometric.md
    keypoints: int = bounded(512, ge=16, le=4096)  # most keypoints kept per image
    min_inliers: int = bounded(10, ge=4, le=4096)  # RANSAC inliers that verify a candidate


@dataclass(frozen=True)
class StoreConfig(_Section):
    # where the items live: local (the index folder) | milvus-lite:PATH (relative to INDEX_DIR) |
    # milvus://HOST:PORT/COLLECTION; credentials never go here (see csearch.store)
    uri: str = "local"
    # approximate search for large unfiltered queries in the local store (FAISS); category-restricted
    # searches stay exact
    ann: AnnIndex = "none"


@dataclass(frozen=True)
class Config:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    localize: LocalizeConfig = field(default_factory=LocalizeConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- the schema


def _hint(section: Any, name: str) -> Any:
    return typing.get_type_hints(type(section))[name]


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(the type without Optional, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
        return next(a for a in typing.get_args(hint) if a is not type(None)), True
    return hint, False


def _key(section: Any, name: str) -> str:
    prefix = getattr(section, "_key_prefix", None) or _SECTION_NAMES.get(type(section), "")
    return f"{prefix}.{name}" if prefix else name


def _check_value(section: Any, spec: dataclasses.Field) -> None:
    value = getattr(section, spec.name)
    base, optional = _base_type(_hint(section, spec.name))
    key = _key(section, spec.name)
    if value is None:
        if optional:
            return
        raise ConfigError(f"config key {key!r} must not be empty")
    if typing.get_origin(base) is Literal:
        if value not in typing.get_args(base):
            raise unknown_name(f"value for {key}", value, typing.get_args(base))
        return
    limits = spec.metadata
    if not limits or isinstance(value, bool):
        return
    described = _describe_bounds(limits)
    if (
        (limits["ge"] is not None and value < limits["ge"])
        or (limits["le"] is not None and value > limits["le"])
        or (limits["gt"] is not None and value <= limits["gt"])
        or (limits["lt"] is not None and value >= limits["lt"])
    ):
        raise ConfigError(f"config key {key!r} must be {described}, got {value!r}")
    if limits["multiple_of"] and value % limits["multiple_of"]:
        raise ConfigError(f"config key {key!r} must be a multiple of {limits['multiple_of']}, got {value!r}")


def _describe_bounds(limits: Mapping[str, Any]) -> str:
    parts = [
        f"{word} {limits[name]:g}"
        for name, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
        if limits.get(name) is not None
    ]
    return " and ".join(parts)


def _field(key: str) -> tuple[Any, dataclasses.Field]:
    section_name, _, name = key.partition(".")
    section = {f.name: f for f in fields(Config)}.get(section_name)
    if section is None:
        raise ConfigError(
            f"unknown config section {section_name!r}.{_closest(section_name, [f.name for f in fields(Config)])}"
        )
    section_type = section.default_factory
    known = {f.name: f for f in fields(section_type)}
    if name not in known:
        raise ConfigError(f"unknown config key {key!r}.{_closest(name, known)}")
    return section_type, known[name]


def allowed_values(key: str) -> tuple[str, ...]:
    """The values a Literal config key accepts, e.g. allowed_values("search.rerank"): the one list
    that the CLI choices, the HTTP validation and the pipeline use."""
    section_type, spec = _field(key)
    base, _ = _base_type(typing.get_type_hints(section_type)[spec.name])
    if typing.get_origin(base) is not Literal:
        raise ConfigError(f"config key {key!r} takes no fixed set of values")
    return typing.get_args(base)


def bounds(key: str) -> dict:
    """The declared bounds of a numeric config key: {"ge": .., "le": .., "gt": .., "lt": ..} (None: unbounded)."""
    _, spec = _field(key)
    return {name: spec.metadata.get(name) for name in ("ge", "le", "gt", "lt", "multiple_of")}


def describe_allowed(key: str) -> str:
    """What a key accepts, in words, e.g. "`none`, `iou`" or "1 to 100" (docs/config.md shows it)."""
    section_type, spec = _field(key)
    base, optional = _base_type(typing.get_type_hints(section_type)[spec.name])
    if typing.get_origin(base) is Literal:
        words = ", ".join(f"`{value}`" for value in typing.get_args(base))
    elif base is bool:
        words = "true, false"
    elif spec.metadata:
        words = _describe_bounds(spec.metadata)
        if spec.metadata.get("multiple_of"):
            words += f", a multiple of {spec.metadata['multiple_of']}"
    else:
        words = "text"
    return words + (", null" if optional else "")


def default_value(key: str) -> Any:
    section_type, spec = _field(key)
    return getattr(section_type(), spec.name)


_SECTION_NAMES = {
    PreprocessConfig: "preprocess",
    LocalizeConfig: "localize",
    EmbedConfig: "embed",
    ClassifyConfig: "classify",
    SearchConfig: "search",
    StoreConfig: "store",
}


def _closest(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(close)}?" if close else f" Valid: {', '.join(sorted(valid))}"


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type (strings from the CLI included)."""
    base, optional = _base_type(annotation)
    if typing.get_origin(base) is Literal:
        base = str
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"config key {key!r} must not be empty")
    try:
        if base is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r} expects {base.__name__}, got {value!r}") from None
    return value


def update_section(section: Any, values: Mapping[str, Any], prefix: str) -> Any:
    """`section` (a frozen dataclass) with `values` coerced to its declared types and validated."""
    known = {f.name: f for f in fields(section)}
    hints = typing.get_type_hints(type(section))
    changes = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{prefix}{key}'.{_closest(key, known)}")
        changes[key] = _coerce(value, hints[key], prefix + key)
    return replace(section, **changes)


def _rename_deprecated(sections: dict[str, dict], notify: bool) -> None:
    """Move values given under a RENAMED_KEYS old name to the new one (a one-line notice)."""
    for old, new in RENAMED_KEYS.items():
        old_section, old_key = old.split(".")
        new_section, new_key = new.split(".")
        if old_key not in sections.get(old_section, {}):
            continue
        value = sections[old_section].pop(old_key)
        if new_key in sections.get(new_section, {}):
            raise ConfigError(f"config keys {old!r} (deprecated) and {new!r} are both given; keep only {new!r}")
        sections.setdefault(new_section, {})[new_key] = value
        if notify:
            log.warning("config key %r is deprecated; read as %r (rename it)", old, new)


def merge(config: Config, values: Mapping[str, Any], notify_deprecated: bool = True) -> Config:
    """Apply nested ({"embed": {...}}) or dotted ({"embed.extractor": ...}) values. Keys renamed
    since (RENAMED_KEYS) are read under their new name, with a one-line notice unless told not to
    (an index's recorded config is migrated quietly: the user cannot edit it)."""
    sections: dict[str, dict] = {}
    for key, value in values.items():
        if "." in key:
            head, tail = key.split(".", 1)
            sections.setdefault(head, {})[tail] = value
        elif isinstance(value, Mapping):
            sections.setdefault(key, {}).update(value)
        else:
            raise ConfigError(f"config key {key!r} needs a section, e.g. embed.{key}")
    _rename_deprecated(sections, notify_deprecated)
    known = {f.name for f in fields(config)}
    changes = {}
    for name, section_values in sections.items():
        if name not in known:
            raise ConfigError(f"unknown config section {name!r}.{_closest(name, known)}")
        changes[name] = update_section(getattr(config, name), section_values, name + ".")
    return replace(config, **changes)


def read_yaml_mapping(path: str | Path, what: str = "settings") -> dict:
    """A YAML file holding a mapping (empty file: {}), every problem a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".splitlines()[0]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping of {what}")
    return dict(data)


def load_config(
    path: Optional[str | Path] = None, overrides: Optional[Mapping[str, Any]] = None, base: Optional[Config] = None
) -> Config:
    """Defaults (or `base`), then the YAML file, then overrides (None values are ignored)."""
    config = base or Config()
    if path is not None:
        config = merge(config, read_yaml_mapping(path, "sections"))
    if overrides:
        config = merge(config, {k: v for k, v in overrides.items() if v is not None})
    return config


def config_from_dict(data: Mapping[str, Any], notify_deprecated: bool = True) -> Config:
    return merge(Config(), data, notify_deprecated)


def save_config(config: Config, path: str | Path, extra: Optional[Mapping[str, Any]] = None) -> None:
    """Write the resolved config as YAML (plus optional extra top-level keys, e.g. the command)."""
    data = config.to_dict()
    if extra:
        data = {**extra, **data}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
