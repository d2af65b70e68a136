"""metav1.Condition bookkeeping, as plain functions over plain lists of dicts.

Conditions are a list-map keyed by `type` in both CRDs, so several writers
share one list: the operator core owns Ready (and TiersReady on a
TierRouter); the control loop owns Scaling, MetricsAvailable and
PowerApplied. Each writer should send only its own entries with server-side
apply on the status subresource (its own field manager), which merges by
type instead of replacing the list.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

Status = Literal["True", "False", "Unknown"]


def now_rfc3339() -> str:
    """The current UTC time at one-second precision, as metav1.Time serialises."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict] | None,
    type: str,
    status: Status,
    reason: str,
    message: str,
    observed_generation: int | None,
    now: str | None = None,
) -> list[dict]:
    """Return a new list with condition `type` set; the input is not modified.

    lastTransitionTime moves only when the status flips (Kubernetes API
    conventions), so a condition that keeps its status but changes its reason
    or message keeps the time it first became that status.
    """
    if status not in ("True", "False", "Unknown"):
        raise ValueError(f"condition status must be True, False or Unknown, got {status!r}")
    if not reason or not reason[0].isalpha():
        raise ValueError(f"condition reason must be a non-empty CamelCase word, got {reason!r}")
    out: list[dict] = []
    previous: dict | None = None
    for c in conditions or []:
        if c.get("type") == type:
            previous = c
        else:
            out.append(dict(c))
    when = now or now_rfc3339()
    if previous is not None and previous.get("status") == status:
        when = previous.get("lastTransitionTime") or when
    new: dict[str, str | int] = {
        "type": type,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": when,
    }
    if observed_generation is not None:
        new["observedGeneration"] = observed_generation
    # Keep the condition where it was so the list does not reorder on every write.
    index = next((i for i, c in enumerate(conditions or []) if c.get("type") == type), None)
    if index is None:
        out.append(new)
    else:
        out.insert(index, new)
    return out


def get_condition(conditions: list[dict] | None, type: str) -> dict | None:
    return next((c for c in conditions or [] if c.get("type") == type), None)


def is_true(conditions: list[dict] | None, type: str) -> bool:
    c = get_condition(conditions, type)
    return c is not None and c.get("status") == "True"
