"""The power agent's rules (docs/power.md, "The power agent"), on the real
cluster: the real `terrace-agent` process (two fake H100s behind the fake
NVML backend: 200-700 W, default 700 W), running as its ServiceAccount
against the real apiserver, and a Node of its own that the test annotates
exactly as the operator does (`agent/protocol.py`), with chosen watts and
timestamps. What the agent did is read back from its report on the Node
(`terrace.dev/power-enforced`: the limit the fake NVML enforces).

- the agent enforces the highest fresh request on every GPU of its node;
- a request older than the TTL (`--desired-ttl`, 600 s by default like the
  operator's `TERRACE_POWER_DESIRED_TTL_SECONDS`) is ignored, so a request
  nobody refreshes lets the GPUs drift back to their default limit.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from terrace_operator.agent.protocol import (
    DEFAULT_TTL_SECONDS,
    DESIRED_PREFIX,
    ENFORCED_KEY,
    desired_key,
    encode_desired,
    parse_time,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from operator_harness import (  # noqa: E402
    OPERATOR_NAMESPACE,
    AgentProcess,
    ensure_namespace,
    kubectl_json,
    wait_for,
)

pytestmark = pytest.mark.cluster

AGENT_RBAC = Path(__file__).resolve().parents[2] / "operator/terrace_operator/agent/rbac.yaml"
NODE = f"agent-rules-{uuid.uuid4().hex[:6]}"  # its own Node: no other test's requests on it
NS = "agent-rules"  # only a name inside the requests; nothing is created in it
GPUS = ("0", "1")
DEFAULT_W, MIN_W, MAX_W = 700, 200, 700  # the fake H100


def annotations(cluster) -> dict[str, str]:
    return kubectl_json(cluster, "get", "node", NODE)["metadata"].get("annotations") or {}


def report(cluster) -> dict:
    return json.loads(annotations(cluster).get(ENFORCED_KEY) or "{}")


def enforced(cluster) -> dict[str, float]:
    """GPU index -> the limit the agent read back from NVML, as it reported it."""
    return {i: g["enforcedWatts"] for i, g in (report(cluster).get("gpus") or {}).items()}


def request(tier: str, watts: int, age_seconds: float) -> tuple[str, str]:
    """The operator's desired-limit annotation for `tier`, written `age_seconds` ago."""
    when = datetime.now(UTC) - timedelta(seconds=age_seconds)
    return desired_key(NS, tier), encode_desired(NS, tier, watts, when)


def set_requests(cluster, *requests: tuple[str, str]) -> None:
    """Exactly these desired annotations on the Node (others withdrawn), as
    the operator writes them: a JSON merge patch of the Node's metadata."""
    patch: dict[str, str | None] = {k: None for k in annotations(cluster)
                                    if k.startswith(DESIRED_PREFIX)}  # fmt: skip
    patch.update(dict(requests))
    cluster.kubectl("patch", "node", NODE, "--type=merge", "-p",
                    json.dumps({"metadata": {"annotations": patch}}))  # fmt: skip


def wait_enforced(cluster, watts: float, what: str, timeout: float = 30) -> dict:
    """Until every GPU reports `watts` enforced; returns the agent's report."""
    want = dict.fromkeys(GPUS, watts)
    seen: dict = {}

    def check() -> dict | None:
        r = report(cluster)
        seen["last"] = r
        got = {i: g["enforcedWatts"] for i, g in (r.get("gpus") or {}).items()}
        return r if got == want and r.get("agent") == "running" else None

    try:
        return wait_for(check, timeout, what=what)
    except AssertionError:
        raise AssertionError(f"{what}: last report {seen.get('last')}") from None


@pytest.fixture(scope="module")
def agent(cluster, tmp_path_factory) -> Iterator[AgentProcess]:
    tmp = tmp_path_factory.mktemp("agent-rules")
    ensure_namespace(cluster, OPERATOR_NAMESPACE)
    cluster.kubectl("apply", "-n", OPERATOR_NAMESPACE, "-f", str(AGENT_RBAC))
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": NODE,
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {"kubernetes.io/hostname": NODE, "type": "kwok"},
        },
        # Nothing is ever scheduled here: only this test's agent uses the Node.
        "spec": {"taints": [{"key": "terrace.dev/test", "value": NODE, "effect": "NoSchedule"}]},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(node))
    kubeconfig = cluster.service_account_kubeconfig(OPERATOR_NAMESPACE, "terrace-agent")
    process = AgentProcess(kubeconfig, NODE, tmp / "agent.log", gpus=len(GPUS))
    try:
        # No request yet: the agent reports its GPUs at their default limit.
        report_ = wait_enforced(cluster, DEFAULT_W, "the agent's first report")
        for g in report_["gpus"].values():
            assert (g["defaultWatts"], g["minWatts"], g["maxWatts"]) == (DEFAULT_W, MIN_W, MAX_W)
        yield process
    finally:
        process.stop()
        print(process.log_path.read_text()[-3000:])
        cluster.kubectl("delete", "node", NODE, "--ignore-not-found", check=False)


def test_the_highest_fresh_request_is_enforced_on_every_gpu(cluster, agent):
    a, b, stale = request("a", 300, 0), request("b", 450, 0), request("c", 650, 700)
    set_requests(cluster, a, b, stale)
    # 450 W, not 300 W (no tier throttled below its own request) and not the
    # stale 650 W; on both GPUs, though each request is one tier's.
    wait_enforced(cluster, 450, "the highest fresh request, 450 W, on every GPU")
    set_requests(cluster, a, stale)  # b withdrawn (its tier deleted)
    wait_enforced(cluster, 300, "the highest remaining fresh request, 300 W")
    assert set(annotations(cluster)) >= {a[0], stale[0]}  # the agent never removes requests


def test_a_request_older_than_the_ttl_is_ignored(cluster, agent):
    # 320 W: no other test of this module leaves that value enforced.
    key, fresh = request("old", 320, 0)
    set_requests(cluster, (key, fresh))
    wait_enforced(cluster, 320, "a fresh 320 W request enforced")
    # The same tier's request, rewritten with a time past the TTL and another
    # value: it is not enforced; with nothing fresh the GPUs go back to default.
    _, stale = request("old", 500, DEFAULT_TTL_SECONDS + 60)
    set_requests(cluster, (key, stale))
    wait_enforced(cluster, DEFAULT_W, "the stale request ignored: default limit")
    assert annotations(cluster)[key] == stale


def test_a_request_nobody_refreshes_expires_after_the_ttl(cluster, agent):
    # Written as if the operator last refreshed it 555 s ago: fresh for
    # another 45 s (the default TTL is 600 s), time enough to be enforced on
    # a busy machine (the agent acts on a Node change within a second or two).
    margin = 45
    key, value = request("dead-operator", 350, DEFAULT_TTL_SECONDS - margin)
    written = parse_time(json.loads(value)["time"])
    set_requests(cluster, (key, value))
    wait_enforced(cluster, 350, "the request enforced while fresh", timeout=margin - 5)
    # No refresh: the agent drops it once it is older than the TTL, on its own
    # (the Node does not change meanwhile), and the GPUs drift back to default.
    after = wait_enforced(cluster, DEFAULT_W, "back to default after the TTL", timeout=margin + 60)
    reported = parse_time(after["time"])
    assert written is not None and reported is not None
    assert reported >= written + timedelta(seconds=DEFAULT_TTL_SECONDS), (written, reported)
    assert annotations(cluster)[key] == value  # still there: only its age changed
