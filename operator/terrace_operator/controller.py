"""What every controller of the operator shares: a work queue, workers, and
the apply, Event and status helpers.

One controller per kind (tiers.py: ModelTier; routers.py: TierRouter), each
the only writer of its kind's status. Watch events land in the shared cache
(cache.py, fed by handlers.py) and put keys on a controller's queue;
workers take keys off it and `sync` them by level: build the desired
children (children.py), apply whatever differs (server-side apply, field
manager `terrace-operator`), and write status. Running a sync twice changes
nothing. The decisions live in reconcile.py and plan.py.
"""

from __future__ import annotations

import asyncio
import logging
import time

from . import children as ch
from .api import API_VERSION
from .cache import Cache, Key
from .conditions import get_condition, now_rfc3339
from .kube import ApiError, Kube
from .metrics import Metrics
from .reconcile import Readiness, needs_apply, status_differs
from .settings import OperatorSettings
from .workqueue import WorkQueue

log = logging.getLogger("terrace_operator")


# Ready=False reasons that only wait for the cluster (pods starting, the
# Deployment controller catching up): looked at again soon, with the
# Deployment read from the API server, even if a watch event is missed.
WAITING = frozenset({"Progressing", "PodsNotReady", "DeploymentMissing"})
RECHECK_SECONDS = 30.0


class Conflict(Exception):
    """A child with our name exists but is not ours: refuse to adopt it."""


class Controller:
    """The base of ModelTierController and TierRouterController."""

    kind = ""

    def __init__(
        self,
        settings: OperatorSettings,
        client: Kube,
        cache: Cache,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.cache = cache
        self.metrics = metrics or Metrics()
        self.queue = WorkQueue()

    async def sync(self, key: Key) -> None:
        raise NotImplementedError

    def tasks(self) -> list[asyncio.Task]:
        """Extra background tasks of this controller (the control tick)."""
        return []

    # -------------------------------------------------------------- workers

    async def run(self) -> None:
        """Workers plus the periodic resync; runs until cancelled."""
        tasks = [asyncio.create_task(self._worker()) for _ in range(self.settings.workers)]
        tasks.append(asyncio.create_task(self._resync()))
        tasks += self.tasks()
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.queue.shutdown()

    async def _resync(self) -> None:
        # Level-based safety net: everything is looked at again now and then,
        # whatever events were missed.
        while True:
            for key in self.cache.keys(self.kind):
                self.queue.add(key)
            await asyncio.sleep(self.settings.resync_seconds)

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            assert isinstance(key, Key)
            self.metrics.queue_depth.labels(self.kind).set(len(self.queue))
            started = time.perf_counter()
            result = "success"
            try:
                await self.sync(key)
                self.queue.forget(key)
            except asyncio.CancelledError:
                raise
            except Conflict as e:
                result = "conflict"
                delay = self.queue.retry(key)
                log.info("%s: %s; retrying in %.1fs", key, e, delay)
            except ApiError as e:
                result = "error"
                delay = self.queue.retry(key)
                level = logging.INFO if e.status == 409 else logging.WARNING
                log.log(level, "%s: apiserver said %s; retrying in %.1fs", key, e, delay)
            except OSError as e:  # the API server cannot be reached
                result = "error"
                delay = self.queue.retry(key)
                log.warning("%s: %s; retrying in %.1fs", key, e, delay)
            except Exception:
                result = "error"
                delay = self.queue.retry(key)
                log.exception("%s: sync failed; retrying in %.1fs", key, delay)
            finally:
                self.queue.done(key)
                self.metrics.reconcile_total.labels(key.kind, result).inc()
                self.metrics.reconcile_seconds.labels(key.kind).observe(
                    time.perf_counter() - started
                )

    # --------------------------------------------------------------- helpers

    async def current(self, kind: str, namespace: str, name: str) -> dict | None:
        """The object from the cache, or from the apiserver on a cache miss.

        A miss is normal right after start-up (the watch has not listed it
        yet) and after a deletion; asking keeps both cases correct.
        """
        obj = self.cache.get(kind, namespace, name)
        if obj is None:
            obj = await self.client.get(kind, namespace, name)
        return obj

    def remember(self, obj: dict) -> dict:
        """Keep an API answer in the cache (newer than any watch event so far)."""
        self.cache.put(Key.of(obj), obj)
        return obj

    async def ensure(self, owner: ch.Owner, desired: dict) -> tuple[dict, str | None]:
        """Apply `desired` if it differs from what is there; say what was done."""
        meta = desired["metadata"]
        current = await self.current(desired["kind"], meta["namespace"], meta["name"])
        if current is not None and not ch.is_controlled_by(current, owner.uid):
            raise Conflict(
                f"{desired['kind']} {meta['name']} exists and is not controlled by this "
                f"{owner.kind}; refusing to adopt it"
            )
        if not needs_apply(desired, current):
            return current, None  # type: ignore[return-value]
        applied = self.remember(await self.client.apply(desired))
        return applied, "Created" if current is None else "Updated"

    async def event(self, body: dict, reason: str, message: str, type: str = "Normal") -> None:
        await self.client.event(body, reason, message, type, now=now_rfc3339())

    async def write_status(self, body: dict, status: dict) -> None:
        """The only status write of this kind: the whole status, one manager.
        An object left waiting on the cluster is looked at again in
        RECHECK_SECONDS."""
        ready = get_condition(status.get("conditions"), "Ready") or {}
        if ready.get("status") == "False" and ready.get("reason") in WAITING:
            # Read the Deployment afresh then: a watch event that never came
            # must not leave the cached copy, and so the status, behind.
            meta = body["metadata"]
            self.cache.pop(Key("Deployment", meta["namespace"], meta["name"]))
            self.queue.add_after(Key.of(body), RECHECK_SECONDS)
        if not status_differs(status, body.get("status")):
            return
        meta = body["metadata"]
        patch = {
            "apiVersion": API_VERSION,
            "kind": body["kind"],
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
            "status": status,
        }
        self.remember(await self.client.apply(patch, subresource="status"))

    async def report_problem(self, body: dict, problem: Readiness) -> None:
        """A Warning Event for a problem that stops the sync, once per change."""
        previous = get_condition((body.get("status") or {}).get("conditions"), "Ready")
        if (
            previous is None
            or previous.get("reason") != problem.reason
            or previous.get("message") != problem.message
        ):
            await self.event(body, problem.reason, problem.message, "Warning")

    async def report(self, body: dict, actions: list[tuple[str, str]]) -> None:
        """One Event per reason for what a sync changed ("Created Deployment x, Service x")."""
        for reason in dict.fromkeys(a for a, _ in actions):
            what = ", ".join(w for a, w in actions if a == reason)
            await self.event(body, reason, f"{reason} {what}")
