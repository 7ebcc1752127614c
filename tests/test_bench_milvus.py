"""The benchmarks' Milvus helpers (issue 13's measurements): a throwaway Milvus server that does
not collide with another one on the same machine (`benchmarks/local_milvus.py`), and the "same
top-k" rule the Grocery backend comparison counts with (`benchmarks/bench_backends_grocery.py`)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import yaml

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_backends_grocery import same_top_k  # noqa: E402
from local_milvus import server_config  # noqa: E402


def test_the_embedded_etcd_gets_its_own_free_ports(tmp_path):
    pytest.importorskip("milvus")
    config = server_config(tmp_path)
    config.configs.update(data_dir=str(tmp_path))
    config.resolve()  # what MilvusServer.start() does: writes configs/milvus.yaml
    written = yaml.safe_load((tmp_path / "configs" / "milvus.yaml").read_text())
    etcd = yaml.safe_load((tmp_path / "etcd.yaml").read_text())
    assert written["etcd"]["config"]["path"] == str(tmp_path / "etcd.yaml")
    assert written["etcd"]["use"]["embed"] is True  # the rest of the package's config is kept
    peer, client = (int(etcd[key].rsplit(":", 1)[1]) for key in ("listen-peer-urls", "listen-client-urls"))
    assert peer != client and not {peer, client} & {2379, 2380}  # etcd's defaults, which the package keeps
    assert etcd["initial-cluster"] == f"default={etcd['initial-advertise-peer-urls']}"


def test_same_top_k_allows_only_ties_within_1e5():
    ids, distances = [3, 1, 2], [0.5, 0.7, 0.7 + 5e-6]
    assert same_top_k(ids, distances, ids, distances)
    assert same_top_k([3, 2, 1], [0.5, 0.7 + 5e-6, 0.7], ids, distances)  # a tie, in the other order
    apart = [0.5, 0.7, 0.7 + 2e-5]
    assert not same_top_k([3, 2, 1], apart, [3, 1, 2], apart)  # 1 and 2 are not tied: their order counts
    assert not same_top_k([3, 1, 4], distances, ids, distances)  # another item
    assert not same_top_k(ids, np.add(distances, 2e-5), ids, distances)  # distances differ
    assert not same_top_k(ids[:2], distances[:2], ids, distances)  # fewer hits
