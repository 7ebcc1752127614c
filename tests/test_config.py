import logging
import re

import pytest

from csearch.config import (
    Config,
    LocalizeConfig,
    SearchConfig,
    allowed_values,
    bounds,
    describe_allowed,
    load_config,
    save_config,
)
from csearch.errors import ConfigError


def test_defaults_round_trip_through_yaml(tmp_path):
    config = load_config(overrides={"embed.extractor": "resnet50", "search.k": "7"})
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config
    assert config.search.k == 7 and config.embed.extractor == "resnet50"


def test_flags_override_file(tmp_path):
    (tmp_path / "c.yaml").write_text("embed: {extractor: mobilenetv2, batch_size: 8}\nsearch: {k: 3}\n")
    config = load_config(tmp_path / "c.yaml", {"search.k": 9, "embed.weights": None})
    assert (config.embed.extractor, config.embed.batch_size, config.search.k) == ("mobilenetv2", 8, 9)
    assert config.embed.weights == Config().embed.weights  # None means "not given"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"embed.extracter": "x"}, "Did you mean extractor"),
        ({"serch.k": 1}, "Did you mean search"),
        ({"search.k": "many"}, "expects int"),
        ({"search.restrict": "maybe"}, "expects bool"),
        ({"k": 3}, "needs a section"),
    ],
)
def test_bad_keys_and_values_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(overrides=overrides)
    assert "\n" not in str(info.value)


def test_optional_and_bool_strings():
    config = load_config(overrides={"classify.classifier": "none", "search.restrict": "off"})
    assert config.classify.classifier is None and config.search.restrict is False


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "bad.yaml")


def test_docs_config_lists_every_key_with_its_default():
    """docs/config.md is the users' reference: every key, with the default the code has."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    sections = {m.group(1): m.start() for m in re.finditer(r"^## (\w+)$", text, re.M)}
    data = Config().to_dict()
    assert set(sections) == set(data)
    starts = sorted(sections.values()) + [len(text)]
    for name, start in sections.items():
        body = text[start : starts[starts.index(start) + 1]]
        rows = {
            key: (default, allowed)
            for key, default, allowed in re.findall(r"^\| `(\w+)` \| ([^|]+) \| ([^|]+) \|", body, re.M)
        }
        assert set(rows) == set(data[name]), name
        for key, (_, allowed) in rows.items():
            assert allowed.strip() == describe_allowed(f"{name}.{key}"), f"{name}.{key}: docs say {allowed.strip()!r}"
        for key, value in data[name].items():
            shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            default = rows[key][0].strip()
            assert default == shown, f"{name}.{key}: docs say {default}, code has {shown}"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"search.k": "0"}, "'search.k' must be >= 1 and <= 100, got 0"),
        ({"search.k": 100_000}, "<= 100"),
        ({"search.rerank": "ioux"}, "search.rerank 'ioux'. Did you mean iou"),
        ({"search.rerank_top": 0}, "'search.rerank_top' must be >= 1"),
        ({"localize.input_size": 100}, "multiple of 32"),
        ({"localize.method": "u2nett"}, "Valid: classical, none, u2net"),
        ({"embed.views": "both"}, "Valid: cutout, cutout+photo"),
        ({"localize.threshold": 1.0}, "> 0 and < 1"),
    ],
)
def test_values_are_checked_against_the_schema(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message) if "Did" not in message else message) as info:
        load_config(overrides=overrides)
    assert "\n" not in str(info.value)


def test_sections_validate_themselves_however_they_are_built():
    # dataclasses.replace, direct construction and YAML share the one set of rules
    from dataclasses import replace

    with pytest.raises(ConfigError, match="search.k"):
        replace(SearchConfig(), k=0)
    with pytest.raises(ConfigError, match="localize.matting"):
        LocalizeConfig(matting="fab")


def test_the_schema_feeds_choices_and_bounds():
    assert allowed_values("search.rerank") == ("none", "iou", "fused", "iou_crop", "fused_crop", "geometric")
    assert bounds("search.k")["le"] == 100
    with pytest.raises(ConfigError, match="no fixed set"):
        allowed_values("search.k")
    import argparse

    from csearch.console import add_model_flags

    parser = argparse.ArgumentParser()
    add_model_flags(parser)
    localizer = next(a for a in parser._actions if a.dest == "localizer")
    assert tuple(localizer.choices) == allowed_values("localize.method")


def test_a_renamed_key_loads_with_a_one_line_notice(tmp_path, caplog):
    (tmp_path / "old.yaml").write_text("localize: {backend: classical}\n")
    with caplog.at_level(logging.WARNING, logger="csearch"):
        config = load_config(tmp_path / "old.yaml", overrides={"localize.backend": "none"})
    assert config.localize.method == "none"
    notices = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(notices) == 2 and all("'localize.backend'" in n and "'localize.method'" in n for n in notices)
    with pytest.raises(ConfigError, match="both given"):
        load_config(overrides={"localize.backend": "none", "localize.method": "u2net"})


def test_an_index_recorded_with_the_old_key_migrates_quietly(caplog):
    from csearch.pipeline import index_config

    meta = {"config": {"localize": {"backend": "classical"}, "embed": {"views": "cutout"}, "classify": {}}}
    with caplog.at_level(logging.WARNING, logger="csearch"):
        assert index_config(meta).localize.method == "classical"
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
