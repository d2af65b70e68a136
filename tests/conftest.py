"""Shared fixtures. `cluster` is the real dev cluster (hack/devcluster.py).

By default a test session starts its own cluster in a temp folder and stops
it at the end. To reuse one you started with `make cluster-up`, set
TERRACE_CLUSTER_DIR to its folder (e.g. .cache/cluster).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))

from devcluster import Cluster  # noqa: E402


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reuse = os.environ.get("TERRACE_CLUSTER_DIR")
    if reuse:
        existing = Cluster.attach(Path(reuse).resolve())
        if existing is None:
            pytest.fail(
                f"TERRACE_CLUSTER_DIR={reuse} holds no healthy cluster (run make cluster-up)"
            )
        yield existing
        return
    c = Cluster(dir=tmp_path_factory.mktemp("cluster"))
    c.up()
    try:
        yield c
    finally:
        c.down()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Anything that asks for the real cluster is marked, so `-m "not cluster"`
    # gives the fast layer.
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
