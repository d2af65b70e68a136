"""Lease leader election (terrace_operator.leader) against the real apiserver.

Every candidate authenticates as a ServiceAccount whose only permission is
the rule the operator needs for it (LEASE_RULE, in a Role in the Lease's
namespace), so these tests also show that rule is enough. The test itself
reads and overwrites Leases as the cluster admin.

Short timings keep it fast: lease 3 s, renew deadline 2 s, retry 0.5 s. Each
test has its own namespace and Lease. No sleep synchronises anything: the
tests poll with deadlines and assert on the measured times.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kubernetes import client as k8s  # noqa: E402
from localproc import Relay  # noqa: E402
from terrace_operator.kube import KubeClient  # noqa: E402
from terrace_operator.leader import LeaderElector, leases_path, micro_time  # noqa: E402

LEASE, RENEW, RETRY = 3.0, 2.0, 0.5
TIMING = {
    "lease_duration_seconds": LEASE,
    "renew_deadline_seconds": RENEW,
    "retry_period_seconds": RETRY,
}
# What the operator's ServiceAccount needs in its own namespace (a Role).
LEASE_RULE = {
    "apiGroups": ["coordination.k8s.io"],
    "resources": ["leases"],
    "verbs": ["get", "create", "update"],
}
SA = "elector"


@dataclass(frozen=True)
class Credentials:
    server: str
    ca_path: str
    token: str | None = None
    cert_path: str | None = None
    key_path: str | None = None

    def configuration(self, server: str | None = None) -> k8s.Configuration:
        """The official client's configuration; `server` overrides the address."""
        cfg = k8s.Configuration()
        cfg.host = server or self.server
        cfg.ssl_ca_cert = self.ca_path
        if self.token:
            cfg.api_key = {"authorization": self.token}
            cfg.api_key_prefix = {"authorization": "Bearer"}
        cfg.cert_file, cfg.key_file = self.cert_path, self.key_path
        return cfg


@dataclass
class Env:
    namespace: str
    name: str  # the Lease
    candidate: Credentials  # the ServiceAccount with LEASE_RULE only
    admin: Credentials

    @property
    def path(self) -> str:
        return leases_path(self.namespace, self.name)


@pytest.fixture
def env(cluster: Any) -> Iterator[Env]:
    ns = f"leader-{uuid.uuid4().hex[:6]}"
    meta = {"name": SA, "namespace": ns}
    objects = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": [LEASE_RULE],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SA},
            "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": ns}],
        },
    ]
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )
    token = cluster.kubectl("create", "token", SA, "-n", ns, "--duration=10m").stdout.strip()
    pki = cluster.dir / "pki"
    try:
        yield Env(
            namespace=ns,
            name=f"terrace-{uuid.uuid4().hex[:6]}",
            candidate=Credentials(server=cluster.server, ca_path=str(cluster.ca_file), token=token),
            admin=Credentials(
                server=cluster.server,
                ca_path=str(cluster.ca_file),
                cert_path=str(pki / "admin.crt"),
                key_path=str(pki / "admin.key"),
            ),
        )
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")


# -- helpers ------------------------------------------------------------------


def client(creds: Credentials, server: str | None = None) -> KubeClient:
    return KubeClient("leader-election-test", 5, creds.configuration(server))


