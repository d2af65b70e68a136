"""Shared fixtures: the router's stub tiers (the harness is router_harness.py)
and a real Prometheus scraping an exposition the test fills (served.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from localpg import PostgresServer
from router_harness import KEY, ServerThread, StubControl, stub_app
from served import Prom, scraped_prometheus


@pytest.fixture
def servers() -> Iterator[list[Any]]:
    """Servers a test starts; stopped at its end, last first."""
    started: list[Any] = []
    yield started
    for s in reversed(started):
        s.stop()


@pytest.fixture
def stubs(servers: list[ServerThread]) -> dict[str, tuple[StubControl, str]]:
    """Stub OpenAI/OIP tiers by name: (control, base URL)."""
    out = {}
    for name in ("small", "medium", "large", "small-b"):
        ctl = StubControl(name)
        srv = ServerThread(stub_app(ctl)).start()
        servers.append(srv)
        out[name] = (ctl, srv.url)
    return out


@pytest.fixture
def router_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API keys the harness's routing tables name (`make_config`)."""
    monkeypatch.setenv("TERRACE_TEST_KEYS", f"other-key,{KEY}")


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prom]:
    """One real Prometheus for the module, scraping an `Exposition`."""
    with scraped_prometheus(tmp_path_factory.mktemp("prometheus"), "test") as prom:
        yield prom


@pytest.fixture
def prom(scraped: Prom) -> Prom:
    """The module's Prometheus, holding nothing from another test."""
    scraped.forget()
    return scraped


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """terrace-batch's store, once on SQLite (a file) and once on a real
    PostgreSQL server of its own (hack/localpg.py)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'batches.db'}"
        return
    pg = PostgresServer().start()
    try:
        yield pg.url
    finally:
        pg.stop()
