"""The OpenAI request path: classify, pick a tier, forward, escalate, answer.

One `Proxy` per app. It reads the current `RouterState` once per request
(so a reload never changes the rules under a request in flight) and uses the
app's one shared upstream session (`upstream.py`). Decisions (tier order, confidence) come
from `policy.py`; this module only does the I/O around them.

A request is never dropped: it gets an upstream's answer, the best answer
seen so far (a low-confidence cheap answer whose escalation failed), or a
clean OpenAI-shaped error (429 when every candidate tier was at its
in-flight limit, 503 otherwise), both with `Retry-After`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from time import monotonic, perf_counter
from typing import Any

import aiohttp
import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from yarl import URL

from . import policy
from .cache import CachedAnswer, cache_key
from .errors import RouterError, bad_request, model_not_found, overloaded, too_large, unavailable
from .metrics import RouterMetrics
from .pool import Endpoint, Pick, TierPool
from .schemas import is_deterministic, prompt_text, validate
from .state import RouterState, Tier
from .upstream import CONNECT, STREAM_ERRORS, Reply, UpstreamFailure, fetch, send

log = logging.getLogger(__name__)

_JSON_HEADERS = {"content-type": "application/json"}
_JSON = "application/json"
_SSE = "text/event-stream"

# Outcomes of one attempt on one tier.
OK = "ok"
CLIENT_ERROR = "client_error"  # upstream 4xx (not 429): the request's fault, passed through
ERROR = policy.ERROR
TIMEOUT = policy.TIMEOUT
OVERLOAD = policy.OVERLOAD

# A body larger than the limit is still read (and dropped) up to this size so
# that the client, still sending, gets the 413 instead of a reset connection.
_DRAIN_LIMIT = 64 * 1024 * 1024


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
                async for _ in request.stream():
                    pass
            raise too_large(limit)
    chunks = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            if total <= _DRAIN_LIMIT:
                async for more in request.stream():
                    total += len(more)
                    if total > _DRAIN_LIMIT:
                        break
            raise too_large(limit)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise bad_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly.)"
        ) from None


def _decision_headers(
    tier: str, complexity: str, reasons: list[str] | str | None
) -> dict[str, str]:
    h = {"x-terrace-tier": tier, "x-terrace-complexity": complexity}
    if reasons:
        h["x-terrace-escalated"] = reasons if isinstance(reasons, str) else ",".join(reasons)
    return h


class Proxy:
    def __init__(self, current: Callable[[], RouterState], metrics: RouterMetrics) -> None:
        self.current = current
        self.metrics = metrics
        self.client: aiohttp.ClientSession | None = None  # set by the app's lifespan
        self._scoring = anyio.CapacityLimiter(1)

    # -- entry point -------------------------------------------------------

    async def openai(self, request: Request, kind: str) -> Response | UpstreamStream:
        state = self.current()
        t0 = perf_counter()
        try:
            state.keys.check(request.headers.get("authorization"))
            payload = parse_json(await read_body(request, state.max_body_bytes))
            validate(kind, payload)
            return await self._route(state, kind, payload, t0)
        except RouterError as err:
            self.metrics.observe_request("none", err.status, None)
            return err.openai_response()

    async def _route(
        self, state: RouterState, kind: str, payload: dict[str, Any], t0: float
    ) -> Response | UpstreamStream:
        model = payload["model"]
        auto = model in state.auto_names
        if not auto:
            pinned_tier = state.by_name.get(model)
            if pinned_tier is None:
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
        cache = state.cache
        if cache is not None:
            cc = state.config.cache
            if (not stream or cc.include_streaming) and (
                cc.include_non_deterministic or is_deterministic(payload)
            ):
                key = cache_key(kind, payload)
                hit = cache.get(key, monotonic())
                if hit is not None:
                    self.metrics.cache_hits.inc()
                    self.metrics.observe_request(hit.tier, 200, perf_counter() - t0)
                    headers = _decision_headers(hit.tier, hit.complexity, hit.escalated)
                    headers["x-terrace-cache"] = "hit"
                    return Response(hit.body, headers=headers, media_type=hit.media_type)

        score = await self._score(state, prompt_text(kind, payload))
        complexity = f"{score:.4f}"
        if auto:
            start = state.route(score)
            self.metrics.complexity.observe(score)
        else:
            start = state.by_name[model].index
        esc = state.escalation
        order = policy.attempt_order(
            start,
            len(state.openai_tiers),
            pinned=not auto,
            fallback_to_smaller=esc.fallback_to_smaller,
            max_attempts=esc.max_attempts,
        )
        if stream:
            return await self._stream(state, kind, payload, model, auto, order, complexity, key, t0)
        return await self._unary(state, kind, payload, model, auto, order, complexity, key, t0)

    async def _score(self, state: RouterState, text: str) -> float:
        """The classifier's score. Shape features run inline (tens of
        microseconds); the sentence encoder (milliseconds) runs on one worker
        thread, so the event loop keeps serving and scoring takes one core."""
        clf = state.classifier
        features = clf.features(text)
        if not clf.needs_encoder(features):
            return clf.score_features(text, features)
        try:
            return await anyio.to_thread.run_sync(clf.score_features, text, features,
                                                  limiter=self._scoring)
        except Exception:  # a request is never lost to its score: the prior still routes it
            log.exception("classifier encoder failed; routing this request by the prior")
            return float(clf.model.prior(features)[0])

    # -- non-streaming -----------------------------------------------------

    async def _unary(
        self,
        state: RouterState,
        kind: str,
        payload: dict[str, Any],
        model: str,
        auto: bool,
        order: list[int],
        complexity: str,
        key: str | None,
        t0: float,
    ) -> Response:
        esc = state.escalation
        tiers = state.openai_tiers
        reasons: list[str] = []
        failures: set[str] = set()
        fallback: tuple[Tier, bytes] | None = None
        for pos, idx in enumerate(order):
            tier = tiers[idx]
            nxt = order[pos + 1] if pos + 1 < len(order) else None
            # Only a cheap answer with a larger tier left to ask is worth checking.
            check = auto and esc.on_low_confidence and nxt is not None and nxt > idx
            payload["model"] = tier.model_for(model, auto)
            added = policy.request_logprobs(payload, kind) if check else False
            data = json.dumps(payload).encode()
            if added:
                del payload["logprobs"]

            outcome, resp = await self._send(tier, kind, data)
            if resp is not None and outcome is OK:
                content = resp.body
                if check:
                    parsed = _loads_or_none(content)
                    if parsed is not None:
                        low = policy.is_low_confidence(parsed, kind, esc.min_mean_logprob)
                        if added:
                            policy.strip_logprobs(parsed)
                            content = json.dumps(parsed).encode()
                        if low:
                            fallback = (tier, content)
                            reasons.append(policy.LOW_CONFIDENCE)
                            self.metrics.escalated(policy.LOW_CONFIDENCE)
                            continue
                return self._answer(
                    state,
                    tier,
                    content,
                    resp.headers.get("content-type", _JSON),
                    complexity,
                    reasons,
                    key,
                    t0,
                )
            if resp is not None and outcome is CLIENT_ERROR:
                return self._passthrough(
                    tier,
                    resp.status,
                    resp.body,
                    resp.headers.get("content-type", _JSON),
                    complexity,
                    reasons,
                    t0,
                )
            failures.add(outcome)
            allowed = esc.on_overload if outcome is OVERLOAD else esc.on_error
            if not allowed or nxt is None:
                break
            reasons.append(outcome)
            self.metrics.escalated(outcome)

        if fallback is not None:
            # The escalation failed; the cheap answer is better than none.
            tier, content = fallback
            return self._answer(state, tier, content, _JSON, complexity, reasons, None, t0)
        raise self._no_answer(state, order, failures, complexity, reasons)

    def _answer(
        self,
        state: RouterState,
        tier: Tier,
        content: bytes,
        media_type: str,
        complexity: str,
        reasons: list[str],
        key: str | None,
        t0: float,
    ) -> Response:
        state.share.record(tier.index)
        self.metrics.observe_request(tier.name, 200, perf_counter() - t0)
        escalated = ",".join(reasons) if reasons else None
        headers = _decision_headers(tier.name, complexity, escalated)
        if key is not None and state.cache is not None:
            state.cache.put(
                key,
                CachedAnswer(content, media_type, tier.name, complexity, escalated),
                monotonic(),
            )
            headers["x-terrace-cache"] = "miss"
        return Response(content, headers=headers, media_type=media_type)

    def _passthrough(
        self,
        tier: Tier,
        status: int,
        content: bytes,
        media_type: str,
        complexity: str,
        reasons: list[str],
        t0: float,
    ) -> Response:
        self.metrics.observe_request(tier.name, status, perf_counter() - t0)
        return Response(
            content,
            status_code=status,
            headers=_decision_headers(tier.name, complexity, reasons),
            media_type=media_type,
        )

    def _no_answer(
        self,
        state: RouterState,
        order: list[int],
        failures: set[str],
        complexity: str,
        reasons: list[str],
    ) -> RouterError:
        if failures == {OVERLOAD}:
            err = overloaded(1)
        else:
            now = monotonic()
            wait = min(state.openai_tiers[i].pool.seconds_until_available(now) for i in order)
            names = {TIMEOUT: "timeout", OVERLOAD: "overload"}
            detail = " and ".join(sorted({names.get(f, "upstream error") for f in failures}))
            err = unavailable(policy.retry_after_seconds(wait), detail or "no attempt allowed")
        # The decision headers travel with the error too: what was scored, what was tried.
        err.extra_headers = _decision_headers("none", complexity, reasons)
        return err

    async def _send(self, tier: Tier, kind: str, data: bytes) -> tuple[str, Reply | None]:
        """One attempt on a tier; another of its endpoints is tried only when
        the connection could not be made (then nothing was sent)."""
        pool = tier.pool
        tried: set[Endpoint] | None = None
        client = self.client
        assert client is not None
        while True:
            ep = pool.pick(monotonic(), tried or ())
            if isinstance(ep, str):
                return (OVERLOAD if ep is Pick.OVERLOADED else ERROR), None
            ep.inflight += 1
            try:
                resp = await fetch(
                    client, "POST", _target(ep, kind), data, _JSON_HEADERS, tier.timeout
                )
            except UpstreamFailure as failure:
                pool.failed(ep, monotonic())
                if failure.kind is CONNECT:
                    tried = tried or set()
                    tried.add(ep)
                    continue
                return failure.kind, None
            finally:
                ep.inflight -= 1
            return self._classify(pool, ep, resp.status), resp

    @staticmethod
    def _classify(pool: TierPool, ep: Endpoint, status: int) -> str:
        if status >= 500:
            pool.failed(ep, monotonic())
            return ERROR
        if status == 429:
            return OVERLOAD  # the upstream's own admission control, not a fault
        pool.succeeded(ep)
        return OK if status < 300 else CLIENT_ERROR

    # -- streaming ---------------------------------------------------------

    async def _stream(
        self,
        state: RouterState,
        kind: str,
        payload: dict[str, Any],
        model: str,
        auto: bool,
        order: list[int],
        complexity: str,
        key: str | None,
        t0: float,
    ) -> Response | UpstreamStream:
        """The tier is settled before the first byte: failures up to the
        upstream's response headers escalate, later ones end the stream."""
        esc = state.escalation
        tiers = state.openai_tiers
        reasons: list[str] = []
        failures: set[str] = set()
        client = self.client
        assert client is not None
        for pos, idx in enumerate(order):
            tier = tiers[idx]
            payload["model"] = tier.model_for(model, auto)
            data = json.dumps(payload).encode()
            pool = tier.pool
            tried: set[Endpoint] = set()
            outcome = ERROR
            while True:
                ep = pool.pick(monotonic(), tried)
                if isinstance(ep, str):
                    outcome = OVERLOAD if ep is Pick.OVERLOADED else ERROR
                    break
                ep.inflight += 1
                try:
                    resp = await send(
                        client, "POST", _target(ep, kind), data, _JSON_HEADERS, tier.timeout
                    )
                except UpstreamFailure as failure:
                    ep.inflight -= 1
                    pool.failed(ep, monotonic())
                    if failure.kind is CONNECT:
                        tried.add(ep)
                        continue
                    outcome = failure.kind
                    break
                except BaseException:  # cancelled: the client left before the head came
                    ep.inflight -= 1
                    raise
                outcome = self._classify(pool, ep, resp.status)
                if outcome is OK:
                    state.share.record(tier.index)
                    headers = _decision_headers(tier.name, complexity, reasons)
                    return UpstreamStream(
                        self.metrics, state, tier, ep, resp, headers, key, complexity, t0
                    )
                try:
                    if outcome is CLIENT_ERROR:
                        try:
                            content = await resp.read()
                        except STREAM_ERRORS:
                            content = b""
                        return self._passthrough(
                            tier,
                            resp.status,
                            content,
                            resp.headers.get("content-type", _JSON),
                            complexity,
                            reasons,
                            t0,
                        )
                finally:
                    ep.inflight -= 1
                    resp.release()
                break
            failures.add(outcome)
            allowed = esc.on_overload if outcome is OVERLOAD else esc.on_error
            if not allowed or pos + 1 >= len(order):
                break
            reasons.append(outcome)
            self.metrics.escalated(outcome)
        raise self._no_answer(state, order, failures, complexity, reasons)


