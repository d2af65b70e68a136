"""terrace-operator under faults, black-box: the real control plane loses its
API server or its etcd for a while, or the operator is SIGKILLed at random
moments while tiers and routers come, change and go.

The outage tests stop and start components of a dev cluster of their own
(started for this module and stopped after it), so no later test runs on a
control plane that was just restarted; every component is started again
even when a test fails. Each test has its own namespace and operator.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from devcluster import Cluster
from operator_harness import (
    OperatorProcess,
    fresh_namespace,
    get_or_none,
    install_crds,
    install_rbac,
    is_ready,
    kubectl_json,
    ready_condition,
    wait_for,
)

pytestmark = pytest.mark.cluster

READY_TIMEOUT = 180  # pods after an outage wait for the controllers' own recovery
OUTAGE_S = 5.0  # how long a component stays down
ACT_WITHIN_S = 30.0  # the operator acts on new changes this soon after the API is back
START_MARK = "===== start"  # OperatorProcess writes it to the log at every start
SMALL = {"requests": {"cpu": "10m", "memory": "16Mi"}}  # 60 pods fit on cpu-node

TIERS = [f"t{i:02d}" for i in range(20)]
ROUTERS = ["r0", "r1", "r2"]
KILLS = 20
CONVERGE_TIMEOUT = 180


def tier_doc(ns: str, name: str, lo: int = 1, hi: int = 3) -> dict:
    return {
        "apiVersion": "terrace.dev/v1alpha1",
        "kind": "ModelTier",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "model": {"uri": f"file:///models/{name}.onnx"},
            "device": "cpu",
            "replicas": {"min": lo, "max": hi},
            "resources": SMALL,
        },
    }


def router_doc(ns: str, name: str, tiers: list[str]) -> dict:
    return {
        "apiVersion": "terrace.dev/v1alpha1",
        "kind": "TierRouter",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"tiers": [{"name": t} for t in tiers], "replicas": 1, "resources": SMALL},
    }


def apply(cluster, ns: str, *docs: dict, check: bool = True) -> subprocess.CompletedProcess:
    text = "---\n".join(yaml.safe_dump(d) for d in docs)
    return cluster.kubectl("apply", "-n", ns, "-f", "-", input=text, check=check)


def wait_ready(cluster, ns: str, kind: str, name: str, timeout: float = READY_TIMEOUT) -> dict:
    return wait_for(
        lambda: (o := get_or_none(cluster, kind, name, ns)) and is_ready(o) and o,
        timeout,
        what=f"{kind} {ns}/{name} Ready",
    )


def controller_uid(obj: dict) -> str | None:
    refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("controller")]
    return refs[0]["uid"] if len(refs) == 1 else None


def api_refuses(cluster) -> bool:
    """The API server does not answer /readyz with 200: gone, or not ready."""
    out = cluster.kubectl("get", "--raw", "/readyz", "--request-timeout=3s", check=False)
    return out.returncode != 0


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A private dev cluster whose components the outage tests restart."""
    c = Cluster(dir=tmp_path_factory.mktemp("faults-cluster"))
    c.up()
    try:
        yield c
    finally:
        c.down()


@pytest.fixture
def ns_op(cluster, tmp_path: Path) -> Iterator[tuple[str, OperatorProcess]]:
    yield from operator_in(cluster, tmp_path)


@pytest.fixture
def own_ns_op(own_cluster, tmp_path: Path) -> Iterator[tuple[str, OperatorProcess]]:
    yield from operator_in(own_cluster, tmp_path)


def operator_in(cluster, tmp_path: Path) -> Iterator[tuple[str, OperatorProcess]]:
    """A namespace of its own and an operator (not started) watching only it."""
    install_crds(cluster)
    install_rbac(cluster)
    ns = f"faults-{uuid.uuid4().hex[:8]}"
    fresh_namespace(cluster, ns)
    op = OperatorProcess(cluster, [ns], tmp_path / "operator.log")
    try:
        yield ns, op
    finally:
        op.stop()
        print(op.log_tail(200))  # the operator's side of a failure
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@contextmanager
def outage(cluster, component: str) -> Iterator[None]:
    """`component` stopped for the block, started again (and the cluster
    healthy) afterwards, even when the block fails."""
    cluster.stop_component(component)
    try:
        yield
    finally:
        cluster.start_component(component)


