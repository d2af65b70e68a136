"""terrace-operator's settings: environment (TERRACE_*) first, flags on top."""

from __future__ import annotations

import subprocess
import sys

import pytest
from terrace_operator import manifests
from terrace_operator.cli import build_settings, kopf_settings, parse_args
from terrace_operator.controller import Controller, Key
from terrace_operator.kube import Credentials, KubeClient
from terrace_operator.settings import OperatorSettings


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
    s = build_settings(
        parse_args(["-n", "c", "--metrics-port", "-1", "--liveness", "", "--peering", "p"])
    )
    assert s.namespaces == ["c"] and s.metrics_port is None and s.liveness_endpoint is None
    ks = kopf_settings(s)
    assert ks.peering.name == "p" and ks.peering.mandatory and not ks.peering.standalone
    assert build_settings(parse_args(["-A"])).clusterwide


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
    sa, role, binding = manifests.rbac("ops")
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
    c = Controller(OperatorSettings(), KubeClient("terrace-operator"))
    router = {
        "kind": "TierRouter",
        "metadata": {"name": "r", "namespace": "ns"},
        "spec": {"tiers": [{"name": "small"}]},
    }
    c.observe("TierRouter", router, deleted=False)
    c.observe(
        "ModelTier",
        {"kind": "ModelTier", "metadata": {"name": "small", "namespace": "ns"}},
        deleted=False,
    )
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
    c.observe("Service", child, deleted=False)
    assert c.cached("Service", "ns", "small") is not None
    pending = set(c.queue._dirty)
    assert pending == {Key("TierRouter", "ns", "r"), Key("ModelTier", "ns", "small")}
    c.observe("Service", child, deleted=True)
    assert c.cached("Service", "ns", "small") is None
    # A Deployment nobody of ours controls is never cached.
    c.observe(
        "Deployment",
        {"kind": "Deployment", "metadata": {"name": "x", "namespace": "ns"}},
        deleted=False,
    )
    assert c.cached("Deployment", "ns", "x") is None


def test_credentials_from_kubeconfig_data_fields() -> None:
    class Info:
        server = "https://127.0.0.1:6443"
        ca_path = None
        ca_data = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg=="  # base64 of a PEM header line
        insecure = None
        token = "t"
        scheme = None
        certificate_path = certificate_data = private_key_path = private_key_data = None

    creds = Credentials.from_kopf(Info())
    assert creds.ca_data == "-----BEGIN CERTIFICATE-----\n"
    assert creds.token == "t" and creds.cert_path is None
