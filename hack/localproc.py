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

import httpx
from devcluster import free_port
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["ServerProcess", "free_port"]


# What uvicorn (Terrace's router and runtime) and llama-server print once
# they listen; group 1 is the port, the one the OS picked for --port 0.
LISTENING = re.compile(r"(?:Uvicorn running on|listening on) http://127\.0\.0\.1:(\d+)")


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
                found = LISTENING.search(self.log_path.read_text(errors="replace"))
                if found is None:
                    time.sleep(0.1)
                    continue
                self.port = int(found.group(1))
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
