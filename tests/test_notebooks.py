"""The result notebooks execute (nbclient, kernel python3) on a tiny trained run, so they cannot
rot. The test replaces each notebook's `parameters` cell with its own RUN_DIRS / DATA / OUT."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
REPO = NOTEBOOKS.parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from conftest import write_catalogue

    from csearch.train import TrainConfig, train_classifier

    root = tmp_path_factory.mktemp("nb")
    data = write_catalogue(root / "data", categories=("bottle", "jar", "tube"), products=1, images=4, size=(40, 40))
    config = TrainConfig(
        backbone="mobilenet", weights="none", image_size=32, epochs=2, copies=0, unfreeze=0, batch_size=4
    )
    train_classifier(config, str(data), root / "run-a", lambda _: None)
    shutil.copytree(root / "run-a", root / "run-b")  # a second run to compare, without training again
    return [root / "run-a", root / "run-b"], data


def execute(name: str, parameters: str, cwd: Path):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    cell = notebook.cells[[c.cell_type for c in notebook.cells].index("code")]
    assert "parameters" in cell.metadata.get("tags", []), f"{name}: first code cell must be tagged parameters"
    cell.source = parameters
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{env_path}" if env_path else str(REPO)
    try:
        client = nbclient.NotebookClient(
            notebook, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(cwd)}}
        )
        client.execute()
    finally:
        os.environ["PYTHONPATH"] = env_path
        if not env_path:
            del os.environ["PYTHONPATH"]
    return notebook


def outputs_of(notebook) -> list[dict]:
    return [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def test_tables_and_confusion_notebook(runs, tmp_path):
    run_dirs, data = runs
    notebook = execute(
        "classifier_tables.ipynb",
        f"RUN_DIRS = {[str(r) for r in run_dirs]!r}\nDATA = {str(data)!r}\nOUT = 'eval'",
        tmp_path,
    )
    out = tmp_path / "eval"
    assert (out / "table2.md").is_file() and (out / "run-a" / "table1.md").is_file()
    assert (out / "run-b" / "confusion_matrix.png").is_file()
    shown = outputs_of(notebook)
    assert sum("image/png" in o.get("data", {}) for o in shown) == 2  # Figure 8, one per run
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in shown)
    assert "average accuracy" in markdown and "precision" in markdown and "run-b" in markdown


def test_training_curves_notebook(runs, tmp_path):
    run_dirs, _ = runs
    notebook = execute("training_curves.ipynb", f"RUN_DIRS = {[str(r) for r in run_dirs]!r}\nOUT = 'curves'", tmp_path)
    assert (tmp_path / "curves" / "run-a-history.png").stat().st_size > 0
    shown = outputs_of(notebook)
    assert sum("image/png" in o.get("data", {}) for o in shown) == 2  # Figure 7, one per run
    assert "run-b" in "".join(o.get("data", {}).get("text/markdown", "") for o in shown)