# -- a, b: the API server or etcd goes away and comes back ----------------------


@pytest.mark.parametrize("component", ["kube-apiserver", "etcd"])
def test_operator_rides_out_a_control_plane_restart(own_cluster, own_ns_op, component: str) -> None:
    cluster = own_cluster
    ns, op = own_ns_op
    op.start()
    steady = ["steady-0", "steady-1", "steady-2"]
    apply(cluster, ns, *(tier_doc(ns, n) for n in steady))
    for name in steady:
        wait_ready(cluster, ns, "mtier", name)
    assert op.proc is not None
    pid = op.proc.pid
    starts = op.log_text().count(START_MARK)

    with outage(cluster, component):
        wait_for(lambda: api_refuses(cluster), 30, what=f"the API unavailable without {component}")
        others = [c for c in ("etcd", "kube-apiserver") if c != component]
        end = time.monotonic() + OUTAGE_S
        while time.monotonic() < end:  # paced on purpose: the outage lasts OUTAGE_S
            assert op.proc.poll() is None, (
                f"operator exited during the {component} outage:\n{op.log_tail()}"
            )
            # Stopping etcd leaves the API server running (unready), and vice versa.
            assert set(others) <= set(cluster.running()), cluster.running()
            time.sleep(0.25)
    back = time.monotonic()

    # After the outage: a new tier and an edit of an existing one.
    apply(cluster, ns, tier_doc(ns, "arrived"))
    cluster.kubectl(
        "patch", "mtier", "steady-0", "-n", ns, "--type=merge",
        "-p", '{"spec":{"replicas":{"min":2}}}',
    )  # fmt: skip

    def acted() -> bool:
        new = get_or_none(cluster, "mtier", "arrived", ns)
        edited = get_or_none(cluster, "mtier", "steady-0", ns)
        if new is None or edited is None:
            return False
        for kind in ("deployment", "service"):
            child = get_or_none(cluster, kind, "arrived", ns)
            if child is None or controller_uid(child) != new["metadata"]["uid"]:
                return False
        deployment = get_or_none(cluster, "deployment", "steady-0", ns)
        return (
            deployment is not None
            and deployment["spec"]["replicas"] == 2
            and all(
                ready_condition(o).get("observedGeneration") == o["metadata"]["generation"]
                for o in (new, edited)
            )
        )

    wait_for(
        acted,
        max(1.0, back + ACT_WITHIN_S - time.monotonic()),
        what=f"the operator acting on a new tier and an edit within {ACT_WITHIN_S}s of "
        f"{component} being back",
    )
    print(f"{component}: acted {time.monotonic() - back:.1f}s after it was back")
    for name in ["arrived", *steady]:
        wait_ready(cluster, ns, "mtier", name)
    assert get_or_none(cluster, "deployment", "steady-0", ns)["spec"]["replicas"] == 2

    # The same process all along: never exited, never restarted.
    assert op.proc.pid == pid and op.proc.poll() is None, op.log_tail()
    assert op.log_text().count(START_MARK) == starts
    assert op.alive(), op.log_tail()


# -- c: SIGKILL anywhere while objects churn -----------------------------------


