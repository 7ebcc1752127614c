"""Cold start: the wall time of one `csearch query` from a new process, and of `csearch serve`
until its first 200 from /health (issue 14's aims: <= 1.5 s and <= 2 s on the 2-core CPU).

"Cold" means a new Python process with the OS file cache warm: one untimed run first, then the
median of --repeats timed runs. It also reports which heavy frameworks the query process
imported (TensorFlow / Keras should not be among them when the index's models are all ONNX).

    CSEARCH_HOME=../shared/models python benchmarks/bench_cold_start.py --index INDEX_DIR --image photo.jpg
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PROBE = (
    "import sys, time\n"
    "from csearch.cli import main\n"
    "rc = main(['query', {index!r}, {image!r}, '--json'])\n"
    "heavy = sorted(m for m in ('tensorflow', 'keras', 'torch', 'jax') if m in sys.modules)\n"
    "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def time_query(index: str, image: str) -> tuple[float, list[str]]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(index=index, image=image)], capture_output=True, text=True, timeout=300
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"query failed: {done.stderr.strip().splitlines()[-1]}")
    heavy = next(line for line in done.stderr.splitlines() if line.startswith("HEAVY="))[6:]
    return seconds, [m for m in heavy.split(",") if m]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_serve(index: str, limit: float = 120.0) -> float:
    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "csearch", "serve", index, "--port", str(port), "--read-only"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while time.perf_counter() - started < limit:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
                    if answer.status == 200:
                        return time.perf_counter() - started
            except OSError:
                time.sleep(0.02)
        raise SystemExit(f"csearch serve gave no 200 from /health within {limit:.0f} s")
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, help="an index made by `csearch index`")
    parser.add_argument("--image", required=True, help="the query photo")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each (default 5)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    time_query(args.index, args.image)  # untimed: warms the OS file cache
    runs = [time_query(args.index, args.image) for _ in range(args.repeats)]
    serve = [time_serve(args.index) for _ in range(args.repeats)]
    result = {
        "query_s": [round(s, 3) for s, _ in runs],
        "query_median_s": round(statistics.median(s for s, _ in runs), 3),
        "query_imported": runs[0][1],
        "serve_health_s": [round(s, 3) for s in serve],
        "serve_health_median_s": round(statistics.median(serve), 3),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
