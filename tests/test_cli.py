"""The `csearch` command: exit codes, one-line errors, stdout holding only JSON."""

import json
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
    assert set(result["results"][0]) == {"id", "path", "product", "category", "distance", "iou", "score"}


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
