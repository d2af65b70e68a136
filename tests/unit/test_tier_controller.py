"""The ModelTier and TierRouter controllers' syncs, against a recording
stand-in of the `Kube` interface (kube_fake.py); the same behaviour on the
real API server is in tests/integration/test_operator_reconcile.py."""

from __future__ import annotations

import asyncio

import pytest
from kube_fake import RecordingKube, tier_body
from terrace_operator.cache import Cache, Key
from terrace_operator.controller import Conflict
from terrace_operator.kube import path_for
from terrace_operator.metrics import Metrics
from terrace_operator.reconcile import REPLICAS_MANAGER
from terrace_operator.routers import TierRouterController
from terrace_operator.settings import OperatorSettings
from terrace_operator.tiers import ModelTierController

NS = "demo"
DEPLOYMENT = path_for("Deployment", NS, "small")
TIER = path_for("ModelTier", NS, "small")


def setup(body: dict, **settings) -> tuple[ModelTierController, RecordingKube, Key]:
    kube = RecordingKube()
    stored = kube.put(path_for("ModelTier", NS, body["metadata"]["name"]), body)
    cache = Cache()
    key = Key.of(stored)
    cache.put(key, stored)
    controller = ModelTierController(OperatorSettings(**settings), kube, cache, Metrics())
    return controller, kube, key


def sync(controller, key) -> None:
    asyncio.run(controller.sync(key))


def conditions(kube: RecordingKube, path: str = TIER) -> dict[str, dict]:
    return {c["type"]: c for c in kube.objects[path]["status"]["conditions"]}


def test_a_new_tier_gets_its_children_one_event_and_one_status_write():
    controller, kube, key = setup(tier_body(replicas={"min": 2, "max": 3}))

    async def first() -> bool:
        await controller.sync(key)
        # Waiting on the Deployment controller: looked at again soon, even if
        # a watch event is missed.
        return controller.queue.scheduled(key)

    assert asyncio.run(first())
    deployment = kube.objects[DEPLOYMENT]
    assert deployment["spec"]["replicas"] == 2  # starts at min
    assert {p for _, p, _ in kube.writes} >= {
        DEPLOYMENT, path_for("Service", NS, "small"), path_for("PodDisruptionBudget", NS, "small")
    }  # fmt: skip
    # replicas are handed to their one owner right after creation
    assert ("apply", DEPLOYMENT, REPLICAS_MANAGER) in kube.writes
    [created] = [e for e in kube.events if e[1] == "Created"]
    assert "Deployment small (2 replicas)" in created[2] and "Service small" in created[2]
    assert kube.writes_to(TIER) == [("apply/status", TIER, "terrace-operator")]
    assert conditions(kube)["Ready"]["status"] == "False"
    # Again with the world unchanged: nothing to write, nothing to say.
    controller.cache.put(key, kube.objects[TIER])
    writes, events = len(kube.writes), len(kube.events)
    sync(controller, key)
    assert len(kube.writes) == writes and len(kube.events) == events


def test_a_deployment_not_ours_is_never_adopted_and_said_once():
    controller, kube, key = setup(tier_body())
    kube.put(DEPLOYMENT, {"apiVersion": "apps/v1", "kind": "Deployment",
                          "metadata": {"name": "small", "namespace": NS},
                          "spec": {"replicas": 5}})  # fmt: skip
    with pytest.raises(Conflict):
        sync(controller, key)
    assert kube.writes_to(DEPLOYMENT) == []
    assert conditions(kube)["Ready"]["reason"] == "ChildConflict"
    controller.cache.put(key, kube.objects[TIER])
    with pytest.raises(Conflict):
        sync(controller, key)
    assert [e[1] for e in kube.events].count("ChildConflict") == 1


def test_a_tick_writes_its_conditions_in_the_same_status_as_ready():
    controller, kube, key = setup(tier_body())
    sync(controller, key)  # children first
    controller.cache.put(key, kube.objects[TIER])
    controller.cache.put(Key("Deployment", NS, "small"), kube.objects[DEPLOYMENT])
    asyncio.run(controller.tick())  # no Prometheus: the tick says so and holds
    assert controller.due == {key}
    before = len(kube.writes_to(TIER))
    sync(controller, key)
    assert len(kube.writes_to(TIER)) == before + 1  # one write for all of it
    c = conditions(kube)
    assert set(c) == {"Ready", "Scaling", "MetricsAvailable"}
    assert c["MetricsAvailable"]["message"] == "no Prometheus URL configured"
    assert c["Scaling"]["reason"] == "MetricsUnavailable"
    assert controller.due == set()
    assert kube.objects[DEPLOYMENT]["spec"]["replicas"] == 1  # held
    # A later sync without a tick keeps the tick's part of the status.
    controller.cache.put(key, kube.objects[TIER])
    sync(controller, key)
    assert set(conditions(kube)) == {"Ready", "Scaling", "MetricsAvailable"}


