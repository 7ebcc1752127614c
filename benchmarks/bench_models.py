"""Forward throughput of the registered extractors on this machine (images/s at batch 32).

    KERAS_BACKEND=tensorflow python benchmarks/bench_models.py [--calls] [--models a,b] [--repeats 3]

`--calls` also compares the ways of running a Keras model (eager call, predict_on_batch,
jit-compiled tf.function) that csearch.models.KerasExtractor chooses between. Models whose
weights are not found locally run with random weights (speed is the same).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from csearch import errors, models


def _rate(fn, batch: np.ndarray, repeats: int) -> float:
    fn(batch)  # warm-up: tracing / graph optimisation is not throughput
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(batch)
        best = min(best, time.perf_counter() - start)
    return len(batch) / best


def _weights(name: str):
    return "imagenet" if models.find_weights(name) else (None if models.get_spec(name).is_keras else "imagenet")


def bench_extractors(names, batch_size: int, repeats: int) -> dict:
    results = {}
    for name in names:
        weights = _weights(name)
        try:
            extractor = models.load_extractor(name, weights)
        except errors.CSearchError as exc:
            print(f"{name}: skipped ({exc})", file=sys.stderr)
            continue
        size = extractor.input_size
        batch = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
        results[name] = {
            "weights": "file" if extractor.files else "random",
            "input_size": size,
            "images_per_s": round(_rate(extractor, batch, repeats), 1),
        }
        print(name, results[name], file=sys.stderr)
    return results


def bench_calls(name: str, batch_size: int, repeats: int) -> dict:
    """Eager `model(x, training=False)` vs `predict_on_batch` vs jit-compiled tf.function."""
    import keras

    model = models.build_backbone(name, _weights(name))
    size = model.input_shape[1]
    batch = np.random.default_rng(0).uniform(0, 255, (batch_size, size, size, 3)).astype(np.float32)
    calls = {
        "eager_call": lambda x: keras.ops.convert_to_numpy(model(x, training=False)),
        "predict_on_batch": model.predict_on_batch,
    }
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        graph = tf.function(lambda x: model(x, training=False))
        xla = tf.function(lambda x: model(x, training=False), jit_compile=True)
        calls["tf_function"] = lambda x: graph(x).numpy()
        calls["tf_function_xla"] = lambda x: xla(x).numpy()
    results = {k: round(_rate(fn, batch, repeats), 1) for k, fn in calls.items()}
    print(name, "calls", results, file=sys.stderr)
    return results


def bench_onnx_per_image(name: str, batch_size: int, repeats: int) -> float:
    """The same ONNX extractor forced to run one image at a time (what a fixed batch-1 export
    would cost without the symbolic batch dim)."""
    extractor = models.load_extractor(name)
    extractor.batched = False
    size = extractor.input_size
    batch = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    rate = round(_rate(extractor, batch, repeats), 1)
    print(name, "per image", rate, file=sys.stderr)
    return rate


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet,mobilenetv2,efficientnet_lite0,resnet50")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--home", help="set $CSEARCH_HOME (e.g. ../shared/models) for real weights")
    parser.add_argument("--calls", action="store_true", help="compare ways to run Keras models")
    args = parser.parse_args(argv)
    if args.home:
        os.environ["CSEARCH_HOME"] = args.home
    names = [n for n in args.models.split(",") if n]
    report = {"extractors": bench_extractors(names, args.batch_size, args.repeats)}
    if args.calls:
        report["onnx_per_image"] = {
            n: bench_onnx_per_image(n, args.batch_size, args.repeats)
            for n in names
            if models.get_spec(n).role == "onnx_extractor" and models.find_weights(n)
        }
    if args.calls:
        report["calls"] = {
            n: bench_calls(n, args.batch_size, args.repeats) for n in names if models.get_spec(n).is_keras
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
