"""Indexing that reports honestly and resumes finely: per-image progress, commits every CHUNK
images or COMMIT_SECONDS, failures.txt and --strict, refusing another catalogue at an existing
index, and `csearch list`. Weight-free models (tests/conftest.py); no test depends on timing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from csearch import indexing
from csearch.cli import main
from csearch.data import read_catalogue
from csearch.errors import StoreError
from csearch.pipeline import build_index
from csearch.store import IndexStore
from tests.conftest import REPO, write_catalogue
from tests.test_cli import tiny_flags


def break_images(catalogue: Path) -> list[Path]:
    """Two unreadable files in the catalogue: a truncated PNG and an empty one."""
    good = sorted(catalogue.rglob("*.png"))[0].read_bytes()
    truncated = catalogue / "jar" / "jar-p0" / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    empty = catalogue / "jar" / "jar-p0" / "empty.png"
    empty.write_bytes(b"")
    return [truncated, empty]


def run_csearch(*argv, env=None):
    return subprocess.run(
        [sys.executable, "-m", "csearch", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


# --------------------------------------------------------------------------- progress and commits


def test_progress_is_per_image_before_the_commit(tmp_path, tiny_catalogue, tiny_config):
    events = []
    report = build_index(
        read_catalogue(tiny_catalogue),
        tiny_config,
        tmp_path / "idx",
        progress=lambda n: events.append(("image", n)),
        on_commit=lambda items: events.append(("commit", items)),
    )
    # 12 images < CHUNK and well under COMMIT_SECONDS: one commit, after every image was reported
    assert events == [("image", 1)] * 12 + [("commit", 12)]
    assert report.items == 12 and report.failures_file is None


def test_a_timed_commit_survives_an_interruption_and_is_not_redone(tmp_path, tiny_catalogue, tiny_config, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(indexing, "clock", lambda: now[0])
    prepared = []
    real_prepare = indexing.prepare_image
    monkeypatch.setattr(indexing, "prepare_image", lambda *a, **k: prepared.append(1) or real_prepare(*a, **k))
    catalogue = read_catalogue(tiny_catalogue)
    seen = []

    def ten_seconds_per_image(n):  # image 3 reaches COMMIT_SECONDS (30 s): that commit must hold
        seen.append(n)
        now[0] += 10.0
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(catalogue, tiny_config, tmp_path / "idx", progress=ten_seconds_per_image)
    store = IndexStore.open(tmp_path / "idx")
    assert len(store) == 3 and store.meta["complete"] is False
    prepared.clear()
    progress = []
    report = build_index(catalogue, tiny_config, tmp_path / "idx", progress=progress.append)
    assert (report.added, report.skipped_existing, report.items) == (9, 3, 12)
    assert len(prepared) == 9 and progress[0] == 3 and sum(progress) == 12
    assert sorted(IndexStore.open(tmp_path / "idx").snapshot.paths) == sorted(
        str(Path(r.path).resolve()) for r in catalogue.records
    )


def test_a_killed_build_keeps_its_commits_and_resumes(tmp_path, tiny_catalogue, tiny_config, tiny_extractor):
    # a real SIGKILL in the middle of a build: COMMIT_SECONDS = 0 commits after every image
    out = tmp_path / "idx"
    script = f"""
import os, signal
from csearch import indexing
from csearch.config import load_config
from csearch.data import read_catalogue
indexing.COMMIT_SECONDS = 0
def kill(items):
    if items == 2:
        os.kill(os.getpid(), signal.SIGKILL)
config = load_config(overrides={{"embed.extractor": {str(tiny_extractor)!r}, "localize.method": "classical",
    "localize.matting": "none", "preprocess.image_size": 32, "embed.batch_size": 4}})
