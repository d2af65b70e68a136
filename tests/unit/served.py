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


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `condition` on the event loop until it holds; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