class Churn(threading.Thread):
    """Creates, edits and deletes TIERS and ROUTERS with kubectl until stopped."""

    def __init__(self, cluster, ns: str, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.cluster, self.ns, self.rng = cluster, ns, rng
        self.halt = threading.Event()
        self.done: Counter[str] = Counter()  # "tier create" -> successful operations
        self.failed: Counter[str] = Counter()

    def bounds(self) -> tuple[int, int]:
        lo = self.rng.randint(1, 2)
        return lo, self.rng.randint(max(lo, 2), 3)

    def step(self) -> None:
        rng, ns, kubectl = self.rng, self.ns, self.cluster.kubectl
        is_tier = rng.random() < 0.8
        kind = "tier" if is_tier else "router"
        name = rng.choice(TIERS if is_tier else ROUTERS)
        action = rng.choices(["create", "edit", "delete"], weights=[45, 35, 20])[0]
        if action == "create":
            doc = (
                tier_doc(ns, name, *self.bounds())
                if is_tier
                else router_doc(ns, name, rng.sample(TIERS, rng.randint(1, 3)))
            )
            out = apply(self.cluster, ns, doc, check=False)
        elif action == "edit":
            if is_tier:
                lo, hi = self.bounds()
                patch = f'{{"spec":{{"replicas":{{"min":{lo},"max":{hi}}}}}}}'
            else:
                tiers = [{"name": t} for t in rng.sample(TIERS, rng.randint(1, 3))]
                patch = json.dumps({"spec": {"tiers": tiers}})
            res = "mtier" if is_tier else "trouter"
            out = kubectl("patch", res, name, "-n", ns, "--type=merge", "-p", patch, check=False)
        else:
            res = "mtier" if is_tier else "trouter"
            out = kubectl("delete", res, name, "-n", ns, "--wait=false", check=False)
        (self.done if out.returncode == 0 else self.failed)[f"{kind} {action}"] += 1

    def run(self) -> None:
        ns = self.ns
        docs = [tier_doc(ns, t) for t in TIERS]
        docs += [router_doc(ns, r, self.rng.sample(TIERS, 3)) for r in ROUTERS]
        apply(self.cluster, ns, *docs, check=False)
        while not self.halt.is_set():
            try:
                self.step()
            except subprocess.TimeoutExpired:
                self.failed["timeout"] += 1
            self.halt.wait(self.rng.uniform(0.05, 0.3))  # paced on purpose

    def stop(self) -> None:
        self.halt.set()
        self.join(120)
        assert not self.is_alive(), "the churn thread did not stop"


def convergence_problems(cluster, ns: str) -> list[str]:
    """Everything that is not as it should be once the operator converged; [] when done."""
    objs = kubectl_json(
        cluster, "get", "modeltiers,tierrouters,deployments,services,pdb,configmaps,replicasets",
        "-n", ns,
    )["items"]  # fmt: skip
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for o in objs:
        by_kind[o["kind"]].append(o)
    tiers = {t["metadata"]["name"]: t for t in by_kind["ModelTier"]}
    routers = {r["metadata"]["name"]: r for r in by_kind["TierRouter"]}
    owners = {o["metadata"]["uid"] for o in [*tiers.values(), *routers.values()]}
    problems = [
        f"{o['kind']} {o['metadata']['name']} is being deleted"
        for o in [*tiers.values(), *routers.values()]
        if o["metadata"].get("deletionTimestamp")
    ]

    # Children: every one controlled by an owner that exists; none twice.
    controlled: dict[tuple[str, str], list[str]] = defaultdict(list)
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "ConfigMap"):
        for child in by_kind[kind]:
            name = child["metadata"]["name"]
            if kind == "ConfigMap" and name == "kube-root-ca.crt":
                continue  # the cluster's own, in every namespace
            uid = controller_uid(child)
            if uid is None:
                problems.append(f"{kind} {name} has no (single) controller")
            elif uid not in owners:
                problems.append(f"{kind} {name} is orphaned: its controller {uid} is gone")
            else:
                controlled[(uid, kind)].append(name)
    deployment_uids = {d["metadata"]["uid"] for d in by_kind["Deployment"]}
    problems += [
        f"ReplicaSet {rs['metadata']['name']} is orphaned"
        for rs in by_kind["ReplicaSet"]
        if controller_uid(rs) not in deployment_uids
    ]

    for name, tier in tiers.items():
        uid = tier["metadata"]["uid"]
        for kind in ("Deployment", "Service", "PodDisruptionBudget"):
            if controlled[(uid, kind)] != [name]:
                problems.append(f"tier {name}: {kind}s {controlled[(uid, kind)]}, want [{name}]")
        if not is_ready(tier):
            problems.append(
                f"tier {name} (generation {tier['metadata']['generation']}) not Ready: "
                f"{ready_condition(tier)}"
            )
        bounds = tier["spec"]["replicas"]
        deployment = next((d for d in by_kind["Deployment"] if d["metadata"]["name"] == name), None)
        if deployment is not None and not (
            bounds["min"] <= deployment["spec"]["replicas"] <= bounds["max"]
        ):
            problems.append(
                f"tier {name}: Deployment runs {deployment['spec']['replicas']}, "
                f"outside [{bounds['min']}, {bounds['max']}]"
            )

    for name, router in routers.items():
        uid = router["metadata"]["uid"]
        named = [t["name"] for t in router["spec"]["tiers"]]
        found = [t for t in named if t in tiers]
        missing = [t for t in named if t not in tiers]
        tables = [f"{name}-routing"]
        # With none of its tiers there is no table to render: the operator keeps
        # the last one, or has none yet (the router pod waits for it).
        for kind, want in (
            ("Deployment", [name]), ("Service", [name]), ("ConfigMap", tables),
        ):  # fmt: skip
            got = controlled[(uid, kind)]
            if got != want and not (kind == "ConfigMap" and not found and got == []):
                problems.append(f"router {name}: {kind}s {got}, want {want}")
        cond = ready_condition(router)
        if cond.get("observedGeneration") != router["metadata"]["generation"]:
            problems.append(f"router {name}: Ready describes an old generation: {cond}")
        elif missing and not (
            cond.get("status") == "False"
            and cond.get("reason") == "TierNotFound"
            and all(f'"{t}"' in cond.get("message", "") for t in missing)
        ):
            problems.append(f"router {name}: tiers {missing} are missing, yet Ready is {cond}")
        elif not missing and not is_ready(router):
            problems.append(f"router {name}: all its tiers exist, yet Ready is {cond}")
        cm = next((c for c in by_kind["ConfigMap"] if c["metadata"]["name"] == tables[0]), None)
        if cm is None:
            continue
        table = [t["name"] for t in yaml.safe_load(cm["data"]["router.yaml"])["tiers"]]
        # The table routes to exactly the named tiers that exist; a kept table
        # (none exists) still routes to no tier the router does not name.
        if table != found and (found or not set(table) <= set(named)):
            problems.append(f"router {name}: routing table {table}, spec {named}, {missing=}")
    return problems


