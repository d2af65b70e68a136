"""Two terrace-operator replicas with leader election, on the real cluster:
exactly one acts, a standby takes over within 30 s of the leader's death,
and nothing is done twice (docs/operator.md, "High availability")."""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator

import pytest
import yaml
from operator_harness import (
    OPERATOR_NAMESPACE,
    OperatorProcess,
    fresh_namespace,
    get_or_none,
    install_crds,
    install_rbac,
    is_ready,
    kubectl_json,
    wait_for,
)

pytestmark = pytest.mark.cluster

NS = "op-ha"
LEASE = "terrace-operator-ha-test"
TAKEOVER_S = 30.0  # the bound; the Lease's own is 15 s + a 2 s retry


def tier(name: str, min_replicas: int = 1) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "terrace.dev/v1alpha1",
            "kind": "ModelTier",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "model": {"uri": f"file:///models/{name}.onnx"},
                "device": "cpu",
                "replicas": {"min": min_replicas, "max": 3},
            },
        }
    )


def leading(op: OperatorProcess) -> bool:
    text = op.metrics()
    found = re.search(r"^terrace_operator_leader (\S+)$", text, re.M)
    return found is not None and float(found.group(1)) == 1.0


def lease(cluster) -> dict:
    return kubectl_json(cluster, "get", "lease", LEASE, "-n", OPERATOR_NAMESPACE)["spec"]


def created(cluster, name: str) -> list[str]:
    """Every child the Created Events of ModelTier `name` name, in order
    ("Created Deployment x (1 replicas), Service x" names two)."""
    items = kubectl_json(
        cluster, "get", "events", "-n", NS,
        "--field-selector", f"involvedObject.name={name},reason=Created",
    )["items"]  # fmt: skip
    children = []
    for e in items:
        if e["involvedObject"]["kind"] == "ModelTier":
            what = e["message"].removeprefix("Created ")
            children += [re.sub(r" \(.*\)$", "", part) for part in what.split(", ")]
    return children


@pytest.fixture
def pair(cluster, tmp_path) -> Iterator[list[OperatorProcess]]:
    install_crds(cluster)
    install_rbac(cluster)
    fresh_namespace(cluster, NS)
    cluster.kubectl(
        "delete", "lease", LEASE, "-n", OPERATOR_NAMESPACE, "--ignore-not-found", check=False
    )
    args = ["--leader-elect", "--lease-name", LEASE, "--lease-namespace", OPERATOR_NAMESPACE]
    ops = [
        OperatorProcess(cluster, [NS], tmp_path / f"operator-{i}.log", args=args).start()
        for i in range(2)
    ]
    try:
        yield ops
    finally:
        cluster.kubectl("delete", "mtier", "--all", "-n", NS, "--wait=false", check=False)
        for op in ops:
            op.stop()
            print(op.log_tail(80))
        cluster.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def test_one_replica_acts_and_a_standby_takes_over_within_30_s(cluster, pair):
    # Exactly one leader, named in the Lease; the other only watches.
    leader = wait_for(lambda: [op for op in pair if leading(op)], 60, what="a leader among the two")
    assert len(leader) == 1
    leader = leader[0]
    standby = next(op for op in pair if op is not leader)
    holder = lease(cluster)["holderIdentity"]
    assert holder, lease(cluster)

    cluster.kubectl("apply", "-f", "-", input=tier("first"))
    wait_for(lambda: is_ready(get_or_none(cluster, "mtier", "first", NS)), 90,
             what="first Ready")  # fmt: skip
    for _ in range(20):  # sampled while both run: never two leaders
        assert [leading(op) for op in pair].count(True) == 1

    # The leader dies without a word (no Lease release).
    assert leader.proc is not None
    leader.proc.send_signal(signal.SIGKILL)
    leader.proc.wait(10)
    died = time.monotonic()
    cluster.kubectl("apply", "-f", "-", input=tier("second"))
    cluster.kubectl("patch", "mtier", "first", "-n", NS, "--type=merge",
                    "-p", json.dumps({"spec": {"replicas": {"min": 2, "max": 3}}}))  # fmt: skip

    def acted() -> bool:
        second = get_or_none(cluster, "deployment", "second", NS)
        first = get_or_none(cluster, "deployment", "first", NS)
        return second is not None and first is not None and first["spec"]["replicas"] == 2

    wait_for(acted, TAKEOVER_S + 10, interval=0.2, what="the standby acting")
    took = time.monotonic() - died
    assert took <= TAKEOVER_S, f"the standby acted {took:.1f} s after the leader died"
    assert leading(standby)
    assert lease(cluster)["holderIdentity"] not in ("", holder)
    assert lease(cluster)["leaseTransitions"] >= 1

    # Nothing twice: one Created Event per tier, one Deployment each, and
    # the new leader's first sync of "first" found nothing to create.
    wait_for(lambda: is_ready(get_or_none(cluster, "mtier", "second", NS)), 90,
             what="second Ready")  # fmt: skip
    for name in ("first", "second"):
        children = [f"{kind} {name}" for kind in ("Deployment", "PodDisruptionBudget", "Service")]
        assert sorted(created(cluster, name)) == children
    owned = [
        d["metadata"]["name"]
        for d in kubectl_json(cluster, "get", "deployments", "-n", NS)["items"]
    ]
    assert sorted(owned) == ["first", "second"]
    # A clean stop hands the Lease over at once: the standby is gone, so the
    # Lease is left empty for whoever comes next.
    standby.stop()
    assert lease(cluster)["holderIdentity"] == ""
