"""terrace-operator's settings: environment (TERRACE_*) first, flags on top."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from terrace_operator import manifests
from terrace_operator.cache import Cache, Key
from terrace_operator.cli import build_settings, kopf_settings, parse_args
from terrace_operator.handlers import observe


def test_defaults_watch_everything_standalone() -> None:
    s = build_settings(parse_args([]))
    assert s.clusterwide and s.namespaces == []
    ks = kopf_settings(s)
    assert ks.peering.standalone and not ks.peering.mandatory
    assert not ks.posting.enabled


def test_env_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERRACE_NAMESPACES", "a, b")
    monkeypatch.setenv("TERRACE_METRICS_PORT", "9100")
    monkeypatch.setenv("TERRACE_GPU_NODE_SELECTOR", '{"gpu": "yes"}')
    s = build_settings(parse_args([]))
    assert s.namespaces == ["a", "b"] and not s.clusterwide
    assert s.metrics_port == 9100 and s.gpu_node_selector == {"gpu": "yes"}
    monkeypatch.setenv("TERRACE_CONTROL_INTERVAL_SECONDS", "5")
    s = build_settings(
        parse_args(
            [
                "-n",
                "c",
                "--metrics-port",
                "-1",
                "--liveness",
                "",
                "--leader-elect",
                "--prometheus-url",
                "http://127.0.0.1:9090",
            ]
        )
    )
    assert s.namespaces == ["c"] and s.metrics_port is None and s.liveness_endpoint is None
    # One settings object: the control tick's settings come with the rest.
    assert s.leader_election and s.control_interval_seconds == 5
    assert s.prometheus_url == "http://127.0.0.1:9090"
    # kopf only watches; the Lease, not kopf's peering, decides who acts.
    assert kopf_settings(s).peering.standalone
    assert build_settings(parse_args(["-A"])).clusterwide
    assert not build_settings(parse_args([])).leader_election


def test_bad_settings_exit_with_a_message() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "terrace_operator.cli", "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "invalid settings" in out.stderr and "workers" in out.stderr
    assert "Traceback" not in out.stderr


def test_rbac_is_least_privilege_and_namespaced_by_placeholder() -> None:
    sa, role, binding, lease_role, lease_binding = manifests.rbac("ops")
    # Leases only in the operator's own namespace, and nothing else there.
    assert (lease_role["kind"], lease_role["metadata"]["namespace"]) == ("Role", "ops")
    assert lease_role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "create", "update"],
        }
    ]
    assert lease_binding["metadata"]["namespace"] == "ops"
    assert lease_binding["subjects"][0]["namespace"] == "ops"
    assert (sa["kind"], sa["metadata"]["namespace"]) == ("ServiceAccount", "ops")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "terrace-operator", "namespace": "ops"}
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    grants = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert ("", "secrets") not in grants
    assert grants[("", "pods")] == {"list"}  # the control loop finds a tier's nodes
    assert not any({"delete", "deletecollection", "*"} & verbs for verbs in grants.values())
    assert {"create", "patch"} <= grants[("apps", "deployments")]
    assert grants[("terrace.dev", "modeltiers/status")] == {"get", "patch"}


def test_watch_events_queue_the_owner_and_routers_naming_a_tier() -> None:
    cache = Cache()
    router = {
        "kind": "TierRouter",
        "metadata": {"name": "r", "namespace": "ns", "generation": 1},
        "spec": {"tiers": [{"name": "small"}]},
    }
    tier = {"kind": "ModelTier", "metadata": {"name": "small", "namespace": "ns", "generation": 1}}
    r, t = Key("TierRouter", "ns", "r"), Key("ModelTier", "ns", "small")
    assert observe(cache, "TierRouter", router, deleted=False) == [r]
    assert observe(cache, "ModelTier", tier, deleted=False) == [t, r]
    child = {
        "kind": "Service",
        "metadata": {
            "name": "small",
            "namespace": "ns",
            "ownerReferences": [
                {
                    "apiVersion": "terrace.dev/v1alpha1",
                    "kind": "ModelTier",
                    "name": "small",
                    "uid": "u",
                    "controller": True,
                }
            ],
        },
    }
    assert observe(cache, "Service", child, deleted=False) == [t]
    assert cache.get("Service", "ns", "small") is not None
    assert observe(cache, "Service", child, deleted=True) == [t]
    assert cache.get("Service", "ns", "small") is None
    # A Deployment nobody of ours controls is never cached and queues nothing.
    foreign = {"kind": "Deployment", "metadata": {"name": "x", "namespace": "ns"}}
    assert observe(cache, "Deployment", foreign, deleted=False) == []
    assert cache.get("Deployment", "ns", "x") is None


def test_a_status_write_queues_no_one_but_readiness_queues_the_routers() -> None:
    cache = Cache()
    router = {
        "kind": "TierRouter",
        "metadata": {"name": "r", "namespace": "ns", "generation": 1},
        "spec": {"tiers": [{"name": "small"}]},
    }
    observe(cache, "TierRouter", router, deleted=False)
    meta = {"name": "small", "namespace": "ns", "generation": 1, "uid": "u"}

    def with_status(ready: str, joules: str, generation: int = 1) -> dict:
        return {
            "kind": "ModelTier",
            "metadata": {**meta, "generation": generation},
            "status": {
                "energyPerRequestJoules": joules,
                "conditions": [{"type": "Ready", "status": ready, "reason": "x"}],
            },
        }

    observe(cache, "ModelTier", with_status("False", "1.0"), deleted=False)
    # The controller's own status write (energy moved): nothing to do.
    assert observe(cache, "ModelTier", with_status("False", "2.0"), deleted=False) == []
    # Readiness flipped: the routers' tables and statuses change, not the tier;
    # even though the tier's controller stored its own write in the cache
    # before the watch brought it back.
    r, t = Key("TierRouter", "ns", "r"), Key("ModelTier", "ns", "small")
    cache.put(t, with_status("True", "2.0"))
    assert observe(cache, "ModelTier", with_status("True", "2.0"), deleted=False) == [r]
    # A spec edit (generation): both.
    assert observe(cache, "ModelTier", with_status("True", "2.0", 2), deleted=False) == [t, r]
    # A router's own status write queues nothing either.
    written = {**router, "status": {"tierCount": 1}}
    assert observe(cache, "TierRouter", written, deleted=False) == []
    # Deletion: the tier (to withdraw its power requests) and its routers.
    assert observe(cache, "ModelTier", with_status("True", "2.0", 2), deleted=True) == [t, r]


def test_no_credentials_exit_with_a_message(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_SERVICE")}
    env["KUBECONFIG"] = str(tmp_path / "absent")
    env["HOME"] = str(tmp_path)  # no ~/.kube/config either
    out = subprocess.run(
        [sys.executable, "-m", "terrace_operator.cli"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 2
    assert "no Kubernetes credentials" in out.stderr and "Traceback" not in out.stderr
