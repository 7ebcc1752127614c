import io
import re

from csearch.demo import run_demo


def test_demo_indexes_and_queries_its_catalogue(tmp_path, tiny_config):
    out = io.StringIO()
    run_demo(tmp_path / "demo", tiny_config, out)
    text = out.getvalue()
    assert "queries found their product first" in text
    found = int(text.split("queries found their product first")[0].split()[-1].split("/")[0])
    assert found >= 3  # 9 look-alike products; even the tiny random extractor beats chance (1/9)
    assert (tmp_path / "demo" / "index" / "manifest.json").is_file()
    assert (tmp_path / "demo" / "index" / "config.yaml").is_file()
    # then a product embedding trained on the demo catalogue, and its own index, compared
    assert "With the learned embedding" in text
    # both counts are reported (the tiny extractor is random: the numbers themselves are not the point)
    assert re.search(r"With the learned embedding \(trained in \d+ s\): \d/9 queries .* against \d/9", text)
    assert (tmp_path / "demo" / "embedder" / "embedder.onnx").is_file()
    assert (tmp_path / "demo" / "index-embedder" / "manifest.json").is_file()


def demo_argv(extractor, *more):
    return [
        "demo",
        "--extractor",
        str(extractor),
        "--localizer",
        "classical",
        "--image-size",
        "32",
        "--no-embedder",
        *more,
    ]


def test_demo_without_out_uses_a_new_temporary_folder_it_keeps(tmp_path, tiny_extractor, monkeypatch, capfd):
    import tempfile

    from csearch.cli import main

    temp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    temp.mkdir(), cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.chdir(cwd)
    assert main(demo_argv(tiny_extractor)) == 0
    out = capfd.readouterr().out
    assert list(cwd.iterdir()) == []  # nothing in the current folder
    (folder,) = temp.iterdir()
    assert folder.name.startswith("csearch-demo-")
    assert (folder / "index" / "manifest.json").is_file()
    assert str(folder) in out  # the user is told where it is


def test_demo_writes_to_out_and_removes_its_temporary_folder_on_failure(tmp_path, tiny_extractor, monkeypatch, capfd):
    import tempfile

    from csearch.cli import main

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert main(demo_argv(tiny_extractor, "--out", str(tmp_path / "mine"))) == 0
    assert (tmp_path / "mine" / "index" / "manifest.json").is_file()
    assert list(temp.iterdir()) == []

    assert main(demo_argv(tmp_path / "missing.onnx")) == 2
    assert "csearch: error:" in capfd.readouterr().err
    assert list(temp.iterdir()) == []  # a failed demo leaves no half-written folder behind