indexing.build_index(read_catalogue({str(tiny_catalogue)!r}), config, {str(out)!r}, on_commit=kill, workers=1)
"""
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert len(IndexStore.open(out)) == 2
    report = build_index(read_catalogue(tiny_catalogue), tiny_config, out)
    assert (report.added, report.skipped_existing, report.items) == (10, 2, 12)


# --------------------------------------------------------------------------- failures


def test_failures_are_listed_in_failures_txt(tmp_path, tiny_catalogue, tiny_config):
    broken = break_images(tiny_catalogue)
    out = tmp_path / "idx"
    report = build_index(read_catalogue(tiny_catalogue), tiny_config, out)
    assert report.added == 12 and report.failures_file == str(out / "failures.txt")
    lines = (out / "failures.txt").read_text().splitlines()
    rows = dict(line.split("\t") for line in lines)
    assert len(lines) == 2 and set(rows) == {str(p) for p in broken}
    assert "truncated" in rows[str(broken[0])] and "empty file" in rows[str(broken[1])]
    assert not any(str(p) in reason for p, reason in rows.items())  # the reason does not repeat the path
    for path in broken:
        path.unlink()
    report = build_index(read_catalogue(tiny_catalogue), tiny_config, out)
    assert report.failures_file is None and not (out / "failures.txt").exists()  # no stale list


def test_cli_reports_failures_in_one_line_and_exits_0(tmp_path, tiny_catalogue, tiny_extractor):
    break_images(tiny_catalogue)
    out = tmp_path / "idx"
    result = run_csearch("index", tiny_catalogue, "--out", out, "--json", *tiny_flags(tiny_extractor))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["added"], summary["failed"], summary["items"]) == (12, 2, 12)
    assert summary["failures_file"] == str(out / "failures.txt")
    mentions = [line for line in result.stderr.splitlines() if "could not be indexed" in line or ".png" in line]
    assert mentions == [f"2 of 14 images could not be indexed; see {out / 'failures.txt'}"]


def test_strict_fails_after_indexing_the_good_images(tmp_path, tiny_catalogue, tiny_extractor):
    break_images(tiny_catalogue)
    out = tmp_path / "idx"
    result = run_csearch("index", tiny_catalogue, "--out", out, "--strict", "--json", *tiny_flags(tiny_extractor))
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "could not be indexed" in line]
    assert lines == [
        f"csearch: error: 2 of 14 images could not be indexed; see {out / 'failures.txt'} (--strict; the others "
        "are indexed)"
    ]
    store = IndexStore.open(out)
    assert len(store) == 12 and store.meta["complete"] is True and (out / "config.yaml").is_file()


def test_an_index_where_nothing_could_be_read_is_an_error(tmp_path, tiny_extractor, capfd):
    catalogue = tmp_path / "catalogue" / "jar" / "jar-p0"
    catalogue.mkdir(parents=True)
    (catalogue / "a.png").write_bytes(b"not a png")
    code = main(["index", str(tmp_path / "catalogue"), "--out", str(tmp_path / "idx"), *tiny_flags(tiny_extractor)])
    err = capfd.readouterr().err
    assert code == 2 and "csearch: error: 1 of 1 images could not be indexed; see" in err


# --------------------------------------------------------------------------- another catalogue


def test_another_catalogue_at_an_existing_index_is_refused(tmp_path, tiny_catalogue, tiny_config, monkeypatch):
    out = tmp_path / "idx"
    monkeypatch.setattr(indexing, "CHUNK", 4)

    def interrupt(items):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # even an interrupted index knows its catalogue
        build_index(read_catalogue(tiny_catalogue), tiny_config, out, on_commit=interrupt)
    other = read_catalogue(write_catalogue(tmp_path / "other", categories=("can",), seed=1))

    def no_models(config):
        raise AssertionError("the catalogue is checked before any model is loaded")

    with monkeypatch.context() as patch:
        patch.setattr(indexing, "load_models", no_models)
        with pytest.raises(StoreError, match=r"another catalogue .*`csearch add .*--overwrite"):
            build_index(other, tiny_config, out)
    assert len(IndexStore.open(out)) == 4
    # the same catalogue, spelt relative to another folder, resumes
    monkeypatch.chdir(tmp_path)
    report = build_index(read_catalogue("./catalogue/../catalogue"), tiny_config, out)
    assert (report.added, report.skipped_existing) == (8, 4)
    report = build_index(other, tiny_config, out, overwrite=True)
    assert (report.added, report.items) == (6, 6)
    assert IndexStore.open(out).meta["catalogue"] == str(tmp_path / "other")


def test_cli_refuses_another_catalogue_in_one_line(tmp_path, tiny_catalogue, tiny_extractor, capfd):
    out = tmp_path / "idx"
    assert main(["index", str(tiny_catalogue), "--out", str(out), *tiny_flags(tiny_extractor)]) == 0
    other = write_catalogue(tmp_path / "other", categories=("can",), seed=1)
    capfd.readouterr()
    code = main(["index", str(other), "--out", str(out), *tiny_flags(tiny_extractor)])
    captured = capfd.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("csearch: error")]
    assert code == 2 and len(lines) == 1 and f"csearch add {out} {other}" in lines[0]
    assert len(IndexStore.open(out)) == 12


# --------------------------------------------------------------------------- csearch list


@pytest.fixture
def listed_index(tmp_path, tiny_catalogue, tiny_extractor, capfd):
    """An index built with a copy of the extractor, which is then deleted: `list` loads no model."""
    model = tmp_path / "model" / "extractor.onnx"
    model.parent.mkdir()
    shutil.copy(tiny_extractor, model)
    out = tmp_path / "idx"
    assert main(["index", str(tiny_catalogue), "--out", str(out), *tiny_flags(model)]) == 0
    assert main(["remove", str(out), "3"]) == 0
    model.unlink()
    capfd.readouterr()
    return out


def test_list_json_is_one_object(listed_index, tiny_catalogue, capfd):
    assert main(["list", str(listed_index), "--json"]) == 0
    out = capfd.readouterr().out
    assert out.count("\n") == 1
    listing = json.loads(out)
    assert listing["count"] == 11 == len(listing["items"])
    assert [item["id"] for item in listing["items"]] == [i for i in range(12) if i != 3]
    paths = {str(p.resolve()) for p in tiny_catalogue.rglob("*.png")}
    for item in listing["items"]:
        assert set(item) == {"id", "product", "category", "path"} and item["path"] in paths
        assert item["product"].startswith(item["category"]) and Path(item["path"]).parent.name == item["product"]


def test_list_text_is_a_table(listed_index, capfd):
    assert main(["list", str(listed_index)]) == 0
    lines = capfd.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "product", "category", "path"] and len(lines) == 12
    first = lines[1].split()
    assert first[0] == "0" and first[1].startswith(first[2]) and first[3].endswith(".png")
    assert len({line.index("/") for line in lines[1:]}) == 1  # the path column is aligned


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_list_of_no_index_is_one_line(tmp_path, capfd, where):
    target = tmp_path / where
    if where == "empty":
        target.mkdir()
    assert main(["list", str(target)]) == 2
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("csearch: error:")
    assert "index" in lines[0] and str(target) in lines[0]
