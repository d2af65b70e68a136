"""A server process on 127.0.0.1 for tests and benchmarks: started from an
argv, waited on until an HTTP path answers 200, read through /metrics, and
stopped by its PID (never by name).

Started with `--port 0`, a server binds a port the OS picks and prints it;
the port is read back from its log. That is the way to start one: a port
from free_port() is free only until somebody else binds it.
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from devcluster import free_port
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "Relay",
    "AGENT_PORT",
    "PROMETHEUS_PORT",
    "UVICORN_PORT",
    "ServerProcess",
    "free_port",
    "port_from_log",
]


# What servers print once they listen; group 1 is the port, the one the OS
# picked when they were started on port 0.
UVICORN_PORT = r"Uvicorn running on http://127\.0\.0\.1:(\d+)"  # Terrace's router, runtime
LLAMA_SERVER_PORT = r"listening on http://127\.0\.0\.1:(\d+)"
PROMETHEUS_PORT = r'msg="Listening on" address=127\.0\.0\.1:(\d+)'
AGENT_PORT = r"metrics on 127\.0\.0\.1:(\d+)"  # terrace-agent's /metrics
LISTENING = f"{UVICORN_PORT}|{LLAMA_SERVER_PORT}"


def port_from_log(
    proc: subprocess.Popen[Any], log: Path, pattern: str, timeout: float = 60.0, after: int = 0
) -> int:
    """The port a subprocess started on port 0 reports in its log (from
    character `after` on: a log an earlier process wrote to as well);
    `pattern` is a regex whose first non-empty group is the port. Raises
    RuntimeError if the process exits first, TimeoutError if it says nothing
    in time."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = regex.search(log.read_text(errors="replace")[after:])
        if found:
            return int(next(g for g in found.groups() if g))
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}):\n{log.read_text()}")
        time.sleep(0.05)
    raise TimeoutError(f"no port in {log} after {timeout} s:\n{log.read_text()}")


class ServerProcess:
    """`argv` makes the server listen on `port`; its output goes to `log`.

    With `port=0` (and `--port 0` in `argv`) the server binds a port the OS
    picks: `wait()` reads it from the log (needed then) and sets `port`/`url`.
    """

    def __init__(
        self, name: str, argv: list[str], port: int, ready_path: str, log: Path | None = None
    ) -> None:
        if port == 0 and log is None:
            raise ValueError("a server on port 0 needs a log to report its port in")
        self.name, self.port, self.ready_path = name, port, ready_path
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log
        self._log = log.open("w") if log is not None else None
        out = self._log if self._log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path else ""

    def wait(self, timeout_s: float = 180) -> ServerProcess:
        """Until `ready_path` answers 200; raises if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            if self.port == 0:
                assert self.log_path is not None
                left = deadline - time.monotonic()
                self.port = port_from_log(self.proc, self.log_path, LISTENING, left)
                self.url = f"http://127.0.0.1:{self.port}"
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.log()}")

    def metric(self, name: str) -> float:
        """The sum of a metric's samples on /metrics (0 when absent)."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name
        )

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()


class Relay:
    """A stable address on 127.0.0.1 in front of a server that comes and
    goes, as a Service is in front of its pods: each connection is relayed to
    127.0.0.1:`target`, the server of the moment. With no target (killed, or
    not ready again yet) a connection is reset at once, the way a dead
    upstream's address answers. `sock` is a socket already bound (one a test
    held, refusing connections, until the server was ready); by default a
    port the OS picks."""

    def __init__(self, sock: socket.socket | None = None, target: int | None = None) -> None:
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
        self.sock = sock
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.target = target
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            target = self.target
            try:
                if target is None:
                    raise ConnectionRefusedError("no runtime behind the relay")
                upstream = socket.create_connection(("127.0.0.1", target), timeout=5)
            except OSError:
                self._reset(conn)
                continue
            upstream.settimeout(None)
            with self.lock:
                self.open |= {conn, upstream}
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _reset(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            with self.lock:
                gone = {src, dst} & self.open
                self.open -= gone
            for s in gone:
                s.close()

    def cut(self) -> None:
        """A partition: every open connection reset, new ones refused, until
        `target` is set again."""
        self.target = None
        with self.lock:
            left, self.open = self.open, set()
        for s in left:
            with contextlib.suppress(OSError):
                self._reset(s)

    def stop(self) -> None:
        self.stopping.set()
        self.sock.close()
        self.thread.join(5)
        with self.lock:
            left, self.open = self.open, set()
        for s in left:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