class Leads:
    """A `lead()` that runs until cancelled, recording what happened to it."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0
        self.running = False
        self.cancelled_at = 0.0  # monotonic

    async def __call__(self) -> None:
        self.started += 1
        self.running = True
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            self.cancelled_at = time.monotonic()
            raise
        finally:
            self.running = False


async def until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll `check` (sync or async) until truthy; its answer. Fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if isinstance(got, Awaitable):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def spec(admin: KubeClient, env: Env) -> dict:
    lease = await admin.request("GET", env.path)
    assert lease is not None, "the Lease exists"
    return lease["spec"]


async def stop(*tasks: asyncio.Task) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.wait(set(tasks))


def wall(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def pair(env: Env, **kwargs: Any) -> tuple[LeaderElector, LeaderElector, dict[str, Leads]]:
    a = LeaderElector(client(env.candidate), env.namespace, env.name, "a", **TIMING, **kwargs)
    b = LeaderElector(client(env.candidate), env.namespace, env.name, "b", **TIMING, **kwargs)
    return a, b, {"a": Leads(), "b": Leads()}


async def first_leader(a: LeaderElector, b: LeaderElector) -> tuple[LeaderElector, LeaderElector]:
    def one() -> bool:
        assert not (a.is_leader and b.is_leader), "two leaders"
        return a.is_leader or b.is_leader

    await until(one, LEASE + 2 * RETRY, "a leader")
    return (a, b) if a.is_leader else (b, a)


async def close(*electors: LeaderElector) -> None:
    for e in electors:
        await e.client.close()


# -- 1. two candidates, one leader ------------------------------------------------


def test_two_candidates_have_exactly_one_leader_named_in_the_lease(env: Env) -> None:
    async def go() -> None:
        admin = client(env.admin)
        a, b, leads = pair(env)
        # Both start on a Lease that does not exist yet: both try to create it.
        tasks = [asyncio.create_task(e.run(leads[e.identity])) for e in (a, b)]
        try:
            leader, follower = await first_leader(a, b)
            first = await spec(admin, env)
            samples = 0
            end = time.monotonic() + 2 * LEASE  # past expiry: only renewals keep it
            while time.monotonic() < end:
                assert leader.is_leader and not follower.is_leader
                assert leads[leader.identity].running and leads[leader.identity].started == 1
                assert leads[follower.identity].started == 0
                assert (await spec(admin, env))["holderIdentity"] == leader.identity
                samples += 1
                await asyncio.sleep(0.05)
            last = await spec(admin, env)
        finally:
            await stop(*tasks)
            await close(a, b)
            await admin.close()
        assert samples >= 20
        assert first["leaseDurationSeconds"] == LEASE
        assert last["leaseTransitions"] == first["leaseTransitions"] == 0
        assert last["acquireTime"] == first["acquireTime"]
        assert wall(last["renewTime"]) > wall(first["renewTime"])  # renewed meanwhile

    asyncio.run(go())


# -- 2. a crashed leader: the peer waits for expiry ---------------------------------


def test_a_crashed_leader_is_replaced_after_its_lease_expires(env: Env) -> None:
    async def go() -> None:
        admin = client(env.admin)
        a, b, leads = pair(env, release_on_cancel=False)
        tasks = {e.identity: asyncio.create_task(e.run(leads[e.identity])) for e in (a, b)}
        try:
            leader, follower = await first_leader(a, b)
            # Crash: the run task dies without releasing the Lease.
            crashed = time.monotonic()
            await stop(tasks[leader.identity])
            assert leads[leader.identity].cancelled == 1
            old = await spec(admin, env)
            assert old["holderIdentity"] == leader.identity  # not released

            async def taken_over() -> bool:
                nonlocal old
                now = await spec(admin, env)
                if now["holderIdentity"] == leader.identity:
                    old = now  # a renewal in flight at the crash may land late
                return follower.is_leader

            await until(taken_over, LEASE + 4 * RETRY + 5, "the follower to lead")
            took = time.monotonic() - crashed
            new = await spec(admin, env)
        finally:
            await stop(*tasks.values())
            await close(a, b)
            await admin.close()
        assert leads[follower.identity].started == 1
        assert new["holderIdentity"] == follower.identity
        assert new["leaseTransitions"] == old["leaseTransitions"] + 1
        # Not before the crashed holder's last renewal expired (both stamps
        # come from this host's clock)...
        gap = (wall(new["acquireTime"]) - wall(old["renewTime"])).total_seconds()
        assert gap >= LEASE, f"taken {gap:.3f}s after the last renewal"
        # ...and promptly after.
        assert took <= LEASE + 2 * RETRY, f"took over {took:.2f}s after the crash"

    asyncio.run(go())


# -- 3. a clean stop releases the Lease ---------------------------------------------


def test_a_clean_stop_releases_the_lease_and_the_peer_takes_over_at_once(env: Env) -> None:
    async def go() -> None:
        admin = client(env.admin)
        a, b, leads = pair(env)
        tasks = {e.identity: asyncio.create_task(e.run(leads[e.identity])) for e in (a, b)}
        try:
            leader, follower = await first_leader(a, b)
            before = await spec(admin, env)
            stopped = time.monotonic()
            await stop(tasks[leader.identity])  # returns once released
            assert leads[leader.identity].cancelled == 1
            assert (await spec(admin, env))["holderIdentity"] in ("", follower.identity)
            await until(lambda: follower.is_leader, LEASE + 2 * RETRY, "the follower to lead")
            took = time.monotonic() - stopped
            after = await spec(admin, env)
        finally:
            await stop(*tasks.values())
            await close(a, b)
            await admin.close()
        assert took < LEASE / 2, f"took over {took:.2f}s after the release"
        assert after["holderIdentity"] == follower.identity
        assert after["leaseTransitions"] == before["leaseTransitions"] + 1

    asyncio.run(go())


def test_lead_returning_ends_run_and_releases_and_its_error_propagates(env: Env) -> None:
    async def go() -> None:
        admin = client(env.admin)
        e = LeaderElector(client(env.candidate), env.namespace, env.name, "a", **TIMING)
        ran: list[bool] = []

        async def once() -> None:
            ran.append(e.is_leader)

        async def boom() -> None:
            raise RuntimeError("lead failed")

        try:
            await asyncio.wait_for(e.run(once), LEASE + 2 * RETRY)
            released = await spec(admin, env)
            with pytest.raises(RuntimeError, match="lead failed"):
                await asyncio.wait_for(e.run(boom), LEASE + 2 * RETRY)
            released_again = await spec(admin, env)
        finally:
            await close(e)
            await admin.close()
        assert ran == [True]
        assert released["holderIdentity"] == ""
        assert released["leaseDurationSeconds"] == 1
        assert not e.is_leader
        # Re-acquiring the released Lease was a transition; failing released it too.
        assert released_again["holderIdentity"] == ""
        assert released_again["leaseTransitions"] == released["leaseTransitions"] + 1

    asyncio.run(go())


# -- 4. a leader that cannot renew stops leading -------------------------------------


def test_a_leader_cut_off_from_the_apiserver_stops_within_the_renew_deadline(env: Env) -> None:
    # The candidate reaches the apiserver through a relay the test can cut,
    # as a network partition would: open connections reset, new ones refused.
    apiserver_port = int(env.candidate.server.rsplit(":", 1)[1])
    relay = Relay(target=apiserver_port)
    relayed = relay.url.replace("http://", "https://")

    async def go() -> None:
        admin = client(env.admin)
        leads = Leads()
        e = LeaderElector(client(env.candidate, relayed), env.namespace, env.name, "a", **TIMING)
        lost: list[float] = []
        task = asyncio.create_task(e.run(leads, lambda: lost.append(time.monotonic())))
        try:
            await until(lambda: e.is_leader, LEASE + 2 * RETRY, "leadership")
            relay.cut()
            cut = time.monotonic()
            await until(lambda: leads.cancelled, RENEW + 2 * RETRY + 5, "lead() cancelled")
            stopped = leads.cancelled_at - cut
            assert not e.is_leader
            assert not task.done(), "run() goes back to acquiring"
            # The caller heard of it once, after lead() had stopped.
            assert len(lost) == 1 and lost[0] >= leads.cancelled_at
            # Reachable again: the Lease still names it, so it leads again at once.
            relay.target = apiserver_port
            back = time.monotonic()
            await until(lambda: leads.started == 2, LEASE, "leading again")
            again = time.monotonic() - back
            final = await spec(admin, env)
        finally:
            await stop(task)
            await close(e)
            await admin.close()
            relay.stop()
        # Kept leading through the failures until the deadline, then stopped.
        # (A leader giving up at the first failed try would stop within ~RETRY.)
        assert RENEW - RETRY - 0.5 <= stopped <= RENEW + RETRY, f"stopped after {stopped:.2f}s"
        assert again < LEASE / 2
        assert final["holderIdentity"] == "a" and final["leaseTransitions"] == 0

    asyncio.run(go())


def test_a_leader_whose_lease_is_overwritten_stops_and_waits_for_expiry(env: Env) -> None:
    async def go() -> None:
        admin = client(env.admin)
        leads = Leads()
        e = LeaderElector(client(env.candidate), env.namespace, env.name, "a", **TIMING)
        task = asyncio.create_task(e.run(leads))
        try:
            await until(lambda: e.is_leader, LEASE + 2 * RETRY, "leadership")
            lease = await admin.request("GET", env.path)
            assert lease is not None
            now = micro_time(datetime.now(UTC))
            lease["spec"].update(
                holderIdentity="intruder",
                leaseDurationSeconds=int(LEASE),
                acquireTime=now,
                renewTime=now,
                leaseTransitions=lease["spec"]["leaseTransitions"] + 1,
            )
            await admin.request("PUT", env.path, json=lease)  # with its resourceVersion
            written = time.monotonic()
            await until(lambda: leads.cancelled, RENEW + 2 * RETRY + 5, "lead() cancelled")
            stopped = leads.cancelled_at - written
            assert not e.is_leader
            # The intruder never renews: after its lease expires, "a" takes it back.
            await until(lambda: leads.started == 2, LEASE + 2 * RETRY + 5, "leading again")
            retaken = time.monotonic() - written
            final = await spec(admin, env)
        finally:
            await stop(task)
            await close(e)
            await admin.close()
        assert stopped <= RENEW + RETRY, f"stopped after {stopped:.2f}s"
        # Stricter than client-go: a record naming another holder stops it at
        # its next renewal, without waiting for the deadline.
        assert stopped <= RETRY + 0.5, f"stopped after {stopped:.2f}s"
        assert LEASE - 0.1 <= retaken <= LEASE + 2 * RETRY + 0.5, f"retook after {retaken:.2f}s"
        assert final["holderIdentity"] == "a"
        assert final["leaseTransitions"] == 2  # created 0, intruder 1, a again 2

    asyncio.run(go())
