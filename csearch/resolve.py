"""Which models a config needs: model names resolved to files (recorded by sha256 in every index),
the models loaded, and an index's recorded config read back."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from .config import Config, config_from_dict
from .errors import ConfigError, ModelMismatch

log = logging.getLogger("csearch")

# what an index written before a config key existed was built with (its meta lacks the key)
LEGACY_DEFAULTS = {"embed": {"views": "cutout"}, "classify": {"input": "cutout"}}


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


def load_models(config: Config) -> Models:
    from .localize import make_localizer
    from .models import load_extractor

    localizer = make_localizer(config.localize)
    extractor = load_extractor(config.embed.extractor, config.embed.weights, image_size=config.preprocess.image_size)
    classifier = None
    if config.classify.classifier:
        from .classify import Classifier

        classifier = Classifier.load(config.classify.classifier)
    return Models(localizer, extractor, classifier)


def describe_files(files: Iterable[Path]) -> list[dict]:
    from .models import file_sha256

    return [{"path": str(Path(f).resolve()), "sha256": file_sha256(f)} for f in files]


def verify_files(recorded: Sequence[dict]) -> None:
    """An index is only valid with the exact model files it was built with."""
    from .models import file_sha256

    for entry in recorded:
        path = Path(entry["path"])
        if not path.is_file():
            raise ModelMismatch(
                f"model file {path} recorded by the index is missing (moved or deleted); "
                f"put it back or rebuild the index"
            )
        if file_sha256(path) != entry["sha256"]:
            raise ModelMismatch(
                f"model file {path} changed since the index was built (sha256 differs); rebuild the index"
            )


def index_config(meta: dict) -> Config:
    """The config an index was built with; keys it predates take the values it was built with."""
    data = {section: dict(values) for section, values in meta["config"].items()}
    for section, values in LEGACY_DEFAULTS.items():
        for key, value in values.items():
            data.setdefault(section, {}).setdefault(key, value)
    return config_from_dict(data, notify_deprecated=False)


def resolve_config(config: Config) -> Config:
    """Replace model names/"imagenet" by the absolute files they resolve to, so an index records
    (and its queries reuse) exactly the files it was built with."""
    from .models import get_spec, resolve_weights

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
