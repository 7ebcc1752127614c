"""A throwaway Milvus server for the benchmarks: the 2.3.5-lite binary that the PyPI `milvus`
package ships (as in tests/test_store_backends.py), on a free 127.0.0.1 port with its own data
folder, SIGKILLed at the end (it ignores SIGTERM for 40 s and more).

    with milvus_server(Path("/tmp/milvus-data")) as server:   # server.address: "127.0.0.1:PORT"
        ...
    python benchmarks/local_milvus.py --data /tmp/milvus-data   # prints HOST:PORT, serves until
                                                                 # SIGINT / SIGTERM, then SIGKILLs it
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple


class Server(NamedTuple):
    address: str  # "127.0.0.1:PORT"
    pid: int

    def peak_rss_mb(self) -> float:
        """The server process's peak resident memory so far (VmHWM), in MB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
        return float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ETCD_CONFIG = """name: default
listen-peer-urls: http://127.0.0.1:{peer}
initial-advertise-peer-urls: http://127.0.0.1:{peer}
initial-cluster: default=http://127.0.0.1:{peer}
listen-client-urls: http://127.0.0.1:{client}
advertise-client-urls: http://127.0.0.1:{client}
"""


def server_config(data: Path):
    """The `milvus` package's config, plus an embedded-etcd config on free ports: by default the
    embedded etcd binds 2379 and 2380 whatever the package's port resolver picks, so a second
    server on the machine (another test session, say) dies at start, and the package's
    wait_started() then waits its whole timeout, since it never looks at the process."""
    import milvus

    template = Path(milvus.__file__).parent / "data" / "config.yaml.template"
    etcd = data / "etcd.yaml"
    etcd.write_text(ETCD_CONFIG.format(peer=free_port(), client=free_port()))
    text = template.read_text(encoding="utf-8")
    text = text.replace("\netcd:\n", f"\netcd:\n  config:\n    path: {etcd}\n", 1)
    ours = data / "config.yaml.template"
    ours.write_text(text, encoding="utf-8")
    config = milvus.MilvusServerConfig(template=str(ours))
    config.glog_conf_file = str(template.parent / "glog.conf")  # set only for the package's own template
    return config


@contextlib.contextmanager
def milvus_server(data: Path, timeout_s: float = 240.0) -> Iterator[Server]:
    """Start a Milvus server with data folder `data`; yield its Server; SIGKILL it at the end."""
    from milvus import MilvusServer

    data = data.absolute()
    data.mkdir(parents=True, exist_ok=True)
    server = MilvusServer(server_config(data), wait_for_started=False)
    server.set_base_dir(str(data))
    server.listen_port = free_port()  # start() takes the first free port from here
    began = time.perf_counter()
    server.start()
    try:
        health = f"http://127.0.0.1:{server.webservice_port}/healthz"
        while not healthy(health):
            if server.server_proc.poll() is not None:
                raise SystemExit(
                    f"the Milvus server exited at start (code {server.server_proc.returncode}); see {data}/logs"
                )
            if time.perf_counter() - began > timeout_s:
                raise SystemExit(f"the Milvus server was not up in {timeout_s:.0f} s; see {data}/logs")
            time.sleep(0.5)
        print(
            f"milvus server pid {server.server_proc.pid} on 127.0.0.1:{server.listen_port} "
            f"(up in {time.perf_counter() - began:.1f} s; data {data})",
            file=sys.stderr,
        )
        yield Server(f"127.0.0.1:{server.listen_port}", server.server_proc.pid)
    finally:
        process, server.server_proc = server.server_proc, None
        if process is not None:
            process.kill()
            process.wait(30)
        server.stop()  # closes its log files


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return b"OK" in response.read()
    except (OSError, urllib.error.URLError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the server's data folder")
    args = parser.parse_args()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with milvus_server(args.data) as server:
        print(server.address, flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
