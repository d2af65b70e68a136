"""A server process on 127.0.0.1 for tests and benchmarks: started from an
argv, waited on until an HTTP path answers 200, read through /metrics, and
stopped by its PID (never by name).

Started with `--port 0`, a server binds a port the OS picks and prints it;
the port is read back from its log. That is the way to start one: a port
from free_port() is free only until somebody else binds it.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from devcluster import free_port
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
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
