"""The Prometheus client against a real Prometheus and a real HTTP server.

A real Prometheus (Debian's binary, on 127.0.0.1) answers the cases PromQL can
produce: empty vectors, NaN and infinities, several series, a range vector, a
bad query (400) and one that fails as it runs (422). A tiny real HTTP server
on 127.0.0.1 serves what a real Prometheus will not: HTTP 500, a non-JSON
body, a non-numeric value, a hang past the timeout; a dead port refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from served import Prometheus, refusing_url
from terrace_operator.prometheus import (
    AmbiguousResult,
    BadValue,
    NoData,
    PrometheusClient,
    PrometheusUnavailable,
    QueryError,
)
from terrace_operator.signals import SignalQueries


@pytest.fixture(scope="module")
def real_prometheus(tmp_path_factory):
    with Prometheus(tmp_path_factory.mktemp("prom"), {"global": {"scrape_interval": "1s"}}) as p:
        yield p.url


def run(coro):
    return asyncio.run(coro)


async def _value(url, q, timeout=5.0):
    async with PrometheusClient(url, timeout_seconds=timeout) as c:
        return await c.value(q)


# Two series of one value each, from PromQL alone.
TWO_SERIES = (
    '(label_replace(vector(1), "a", "x", "", "") or label_replace(vector(2), "a", "y", "", ""))'
)


def test_real_prometheus_single_value(real_prometheus):
    assert run(_value(real_prometheus, "vector(3.5)")) == 3.5
    assert run(_value(real_prometheus, "scalar(vector(2))")) == 2.0


def test_real_prometheus_empty_result(real_prometheus):
    with pytest.raises(NoData):
        run(_value(real_prometheus, "vector(1) > 2"))
    with pytest.raises(NoData):
        run(_value(real_prometheus, 'sum(terrace_router_inflight{tier="nope"})'))


def test_real_prometheus_nan_and_inf(real_prometheus):
    with pytest.raises(BadValue, match="nan"):
        run(_value(real_prometheus, "vector(0/0)"))
    with pytest.raises(BadValue, match="inf"):
        run(_value(real_prometheus, "vector(1/0)"))
    with pytest.raises(BadValue, match="inf"):
        run(_value(real_prometheus, "vector(-1/0)"))
    # the built-in p95 over a histogram with no requests: empty, never 0
    q = SignalQueries().grouped()["latencyP95"]
    with pytest.raises(NoData):
        run(_value(real_prometheus, q))


def test_real_prometheus_several_series(real_prometheus):
    q = 'vector(1) or label_replace(vector(2), "x", "y", "", "")'
    with pytest.raises(AmbiguousResult, match="2 series"):
        run(_value(real_prometheus, q))
    with pytest.raises(AmbiguousResult, match="2 series"):
        run(_value(real_prometheus, TWO_SERIES))


def test_real_prometheus_range_vector_is_a_query_error(real_prometheus):
    with pytest.raises(QueryError, match="range vector"):
        run(_value(real_prometheus, "up[1m]"))
    with pytest.raises(QueryError, match="range vector"):
        run(_value(real_prometheus, "vector(1)[1m:10s]"))  # a subquery: never empty


def test_real_prometheus_execution_error_422(real_prometheus):
    """A query that parses and fails when evaluated: Prometheus answers 422,
    errorType execution (many-to-many matching)."""
    q = f"{TWO_SERIES} + on() {TWO_SERIES}"
    with pytest.raises(QueryError, match="execution: .*many-to-many"):
        run(_value(real_prometheus, q))


def test_real_prometheus_bad_query(real_prometheus):
    with pytest.raises(QueryError, match="bad_data"):
        run(_value(real_prometheus, "sum("))


class _Canned(BaseHTTPRequestHandler):
    status = 200
    body: bytes = b""
    delay = 0.0

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("content-length") or 0))
        time.sleep(self.delay)
        self.send_response(self.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def canned():
    handler = type("H", (_Canned,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()

    def set_(status=200, body=None, raw=None, delay=0.0):
        handler.status = status
        handler.body = raw if raw is not None else json.dumps(body).encode()
        handler.delay = delay
        return f"http://127.0.0.1:{server.server_address[1]}"

    try:
        yield set_
    finally:
        server.shutdown()
        server.server_close()


def vec(*values, labels=None):
    return {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [
                {"metric": labels or {"i": str(i)}, "value": [1700000000.0, v]}
                for i, v in enumerate(values)
            ],
        },
    }


def test_http_500_is_unavailable(canned):
    url = canned(500, raw=b"internal server error")
    with pytest.raises(PrometheusUnavailable, match="500"):
        run(_value(url, "up"))
    url = canned(503, {"status": "error", "errorType": "unavailable", "error": "starting"})
    with pytest.raises(PrometheusUnavailable, match="unavailable"):
        run(_value(url, "up"))


def test_bodies_a_real_prometheus_never_sends(canned):
    """What a proxy in front of Prometheus, or a broken one, may answer."""
    with pytest.raises(PrometheusUnavailable):
        run(_value(canned(200, raw=b"<html>proxy</html>"), "x"))
    with pytest.raises(PrometheusUnavailable, match="not-a-number"):
        run(_value(canned(200, vec("not-a-number")), "x"))
    # the canned server's success body itself is read as a value
    assert run(_value(canned(200, vec("42")), "x")) == 42.0


def test_timeout_is_unavailable(canned):
    url = canned(200, vec("1"), delay=2.0)
    with pytest.raises(PrometheusUnavailable, match="timed out"):
        run(_value(url, "x", timeout=0.3))


def test_connection_refused_is_unavailable():
    with refusing_url() as url, pytest.raises(PrometheusUnavailable, match="cannot reach"):
        run(_value(url, "x"))


def test_builtin_queries_are_grouped_by_tier_and_share_the_window():
    q = SignalQueries(window="30s").grouped()
    assert q["inflight"] == "sum by (namespace, tier) (terrace_router_inflight)"
    assert "rate(terrace_router_requests_total[30s])" in q["rps"]
    assert q["latencyP95"].startswith("histogram_quantile(0.95, sum by (namespace, tier, le)")
    assert q["gpuUtilization"] == "terrace_gpu_utilization_ratio"
    for kind, promql in q.items():
        assert "[" not in promql or "[30s]" in promql, kind
    dcgm = SignalQueries(gpu_source="dcgm").grouped()
    assert dcgm["gpuUtilization"] == "DCGM_FI_DEV_GPU_UTIL / 100"
