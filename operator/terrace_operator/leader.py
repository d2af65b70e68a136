"""Leader election on a coordination.k8s.io/v1 Lease, as client-go does it.

Several operator replicas run `LeaderElector(...).run(lead)`; at most one at a
time runs `lead()`. The Lease's spec is the record:

- holderIdentity: who leads ("" when nobody: released);
- leaseDurationSeconds: how long the holder's claim lasts without renewal;
- acquireTime / renewTime: MicroTime stamps (RFC 3339 with microseconds, UTC);
- leaseTransitions: how many times leadership passed to a new holder.

The algorithm is client-go's (k8s.io/client-go/tools/leaderelection):

- A candidate may take the Lease when it is free, already its own, or when
  the record has not changed for leaseDurationSeconds *by the candidate's own
  monotonic clock*: it remembers when it last saw the record change and never
  compares remote timestamps with its own, so clock skew between nodes does
  not matter.
- Every write is a PUT carrying metadata.resourceVersion (optimistic
  concurrency): a 409 means somebody else wrote first and this try lost.
  An absent Lease is created (POST); a 409 there means a peer created it.
- The leader renews every retry period. When it has not renewed successfully
  for renew_deadline (measured from the start of its last successful write,
  so before any peer can think the lease expired: renew_deadline <
  lease_duration), it stops leading: `lead()` is cancelled.
- A clean stop (cancelling `run()`) cancels `lead()` first, then releases the
  Lease (holder "", leaseDurationSeconds 1: client-go's ReleaseOnCancel) so a
  peer takes over on its next try instead of waiting for expiry.

Differences from client-go, each on the safe side: a leader that reads a
record naming another holder stops leading at once (client-go keeps trying
until its renew deadline), and retries are not jittered.

Safety relies on `lead()` honouring cancellation promptly: a peer may start
leading lease_duration - renew_deadline seconds after this process stopped
renewing.

The ServiceAccount needs, in the Lease's namespace: apiGroups
[coordination.k8s.io], resources [leases], verbs [get, create, update].
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from .kube import ApiError, Kube

log = logging.getLogger(__name__)

API_VERSION = "coordination.k8s.io/v1"


def leases_path(namespace: str, name: str | None = None) -> str:
    """The Leases collection of `namespace`, or one Lease in it."""
    path = f"/apis/{API_VERSION}/namespaces/{namespace}/leases"
    return f"{path}/{name}" if name else path


def micro_time(when: datetime) -> str:
    """`when` as a metav1.MicroTime: UTC, microseconds, e.g. 2026-11-30T16:00:00.000000Z."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class LeaseRecord:
    """The election fields of a Lease's spec (client-go's LeaderElectionRecord).

    holder "" means nobody holds it. lease_duration_seconds is whole seconds
    (the API's int32). Times are MicroTime strings as written, or None.
    """

    holder: str = ""
    lease_duration_seconds: int = 0
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0

    @classmethod
    def from_lease(cls, lease: dict) -> LeaseRecord:
        """The record in a Lease object as the apiserver returns it (absent fields: defaults)."""
        spec = lease.get("spec") or {}
        return cls(
            holder=spec.get("holderIdentity") or "",
            lease_duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
            acquire_time=spec.get("acquireTime"),
            renew_time=spec.get("renewTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
        )

    def spec(self) -> dict:
        """The Lease spec fields for this record (merged over the existing spec when written)."""
        return {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.lease_duration_seconds,
            "acquireTime": self.acquire_time,
            "renewTime": self.renew_time,
            "leaseTransitions": self.transitions,
        }


def observe(
    previous: LeaseRecord | None, observed_at: float, record: LeaseRecord, now: float
) -> float:
    """When the record was last seen to change: `now` if `record` differs from
    `previous` (or nothing was seen before), else the earlier `observed_at`.
    Times are the caller's monotonic clock, in seconds."""
    return observed_at if previous is not None and previous == record else now


def may_take(record: LeaseRecord, identity: str, observed_at: float, now: float) -> bool:
    """May `identity` write itself into the Lease now?

    Yes when the Lease is free (empty holder), already held by `identity`
    (renewal), or when the holder's claim expired as observed locally: the
    record has not changed for its leaseDurationSeconds since `observed_at`
    (see `observe`). `observed_at` and `now` are the caller's monotonic clock
    in seconds; the record's remote timestamps are deliberately ignored.
    """
    if not record.holder or record.holder == identity:
        return True
    return now >= observed_at + record.lease_duration_seconds


def next_record(
    old: LeaseRecord | None, identity: str, lease_duration_seconds: int, now: datetime
) -> LeaseRecord:
    """The record `identity` writes to acquire or renew, given the current one
    (None: no Lease yet). Renewal keeps acquireTime and leaseTransitions; a new
    holder (also after a release) stamps acquireTime and counts a transition;
    creating the Lease starts at 0 transitions."""
    stamp = micro_time(now)
    if old is not None and old.holder == identity:
        return replace(
            old,
            lease_duration_seconds=lease_duration_seconds,
            acquire_time=old.acquire_time or stamp,
            renew_time=stamp,
        )
    transitions = 0 if old is None else old.transitions + 1
    return LeaseRecord(identity, lease_duration_seconds, stamp, stamp, transitions)


def released_record(old: LeaseRecord, now: datetime) -> LeaseRecord:
    """What a holder writes to give the Lease up (client-go's ReleaseOnCancel):
    no holder, a 1 s duration, both times now, transitions unchanged."""
    stamp = micro_time(now)
    return LeaseRecord("", 1, stamp, stamp, old.transitions)


def default_identity() -> str:
    """hostname_<random hex>: unique per process even on one host."""
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:12]}"


