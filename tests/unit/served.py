"""Servers the unit tests start on 127.0.0.1, without a free-port race.

Never "bind port 0, close, reuse the number": another process may take the
port in between. In-process uvicorn servers get a socket already bound to a
port the OS picked (`ServerThread`); a subprocess is started on port 0 and the
port it bound is read from its log (`localproc.port_from_log`); a URL that must refuse
connections points at a port this process holds bound but not listening
(`Reserved`, `refusing_url`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from localproc import PROMETHEUS_PORT, port_from_log
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily


def bound_socket() -> socket.socket:
    """A TCP socket bound to 127.0.0.1 on a port the OS picks (not listening yet)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ServerThread:
    """A uvicorn server on 127.0.0.1 in a thread: on a port the OS picks, or on
    `sock`, a socket from `bound_socket` the test held (refusing connections)
    until now."""

    def __init__(self, app: Any, sock: socket.socket | None = None) -> None:
        self.sock = sock if sock is not None else bound_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


class Reserved:
    """A port on 127.0.0.1 that this process holds bound and does not listen
    on: connections are refused, and nobody else can take it, until `sock` is
    handed to a server (`ServerThread(app, sock=...)`) or `stop` frees it.
    `stop` suits the routers' `servers` fixture."""

    def __init__(self) -> None:
        self.sock = bound_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def refusing_url() -> Iterator[str]:
    """A URL on 127.0.0.1 that refuses connections for as long as it is held."""
    reserved = Reserved()
    try:
        yield reserved.url
    finally:
        reserved.stop()


class Prometheus:
    """The real Prometheus server (Debian's binary) on 127.0.0.1, with a
    generated config, stopped by PID; a context manager."""

    def __init__(self, workdir: Path, config: dict[str, Any], *args: str) -> None:
        self.workdir = workdir
        self.binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        (workdir / "prometheus.yml").write_text(json.dumps(config))
        self.log_path = workdir / "prometheus.log"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> Prometheus:
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                "--web.listen-address=127.0.0.1:0",
                *self.args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            port = port_from_log(self.proc, self.log_path, PROMETHEUS_PORT, timeout=30)
            self.url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while not self._ready():
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"Prometheus did not become ready:\n{self.log()}")
                time.sleep(0.05)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector, straight from the HTTP API."""
        data = urllib.parse.urlencode({"query": promql}).encode()
        with urllib.request.urlopen(f"{self.url}/api/v1/query", data, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


# A series an `Exposition` shows: (metric family, kind, label pairs), kind
# one of "gauge", "counter", "histogram".
Series = tuple[str, str, tuple[tuple[str, str], ...]]
# The step counter `Prom.show` waits on.
STEP: Series = ("terrace_test_step", "gauge", ())
# Every latency observation an `Exposition` shows falls in (0.05, 0.1]: the
# p95 is 97.5 ms.
LATENCY_BUCKETS = (0.05, 0.1, 0.25)


class Exposition:
    """A prometheus_client collector, served by its own HTTP server, that the
    real Prometheus scrapes every second. `show` records two samples per
    series, one second apart and just ahead of the clock (explicit
    timestamps); each scrape exposes the next of them, so Prometheus holds
    exactly those two. A counter goes from its last total up by the given
    increase, so after a test's first `show` every `increase()` over the 1m
    window is 1.5 x that increase (Prometheus extrapolates half a sample
    interval past the last sample and none before a counter's zero) and every
    `rate()` is that over 60 s, whatever the clock says when the tick queries."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.steps: list[tuple[float, dict[Series, float]]] = []
            self.next = 0
            self.gauges: dict[Series, float] = {}
            self.totals: dict[Series, float] = {}

    def show(self, values: dict[Series, float]) -> tuple[int, float]:
        """Record `values` (gauge values, counter increases, latency
        observations) over what earlier calls showed; the index of the last
        step and its time."""
        with self.lock:
            last = self.steps[-1][0] if self.steps else 0.0
            t = max(time.time() + 0.5, last + 1)
            before = dict(self.totals)
            for series, v in values.items():
                if series[1] == "gauge":
                    self.gauges[series] = v
                else:
                    self.totals[series] = before.get(series, 0.0) + v
            index = len(self.steps) + 1
            start = {series: before.get(series, 0.0) for series in self.totals}
            self.steps.append((t, {**self.gauges, **start, STEP: index - 1}))
            self.steps.append((t + 1, {**self.gauges, **self.totals, STEP: index}))
            return index, t + 1

    def collect(self):
        with self.lock:
            if not self.steps:
                return
            t, values = self.steps[self.next]
            self.next = min(self.next + 1, len(self.steps) - 1)
        for (name, kind, pairs), v in values.items():
            labels = dict(pairs)
            if kind == "gauge":
                family = GaugeMetricFamily(name, name, labels=list(labels))
                family.add_metric(list(labels.values()), v, timestamp=t)
            elif kind == "counter":
                family = CounterMetricFamily(name, name, labels=list(labels))
                family.add_metric(list(labels.values()), v, timestamp=t)
            else:  # histogram of `v` observations in (0.05, 0.1]
                family = HistogramMetricFamily(name, name, labels=list(labels))
                buckets = [(str(b), v if b >= 0.1 else 0.0) for b in LATENCY_BUCKETS]
                family.add_metric(
                    list(labels.values()), [*buckets, ("+Inf", v)], v * 0.075, timestamp=t
                )
            yield family


class Prom:
    """A real Prometheus that scrapes an `Exposition` as job `job`."""

    def __init__(self, prometheus: Prometheus, exposition: Exposition, job: str) -> None:
        self.prometheus = prometheus
        self.exposition = exposition
        self.job = job
        self.url = prometheus.url

    def forget(self) -> None:
        """Nothing exposed and nothing left in Prometheus from earlier tests:
        every series deleted up to now (what `show` adds is later)."""
        self.exposition.reset()
        match = f'{{job="{self.job}"}}'
        query = urllib.parse.urlencode({"match[]": match, "end": f"{time.time():.3f}"})
        req = urllib.request.Request(
            f"{self.url}/api/v1/admin/tsdb/delete_series?{query}", method="POST"
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 204, r.status
        assert self.prometheus.query(match) == []

    def show(self, values: dict[Series, float]) -> None:
        """Expose `values` and wait until Prometheus has scraped all of it and
        its last sample is more than a sample interval old (the extrapolation
        `Exposition` counts on)."""
        step, last = self.exposition.show(values)
        deadline = time.monotonic() + 30
        while True:
            got = self.prometheus.query("terrace_test_step")
            if got and float(got[0]["value"][1]) == step and time.time() > last + 1.2:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"Prometheus did not scrape step {step}: {got}")
            time.sleep(0.1)


@contextlib.contextmanager
def scraped_prometheus(workdir: Path, job: str) -> Iterator[Prom]:
    """A real Prometheus (admin API on, for `Prom.forget`) scraping a fresh
    `Exposition` every second as job `job`; the exposition's HTTP server and
    Prometheus are stopped on exit."""
    registry = CollectorRegistry()
    exposition = Exposition()
    registry.register(exposition)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    target = f"127.0.0.1:{server.server_port}"
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}],
    }
    try:
        with Prometheus(workdir, config, "--web.enable-admin-api") as prometheus:
            yield Prom(prometheus, exposition, job)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `condition` on the event loop until it holds; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
