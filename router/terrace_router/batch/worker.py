"""The batch worker: releases pending lines to the router, records answers.

Every `interval_seconds` it reads the grid signal once (`GridSignal`), then
for each batch in progress: ends it if it was cancelled or its window has
passed, finalizes it when every line has an outcome, and otherwise asks the
release policy (policy.py) how many lines to send now, claims them in the
store and sends each to the router's endpoint as an ordinary client would
(its own API key). An answer is recorded once (store.finish); a line the
router sheds (429, 503, a connection error) goes back to pending and the
batch's concurrency halves; a 5xx is tried again up to `attempts` times.
A worker that dies leaves its claimed lines to come back when their lease
runs out, so a restart resumes where the batch was and no line is answered
twice in the output.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass, field

import httpx

from ..proxy import DEFERRABLE_HEADER
from .metrics import BatchMetrics
from .policy import Grid, Pace, Slots, release
from .store import Claimed, Store

log = logging.getLogger("terrace.batch")

EXPIRED = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}
CANCELLED = {
    "code": "batch_cancelled",
    "message": "This request was not executed because the batch was cancelled.",
}
SHED = (429, 503)


@dataclass
class WorkerSettings:
    interval_seconds: float = 1.0
    slots: int = 8  # most lines of one batch in flight at once
    lease_seconds: float = 120.0  # a claimed line comes back after this if unanswered
    request_timeout_seconds: float = 600.0
    safety: float = 2.0  # deadline margin: finish in half the time left
    attempts: int = 3  # 5xx answers before a line is recorded as failed
    threshold: float | None = None  # also release at or below this grid signal
    # Seconds a line takes in one slot, assumed until the batch's first
    # answer measures it (on the safe side: the deadline comes early).
    initial_seconds_per_line: float = 10.0


ENERGY_BY_TIER = "max by (tier) (terrace_tier_energy_per_request_joules)"
JOULES_PER_KWH = 3.6e6
# With no signal configured: the cluster's own demand (its low-demand hours).
# Routing decisions, which count neither batch lines nor requests the router
# shed (proxy.py), so batch work does not raise its own signal. No series yet
# (no router has routed anything) is no demand, not an unknown.
DEMAND_SIGNAL = "sum(rate(terrace_router_demand_total[5m])) or vector(0)"
# A forecast series carries how far ahead it looks in this label (hours).
FORECAST_LABEL = "hours_ahead"
DAY = 86_400
OUTLOOK_STEP = 300  # seconds between the points of yesterday's values
OUTLOOK_TTL = 300  # seconds an outlook is reused


class GridSignal:
    """Reads from Prometheus: the grid signal (a carbon intensity, a price;
    DEMAND_SIGNAL when none is given), its outlook (policy.py), the grid's
    carbon intensity (gCO2/kWh) and each tier's energy per request (the
    operator's `terrace_tier_energy_per_request_joules`). A value Prometheus
    cannot give is None: unknown, never zero.

    The outlook is `forecast_query`'s series, one per `hours_ahead` label,
    when given; else the signal's own values over the next 24 hours of
    yesterday, every OUTLOOK_STEP seconds (a persistence forecast)."""

    def __init__(
        self,
        prometheus_url: str,
        query: str | None,
        timeout: float = 5.0,
        carbon_query: str | None = None,
        forecast_query: str | None = None,
    ) -> None:
        self.query = query or DEMAND_SIGNAL
        self.carbon_query = carbon_query
        self.forecast_query = forecast_query
        self._client = httpx.AsyncClient(base_url=prometheus_url.rstrip("/"), timeout=timeout)
        self._outlook: tuple[float, list[tuple[float, float]]] | None = None  # (read at, points)

    async def _vector(self, query: str) -> list[dict] | None:
        try:
            r = await self._client.get("/api/v1/query", params={"query": query})
            data = r.json()["data"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            log.warning("query %r unreadable: %s", query, e)
            return None
        result = data.get("result")
        if data.get("resultType") == "scalar":
            result = [{"metric": {}, "value": result}]
        return result if isinstance(result, list) else None

    @staticmethod
    def _value(item: dict) -> float | None:
        try:
            value = float(item["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            return None
        return value if math.isfinite(value) else None

    async def _one(self, query: str | None) -> float | None:
        result = await self._vector(query) if query else None
        return self._value(result[0]) if result is not None and len(result) == 1 else None

    async def read(self) -> float | None:
        return await self._one(self.query)

    async def outlook(self, now: float) -> list[tuple[float, float]]:
        """(seconds ahead of `now`, expected value) points, soonest first;
        [] when Prometheus has none (a new signal, a forecast without data)."""
        if self._outlook is not None and now - self._outlook[0] < OUTLOOK_TTL:
            read_at, points = self._outlook
            return [(ahead - (now - read_at), v) for ahead, v in points if ahead > now - read_at]
        points = await (self._forecast() if self.forecast_query else self._yesterday(now))
        self._outlook = (now, points)
        return points

    async def _forecast(self) -> list[tuple[float, float]]:
        points = []
        for item in await self._vector(self.forecast_query or "") or []:
            value = self._value(item)
            try:
                ahead = float((item.get("metric") or {})[FORECAST_LABEL]) * 3600
            except (KeyError, TypeError, ValueError):
                continue
            if value is not None and math.isfinite(ahead) and ahead >= 0:
                points.append((ahead, value))
        return sorted(points)

    async def _yesterday(self, now: float) -> list[tuple[float, float]]:
        params = {"query": self.query, "start": f"{now - DAY:.3f}", "end": f"{now:.3f}",
                  "step": str(OUTLOOK_STEP)}  # fmt: skip
        try:
            r = await self._client.get("/api/v1/query_range", params=params)
            result = r.json()["data"]["result"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            log.warning("outlook of %r unreadable: %s", self.query, e)
            return []
        if not isinstance(result, list) or len(result) != 1:
            return []
        points = []
        for t, v in result[0].get("values") or []:
            try:
                value = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(value):
                points.append((float(t) + DAY - now, value))
        return points

    async def carbon(self) -> float | None:
        return await self._one(self.carbon_query)

    async def energy_by_tier(self) -> dict[str, float]:
        out = {}
        for item in await self._vector(ENERGY_BY_TIER) or []:
            value = self._value(item)
            tier = (item.get("metric") or {}).get("tier")
            if tier and value is not None:
                out[tier] = value
        return out

    async def aclose(self) -> None:
        await self._client.aclose()


@dataclass
class BatchPace:
    slots: Slots
    seconds_per_line: float = 1.0
    failures: dict[int, int] = field(default_factory=dict)  # line -> 5xx answers so far


class Worker:
    def __init__(
        self,
        store: Store,
        router_url: str,
        api_key: str | None = None,
        settings: WorkerSettings | None = None,
        grid: GridSignal | None = None,
        metrics: BatchMetrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics or BatchMetrics()
        self.settings = settings or WorkerSettings()
        self.grid = grid
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            base_url=router_url.rstrip("/"),
            headers=headers,
            timeout=self.settings.request_timeout_seconds,
        )
        self.paces: dict[str, BatchPace] = {}
        self.tasks: set[asyncio.Task] = set()
        self.last_signal: float | None = None
        self.outlook: list[tuple[float, float]] = []  # (seconds ahead, value)
        self.last_reason: dict[str, str] = {}
        self.intensity: float | None = None  # gCO2/kWh at the last pass
        self.energy: dict[str, float] = {}  # joules per request by tier, at the last pass

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.tick()
                except Exception:  # the store was unreachable: try again next pass
                    log.exception("batch pass failed")
                await asyncio.sleep(self.settings.interval_seconds)
        finally:
            for t in self.tasks:
                t.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.client.aclose()
            if self.grid is not None:
                await self.grid.aclose()

    async def tick(self) -> None:
        if self.grid is not None:
            self.last_signal = await self.grid.read()
            self.outlook = await self.grid.outlook(time.time())
            self.intensity = await self.grid.carbon()
            self.energy = await self.grid.energy_by_tier()
        self.metrics.signal.set(math.nan if self.last_signal is None else self.last_signal)
        for batch in await asyncio.to_thread(self.store.active):
            await self._batch(batch)
        self.metrics.passes.inc()

    async def _batch(self, batch: dict) -> None:
        batch_id, now = batch["id"], time.time()
        ending = None
        if batch["status"] == "cancelling":
            ending = ("cancelled", CANCELLED, {"cancelled_at": int(now)})
        elif now >= batch["expires_at"]:
            ending = ("expired", EXPIRED, {"expired_at": int(now)})
        if ending is not None:
            # Nothing more goes out; lines already sent are waited for (until
            # their lease ends), so an answer that was computed is kept.
            state, error, stamps = ending
            # One instant for both: a lease running out in between would make
            # a line neither ended nor in flight, and missing from the files.
            await asyncio.to_thread(self.store.end_unfinished, batch_id, state, error, now)
            if await asyncio.to_thread(self.store.in_flight, batch_id, now) == 0:
                await self._finalize(batch_id, state, **stamps)
            return
        counts = await asyncio.to_thread(self.store.counts, batch_id)
        if counts.pending == 0:
            await self._finalize(batch_id, "completed", completed_at=int(now))
            return
        in_flight = await asyncio.to_thread(self.store.in_flight, batch_id)
        pace = self.paces.setdefault(
            batch_id,
            BatchPace(
                Slots(float(self.settings.slots), self.settings.slots),
                self.settings.initial_seconds_per_line,
            ),
        )
        decision = release(
            Pace(
                now=now,
                expires_at=batch["expires_at"],
                pending=counts.pending - in_flight,
                in_flight=in_flight,
                seconds_per_line=pace.seconds_per_line,
                slots=pace.slots.value,
            ),
            Grid(
                self.last_signal,
                self.settings.threshold,
                tuple(v for ahead, v in self.outlook if ahead <= batch["expires_at"] - now),
                configured=self.grid is not None,
            ),
            self.settings.safety,
        )
        if self.last_reason.get(batch_id) != decision.reason:
            self.last_reason[batch_id] = decision.reason
            log.info("batch %s: %s", batch_id, decision.reason)
        if decision.lines <= 0:
            return
        claimed = await asyncio.to_thread(
            self.store.claim, batch_id, decision.lines, self.settings.lease_seconds
        )
        reason = decision.reason.split(":")[0].split(" ")[0]  # deadline, grid, spare
        self.metrics.released.labels(reason).inc(len(claimed))
        # Not near its deadline, a line may wait: the router sheds it first and
        # wakes no tier for it (proxy.DEFERRABLE_HEADER).
        deferrable = not decision.reason.startswith("deadline")
        for line in claimed:
            task = asyncio.create_task(self._send(batch["endpoint"], line, pace, deferrable))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _send(
        self, endpoint: str, line: Claimed, pace: BatchPace, deferrable: bool = True
    ) -> None:
        started = time.monotonic()
        headers = {DEFERRABLE_HEADER: "true"} if deferrable else {}
        try:
            r = await self.client.post(endpoint, json=line.body, headers=headers)
        except httpx.HTTPError as e:
            log.info("line %s of %s not sent (%s): back to pending", line.line, line.batch_id, e)
            self.metrics.shed.inc()
            pace.slots = pace.slots.shed()
            await asyncio.to_thread(self.store.release, line.batch_id, [line.line])
            return
        if r.status_code in SHED or (
            r.status_code >= 500 and pace.failures.get(line.line, 0) + 1 < self.settings.attempts
        ):
            if r.status_code >= 500 and r.status_code not in SHED:
                pace.failures[line.line] = pace.failures.get(line.line, 0) + 1
            self.metrics.shed.inc()
            pace.slots = pace.slots.shed()
            await asyncio.to_thread(self.store.release, line.batch_id, [line.line])
            return
        took = time.monotonic() - started
        pace.seconds_per_line = 0.8 * pace.seconds_per_line + 0.2 * took
        pace.slots = pace.slots.served()
        try:
            body = r.json()
        except ValueError:
            body = {"error": {"message": r.text[:2000], "type": "upstream_error"}}
        request_id = r.headers.get("x-request-id") or f"req_{secrets.token_hex(12)}"
        recorded = await asyncio.to_thread(
            self.store.finish, line.batch_id, line.line, r.status_code, body, None, request_id
        )
        if recorded:
            self.metrics.answered.labels(f"{r.status_code // 100}xx").inc()
            joules = self.energy.get(r.headers.get("x-terrace-tier", ""))
            if joules is not None and 200 <= r.status_code < 300:
                grams = joules / JOULES_PER_KWH * self.intensity if self.intensity else None
                await asyncio.to_thread(self.store.add_energy, line.batch_id, joules, grams)

    async def _finalize(self, batch_id: str, status: str, **stamps: int) -> None:
        outcomes = await asyncio.to_thread(self.store.outcomes, batch_id)
        output, errors = [], []
        for o in outcomes:
            item = {
                "id": f"batch_req_{o['batch_id'][-12:]}_{o['line']}",
                "custom_id": o["custom_id"],
                "response": None,
                "error": json.loads(o["error"]) if o["error"] else None,
            }
            if o["status_code"] is not None:
                item["response"] = {
                    "status_code": o["status_code"],
                    "request_id": o["request_id"],
                    "body": json.loads(o["response"]) if o["response"] else None,
                }
            ok = o["status_code"] is not None and 200 <= o["status_code"] < 300
            (output if ok else errors).append(json.dumps(item, separators=(",", ":")))
        now = int(time.time())
        done = await asyncio.to_thread(
            self.store.finalize,
            batch_id,
            status,
            ("\n".join(output) + "\n").encode() if output else b"",
            ("\n".join(errors) + "\n").encode() if errors else b"",
            finalizing_at=now,
            **stamps,
        )
        if done:
            log.info("batch %s %s: %d answered, %d errors", batch_id, status, len(output),
                     len(errors))  # fmt: skip
            self.paces.pop(batch_id, None)
            self.last_reason.pop(batch_id, None)
