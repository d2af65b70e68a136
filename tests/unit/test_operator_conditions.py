"""set_condition keeps metav1.Condition semantics (shared with the control loop)."""

from __future__ import annotations

import re

import pytest
from terrace_operator.conditions import get_condition, is_true, now_rfc3339, set_condition

T0 = "2026-01-01T00:00:00Z"
T1 = "2026-01-01T00:05:00Z"


def test_adds_a_condition_in_metav1_shape() -> None:
    out = set_condition([], "Ready", "False", "PodsNotReady", "0/1 pods ready", 3, now=T0)
    assert out == [
        {
            "type": "Ready",
            "status": "False",
            "reason": "PodsNotReady",
            "message": "0/1 pods ready",
            "lastTransitionTime": T0,
            "observedGeneration": 3,
        }
    ]


def test_transition_time_moves_only_when_status_flips() -> None:
    first = set_condition([], "Ready", "False", "PodsNotReady", "0/2", 1, now=T0)
    same = set_condition(first, "Ready", "False", "Progressing", "1/2", 2, now=T1)
    assert same[0]["lastTransitionTime"] == T0
    assert (same[0]["reason"], same[0]["message"], same[0]["observedGeneration"]) == (
        "Progressing",
        "1/2",
        2,
    )
    flipped = set_condition(same, "Ready", "True", "Available", "2/2", 2, now=T1)
    assert flipped[0]["lastTransitionTime"] == T1


def test_other_writers_conditions_are_kept_in_place_and_input_untouched() -> None:
    theirs = [
        {
            "type": "Scaling",
            "status": "True",
            "reason": "ScaledUp",
            "message": "",
            "lastTransitionTime": T0,
        },
        {
            "type": "Ready",
            "status": "False",
            "reason": "PodsNotReady",
            "message": "",
            "lastTransitionTime": T0,
        },
        {
            "type": "PowerApplied",
            "status": "True",
            "reason": "Enforced",
            "message": "",
            "lastTransitionTime": T0,
        },
    ]
    snapshot = [dict(c) for c in theirs]
    out = set_condition(theirs, "Ready", "True", "Available", "1/1", 4, now=T1)
    assert [c["type"] for c in out] == ["Scaling", "Ready", "PowerApplied"]
    assert theirs == snapshot
    assert is_true(out, "Ready") and not is_true(out, "Missing")
    assert get_condition(out, "Scaling") == snapshot[0]


def test_no_observed_generation_leaves_it_out_and_now_is_rfc3339() -> None:
    out = set_condition(None, "MetricsAvailable", "Unknown", "NotYetQueried", "", None)
    assert "observedGeneration" not in out[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", out[0]["lastTransitionTime"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", now_rfc3339())


@pytest.mark.parametrize(("status", "reason"), [("Yes", "Ok"), ("True", ""), ("True", "1bad")])
def test_rejects_what_the_apiserver_would(status: str, reason: str) -> None:
    with pytest.raises(ValueError):
        set_condition([], "Ready", status, reason, "", 1)  # type: ignore[arg-type]