class LeaderElector:
    """Runs a coroutine only while this process holds the Lease `namespace/name`.

    client: the operator's `Kube` (its credentials need get, create and
      update on leases in `namespace`).
    identity: this candidate's holderIdentity; default hostname_<random>.
    lease_duration_seconds: how long peers wait after the record last changed
      before taking over; written rounded up to whole seconds (default 15).
    renew_deadline_seconds: how long the leader keeps leading without a
      successful renewal (default 10); must be below the lease duration.
    retry_period_seconds: pause between tries to acquire or renew (default 2);
      must be below the renew deadline.
    release_on_cancel: when `run()` is cancelled, give the Lease up so a peer
      takes over at once (default True); False leaves it to expire, as a
      crashed process would.

    Raises ValueError unless 0 < retry_period < renew_deadline < lease_duration.
    """

    def __init__(
        self,
        client: Kube,
        namespace: str,
        name: str,
        identity: str | None = None,
        lease_duration_seconds: float = 15,
        renew_deadline_seconds: float = 10,
        retry_period_seconds: float = 2,
        release_on_cancel: bool = True,
    ) -> None:
        if not 0 < retry_period_seconds < renew_deadline_seconds < lease_duration_seconds:
            raise ValueError(
                "need 0 < retry_period_seconds < renew_deadline_seconds < lease_duration_seconds,"
                f" got {retry_period_seconds}, {renew_deadline_seconds}, {lease_duration_seconds}"
            )
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity or default_identity()
        self.lease_duration_seconds = lease_duration_seconds
        self.renew_deadline_seconds = renew_deadline_seconds
        self.retry_period_seconds = retry_period_seconds
        self.release_on_cancel = release_on_cancel
        self._written_duration = max(1, math.ceil(lease_duration_seconds))
        self._observed: LeaseRecord | None = None
        self._observed_at = 0.0  # monotonic: when the record last changed, as seen here
        self._leading = False
        self._renewed_at = 0.0  # monotonic: start of the last successful acquire/renew

    @property
    def is_leader(self) -> bool:
        """True while this process holds the Lease and its last successful
        renewal started less than renew_deadline ago (so it is False as soon
        as the deadline passes, even before `lead()` has been cancelled)."""
        return self._leading and time.monotonic() - self._renewed_at < self.renew_deadline_seconds

    async def run(
        self, lead: Callable[[], Awaitable[None]], on_lost: Callable[[], None] | None = None
    ) -> None:
        """Acquire the Lease, run `lead()` as a task while renewing, repeat.

        When renewal fails past the renew deadline (or another holder shows up
        in the record), `lead()` is cancelled, awaited, and this goes back to
        acquiring (after calling `on_lost()`, if given: a caller that prefers
        to exit stops there); it never gives up on API errors, it logs and
        retries.
        When `lead()` returns or raises by itself, the Lease is released
        (release_on_cancel) and `run()` returns, or raises what `lead()`
        raised. Cancelling `run()` cancels and awaits `lead()`, then releases
        the Lease (release_on_cancel), then raises CancelledError.
        """
        lead_task: asyncio.Task | None = None
        renew_task: asyncio.Task | None = None
        try:
            while True:
                await self._acquire()
                lead_task = asyncio.create_task(_call(lead), name=f"lead {self.identity}")
                renew_task = asyncio.create_task(self._renew(), name=f"renew {self.identity}")
                await asyncio.wait({lead_task, renew_task}, return_when=asyncio.FIRST_COMPLETED)
                if lead_task.done():
                    finished, lead_task = lead_task, None
                    finished.result()  # lead() raised: so does run()
                    return  # finally: stop renewing, release
                # Lost the lease: stop acting before anything else.
                self._leading = False
                log.warning("lost lease %s/%s: stopping", self.namespace, self.name)
                await _cancel_and_wait(lead_task)
                lead_task = renew_task = None
                if on_lost is not None:
                    on_lost()
        finally:
            self._leading = False
            if lead_task is not None:
                await _cancel_and_wait(lead_task)
            if renew_task is not None:
                await _cancel_and_wait(renew_task)
            if self.release_on_cancel:
                await self._release()

    # -- one try ----------------------------------------------------------

    def _see(self, record: LeaseRecord) -> None:
        now = time.monotonic()
        self._observed_at = observe(self._observed, self._observed_at, record, now)
        self._observed = record

    async def _try_acquire_or_renew(self) -> bool:
        """One GET and at most one write; True when this process holds the Lease now."""
        path = leases_path(self.namespace, self.name)
        lease = await self.client.request("GET", path)
        if lease is None:
            record = next_record(None, self.identity, self._written_duration, datetime.now(UTC))
            body = {
                "apiVersion": API_VERSION,
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": record.spec(),
            }
            try:
                created = await self.client.request("POST", leases_path(self.namespace), json=body)
            except ApiError as e:
                if e.status != 409:
                    raise
                # A peer created it first: read theirs, so its expiry counts from now.
                lease = await self.client.request("GET", path)
                if lease is not None:
                    self._see(LeaseRecord.from_lease(lease))
                return False
            if created is None:
                return False  # 404: no such namespace
            self._see(LeaseRecord.from_lease(created))
            return True

        record = LeaseRecord.from_lease(lease)
        self._see(record)
        if not may_take(record, self.identity, self._observed_at, time.monotonic()):
            return False
        new = next_record(record, self.identity, self._written_duration, datetime.now(UTC))
        try:
            updated = await self.client.request("PUT", path, json=_with_spec(lease, new))
        except ApiError as e:
            if e.status == 409:
                return False  # somebody wrote after our GET: next try re-reads
            raise
        if updated is None:
            return False  # deleted since the GET: the next try creates it
        self._see(LeaseRecord.from_lease(updated))
        return True

    async def _attempt(self, timeout: float) -> bool:
        """`_try_acquire_or_renew` within `timeout` seconds; errors count as False."""
        try:
            async with asyncio.timeout(timeout):
                return await self._try_acquire_or_renew()
        except (ApiError, TimeoutError) as e:
            log.warning("lease %s/%s: %s", self.namespace, self.name, str(e) or "timed out")
        except Exception:
            log.warning("lease %s/%s: try failed", self.namespace, self.name, exc_info=True)
        return False

    # -- loops ------------------------------------------------------------

    async def _acquire(self) -> None:
        """Try every retry period until this process holds the Lease."""
        while True:
            started = time.monotonic()
            if await self._attempt(self.renew_deadline_seconds):
                self._renewed_at = started
                self._leading = True
                log.info("acquired lease %s/%s as %s", self.namespace, self.name, self.identity)
                return
            await asyncio.sleep(self.retry_period_seconds)

    async def _renew(self) -> None:
        """Renew every retry period; return when leadership is lost."""
        while True:
            await asyncio.sleep(self.retry_period_seconds)
            while True:
                remaining = self._renewed_at + self.renew_deadline_seconds - time.monotonic()
                if remaining <= 0:
                    log.warning(
                        "lease %s/%s: no renewal for %ss",
                        self.namespace,
                        self.name,
                        self.renew_deadline_seconds,
                    )
                    return
                started = time.monotonic()
                if await self._attempt(remaining):
                    self._renewed_at = started
                    break
                observed = self._observed
                if observed is not None and observed.holder not in ("", self.identity):
                    log.warning(
                        "lease %s/%s is held by %s", self.namespace, self.name, observed.holder
                    )
                    return
                remaining = self._renewed_at + self.renew_deadline_seconds - time.monotonic()
                await asyncio.sleep(max(0.0, min(self.retry_period_seconds, remaining)))

    async def _release(self) -> None:
        """Give the Lease up if the latest record names this process; errors are logged."""
        if self._observed is None or self._observed.holder != self.identity:
            return
        path = leases_path(self.namespace, self.name)
        try:
            async with asyncio.timeout(self.renew_deadline_seconds):
                lease = await self.client.request("GET", path)
                if lease is None:
                    return
                record = LeaseRecord.from_lease(lease)
                if record.holder != self.identity:
                    return
                new = released_record(record, datetime.now(UTC))
                await self.client.request("PUT", path, json=_with_spec(lease, new))
                self._observed = new
                log.info("released lease %s/%s", self.namespace, self.name)
        except Exception as e:  # shutting down: say why, never mask the cancellation
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, e)


def _with_spec(lease: dict, record: LeaseRecord) -> dict:
    """The Lease object with `record` written over its spec (metadata, and so
    its resourceVersion precondition, kept)."""
    return {**lease, "spec": {**(lease.get("spec") or {}), **record.spec()}}


async def _call(fn: Callable[[], Awaitable[None]]) -> None:
    await fn()


async def _cancel_and_wait(task: asyncio.Task) -> None:
    """Cancel `task` and wait until it has finished; an exception it ends with
    is logged, not raised. A cancellation of the caller still propagates."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        log.warning("%s failed while stopping", task.get_name(), exc_info=task.exception())
