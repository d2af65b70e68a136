"""Upstream endpoints of one tier: least-in-flight balancing, an in-flight
limit per endpoint, and passive health (eject after repeated failures, try
again after a cooldown).

Who is at fault decides what counts. An endpoint that cannot be reached,
resets, answers garbage or answers 502/503/504 is at fault: `failed`. A
failure a request can cause by itself (a 500 answer, a read timeout on a
long generation) only makes the endpoint a suspect: `suspect` says when
enough have piled up to ask the endpoint itself (a health check, done by
the caller), and only a failed check ejects it (`check_failed`). So bad
requests never take a tier out of service, however quiet its traffic,
while a hung or dead endpoint still goes. Answers in 4xx are the client's
and count as successes.

Pure bookkeeping over plain counters; the caller passes the clock and does
the HTTP. Everything runs on the event loop thread, so no locks.
"""

from __future__ import annotations

from collections.abc import Iterable


def normalize_base_url(url: str) -> str:
    """`http://h:8080/`, `http://h:8080/v1` -> `http://h:8080` (paths are added per API)."""
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    return url


class Endpoint:
    __slots__ = (
        "base",
        "inflight",
        "failures",
        "ejected_until",
        "suspicions",
        "checking",
    )

    def __init__(self, base: str) -> None:
        self.base = normalize_base_url(base)
        self.inflight = 0
        self.failures = 0  # consecutive
        self.ejected_until = 0.0
        self.suspicions = 0  # consecutive failures a request may have caused
        self.checking = False  # a health check is in flight

    def __repr__(self) -> str:
        return f"Endpoint({self.base!r}, inflight={self.inflight}, failures={self.failures})"


class Pick:
    """Why no endpoint was picked, when none was."""

    OVERLOADED = "overloaded"  # every healthy endpoint is at its in-flight limit
    UNAVAILABLE = "unavailable"  # every endpoint is ejected (or already tried)


class TierPool:
    __slots__ = ("endpoints", "max_inflight", "eject_after", "eject_seconds", "_next")

    def __init__(
        self,
        endpoints: list[Endpoint],
        *,
        max_inflight: int,
        eject_after: int,
        eject_seconds: float,
    ) -> None:
        self.endpoints = endpoints
        self.max_inflight = max_inflight
        self.eject_after = eject_after
        self.eject_seconds = eject_seconds
        self._next = 0  # rotates the tie-break so equal endpoints share load

    def load(self) -> float:
        """Requests in flight over the tier's capacity (endpoints x max_inflight), 0..1."""
        capacity = len(self.endpoints) * self.max_inflight
        return sum(ep.inflight for ep in self.endpoints) / capacity if capacity else 1.0

    def pick(
        self, now: float, exclude: Iterable[Endpoint] = (), *, include_ejected: bool = False
    ) -> Endpoint | str:
        """The healthy endpoint with the fewest requests in flight, or a Pick
        reason. `include_ejected`: ejected endpoints count as healthy (a
        request waiting for a sleeping tier to wake tries them all)."""
        best: Endpoint | None = None
        saw_healthy = False
        eps = self.endpoints
        n = len(eps)
        start = self._next
        self._next = (start + 1) % n
        for i in range(n):
            ep = eps[(start + i) % n]
            if (ep.ejected_until > now and not include_ejected) or ep in exclude:
                continue
            saw_healthy = True
            if ep.inflight >= self.max_inflight:
                continue
            if best is None or ep.inflight < best.inflight:
                best = ep
        if best is not None:
            return best
        return Pick.OVERLOADED if saw_healthy else Pick.UNAVAILABLE

    def succeeded(self, ep: Endpoint) -> None:
        ep.failures = 0
        ep.suspicions = 0
        ep.ejected_until = 0.0

    def suspect(self, ep: Endpoint) -> bool:
        """A failure the request may have caused. True when the endpoint
        should now be health-checked (enough in a row, none in flight); the
        caller reports the check with `succeeded` or `check_failed`."""
        ep.suspicions += 1
        if ep.suspicions < self.eject_after or ep.checking:
            return False
        ep.checking = True
        return True

    def check_failed(self, ep: Endpoint, now: float) -> None:
        """The endpoint failed its health check too: it is at fault."""
        ep.failures = max(ep.failures, self.eject_after - 1)
        self.failed(ep, now)

    def failed(self, ep: Endpoint, now: float) -> None:
        """A failure the endpoint is at fault for."""
        ep.failures += 1
        if ep.failures >= self.eject_after:
            # After the cooldown one request probes it; another failure
            # ejects it again at once because the count stays high.
            ep.ejected_until = now + self.eject_seconds

    def seconds_until_available(self, now: float) -> float:
        """How long until some endpoint leaves ejection (0 if one is healthy)."""
        waits = [ep.ejected_until - now for ep in self.endpoints]
        return max(0.0, min(waits)) if waits else 0.0
