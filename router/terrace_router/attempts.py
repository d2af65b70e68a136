"""The one attempt path: a request tries the tiers of its routing decision in
order, each on that tier's least busy healthy endpoint, until one answers.

OpenAI unary, OpenAI streaming and OIP v2 requests all go through `attempt`.
What differs per protocol (the body sent to a tier, how a cheap answer is
judged) is the `Exchange` subclass's; the rules are here, once:

- Another endpoint of the same tier is tried only when the request provably
  never reached the first one (`upstream.CONNECT`). Anything that may have
  reached an upstream is never sent to it again: inference is not
  idempotent.
- An answer in 4xx (not 429) is the client's fault: passed through as it
  came, never escalated, and it counts as a success for the endpoint.
- A 429, a 5xx, a timeout, a reset or a malformed answer moves on to the
  next tier when the decision and the escalation config allow it; otherwise
  the client gets `errors.no_answer`, which names every tier's cause and
  keeps an upstream's own status and `Retry-After`.
- A tier that can sleep (`activation_timeout_seconds` > 0: the operator
  sets it for tiers that scale to zero) and has no endpoint that answers at
  all holds the request, trying every endpoint again each 0.25 s, until one
  answers or the timeout passes; then the request moves on like any other
  on an unavailable tier.
- A stream is settled on a tier once its 2xx head is in; later failures end
  the stream in band (`relay.py`).
- A unary 2xx answer is judged (`Exchange.judge`): a malformed one is an
  upstream failure like a reset; an unsure one (when a larger tier is left
  to ask) sends the request on, and is kept as the fallback should the
  rest fail.

The client's payload is never changed: each attempt builds its own body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from time import monotonic
from typing import Any

from . import upstream
from .errors import Failure, no_answer
from .metrics import RouterMetrics
from .policy import ERROR, LOW_CONFIDENCE, OVERLOAD, TIMEOUT, UNAVAILABLE, Decision
from .pool import Endpoint, Pick
from .state import RouterState, Tier
from .upstream import CONNECT, Head, UpstreamFailure

log = logging.getLogger(__name__)

# An upstream's error message is quoted to the client up to this length.
_DETAIL_CHARS = 300

# How often a request held for a sleeping tier tries its endpoints again,
# and how often a tier is asked to wake (whatever the number of requests).
WAKE_POLL_SECONDS = 0.25
WAKE_EVERY_SECONDS = 1.0

# Verdicts on a 2xx answer (`Exchange.judge`).
SOUND = "sound"
UNSURE = "unsure"
MALFORMED = "malformed"


@dataclass(slots=True)
class Outgoing:
    """What one attempt sends to a tier's endpoint."""

    method: str
    path: str
    body: bytes | None
    headers: dict[str, str]
    added_logprobs: bool = False


class Exchange:
    """One client request on its way through the tiers: the per-request
    context every step reads, and where what happened is recorded."""

    def __init__(
        self,
        state: RouterState,
        tiers: Sequence[Tier],
        decision: Decision,
        *,
        stream: bool,
        t0: float,
    ) -> None:
        self.state = state
        self.tiers = tiers  # what decision.order indexes
        self.decision = decision
        self.stream = stream
        self.t0 = t0  # perf_counter() at arrival
        self.reasons: list[str] = []  # why each tier was left, in order
        self.failures: list[Failure] = []
        self.wake = True  # False: a tier at zero is not woken nor waited for (batch work)

    def outgoing(self, tier: Tier, check: bool) -> Outgoing:
        """The request for `tier`; `check`: the answer will be judged."""
        raise NotImplementedError

    def judge(
        self, tier: Tier, head: Head, body: bytes, out: Outgoing, check: bool
    ) -> tuple[str, bytes]:
        """The verdict on a 2xx body (`SOUND`, `UNSURE`: ask the next tier,
        `MALFORMED`: the upstream is broken) and the body the client gets."""
        return SOUND, body


class Held:
    """An endpoint's in-flight slot and an upstream response, until `finish`."""

    __slots__ = ("session", "tier", "ep", "head", "_open")

    def __init__(self, session: upstream.Session, tier: Tier, ep: Endpoint, head: Head) -> None:
        self.session = session
        self.tier = tier
        self.ep = ep
        self.head = head
        self._open = True

    def finish(self, complete: bool) -> None:
        """Free the slot. A body read to its end hands the connection back to
        the pool; anything else closes it, so the upstream stops working for
        nobody. Idempotent."""
        if self._open:
            self._open = False
            self.ep.inflight -= 1
            if complete:
                self.head.release()
            else:
                self.head.close()

    def blame(self, endpoint_fault: bool) -> None:
        """The answer failed after its head: see `blame`."""
        blame(self.session, self.tier, self.ep, endpoint_fault=endpoint_fault)


