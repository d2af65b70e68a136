"""A small async client of Prometheus's HTTP API, and the built-in queries.

Only `/api/v1/query` (instant queries) is needed: every tick the control loop
asks "what is the value now". Each way an answer can be unusable has its own
exception, so the loop can say exactly why it held a tier (and so that no
bad answer is ever mistaken for "zero load"):

* `PrometheusUnavailable`: connection refused, timeout, HTTP 5xx, a body
  that is not Prometheus's JSON envelope;
* `QueryError`: HTTP 4xx or ``status: error`` (a bad PromQL in `custom`);
* `NoData`: the query matched no series;
* `BadValue`: NaN or +/-Inf (e.g. a p95 over zero requests is NaN);
* `AmbiguousResult`: several series where one value was expected.

All of them derive from `MetricsError`.

The queries the control loop sends, one per metric kind for every tier at
once, live in signals.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import httpx


class MetricsError(Exception):
    """The metric has no usable value right now."""


class PrometheusUnavailable(MetricsError):
    pass


class QueryError(MetricsError):
    pass


class NoData(MetricsError):
    pass


class BadValue(MetricsError):
    pass


class AmbiguousResult(MetricsError):
    pass


@dataclass(frozen=True)
class Sample:
    labels: Mapping[str, str]
    value: float


def _parse_value(raw: object) -> float:
    # Prometheus encodes sample values as strings: "1.5", "NaN", "+Inf".
    if not (isinstance(raw, list | tuple) and len(raw) == 2):
        raise PrometheusUnavailable(f"malformed sample {raw!r}")
    try:
        return float(raw[1])
    except (TypeError, ValueError) as exc:
        raise PrometheusUnavailable(f"malformed sample value {raw[1]!r}") from exc


def parse_response(status_code: int, body: object, query: str) -> list[Sample]:
    """Turn one HTTP answer into samples, or the right MetricsError."""
    if not isinstance(body, dict) or "status" not in body:
        if status_code >= 500:
            raise PrometheusUnavailable(f"HTTP {status_code} from Prometheus")
        raise PrometheusUnavailable(f"HTTP {status_code}: not a Prometheus API response")
    if body.get("status") != "success":
        kind = body.get("errorType", "error")
        msg = body.get("error", "")
        if status_code >= 500 or kind in ("timeout", "canceled", "internal", "unavailable"):
            raise PrometheusUnavailable(f"{kind}: {msg}")
        raise QueryError(f"{kind}: {msg} (query {query!r})")
    if status_code >= 400:
        raise PrometheusUnavailable(f"HTTP {status_code} with a success body")
    data = body.get("data")
    if not isinstance(data, dict):
        raise PrometheusUnavailable("response without data")
    rtype, result = data.get("resultType"), data.get("result")
    if rtype in ("scalar", "string"):
        return [Sample({}, _parse_value(result))]
    if rtype == "vector" and isinstance(result, list):
        samples = []
        for item in result:
            if not isinstance(item, dict):
                raise PrometheusUnavailable(f"malformed vector item {item!r}")
            samples.append(Sample(dict(item.get("metric") or {}), _parse_value(item.get("value"))))
        return samples
    if rtype == "matrix":
        raise QueryError(f"range vector where an instant value was expected (query {query!r})")
    raise PrometheusUnavailable(f"unknown resultType {rtype!r}")


def single_value(samples: list[Sample], query: str) -> float:
    """Exactly one finite value, or the MetricsError saying why not."""
    if not samples:
        raise NoData(f"no series for {query!r}")
    if len(samples) > 1:
        shown = ", ".join(str(dict(s.labels)) for s in samples[:3])
        raise AmbiguousResult(
            f"{len(samples)} series where one was expected for {query!r}: {shown}; "
            "aggregate it (sum/avg/max)"
        )
    value = samples[0].value
    if not math.isfinite(value):
        raise BadValue(f"{value} from {query!r}")
    return value


class PrometheusClient:
    """One per process; create it in a startup hook and close it on cleanup."""

    def __init__(
        self,
        base_url: str,
        timeout_seconds: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout_seconds
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_seconds),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> PrometheusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def query(self, promql: str) -> list[Sample]:
        try:
            # Prometheus also bounds evaluation itself; ask for our timeout.
            timeout_ms = max(1, int(self._timeout * 1000))
            resp = await self._client.post(
                "/api/v1/query", data={"query": promql, "timeout": f"{timeout_ms}ms"}
            )
        except httpx.TimeoutException as exc:
            raise PrometheusUnavailable(f"timed out after {self._timeout}s") from exc
        except httpx.HTTPError as exc:
            raise PrometheusUnavailable(f"cannot reach Prometheus: {exc}") from exc
        try:
            body = resp.json()
        except ValueError:
            body = None
        return parse_response(resp.status_code, body, promql)

    async def value(self, promql: str) -> float:
        return single_value(await self.query(promql), promql)
