"""Routing decisions as plain functions: which tiers to try, in what order, and
whether a cheap answer is sure enough to keep.

No I/O here; `proxy.py` does the HTTP and asks these functions what to do.

Confidence signal
-----------------
When escalation on low confidence is on, the router asks the cheap tier for
token log-probabilities (`logprobs: true` on chat, `logprobs: 1` on legacy
completions) unless the client asked for them itself, and computes the mean
log-probability of the sampled tokens over all choices. A mean below
`escalation.minMeanLogprob` (default -2.5, i.e. a geometric-mean token
probability under about 8%) means the small model was guessing, and the
request is re-asked on the next tier. An upstream that returns no logprobs
gives no signal, and its answer is kept. The logprobs the router added are
removed before the client sees the answer. Streaming requests are not
checked (the tier is decided before the first byte).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .config import EscalationConfig

# Why the router left a tier; used as the `reason` label and in the
# `x-terrace-escalated` header.
LOW_CONFIDENCE = "low_confidence"
ERROR = "error"
TIMEOUT = "timeout"
OVERLOAD = "overload"
UNAVAILABLE = "unavailable"  # no endpoint of the tier could be tried


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one request goes: tier indexes to try in order, and why.

    `order` indexes the candidate tiers (the OpenAI tiers in cost order, or
    every tier for OIP v2). `check_confidence`: a cheap answer with a larger
    tier left to ask is judged on its logprobs before it is kept."""

    order: tuple[int, ...]
    why: str
    check_confidence: bool = False

    def escalates(self, reason: str, escalation: EscalationConfig) -> bool:
        """Whether a failure of this kind may move on to the next tier."""
        if len(self.order) < 2:
            return False
        return escalation.on_overload if reason == OVERLOAD else escalation.on_error


def decide_auto(score: float, start: int, n_tiers: int, escalation: EscalationConfig) -> Decision:
    """An `auto` request: the tier its complexity score picked, then the
    escalation order (`attempt_order`)."""
    order = attempt_order(
        start,
        n_tiers,
        pinned=False,
        fallback_to_smaller=escalation.fallback_to_smaller,
        max_attempts=escalation.max_attempts,
    )
    return Decision(tuple(order), f"complexity {score:.4f}", escalation.on_low_confidence)


def decide_pinned(index: int, why: str) -> Decision:
    """A request that names its tier (a tier name, or an OIP v2 model): that
    tier only, on any of its endpoints. The client chose the model, so the
    router never answers with another one."""
    return Decision((index,), why)


def decide_flex(
    loads: Sequence[float], max_load: float, escalation: EscalationConfig, pinned: int | None = None
) -> Decision | None:
    """A `service_tier: "flex"` request (OpenAI's cheap, sheddable tier):
    the cheapest tier whose load (in flight over capacity) is under
    `max_load`, escalating only into tiers also under it; for a pinned
    request its own tier if under it. None: every candidate is busier, and
    the request is shed (429) so interactive requests keep the headroom.
    The complexity score is not asked: flex buys latency and quality
    tolerance for cost."""
    candidates = [pinned] if pinned is not None else range(len(loads))
    order = [i for i in candidates if loads[i] < max_load][: escalation.max_attempts]
    if not order:
        return None
    why = f"flex: cheapest tier under {max_load:.0%} load"
    return Decision(tuple(order), why, escalation.on_low_confidence and len(order) > 1)


def tier_for_score(score: float, thresholds: Sequence[float]) -> int:
    """Index of the tier for a score under fixed ascending thresholds.

    A score at or above thresholds[i] goes past tier i.
    """
    return bisect.bisect_right(thresholds, score)


def attempt_order(
    start: int, n_tiers: int, *, pinned: bool, fallback_to_smaller: bool, max_attempts: int
) -> list[int]:
    """Tier indexes to try, in order: the chosen one, then larger ones, then
    (if allowed) smaller ones from the nearest down. A pinned request tries
    only its tier. Bounded by max_attempts."""
    if pinned:
        return [start]
    order = list(range(start, n_tiers))
    if fallback_to_smaller:
        order += range(start - 1, -1, -1)
    return order[:max_attempts]


def mean_token_logprob(response: dict[str, Any], kind: str) -> float | None:
    """Mean log-probability of the sampled tokens in an OpenAI response, or
    None when the upstream returned none.

    Chat answers carry ``logprobs.content[].logprob``; legacy completions
    ``logprobs.token_logprobs[]``. Either shape is read for either kind:
    llama.cpp's server answers ``/v1/completions`` in the chat shape and
    leaves the legacy fields null.
    """
    values: list[Any] = []
    for choice in response.get("choices") or ():
        lp = choice.get("logprobs") if isinstance(choice, dict) else None
        if not isinstance(lp, dict):
            continue
        legacy = lp.get("token_logprobs")
        if kind != "chat" and isinstance(legacy, list) and legacy:
            values.extend(legacy)
        else:
            content = lp.get("content")
            if isinstance(content, list):
                values.extend(t.get("logprob") for t in content if isinstance(t, dict))
    finite = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def is_low_confidence(response: dict[str, Any], kind: str, min_mean_logprob: float) -> bool:
    mean = mean_token_logprob(response, kind)
    return mean is not None and mean < min_mean_logprob


def with_logprobs(payload: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """A copy of `payload` asking the upstream for the logprobs the
    confidence check needs, or None when the client asked for them itself
    (then nothing is added, and nothing must be stripped) or when adding
    them would change what the request means to an upstream (`echo`: many
    servers, Terrace's runtime among them, refuse echo with logprobs; such a
    request is then judged without a signal, and kept)."""
    if payload.get("echo"):
        return None
    if kind == "chat":
        return None if payload.get("logprobs") else {**payload, "logprobs": True}
    return None if payload.get("logprobs") is not None else {**payload, "logprobs": 1}


def strip_logprobs(response: dict[str, Any]) -> None:
    for choice in response.get("choices") or ():
        if isinstance(choice, dict) and "logprobs" in choice:
            choice["logprobs"] = None


def retry_after_seconds(seconds: float) -> int:
    """A Retry-After value: whole seconds, at least 1."""
    return max(1, math.ceil(seconds))
