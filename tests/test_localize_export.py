"""experiments/export_onnx.py must import and explain itself without torch."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "export_onnx.py"


@pytest.fixture(scope="module")
def export_module():
    spec = importlib.util.spec_from_file_location("export_onnx", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # must not import torch at module level
    return module


def test_help_runs_without_torch():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "u2netp" in result.stdout and "--checkpoint" in result.stdout


def test_fba_example_inputs_match_the_interface(export_module):
    feeds = export_module.fba_example(64)
    assert list(feeds) == export_module.FBA_INPUTS
    assert [feeds[n].shape[1] for n in feeds] == [3, 2, 3, 6]


def test_missing_checkpoint_is_reported(export_module, tmp_path):
    with pytest.raises(SystemExit, match="--checkpoint"):
        export_module.main(
            [
                "u2netp",
                "--repo",
                str(tmp_path),
                "--checkpoint",
                str(tmp_path / "x.pth"),
                "--out",
                str(tmp_path / "x.onnx"),
            ]
        )