# Health checks and wake-up calls in flight (a reference keeps each task
# alive until it ends).
_TASKS: set[asyncio.Task[None]] = set()


def _background(work: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(work)
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


async def _wake(session: upstream.Session, tier: Tier) -> None:
    """Ask the operator to wake a sleeping tier (`TierConfig.wake_url`)."""
    assert tier.config.wake_url is not None
    status = await upstream.notify(session, upstream.url(tier.config.wake_url, ""), tier.timeout)
    if not 200 <= status < 300:
        log.warning("asking to wake tier %s: %s", tier.name, status or "no answer")


def blame(session: upstream.Session, tier: Tier, ep: Endpoint, *, endpoint_fault: bool) -> None:
    """Count a failure against an endpoint. One the request may have caused
    (`endpoint_fault=False`: a 500, a read timeout) only makes it a suspect;
    enough in a row and the endpoint is asked itself (`_check`)."""
    pool = tier.pool
    if endpoint_fault:
        pool.failed(ep, monotonic())
    elif pool.suspect(ep):
        _background(_check(session, tier, ep))


async def _check(session: upstream.Session, tier: Tier, ep: Endpoint) -> None:
    """Ask a suspect endpoint for its health (GET /v1/models, or OIP v2's
    /v2/health/ready): a 200 clears it, anything else ejects it."""
    path = "/v2/health/ready" if tier.config.protocol == "v2" else "/v1/models"
    try:
        healthy = await upstream.healthy(session, upstream.url(ep.base, path), tier.timeout)
    finally:
        ep.checking = False
    if healthy:
        tier.pool.succeeded(ep)
    else:
        log.warning("tier %s endpoint %s failed its health check: ejected", tier.name, ep.base)
        tier.pool.check_failed(ep, monotonic())


@dataclass(slots=True)
class Answer:
    """A tier's answer: `body` read whole, or `held` open for relaying."""

    tier: Tier
    status: int
    headers: Mapping[str, str]
    body: bytes
    held: Held | None = None
    fallback: bool = False  # an unsure answer kept because the escalation failed


async def attempt(x: Exchange, session: upstream.Session, metrics: RouterMetrics) -> Answer:
    """Try `x.decision`'s tiers in order. Raises RouterError (errors.no_answer)."""
    order = x.decision.order
    fallback: Answer | None = None
    for pos, idx in enumerate(order):
        tier = x.tiers[idx]
        nxt = order[pos + 1] if pos + 1 < len(order) else None
        # A stream is settled on its tier once the head is in, so it is never
        # judged, and never asked for logprobs the client did not ask for.
        check = x.decision.check_confidence and not x.stream and nxt is not None and nxt > idx
        out = x.outgoing(tier, check)
        result = await _try_tier(session, tier, out, x.wake)
        if isinstance(result, Held):
            result = await _settle(x, tier, result, out, check)
        if isinstance(result, Answer):
            if not result.fallback:
                return result
            fallback = result  # unsure: ask the next tier, keep this one in hand
            x.reasons.append(LOW_CONFIDENCE)
            metrics.escalated(LOW_CONFIDENCE)
            continue
        x.failures.append(result)
        reason = _reason(result.kind)
        if nxt is None or not x.decision.escalates(reason, x.state.escalation):
            break
        x.reasons.append(reason)
        metrics.escalated(reason)
    if fallback is not None:
        return fallback  # the escalation failed: an unsure answer beats none
    now = monotonic()
    wait = min(x.tiers[i].pool.seconds_until_available(now) for i in order)
    raise no_answer(x.failures, wait)


async def _settle(
    x: Exchange, tier: Tier, held: Held, out: Outgoing, check: bool
) -> Answer | Failure:
    """What a held 2xx/4xx head comes to: a stream to relay, a body (judged
    when 2xx; `fallback` set when unsure), or a failure of the upstream."""
    head = held.head
    if x.stream and head.status < 300:
        if head.headers.get("content-type", "").startswith("text/event-stream"):
            return Answer(tier, head.status, head.headers, b"", held)
        # Not a stream: the upstream is broken (or ignored `stream`).
        held.blame(endpoint_fault=True)
        held.finish(False)
        log.warning("tier %s answered a stream request without a stream", tier.name)
        return Failure(tier.name, ERROR, detail="answered a stream request without a stream")
    try:
        body = await head.read()
    except UpstreamFailure as failure:
        held.blame(endpoint_fault=failure.kind != TIMEOUT)
        held.finish(False)
        return Failure(tier.name, failure.kind, detail=str(failure))
    except BaseException:  # cancelled: the client left while the body came
        held.finish(False)
        raise
    held.finish(True)
    if head.status >= 300:
        return Answer(tier, head.status, head.headers, body)
    verdict, body = x.judge(tier, head, body, out, check)
    if verdict == MALFORMED:
        held.blame(endpoint_fault=True)
        log.warning("tier %s answered a malformed body", tier.name)
        return Failure(tier.name, ERROR, detail="answered a malformed body")
    return Answer(tier, head.status, head.headers, body, fallback=verdict == UNSURE)


def _reason(kind: str) -> str:
    """The escalation reason (header value, metric label) for a failure kind."""
    return kind if kind in (OVERLOAD, TIMEOUT) else ERROR


async def _try_tier(
    session: upstream.Session, tier: Tier, out: Outgoing, wake: bool = True
) -> Held | Failure:
    """One attempt on a tier: its best endpoint, and the next one only when
    the request never went out; for a tier that can sleep
    (`activation_timeout_seconds`), up to that long waiting for one of its
    endpoints to answer at all (not with `wake` False). A held 2xx/4xx
    answer, or why not."""
    pool = tier.pool
    tried: list[Endpoint] = []
    hold = tier.config.activation_timeout_seconds if wake else 0.0
    wake_by = monotonic() + hold if hold > 0 else 0.0
    waiting = False
    while True:
        now = monotonic()
        ep = pool.pick(now, tried, include_ejected=waiting)
        if ep is Pick.UNAVAILABLE and now < wake_by:
            # Nothing of a tier that can sleep answers: it is at zero replicas
            # (or waking). Ask for it to wake, hold the request and try every
            # endpoint again.
            if tier.config.wake_url and now - tier.woken_at >= WAKE_EVERY_SECONDS:
                tier.woken_at = now
                _background(_wake(session, tier))
            waiting = True
            tried.clear()
            await asyncio.sleep(min(WAKE_POLL_SECONDS, wake_by - now))
            continue
        if isinstance(ep, str):
            if ep is Pick.OVERLOADED:
                return Failure(tier.name, OVERLOAD)
            detail = f"did not wake within {hold:g} s" if waiting else ""
            return Failure(tier.name, UNAVAILABLE, detail=detail)
        ep.inflight += 1
        try:
            head = await upstream.send(
                session,
                out.method,
                upstream.url(ep.base, out.path),
                out.body,
                out.headers,
                tier.timeout,
            )
        except UpstreamFailure as failure:
            ep.inflight -= 1
            blame(session, tier, ep, endpoint_fault=failure.kind != TIMEOUT)
            if failure.kind == CONNECT:
                tried.append(ep)
                continue
            log.warning(
                "tier %s endpoint %s: %s: %s", tier.name, ep.base, failure.kind, failure.cause
            )
            return Failure(tier.name, failure.kind, detail=str(failure))
        except BaseException:  # cancelled: the client left before the head came
            ep.inflight -= 1
            raise
        held = Held(session, tier, ep, head)
        status = head.status
        if status < 500 and status != 429:
            pool.succeeded(ep)
            return held
        # An answer that is a failure: its status, Retry-After and message travel on.
        try:
            body = await head.read()
        except UpstreamFailure:
            body = b""
        finally:
            held.finish(True)
        if status == 429:
            kind = OVERLOAD  # the upstream's own admission control, not a fault
        else:
            kind = ERROR
            blame(session, tier, ep, endpoint_fault=status in (502, 503, 504))
        return Failure(tier.name, kind, status, _retry_after(head.headers), _detail(body))


def _retry_after(headers: Mapping[str, str]) -> int | None:
    """Retry-After in whole seconds, if given (RFC 9110: delta-seconds or an
    HTTP-date, which is turned into the seconds until it)."""
    value = headers.get("retry-after", "").strip()
    if value.isdigit():
        return int(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0, math.ceil((when - datetime.now(UTC)).total_seconds()))


def _detail(body: bytes) -> str:
    """The message of an upstream's error body (OpenAI's envelope, OIP v2's
    string, FastAPI's `detail`), or "" when it has none worth quoting."""
    try:
        parsed: Any = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    if not isinstance(parsed, dict):
        return ""
    err = parsed.get("error", parsed.get("detail", parsed.get("message")))
    if isinstance(err, dict):
        err = err.get("message")
    return err[:_DETAIL_CHARS] if isinstance(err, str) else ""