@pytest.mark.parametrize(
    ("namespace", "spec", "replicas", "want"),
    [
        ("other", {"replicas": {"min": 0, "max": 3}}, 0, 404),  # not watched
        (NS, {"replicas": {"min": 1, "max": 3}}, 1, 409),  # never sleeps
        (NS, {"replicas": {"min": 0, "max": 3, "count": 0}}, 0, 409),  # an HPA drives it
        (NS, {"replicas": {"min": 0, "max": 3}}, 2, 200),  # awake already
        (NS, {"replicas": {"min": 0, "max": 3}}, 0, 202),  # woken
    ],
)
def test_the_wake_endpoint_touches_only_a_watched_sleeping_tier(namespace, spec, replicas, want):
    controller, kube, key = setup(tier_body(namespace=NS, **spec), namespaces=[NS])
    owner = {"apiVersion": "terrace.dev/v1alpha1", "kind": "ModelTier", "name": "small",
             "uid": "uid-small", "controller": True}  # fmt: skip
    dep = kube.put(DEPLOYMENT, {"apiVersion": "apps/v1", "kind": "Deployment",
                                "metadata": {"name": "small", "namespace": NS,
                                             "ownerReferences": [owner]},
                                "spec": {"replicas": replicas}})  # fmt: skip
    controller.cache.put(Key("Deployment", NS, "small"), dep)
    got, _ = asyncio.run(controller.wake(namespace, "small"))
    assert got == want
    scaled = [w for w in kube.writes_to(DEPLOYMENT)]
    if want == 202:
        assert scaled == [("apply", DEPLOYMENT, REPLICAS_MANAGER)]
        assert kube.objects[DEPLOYMENT]["spec"]["replicas"] == 1
        assert [e[1] for e in kube.events] == ["WakingUp"]
        assert controller.woken[key]  # the next tick records it
    else:
        assert scaled == [] and kube.events == []


def test_no_such_tier_is_404():
    controller, _, _ = setup(tier_body())
    assert asyncio.run(controller.wake(NS, "nope"))[0] == 404


def test_a_router_naming_a_missing_tier_says_which():
    kube = RecordingKube()
    body = {
        "apiVersion": "terrace.dev/v1alpha1",
        "kind": "TierRouter",
        "metadata": {"name": "r", "namespace": NS, "uid": "uid-r", "generation": 1},
        "spec": {"tiers": [{"name": "small"}, {"name": "large"}]},
    }
    stored = kube.put(path_for("TierRouter", NS, "r"), body)
    cache = Cache()
    cache.put(Key.of(stored), stored)
    small = kube.put(TIER, tier_body())
    cache.put(Key.of(small), small)
    routers = TierRouterController(OperatorSettings(), kube, cache, Metrics())
    asyncio.run(routers.sync(Key.of(stored)))  # not an error: it waits for the tier
    status = kube.objects[path_for("TierRouter", NS, "r")]["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "TierNotFound" and '"large"' in ready["message"]
    assert [(t["name"], t["found"]) for t in status["tiers"]] == [("small", True), ("large", False)]
    # The ModelTier is read, never written, by the router's controller; the
    # table is rendered from the tiers that exist, and one Warning says what is missing.
    assert kube.writes_to(TIER) == []
    assert path_for("ConfigMap", NS, "r-routing") in {p for _, p, _ in kube.writes}
    assert [e[1] for e in kube.events if e[3] == "Warning"] == ["TierNotFound"]


def test_a_tick_ends_when_every_tier_was_tried_even_a_failing_one():
    controller, kube, key = setup(tier_body())
    kube.put(DEPLOYMENT, {"apiVersion": "apps/v1", "kind": "Deployment",
                          "metadata": {"name": "small", "namespace": NS}})  # fmt: skip
    asyncio.run(controller.tick())
    assert controller.open == {key}
    with pytest.raises(Conflict):
        sync(controller, key)
    assert controller.open == set()  # the tick is over and was timed
    count = controller.metrics.control_tick_seconds.collect()[0].samples
    assert next(s.value for s in count if s.name.endswith("_count")) == 1
    # A child that is not ours stops the children, not the tick: it said so.
    assert controller.due == set()
    assert conditions(kube)["Scaling"]["reason"] == "NoDeployment"
