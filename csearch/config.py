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
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 224  # extractor / classifier input side (the paper: 224)
    color: str = "rgb"  # rgb | gray (the paper: gray replicated to 3 channels)
    max_pixels: int = 40_000_000  # decompression-bomb guard: larger images are refused
    min_side: int = 8  # smaller images carry no usable detail
    work_side: int = 640  # images are downscaled to this longest side before localization


@dataclass(frozen=True)
class LocalizeConfig:
    backend: str = "u2net"  # none | classical | u2net
    model: Optional[str] = None  # U²-Net ONNX file (None: resolve u2netp.onnx, see `csearch models`)
    matting: str = "none"  # none | pymatting | fba (pymatting: no retrieval gain measured, +70 ms/image)
    matting_model: Optional[str] = None  # FBA ONNX file, for matting=fba
    input_size: int = 320  # U²-Net input side (320 as trained; 256/224 faster, less accurate)
    threads: Optional[int] = None  # ONNX Runtime intra-op threads per localizer (None: 1)
    threshold: float = 0.5  # alpha above this is object
    band: int = 11  # width in px of the trimap's unknown band (matting cost grows with it)
    crop: bool = True  # crop the cut-out to the object's box before feature extraction
    margin: float = 0.05  # box margin, as a fraction of the box's longer side


@dataclass(frozen=True)
class EmbedConfig:
    extractor: str = "efficientnet_lite0"  # registry name (`csearch models`); measured best, retrieval.md
    weights: Optional[str] = "imagenet"  # imagenet | none | a file path
    batch_size: int = 32
    normalize: bool = True  # L2-normalise vectors (Euclidean on unit vectors ~ cosine)
    # cutout | cutout+photo: also embed the whole photo and search both views at once (measured
    # best on average, and far better without a classifier: docs/results/retrieval.md)
    views: str = "cutout+photo"
    photo_weight: float = 0.5  # cutout+photo: share of the whole photo in the squared distance


@dataclass(frozen=True)
class ClassifyConfig:
    classifier: Optional[str] = None  # RUN_DIR of `python -m csearch.train classifier`
    top_n: int = 1  # search the top-n predicted categories
    input: str = "photo"  # what the classifier sees: photo (measured best) | cutout (the paper)


@dataclass(frozen=True)
class SearchConfig:
    k: int = 5
    restrict: bool = True  # restrict to the predicted category when the index has a classifier
    rerank: str = "none"  # none | iou | fused | iou_crop | fused_crop (see csearch.search)
    rerank_top: int = 10  # how many KNN candidates the re-ranker re-orders
    rerank_weight: float = 0.5  # fused: weight of the IoU term
    mask_size: int = 64  # masks are compared at mask_size x mask_size
    engine: str = "numpy"  # numpy | faiss | auto (exact either way; numpy measured fastest on 2 cores)


@dataclass(frozen=True)
class Config:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    localize: LocalizeConfig = field(default_factory=LocalizeConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _closest(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(close)}?" if close else f" Valid: {', '.join(sorted(valid))}"


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type (strings from the CLI included)."""
    hint = annotation if not isinstance(annotation, str) else eval(annotation, vars(typing))  # noqa: S307
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
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


def _update_section(section: Any, values: Mapping[str, Any], prefix: str) -> Any:
    known = {f.name: f for f in fields(section)}
    changes = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{prefix}{key}'.{_closest(key, known)}")
        changes[key] = _coerce(value, known[key].type, prefix + key)
    return replace(section, **changes)


def merge(config: Config, values: Mapping[str, Any]) -> Config:
    """Apply nested ({"embed": {...}}) or dotted ({"embed.extractor": ...}) values."""
    sections: dict[str, dict] = {}
    for key, value in values.items():
        if "." in key:
            head, tail = key.split(".", 1)
            sections.setdefault(head, {})[tail] = value
        elif isinstance(value, Mapping):
            sections.setdefault(key, {}).update(value)
        else:
            raise ConfigError(f"config key {key!r} needs a section, e.g. embed.{key}")
    known = {f.name for f in fields(config)}
    changes = {}
    for name, section_values in sections.items():
        if name not in known:
            raise ConfigError(f"unknown config section {name!r}.{_closest(name, known)}")
        changes[name] = _update_section(getattr(config, name), section_values, name + ".")
    return replace(config, **changes)


def load_config(path: Optional[str | Path] = None, overrides: Optional[Mapping[str, Any]] = None,
                base: Optional[Config] = None) -> Config:
    """Defaults (or `base`), then the YAML file, then overrides (None values are ignored)."""
    config = base or Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}".splitlines()[0]) from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        config = merge(config, data)
    if overrides:
        config = merge(config, {k: v for k, v in overrides.items() if v is not None})
    return config


def config_from_dict(data: Mapping[str, Any]) -> Config:
    return merge(Config(), data)


def save_config(config: Config, path: str | Path, extra: Optional[Mapping[str, Any]] = None) -> None:
    """Write the resolved config as YAML (plus optional extra top-level keys, e.g. the command)."""
    data = config.to_dict()
    if extra:
        data = {**extra, **data}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