def test_sigkill_anywhere_during_churn_converges(cluster, ns_op) -> None:
    ns, op = ns_op
    seed = int(os.environ.get("TERRACE_FAULT_SEED") or random.SystemRandom().randrange(2**32))
    print(f"crash-anywhere seed {seed}: rerun with TERRACE_FAULT_SEED={seed}")
    rng = random.Random(seed)
    churn = Churn(cluster, ns, random.Random(rng.getrandbits(64)))
    churn.start()
    try:
        for kill in range(1, KILLS + 1):
            op.start()
            time.sleep(rng.uniform(0.2, 2.0))  # paced on purpose: the kill's random moment
            assert op.proc is not None and op.proc.poll() is None, (
                f"seed {seed}: the operator exited by itself before kill {kill}:\n{op.log_tail()}"
            )
            os.killpg(op.proc.pid, signal.SIGKILL)  # its own session, started by us
            op.proc.wait(30)
            op.stop()  # closes its log
    finally:
        churn.stop()
    print(f"churn: done {dict(churn.done)}, failed {dict(churn.failed)}")
    # The churn really did all of it (not a run where every kubectl failed).
    for kind in ("tier", "router"):
        for action in ("create", "edit", "delete"):
            assert churn.done[f"{kind} {action}"] > 0, (seed, dict(churn.done), churn.failed)
    assert op.log_text().count(START_MARK) >= KILLS

    last_start = time.monotonic()
    op.start()  # the last start
    last: list[list[str]] = [[]]

    def converged() -> bool:
        last[0] = convergence_problems(cluster, ns)
        return not last[0]

    try:
        wait_for(converged, CONVERGE_TIMEOUT, interval=1.0, what="convergence after the kills")
    except AssertionError as e:
        problems = "\n  ".join(last[0])
        raise AssertionError(f"seed {seed}: {e}\nstill wrong:\n  {problems}") from None
    left = kubectl_json(cluster, "get", "modeltiers", "-n", ns)["items"]
    print(
        f"converged with {len(left)} tiers, {time.monotonic() - last_start:.1f}s after the last start"
    )
    assert left, f"seed {seed}: the churn left no tier to check"
    assert op.proc is not None and op.proc.poll() is None, op.log_tail()