def _target(ep: Endpoint, kind: str) -> URL:
    url = ep.targets.get(kind)
    if url is None:
        url = ep.targets[kind] = URL(ep.url_for(kind))
    return url  # type: ignore[return-value]


def _loads_or_none(content: bytes) -> Any:
    try:
        value = json.loads(content)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class UpstreamStream:
    """ASGI response relaying an upstream SSE stream.

    Holds the endpoint's in-flight slot until the stream ends, however it
    ends: upstream done, upstream broken (an SSE error event and `data:
    [DONE]` close the stream cleanly), or the client gone (noticed by
    watching `receive`, since the server silently drops writes then).
    """

    def __init__(
        self,
        metrics: RouterMetrics,
        state: RouterState,
        tier: Tier,
        ep: Endpoint,
        resp: aiohttp.ClientResponse,
        headers: dict[str, str],
        key: str | None,
        complexity: str,
        t0: float,
    ) -> None:
        self.metrics = metrics
        self.state = state
        self.tier = tier
        self.ep = ep
        self.resp = resp
        self.key = key
        self.complexity = complexity
        self.t0 = t0
        self.escalated = headers.get("x-terrace-escalated")
        self.media_type = resp.headers.get("content-type", _SSE)
        raw = [(k.encode(), v.encode()) for k, v in headers.items()]
        raw.append((b"content-type", self.media_type.encode()))
        raw.append((b"cache-control", b"no-cache"))
        if key is not None:
            raw.append((b"x-terrace-cache", b"miss"))
        self.raw_headers = raw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        collected: list[bytes] | None = [] if self.key is not None else None
        complete = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_disconnect)
                try:
                    async for chunk in self.resp.content.iter_any():
                        if collected is not None:
                            collected.append(chunk)
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    complete = True
                except STREAM_ERRORS as exc:
                    # Too late to escalate: bytes are out. End the stream in
                    # OpenAI's in-band error shape, then [DONE].
                    self.tier.pool.failed(self.ep, monotonic())
                    log.warning("tier %s broke mid-stream: %s", self.tier.name, type(exc).__name__)
                    err = {
                        "error": {
                            "message": "The upstream tier failed mid-stream.",
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    }
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b"data: " + json.dumps(err).encode() + b"\n\ndata: [DONE]\n\n",
                            "more_body": True,
                        }
                    )
                tg.cancel_scope.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.ep.inflight -= 1
            # A body read to its end hands the connection back to the pool;
            # anything else (client gone, upstream broken) closes it, so the
            # upstream stops generating for nobody.
            if complete:
                self.resp.release()
            else:
                self.resp.close()
            self.metrics.observe_request(self.tier.name, 200, perf_counter() - self.t0)
            cache = self.state.cache
            if complete and collected is not None and cache is not None and self.key is not None:
                cache.put(
                    self.key,
                    CachedAnswer(
                        b"".join(collected),
                        self.media_type,
                        self.tier.name,
                        self.complexity,
                        self.escalated,
                    ),
                    monotonic(),
                )
