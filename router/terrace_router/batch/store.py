"""Where batches live: files, batches and their lines, in a real database.

SQLite (a file, on a PersistentVolumeClaim in a cluster) is the embedded
default for one `terrace-batch` replica; PostgreSQL (`postgresql+psycopg://`
URL) when several replicas share the work: each claims lines with
`FOR UPDATE SKIP LOCKED`, so no line is sent by two at once. SQLAlchemy Core
speaks both.

A line's life: `pending` -> `running` (claimed by a worker, with a lease
time) -> `done` (its output or error recorded, once: the update only
matches a line not yet done, so a line answered twice after a restart is
written once) or `expired` / `cancelled`. A `running` line whose worker died
goes back to `pending` when its lease runs out. Every public method is
blocking; the async callers run them in a thread.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

metadata = sa.MetaData()

files = sa.Table(
    "terrace_batch_files",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("filename", sa.String(512), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("bytes", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("content", sa.LargeBinary, nullable=True),  # input files; outputs are built
    sa.Column("batch_id", sa.String(64), nullable=True),  # output and error files
    sa.Column("kind", sa.String(16), nullable=False, default="input"),  # input|output|error
)

batches = sa.Table(
    "terrace_batches",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False, unique=True),  # list order
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("input_file_id", sa.String(64), nullable=False),
    sa.Column("completion_window", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("metadata", sa.Text, nullable=True),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("expires_at", sa.Integer, nullable=False),
    sa.Column("in_progress_at", sa.Integer, nullable=True),
    sa.Column("finalizing_at", sa.Integer, nullable=True),
    sa.Column("completed_at", sa.Integer, nullable=True),
    sa.Column("expired_at", sa.Integer, nullable=True),
    sa.Column("cancelling_at", sa.Integer, nullable=True),
    sa.Column("cancelled_at", sa.Integer, nullable=True),
    sa.Column("failed_at", sa.Integer, nullable=True),
    sa.Column("output_file_id", sa.String(64), nullable=True),
    sa.Column("error_file_id", sa.String(64), nullable=True),
    # Energy and emissions of the lines answered so far, as far as known: the
    # serving tier's energy per request at the time, times the grid's intensity.
    sa.Column("joules", sa.Float, nullable=False, default=0.0),
    sa.Column("grams_co2", sa.Float, nullable=False, default=0.0),
    sa.Column("lines_measured", sa.Integer, nullable=False, default=0),  # with a known energy
    sa.Column("lines_with_carbon", sa.Integer, nullable=False, default=0),  # and intensity
)

lines = sa.Table(
    "terrace_batch_lines",
    metadata,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("line", sa.Integer, primary_key=True),
    sa.Column("custom_id", sa.String(512), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, default="pending"),
    sa.Column("lease_until", sa.Float, nullable=True),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("response", sa.Text, nullable=True),  # the answer body (JSON)
    sa.Column("error", sa.Text, nullable=True),  # {"code", "message"} (JSON)
    sa.Column("request_id", sa.String(64), nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.UniqueConstraint("batch_id", "custom_id", name="terrace_batch_line_custom_id"),
    sa.Index("terrace_batch_lines_state", "state", "batch_id"),
)

TERMINAL = ("completed", "expired", "cancelled", "failed")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class Claimed:
    batch_id: str
    line: int
    custom_id: str
    body: dict


@dataclass(frozen=True)
class Counts:
    total: int
    completed: int
    failed: int
    pending: int  # pending or running


class Store:
    """One per process; `url` is a SQLAlchemy URL (sqlite:///path,
    postgresql+psycopg://user@/db?host=/socket/dir)."""

    def __init__(self, url: str) -> None:
        kwargs: dict[str, Any] = {"future": True}
        if url.startswith("sqlite"):
            # One file, one writer at a time: wait for the lock instead of failing.
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = sa.create_engine(url, **kwargs)
        self.postgres = self.engine.dialect.name == "postgresql"
        if self.engine.dialect.name == "sqlite":
            with self.engine.begin() as c:
                c.exec_driver_sql("PRAGMA journal_mode=WAL")
        metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # ---------------------------------------------------------------- files

    def add_file(self, filename: str, purpose: str, content: bytes) -> dict:
        row = {
            "id": new_id("file"),
            "filename": filename,
            "purpose": purpose,
            "bytes": len(content),
            "created_at": int(time.time()),
            "content": content,
            "kind": "input",
        }
        with self.engine.begin() as c:
            c.execute(files.insert().values(**row))
        return row

    def file(self, file_id: str) -> dict | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(files).where(files.c.id == file_id)).mappings().first()
        return dict(row) if row else None

    def files(self, purpose: str | None, after: str | None, limit: int, order: str) -> list[dict]:
        q = sa.select(files)
        if purpose is not None:
            q = q.where(files.c.purpose == purpose)
        key = (files.c.created_at, files.c.id)
        if after is not None:
            anchor = self.file(after)
            if anchor is not None:
                cmp = sa.tuple_(*key) < (anchor["created_at"], anchor["id"])
                if order == "asc":
                    cmp = sa.tuple_(*key) > (anchor["created_at"], anchor["id"])
                q = q.where(cmp)
        q = q.order_by(*(k.desc() if order == "desc" else k.asc() for k in key)).limit(limit)
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def delete_file(self, file_id: str) -> bool:
        with self.engine.begin() as c:
            return c.execute(files.delete().where(files.c.id == file_id)).rowcount > 0

    # -------------------------------------------------------------- batches

    def add_batch(
        self,
        endpoint: str,
        input_file_id: str,
        window: str,
        window_seconds: int,
        meta: dict | None,
        items: Sequence[tuple[str, dict]],
    ) -> dict:
        """A batch and its lines, in one transaction: (custom_id, body) each."""
        now = int(time.time())
        batch_id = new_id("batch")
        with self.engine.begin() as c:
            seq = c.execute(sa.select(sa.func.coalesce(sa.func.max(batches.c.seq), 0))).scalar()
            c.execute(
                batches.insert().values(
                    id=batch_id,
                    seq=int(seq or 0) + 1,
                    endpoint=endpoint,
                    input_file_id=input_file_id,
                    completion_window=window,
                    status="in_progress",
                    metadata=json.dumps(meta) if meta is not None else None,
                    created_at=now,
                    expires_at=now + window_seconds,
                    in_progress_at=now,
                    joules=0.0,
                    grams_co2=0.0,
                    lines_measured=0,
                    lines_with_carbon=0,
                )
            )
            c.execute(
                lines.insert(),
                [
                    {
                        "batch_id": batch_id,
                        "line": i,
                        "custom_id": custom_id,
                        "body": json.dumps(body),
                        "state": "pending",
                    }
                    for i, (custom_id, body) in enumerate(items)
                ],
            )
        batch = self.batch(batch_id)
        assert batch is not None
        return batch

    def batch(self, batch_id: str) -> dict | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(batches).where(batches.c.id == batch_id)).mappings().first()
        return dict(row) if row else None

    def batches(self, after: str | None, limit: int) -> list[dict]:
        """Newest first, after the batch `after` (OpenAI's cursor pagination)."""
        q = sa.select(batches)
        if after is not None:
            anchor = self.batch(after)
            if anchor is not None:
                q = q.where(batches.c.seq < anchor["seq"])
        q = q.order_by(batches.c.seq.desc()).limit(limit)
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def counts(self, batch_id: str) -> Counts:
        q = (
            sa.select(lines.c.state, lines.c.status_code, sa.func.count())
            .where(lines.c.batch_id == batch_id)
            .group_by(lines.c.state, lines.c.status_code)
        )
        total = completed = failed = pending = 0
        with self.engine.connect() as c:
            for state, code, n in c.execute(q):
                total += n
                if state == "done" and code is not None and 200 <= code < 300:
                    completed += n
                elif state in ("pending", "running"):
                    pending += n
                else:
                    failed += n
        return Counts(total, completed, failed, pending)

    def set_status(self, batch_id: str, status: str, **stamps: Any) -> bool:
        """Move a batch on, unless it already ended; True when it moved."""
        with self.engine.begin() as c:
            r = c.execute(
                batches.update()
                .where(batches.c.id == batch_id, batches.c.status.not_in(TERMINAL))
                .values(status=status, **stamps)
            )
            return r.rowcount > 0

    def active(self) -> list[dict]:
        with self.engine.connect() as c:
            q = sa.select(batches).where(batches.c.status.in_(("in_progress", "cancelling")))
            return [dict(r) for r in c.execute(q.order_by(batches.c.seq)).mappings()]

    def add_energy(self, batch_id: str, joules: float, grams: float | None) -> None:
        """One answered line's energy, and its emissions when the grid's
        intensity was known."""
        values: dict[str, Any] = {
            "joules": batches.c.joules + joules,
            "lines_measured": batches.c.lines_measured + 1,
        }
        if grams is not None:
            values["grams_co2"] = batches.c.grams_co2 + grams
            values["lines_with_carbon"] = batches.c.lines_with_carbon + 1
        with self.engine.begin() as c:
            c.execute(batches.update().where(batches.c.id == batch_id).values(**values))

    # ---------------------------------------------------------------- lines

    def claim(self, batch_id: str, n: int, lease_seconds: float) -> list[Claimed]:
        """Up to `n` pending lines (or running ones whose lease ran out), now
        running under this caller's lease."""
        now = time.time()
        claimable = sa.or_(
            lines.c.state == "pending",
            sa.and_(lines.c.state == "running", lines.c.lease_until < now),
        )
        q = (
            sa.select(lines.c.line, lines.c.custom_id, lines.c.body)
            .where(lines.c.batch_id == batch_id, claimable)
            .order_by(lines.c.line)
            .limit(n)
        )
        if self.postgres:
            q = q.with_for_update(skip_locked=True)
        with self.engine.begin() as c:
            rows = c.execute(q).all()
            if not rows:
                return []
            c.execute(
                lines.update()
                .where(lines.c.batch_id == batch_id, lines.c.line.in_([r.line for r in rows]))
                .values(state="running", lease_until=now + lease_seconds)
            )
        return [Claimed(batch_id, r.line, r.custom_id, json.loads(r.body)) for r in rows]

    def finish(
        self,
        batch_id: str,
        line: int,
        status_code: int | None,
        response: dict | None,
        error: dict | None,
        request_id: str,
    ) -> bool:
        """Record a line's outcome once; False when it was already recorded
        (another worker, or this one before a restart, finished it first)."""
        with self.engine.begin() as c:
            r = c.execute(
                lines.update()
                .where(
                    lines.c.batch_id == batch_id,
                    lines.c.line == line,
                    lines.c.state.in_(("pending", "running")),
                )
                .values(
                    state="done",
                    status_code=status_code,
                    response=json.dumps(response) if response is not None else None,
                    error=json.dumps(error) if error is not None else None,
                    request_id=request_id,
                    finished_at=time.time(),
                    lease_until=None,
                )
            )
            return r.rowcount > 0

    def release(self, batch_id: str, line_numbers: Iterable[int]) -> None:
        """Give claimed lines back (sent nowhere, or the upstream shed them)."""
        with self.engine.begin() as c:
            c.execute(
                lines.update()
                .where(
                    lines.c.batch_id == batch_id,
                    lines.c.line.in_(list(line_numbers)),
                    lines.c.state == "running",
                )
                .values(state="pending", lease_until=None)
            )

    def end_unfinished(
        self, batch_id: str, state: str, error: dict, now: float | None = None
    ) -> int:
        """Every line never sent (pending, or claimed by a worker whose lease
        ran out by `now`): `expired` or `cancelled`, with that error. Lines in
        flight are left to finish. Pass the same `now` to `in_flight`, so a
        lease that runs out between the two calls is counted by one of them."""
        now = time.time() if now is None else now
        unsent = sa.or_(
            lines.c.state == "pending",
            sa.and_(lines.c.state == "running", lines.c.lease_until < now),
        )
        with self.engine.begin() as c:
            r = c.execute(
                lines.update()
                .where(lines.c.batch_id == batch_id, unsent)
                .values(state=state, error=json.dumps(error), finished_at=time.time())
            )
            return r.rowcount

    def in_flight(self, batch_id: str, now: float | None = None) -> int:
        """Lines running under a lease that has not run out by `now`."""
        now = time.time() if now is None else now
        with self.engine.connect() as c:
            q = sa.select(sa.func.count()).where(
                lines.c.batch_id == batch_id,
                lines.c.state == "running",
                lines.c.lease_until >= now,
            )
            return int(c.execute(q).scalar() or 0)

    def outcomes(self, batch_id: str) -> list[dict]:
        """Every line that ended, in input order."""
        with self.engine.connect() as c:
            q = (
                sa.select(lines)
                .where(lines.c.batch_id == batch_id, lines.c.state.not_in(("pending", "running")))
                .order_by(lines.c.line)
            )
            return [dict(r) for r in c.execute(q).mappings()]

    def finalize(
        self, batch_id: str, status: str, output: bytes, errors: bytes, **stamps: Any
    ) -> bool:
        """End a batch with its output and error files, in one transaction:
        a crash leaves it either unfinished (finalized again later) or done.
        False when it had already ended."""
        now = int(time.time())
        ids: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        with self.engine.begin() as c:
            r = c.execute(
                batches.update()
                .where(batches.c.id == batch_id, batches.c.status.not_in(TERMINAL))
                .values(status=status, **stamps)
            )
            if r.rowcount == 0:
                return False
            for kind, content in (("output", output), ("error", errors)):
                if not content:
                    continue
                file_id = new_id("file")
                c.execute(
                    files.insert().values(
                        id=file_id,
                        filename=f"{batch_id}_{kind}.jsonl",
                        purpose="batch_output",
                        bytes=len(content),
                        created_at=now,
                        content=content,
                        batch_id=batch_id,
                        kind=kind,
                    )
                )
                ids[f"{kind}_file_id"] = file_id
            c.execute(batches.update().where(batches.c.id == batch_id).values(**ids))
        return True
