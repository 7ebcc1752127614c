"""The `csearch` command: exit codes, one-line errors, stdout holding only JSON."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from csearch.cli import main


def tiny_flags(tiny_extractor):
    return [
        "--extractor",
        str(tiny_extractor),
        "--localizer",
        "classical",
        "--matting",
        "none",
        "--image-size",
        "32",
        "--batch-size",
        "4",
    ]


@pytest.fixture
def index_dir(tmp_path, tiny_catalogue, tiny_extractor, capfd):
    out = tmp_path / "idx"
    assert main(["index", str(tiny_catalogue), "--out", str(out), *tiny_flags(tiny_extractor)]) == 0
    capfd.readouterr()
    return out


def test_index_writes_resolved_config_and_json_summary(tmp_path, tiny_catalogue, tiny_extractor, capfd):
    out = tmp_path / "idx"
    code = main(["index", str(tiny_catalogue), "--out", str(out), "--json", *tiny_flags(tiny_extractor)])
    captured = capfd.readouterr()
    assert code == 0
    summary = json.loads(captured.out)
    assert summary["added"] == 12 and summary["failed"] == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["embed"]["extractor"] == str(tiny_extractor.resolve())
    assert config["command"].startswith("csearch index")


def test_query_json_is_the_only_stdout(index_dir, tiny_catalogue, capfd):
    image = next(tiny_catalogue.rglob("*.png"))
    assert main(["query", str(index_dir), str(image), "-k", "3", "--json"]) == 0
    out = capfd.readouterr().out
    assert out.count("\n") == 1
    result = json.loads(out)
    assert set(result) == {"category", "results", "timings_ms"} and len(result["results"]) == 3
    hit_keys = {"id", "path", "product", "category", "distance", "iou", "score", "missing"}
    assert set(result["results"][0]) == hit_keys and result["results"][0]["missing"] is False


def test_query_text_output_and_rerank_flag(index_dir, tiny_catalogue, capfd):
    image = next(tiny_catalogue.rglob("*.png"))
    assert main(["query", str(index_dir), str(image), "--rerank", "iou"]) == 0
    out = capfd.readouterr().out
    assert "category: (all)" in out and "timings (ms)" in out


def test_remove_then_add(index_dir, tiny_catalogue, capfd):
    assert main(["remove", str(index_dir), "0", "1", "--json"]) == 0
    assert json.loads(capfd.readouterr().out) == {"removed": 2, "items": 10}
    assert main(["add", str(index_dir), str(tiny_catalogue), "--json"]) == 0
    assert json.loads(capfd.readouterr().out)["items"] == 12


@pytest.mark.parametrize(
    "argv, message",
    [
        (["query", "{index}", "{missing}"], "file not found"),
        (["query", "{index}", "{bad}"], "not an image"),
        (["query", "{missing}", "{bad}"], "index"),
        (["remove", "{index}", "999"], "999"),
        (["index", "{missing}", "--out", "{out}"], "catalogue not found"),
        (["index", "{catalogue}", "--out", "{out}", "--extractor", "resnet5"], "Did you mean"),
        (["index", "{catalogue}", "--out", "{out}", "--set", "embed.batchsize=3"], "Did you mean batch_size"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(argv, message, index_dir, tiny_catalogue, tmp_path, capfd):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"no image here")
    values = {
        "index": index_dir,
        "missing": tmp_path / "missing.jpg",
        "bad": bad,
        "out": tmp_path / "o",
        "catalogue": tiny_catalogue,
    }
    code = main([a.format(**values) for a in argv])
    captured = capfd.readouterr()
    assert code == 2 and captured.out == ""
    lines = [line for line in captured.err.splitlines() if line.startswith("csearch: error")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in captured.err


def test_help_lists_subcommands():
    result = subprocess.run([sys.executable, "-m", "csearch", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("index", "query", "add", "remove", "serve", "export", "models", "demo"):
        assert command in result.stdout


def test_models_lists_the_registry(capfd):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capfd.readouterr().out)
    assert {"resnet50", "mobilenet", "mobilenetv2", "efficientnetv2l", "resnet101v2", "u2netp"} <= {
        r["name"] for r in rows
    }


# --------------------------------------------------------------------------- the CLI rejects what the API rejects


def run_cli(*argv, home):
    env = {**os.environ, "CSEARCH_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "csearch", *map(str, argv)], capture_output=True, text=True, env=env)


def error_line(result) -> str:
    """The one `csearch: error:` line of a run that failed with exit code 2 and no traceback."""
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("csearch: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def cli(tmp_path_factory, tiny_extractor):
    """A tiny index built through the CLI, a copy of it whose model file is gone (anything that
    loads its models fails), a catalogue image and an empty CSEARCH_HOME."""
    from tests.conftest import write_catalogue

    root = tmp_path_factory.mktemp("cli")
    catalogue = write_catalogue(root / "catalogue")
    home = root / "home"
    home.mkdir()
    index = root / "idx"
    assert run_cli("index", catalogue, "--out", index, *tiny_flags(tiny_extractor), home=home).returncode == 0
    broken = root / "broken"
    shutil.copytree(index, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["meta"]["models"] = [{"path": str(root / "gone" / "model.onnx"), "sha256": "0" * 64}]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    image = next(catalogue.rglob("*.png"))
    return {"index": index, "broken": broken, "image": image, "catalogue": catalogue, "home": home, "root": root}


def test_the_broken_index_fails_when_its_models_load(cli):
    # what the next test relies on: whatever loads the broken index's models fails
    assert "model.onnx recorded by the index is missing" in error_line(
        run_cli("query", cli["broken"], cli["image"], home=cli["home"])
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["query", "{broken}", "{image}", "-k", "0"], "'search.k' must be >= 1 and <= 100, got 0"),
        (["query", "{broken}", "{image}", "-k", "-3"], "'search.k' must be >= 1 and <= 100, got -3"),
        (["query", "{broken}", "{image}", "--set", "search.k=0"], "'search.k' must be >= 1 and <= 100, got 0"),
        (["query", "{broken}", "{image}", "-k", "100000"], "'search.k' must be >= 1 and <= 100, got 100000"),
        (["query", "{broken}", "{image}", "--rerank-top", "0"], "'search.rerank_top' must be >= 1"),
        (["query", "{broken}", "{image}", "--set", "search.rerank=ioux"], "Did you mean iou?"),
        (["query", "{broken}", "{image}", "--set", "embed.extractor=mobilenet"], "only search.* settings"),
        (["query", "{broken}", "{image}", "--set", "localize.input_size=100"], "only search.* settings"),
        (["query", "{broken}", "{root}/missing.jpg"], "missing.jpg: file not found"),
        (["add", "{broken}", "{root}/missing-catalogue"], "catalogue not found"),
    ],
)
def test_query_and_add_check_their_input_before_loading_models(cli, argv, message):
    line = error_line(run_cli(*[a.format(**cli) for a in argv], home=cli["home"]))
    assert message in line and "recorded by the index" not in line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--category", "Nope"], "unknown category 'Nope'. Valid: bottle, jar"),
        (["--restrict", "on"], "search.restrict needs an index built with a classifier"),
        (["--set", "search.restrict=true"], "search.restrict needs an index built with a classifier"),
        (["--set", "search.mask_size=32", "--rerank", "iou"], "search.mask_size is fixed by the index"),
    ],
)
def test_query_refuses_what_the_index_cannot_answer(cli, argv, message):
    assert message in error_line(run_cli("query", cli["index"], cli["image"], *argv, home=cli["home"]))


def test_query_settings_that_fit_are_accepted(cli):
    argv = ["query", cli["index"], cli["image"], "--category", "jar", "--restrict", "off", "-k", "100", "--json"]
    result = run_cli(*argv, home=cli["home"])
    assert result.returncode == 0, result.stderr
    assert {hit["category"] for hit in json.loads(result.stdout)["results"]} == {"jar"}


@pytest.mark.parametrize(
    "setting, message",
    [
        ("localize.input_size=100", "'localize.input_size' must be a multiple of 32, got 100"),
        ("search.rerank=ioux", "unknown value for search.rerank 'ioux'. Did you mean iou?"),
    ],
)
def test_index_refuses_an_invalid_setting_before_indexing(cli, tiny_extractor, setting, message):
    out = cli["root"] / "never"
    result = run_cli(
        "index", cli["catalogue"], "--out", out, *tiny_flags(tiny_extractor), "--set", setting, home=cli["home"]
    )
    assert message in error_line(result) and not out.exists()
