"""The OpenAI request path: check, classify, decide, attempt, answer.

One `Proxy` per app. It reads the current `RouterState` once per request
(so a reload never changes the rules under a request in flight) and uses the
app's one shared upstream session. The routing decision comes from
`policy.py`, the attempts (endpoints, escalation, failures) from
`attempts.py`, the SSE relay from `relay.py`; this module parses the
client's request and shapes the answer.

A request is never dropped: it gets an upstream's answer, the best answer
seen so far (an unsure cheap answer whose escalation failed), or a clean
OpenAI-shaped error naming why (`errors.no_answer`). A client that leaves
stops the work (`disconnect.py`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import replace
from time import monotonic, perf_counter
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from . import policy, upstream
from .attempts import MALFORMED, SOUND, UNSURE, Answer, Exchange, Outgoing, attempt
from .cache import CachedAnswer, cache_key
from .disconnect import ClientGone, unless_gone
from .errors import RouterError, bad_request, model_not_found, too_large
from .metrics import RouterMetrics
from .relay import SseRelay
from .schemas import is_deterministic, prompt_text, validate
from .state import RouterState, Tier
from .upstream import Head

log = logging.getLogger(__name__)

_JSON_HEADERS = {"content-type": "application/json"}
_JSON = "application/json"
_SSE = "text/event-stream"
_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}

# Status recorded for a request whose client left before its answer (nginx's).
CLIENT_CLOSED = 499

# A body larger than the limit is still read (and dropped) up to this size so
# that the client, still sending, gets the 413 (or 401) instead of a reset.
_DRAIN_LIMIT = 64 * 1024 * 1024


async def drain(request: Request) -> None:
    """Read and drop what is left of the body, up to `_DRAIN_LIMIT` bytes."""
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > _DRAIN_LIMIT:
            break


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 when it exceeds `limit` bytes (checked on
    Content-Length and again while reading: the header can lie or be absent)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise bad_request("Invalid Content-Length header.") from None
        if size > limit:
            if size <= _DRAIN_LIMIT:
                await drain(request)
            raise too_large(limit)
    chunks = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            await drain(request)
            raise too_large(limit)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def authorize(state: RouterState, request: Request) -> None:
    """A 401 unless the request carries a known key; the body is drained
    first so that a client still sending sees the 401, not a reset."""
    try:
        state.keys.check(request.headers.get("authorization"))
    except RouterError:
        await drain(request)
        raise


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)


def _finite(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):  # 1e999: a number JSON cannot carry on
        raise ValueError(text)
    return value


def parse_json(body: bytes) -> Any:
    """Strict JSON: `NaN`, `Infinity` and numbers that overflow a double (all
    of which Python's json accepts) are not JSON; nesting deeper than the
    parser's recursion limit is refused, not a server error."""
    try:
        return json.loads(body, parse_constant=_refuse_constant, parse_float=_finite)
    except (ValueError, RecursionError):
        raise bad_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly.)"
        ) from None


def without_nulls(payload: Any) -> Any:
    """A top-level `null` in an OpenAI request means "the default", as if the
    field were absent (OpenAI's SDKs send them): dropped before validation,
    caching and forwarding, so every upstream sees the same request."""
    if isinstance(payload, dict) and None in payload.values():
        return {k: v for k, v in payload.items() if v is not None}
    return payload


def _decision_headers(
    tier: str, complexity: str, reasons: list[str] | str | None
) -> dict[str, str]:
    h = {"x-terrace-tier": tier, "x-terrace-complexity": complexity}
    if reasons:
        h["x-terrace-escalated"] = reasons if isinstance(reasons, str) else ",".join(reasons)
    return h


def _loads_or_none(content: bytes) -> Any:
    try:
        value = json.loads(content)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _shed(message: str, param: str | None, complexity: str) -> RouterError:
    """The 429 for work that yields to interactive requests (flex, batch
    lines): retry in a second; the decision headers say nothing was tried."""
    err = RouterError(
        429,
        message,
        type="rate_limit_error",
        param=param,
        code="resource_unavailable",
        retry_after=1,
    )
    err.extra_headers = _decision_headers("none", complexity, [])
    return err


# terrace-batch marks a line that may wait (its deadline not near): shed
# first, never wakes a tier (docs/batch.md).
DEFERRABLE_HEADER = "x-terrace-deferrable"


