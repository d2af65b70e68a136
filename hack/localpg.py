"""Debian's PostgreSQL for tests: a private server on a Unix socket.

`PostgresServer(workdir).start()` runs `initdb` and `postgres` from
/usr/lib/postgresql/<version>/bin with TCP off (`listen_addresses=''`), so
there is no port to race for: clients reach it through the socket folder
(`url` is a SQLAlchemy URL for psycopg). Started by root, it runs as the
`postgres` user the Debian package creates (PostgreSQL refuses root). It is
stopped by its PID; `make test`'s system dependencies install the package.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

DATABASE = "terrace"


def binaries() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        raise FileNotFoundError(
            "no PostgreSQL server in /usr/lib/postgresql/*/bin (Debian: apt-get install postgresql)"
        )
    return Path(found[-1]).parent


class PostgresServer:
    def __init__(self) -> None:
        # Not under pytest's 0700 temp folders: the server's user must reach it.
        self.dir = Path(tempfile.mkdtemp(prefix="terrace-pg-"))
        self.data = self.dir / "data"
        self.socket_dir = self.dir
        self.log_path = self.dir / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.bin = binaries()
        self.user = "postgres" if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{DATABASE}@/{DATABASE}?host={self.socket_dir}"

    def _run(self, *argv: str) -> None:
        cmd = [str(self.bin / argv[0]), *argv[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self, timeout: float = 60.0) -> PostgresServer:
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", DATABASE, "--auth=trust", "-E", "UTF8")
        cmd = [
            str(self.bin / "postgres"),
            "-D", str(self.data),
            "-k", str(self.socket_dir),
            "-c", "listen_addresses=",
            "-c", "fsync=off",  # a test database: durability across a power cut is not tested
        ]  # fmt: skip
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", str(self.socket_dir), "-U", DATABASE],
                capture_output=True,
            )
            if ready.returncode == 0:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start:\n{self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        self._run("createdb", "-h", str(self.socket_dir), "-U", DATABASE, DATABASE)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # runuser passes signals on; SIGINT is PostgreSQL's "fast" shutdown.
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
