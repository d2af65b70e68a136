"""Pure reconcile decisions: replicas, drift, readiness, status."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given
from hypothesis import strategies as st
from terrace_operator import children as ch
from terrace_operator.api import ModelTierSpec, Replicas
from terrace_operator.reconcile import (
    REPLICAS_MANAGER,
    TierView,
    deployment_readiness,
    desired_replicas,
    is_subset,
    needs_apply,
    owns_field,
    replicas_need_handover,
    router_readiness,
    router_status,
    status_differs,
    tier_status,
    tiers_readiness,
)
from terrace_operator.settings import OperatorSettings

T0 = "2026-01-01T00:00:00Z"


def test_new_deployment_starts_at_min_even_zero() -> None:
    assert desired_replicas(Replicas(min=2, max=5), None) == 2
    assert desired_replicas(Replicas(min=0, max=5), None) == 0


def test_existing_replicas_are_clamped_not_reset() -> None:
    bounds = Replicas(min=1, max=4)
    assert desired_replicas(bounds, 3) == 3  # the autoscaler's choice stands
    assert desired_replicas(bounds, 9) == 4
    assert desired_replicas(bounds, 0) == 1


def test_scale_subresource_count_wins_inside_bounds() -> None:
    assert desired_replicas(Replicas(min=1, max=4, count=3), 1) == 3
    assert desired_replicas(Replicas(min=1, max=4, count=10), 1) == 4
    assert desired_replicas(Replicas(min=1, max=4, count=0), None) == 1


@given(
    st.integers(0, 50),
    st.integers(0, 50),
    st.one_of(st.none(), st.integers(0, 100)),
    st.one_of(st.none(), st.integers(0, 100)),
)
def test_replicas_always_inside_bounds(
    lo: int, span: int, current: int | None, count: int | None
) -> None:
    bounds = Replicas(min=lo, max=max(1, lo + span), count=count)
    n = desired_replicas(bounds, current)
    assert bounds.min <= n <= bounds.max
    # Idempotent: deciding again from the decision changes nothing.
    assert desired_replicas(bounds, n) == n


def managed(manager: str, operation: str, fields: dict) -> dict:
    return {
        "metadata": {
            "managedFields": [{"manager": manager, "operation": operation, "fieldsV1": fields}]
        }
    }


def test_handover_needed_only_while_main_manager_owns_replicas() -> None:
    owned = managed(ch.MANAGER, "Apply", {"f:spec": {"f:replicas": {}, "f:template": {}}})
    assert replicas_need_handover(owned)
    not_replicas = managed(ch.MANAGER, "Apply", {"f:spec": {"f:template": {}}})
    assert not replicas_need_handover(not_replicas)
    other = managed(REPLICAS_MANAGER, "Apply", {"f:spec": {"f:replicas": {}}})
    assert not replicas_need_handover(other)
    assert owns_field(other, REPLICAS_MANAGER, "Apply", "spec", "replicas")
    assert not owns_field(other, REPLICAS_MANAGER, "Update", "spec", "replicas")


def test_subset_ignores_server_defaults_but_sees_edits() -> None:
    desired = {"a": {"b": 1, "c": [{"x": 1}]}}
    assert is_subset(desired, {"a": {"b": 1, "extra": 2, "c": [{"x": 1, "default": True}]}})
    assert not is_subset(desired, {"a": {"b": 2, "c": [{"x": 1}]}})
    assert not is_subset(desired, {"a": {"b": 1, "c": [{"x": 1}, {"x": 2}]}})
    assert not is_subset(desired, {"a": {"b": 1}})


def desired_dep() -> dict:
    owner = ch.Owner("ModelTier", "t", "ns", "u", 1)
    return ch.runtime_deployment(
        owner, ModelTierSpec.model_validate({"model": {"uri": "file:///m"}}), OperatorSettings()
    )


def test_needs_apply_when_missing_edited_or_spec_changed() -> None:
    desired = desired_dep()
    live = copy.deepcopy(desired)
    live["spec"]["replicas"] = 3
    live["status"] = {"replicas": 3}
    assert not needs_apply(desired, live)
    assert needs_apply(desired, None)
    edited = copy.deepcopy(live)
    edited["spec"]["template"]["spec"]["containers"][0]["image"] = "evil"
    assert needs_apply(desired, edited)
    # A field dropped from the spec (e.g. a toleration) is not visible to a
    # subset test; the digest annotation catches it.
    stale = copy.deepcopy(live)
    stale["metadata"]["annotations"][ch.HASH_ANNOTATION] = "0" * 16
    assert needs_apply(desired, stale)


def dep(
    replicas: int,
    *,
    generation: int = 2,
    observed: int = 2,
    total: int | None = None,
    updated: int | None = None,
    ready: int = 0,
    available: int | None = None,
) -> dict:
    status = {
        "observedGeneration": observed,
        "readyReplicas": ready,
        "replicas": replicas if total is None else total,
        "updatedReplicas": replicas if updated is None else updated,
        "availableReplicas": ready if available is None else available,
    }
    return {
        "metadata": {"generation": generation},
        "spec": {"replicas": replicas},
        "status": status,
    }


@pytest.mark.parametrize(
    ("deployment", "ready", "reason"),
    [
        (None, False, "DeploymentMissing"),
        (dep(2, observed=1), False, "Progressing"),
        (dep(2, ready=1), False, "PodsNotReady"),
        (dep(2, updated=1, ready=2), False, "Progressing"),
        (dep(2, total=3, ready=2), False, "Progressing"),
        (dep(2, ready=2), True, "Available"),
        (dep(0, total=0), True, "ScaledToZero"),
        (dep(0, total=1), False, "Progressing"),
    ],
)
def test_deployment_readiness(deployment: dict | None, ready: bool, reason: str) -> None:
    r = deployment_readiness(deployment)
    assert (r.ready, r.reason) == (ready, reason)


def test_tier_status_fields_and_ready_condition() -> None:
    status = tier_status(
        generation=4,
        conditions=None,
        deployment=dep(2, ready=2),
        selector="a=b",
        endpoint="http://t.ns.svc:8080",
        now=T0,
    )
    assert status == {
        "observedGeneration": 4,
        "replicas": 2,
        "readyReplicas": 2,
        "selector": "a=b",
        "endpoint": "http://t.ns.svc:8080",
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Available",
                "message": "2/2 pods ready",
                "lastTransitionTime": T0,
                "observedGeneration": 4,
            }
        ],
    }


def test_own_conditions_only_are_written_and_times_carry_over() -> None:
    theirs = [
        {
            "type": "Scaling",
            "status": "True",
            "reason": "Up",
            "message": "",
            "lastTransitionTime": T0,
        },
        {
            "type": "Ready",
            "status": "True",
            "reason": "Available",
            "message": "1/1 pods ready",
            "lastTransitionTime": T0,
            "observedGeneration": 1,
        },
    ]
    status = tier_status(
        generation=2,
        conditions=theirs,
        deployment=dep(1, ready=1),
        selector="",
        endpoint="",
        now="2030-01-01T00:00:00Z",
    )
    assert [c["type"] for c in status["conditions"]] == ["Ready"]
    assert status["conditions"][0]["lastTransitionTime"] == T0
    current = {**status, "conditions": theirs}
    assert status_differs(status, current)  # observedGeneration of Ready moved to 2
    assert not status_differs(status, {**status})
    # The controller writes the whole status: a condition or a field it no
    # longer has (a tier turned from GPU to CPU loses PowerApplied and its
    # watts) must go, so its absence is a change.
    assert status_differs(status, {**status, "conditions": [theirs[0], *status["conditions"]]})
    assert status_differs(status, {**status, "powerLimitWatts": 300})


def test_missing_tier_is_named_in_the_reason() -> None:
    views = [
        TierView("small", True, True, "http://small.ns.svc:8080"),
        TierView("large", False, False, None),
    ]
    r = router_readiness(views, dep(1, ready=1), "ns")
    assert (r.ready, r.reason) == (False, "TierNotFound")
    assert r.message == 'ModelTier "large" does not exist in namespace ns'
    two = router_readiness(
        [TierView("a", False, False, None), TierView("b", False, False, None)], None, "ns"
    )
    assert two.message == 'ModelTiers "a", "b" do not exist in namespace ns'
    ok = router_readiness(views[:1], dep(1, ready=1), "ns")
    assert ok.ready and ok.message == "1/1 router pods ready"


def test_tiers_ready_condition() -> None:
    assert tiers_readiness([TierView("a", True, True, "x")]).ready
    waiting = tiers_readiness([TierView("a", True, False, "x"), TierView("b", True, True, "y")])
    assert (waiting.ready, waiting.message) == (False, "not ready: a")


def test_router_status_lists_tiers() -> None:
    views = [TierView("a", True, True, "http://a.ns.svc:8080"), TierView("b", False, False, None)]
    status = router_status(
        generation=1,
        conditions=None,
        tiers=views,
        deployment=dep(1, ready=1),
        namespace="ns",
        endpoint="http://r.ns.svc:8080",
        config_hash="abc",
        now=T0,
    )
    assert status["tierCount"] == 2 and status["configHash"] == "abc"
    assert status["tiers"] == [
        {"name": "a", "endpoint": "http://a.ns.svc:8080", "found": True, "ready": True},
        {"name": "b", "endpoint": "", "found": False, "ready": False},
    ]
    assert {c["type"]: c["reason"] for c in status["conditions"]} == {
        "Ready": "TierNotFound",
        "TiersReady": "TierNotFound",
    }