class OpenAIExchange(Exchange):
    """An OpenAI request: the same JSON to every tier, with the model name
    each tier expects and, when the answer is judged, logprobs."""

    def __init__(
        self,
        state: RouterState,
        decision: policy.Decision,
        *,
        kind: str,
        payload: dict[str, Any],
        auto: bool,
        t0: float,
    ) -> None:
        super().__init__(
            state, state.openai_tiers, decision, stream=payload.get("stream") is True, t0=t0
        )
        self.kind = kind
        self.payload = payload
        self.model: str = payload["model"]
        self.auto = auto
        self.path = _PATHS[kind]

    def outgoing(self, tier: Tier, check: bool) -> Outgoing:
        body = {**self.payload, "model": tier.model_for(self.model, self.auto)}
        asked = policy.with_logprobs(body, self.kind) if check else None
        if asked is not None:
            body = asked
        return Outgoing(
            "POST", self.path, json.dumps(body).encode(), _JSON_HEADERS, asked is not None
        )

    def judge(
        self, tier: Tier, head: Head, body: bytes, out: Outgoing, check: bool
    ) -> tuple[str, bytes]:
        parsed = _loads_or_none(body)
        if parsed is None:
            return MALFORMED, body
        if not check:
            return SOUND, body
        esc = self.state.escalation
        low = policy.is_low_confidence(parsed, self.kind, esc.min_mean_logprob)
        if out.added_logprobs:
            policy.strip_logprobs(parsed)
            body = json.dumps(parsed, separators=(",", ":")).encode()  # compact
        return (UNSURE if low else SOUND), body


