import pytest

from csearch.config import Config, load_config, save_config
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
    bounds = sorted(sections.values()) + [len(text)]
    for name, start in sections.items():
        body = text[start : bounds[bounds.index(start) + 1]]
        rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", body, re.M))
        assert set(rows) == set(data[name]), name
        for key, value in data[name].items():
            shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            assert rows[key].strip() == shown, f"{name}.{key}: docs say {rows[key].strip()}, code has {shown}"
