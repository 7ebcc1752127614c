"""The Keras model code on the JAX and PyTorch backends (the rest of the suite uses TensorFlow).

Each backend runs tests/backend_probe.py in its own process (Keras fixes its backend at import).
JAX is a dev dependency, so its check always runs; PyTorch is not (a CPU build is several
hundred MB, a CUDA one several GB): its check runs where torch is installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_catalogue

PROBE = Path(__file__).with_name("backend_probe.py")
MODULES = {"jax": "jax", "torch": "torch"}


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_model_code_runs_on_another_backend(backend, tmp_path):
    if importlib.util.find_spec(MODULES[backend]) is None:
        if backend == "jax":
            pytest.fail("jax is a dev dependency: pip install -e '.[dev]'")
        pytest.skip(f"{backend} is not installed (pip install {backend} to run this check)")
    catalogue = write_catalogue(tmp_path / "catalogue", size=(40, 40))
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "CUDA_VISIBLE_DEVICES": "",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "JAX_PLATFORMS": "cpu",
    }
    done = subprocess.run(
        [sys.executable, str(PROBE), str(catalogue), str(tmp_path / "work")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[1],
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[-1][len("PROBE ") :])
    assert report["backend"] == backend
    assert report["inference_mode"], "InferenceMode let fit() train the backbone's batch-norm"
    modes = {m: r["mode"] for m, r in report["train"].items()}
    assert modes["features"] == "features" and modes["images"] == "images", modes
    assert modes["activations"].startswith("cached activations"), modes
    for mode, result in report["train"].items():
        assert result["code"] == 0 and result["probs_sum"] == pytest.approx([1.0, 1.0], abs=1e-4), mode
    assert report["extractor"] == [3, 1024, True]