class Proxy:
    def __init__(self, current: Callable[[], RouterState], metrics: RouterMetrics) -> None:
        self.current = current
        self.metrics = metrics
        self.client: upstream.Session | None = None  # set by the app's lifespan
        self._scoring = anyio.CapacityLimiter(1)

    async def openai(self, request: Request, kind: str) -> Response | SseRelay:
        state = self.current()
        t0 = perf_counter()
        try:
            await authorize(state, request)
            payload = without_nulls(parse_json(await read_body(request, state.max_body_bytes)))
            validate(kind, payload)
            deferrable = request.headers.get(DEFERRABLE_HEADER, "").strip().lower() == "true"
            route = self._route(state, kind, payload, t0, deferrable)
            return await unless_gone(request.receive, route)
        except RouterError as err:
            self.metrics.observe_request("none", err.status, None)
            return err.openai_response()
        except ClientGone:
            self.metrics.observe_request("none", CLIENT_CLOSED, None)
            return Response(status_code=CLIENT_CLOSED)  # nobody reads it

    async def _route(
        self,
        state: RouterState,
        kind: str,
        payload: dict[str, Any],
        t0: float,
        deferrable: bool = False,
    ) -> Response | SseRelay:
        model = payload["model"]
        auto = model in state.auto_names
        if not auto and model not in state.by_name:
            if model in state.v2_models:
                raise bad_request(
                    f"The model `{model}` speaks the Open Inference Protocol v2; "
                    f"use /v2/models/{model}/infer.",
                    "model",
                    "model_not_supported",
                )
            raise model_not_found(model)
        stream = payload.get("stream") is True

        key = None
        if state.cache is not None:
            cc = state.config.cache
            if (not stream or cc.include_streaming) and (
                cc.include_non_deterministic or is_deterministic(payload)
            ):
                key = cache_key(kind, payload)
                hit = state.cache.get(key, monotonic())
                if hit is not None:
                    self.metrics.cache_hits.inc()
                    self.metrics.observe_request(hit.tier, 200, perf_counter() - t0)
                    headers = _decision_headers(hit.tier, hit.complexity, hit.escalated)
                    headers["x-terrace-cache"] = "hit"
                    return Response(hit.body, headers=headers, media_type=hit.media_type)

        if payload.get("service_tier") == "flex":
            decision, complexity = self._flex(state, model, auto), "flex"
        else:
            # A deferrable request may yet be shed: it enters the calibration
            # window only once its tier takes it.
            decision, score = await self._decide(state, kind, payload, model, auto, deferrable)
            complexity = f"{score:.4f}"
            if deferrable:
                decision = self._deferrable(state, decision, complexity)
                if auto:
                    state.record(score, decision.order[0])
        if not deferrable:
            # Demand wakes tiers and sizes the operator's budget cut-off: batch
            # work, which yields to it, is not counted (docs/batch.md).
            self.metrics.chose(state.openai_tiers[decision.order[0]].name)
        x = OpenAIExchange(state, decision, kind=kind, payload=payload, auto=auto, t0=t0)
        x.wake = not deferrable
        client = self.client
        assert client is not None
        try:
            answer = await attempt(x, client, self.metrics)
        except RouterError as err:
            # The decision headers travel with the error too: what was scored, what was tried.
            err.extra_headers = _decision_headers("none", complexity, x.reasons)
            raise
        if answer.held is not None:
            return self._relay(x, answer, complexity, key)
        return self._answer(x, answer, complexity, key)

    async def _decide(
        self,
        state: RouterState,
        kind: str,
        payload: dict[str, Any],
        model: str,
        auto: bool,
        tentative: bool = False,
    ) -> tuple[policy.Decision, float]:
        """The tier order for an ordinary request, and its score: by
        complexity for `auto`, the named tier otherwise. `tentative`: leave
        the calibration window alone (the caller records it if taken)."""
        score = await self._score(state, prompt_text(kind, payload))
        if auto:
            self.metrics.complexity.observe(score)
            start = state.route(score, record=not tentative)
            decision = policy.decide_auto(score, start, len(state.openai_tiers), state.escalation)
        else:
            decision = policy.decide_pinned(state.by_name[model].index, f"pinned to {model}")
        return decision, score

    def _flex(self, state: RouterState, model: str, auto: bool) -> policy.Decision:
        loads = [t.pool.load() for t in state.openai_tiers]
        pinned = None if auto else state.by_name[model].index
        limit = state.config.flex_max_load
        decision = policy.decide_flex(loads, limit, state.escalation, pinned)
        if decision is None:
            raise _shed(
                f"service_tier flex: every tier that could serve it is above {limit:.0%} of its "
                "in-flight capacity; flex requests are shed first. Retry later, or send it "
                "without service_tier flex.",
                "service_tier",
                "flex",
            )
        return decision

    def _deferrable(
        self, state: RouterState, decision: policy.Decision, complexity: str
    ) -> policy.Decision:
        """Batch work (`x-terrace-deferrable: true`, sent by terrace-batch
        while its deadline is not near): the tier the decision chose, only
        while it is under `flex_max_load` of its in-flight capacity, and only
        tiers already awake (the exchange does not wake a tier at zero). So
        batch lines bound for idle CPU go while a sleeping GPU tier stays
        asleep, and lines bound for it wait; a 429 or 503 sends the line
        back to the batch's queue."""
        limit = state.config.flex_max_load
        first = decision.order[0]
        tier = state.openai_tiers[first]
        if tier.pool.load() < limit:
            # Never down to a smaller tier than the score chose: a line for a
            # sleeping GPU tier waits (503, back to its queue), it is not
            # answered by a tier the classifier judged too small.
            return replace(decision, order=tuple(i for i in decision.order if i >= first))
        raise _shed(
            f"deferrable request: tier {tier.name} is above {limit:.0%} of its in-flight "
            "capacity; batch work yields to interactive requests. Retry later.",
            None,
            complexity,
        )

    async def _score(self, state: RouterState, text: str) -> float:
        """The classifier's score. Shape features run inline (tens of
        microseconds); the sentence encoder (milliseconds) runs on one worker
        thread, so the event loop keeps serving and scoring takes one core."""
        clf = state.classifier
        features = clf.features(text)
        if not clf.needs_encoder(features):
            return clf.score_features(text, features)
        try:
            return await anyio.to_thread.run_sync(
                clf.score_features, text, features, limiter=self._scoring
            )
        except Exception:  # a request is never lost to its score: the prior still routes it
            log.exception("classifier encoder failed; routing this request by the prior")
            return float(clf.model.prior(features)[0])

    def _answer(
        self, x: OpenAIExchange, answer: Answer, complexity: str, key: str | None
    ) -> Response:
        """A unary answer: the tier's 2xx (counted in the realized share, and
        cached when it is a complete success) or its 4xx, passed through."""
        tier = answer.tier
        status = answer.status
        self.metrics.observe_request(tier.name, status, perf_counter() - x.t0)
        escalated = ",".join(x.reasons) or None
        headers = _decision_headers(tier.name, complexity, escalated)
        media_type = answer.headers.get("content-type", _JSON)
        if status < 300:
            x.state.share.record(tier.index)
            cache = x.state.cache
            if key is not None and cache is not None and not answer.fallback:
                headers["x-terrace-cache"] = "miss"
                if _complete_success(answer.body):
                    cache.put(
                        key,
                        CachedAnswer(answer.body, media_type, tier.name, complexity, escalated),
                        monotonic(),
                    )
        return Response(answer.body, status_code=status, headers=headers, media_type=media_type)

    def _relay(
        self, x: OpenAIExchange, answer: Answer, complexity: str, key: str | None
    ) -> SseRelay:
        tier = answer.tier
        x.state.share.record(tier.index)
        escalated = ",".join(x.reasons) or None
        media_type = answer.headers.get("content-type", _SSE)
        raw = [
            (k.encode(), v.encode())
            for k, v in _decision_headers(tier.name, complexity, escalated).items()
        ]
        raw.append((b"content-type", media_type.encode()))
        raw.append((b"cache-control", b"no-cache"))
        cache = x.state.cache
        if key is not None:
            raw.append((b"x-terrace-cache", b"miss"))

        def on_end(body: bytes | None) -> None:
            self.metrics.observe_request(tier.name, 200, perf_counter() - x.t0)
            if body is not None and key is not None and cache is not None:
                cache.put(
                    key,
                    CachedAnswer(body, media_type, tier.name, complexity, escalated),
                    monotonic(),
                )

        assert answer.held is not None
        return SseRelay(answer.held, tier.name, raw, on_end, collect=key is not None)


def _complete_success(body: bytes) -> bool:
    """Worth caching: a JSON object that is not an error."""
    parsed = _loads_or_none(body)
    return parsed is not None and "error" not in parsed and bool(parsed.get("choices"))
