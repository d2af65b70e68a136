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

Queries for the per-tier signals live in `TierQueries`; the label names used
to select a tier are parameters, because scrape configurations differ.
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


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def selector(labels: Mapping[str, str], regex: Mapping[str, str] | None = None) -> str:
    parts = [f'{k}="{_quote(v)}"' for k, v in labels.items()]
    parts += [f'{k}=~"{_quote(v)}"' for k, v in (regex or {}).items()]
    return "{" + ",".join(parts) + "}"


@dataclass(frozen=True)
class TierQueries:
    """The built-in PromQL for one tier.

    Router series carry ``tier``; runtime series carry ``tier`` and
    ``namespace`` (added by the scrape config); GPU series come from the
    power agent (``node`` label) or from DCGM-exporter (``namespace``/``pod``).
    """

    namespace: str
    tier: str
    window: str = "1m"
    gpu_source: str = "agent"  # agent | dcgm
    nodes: tuple[str, ...] = ()

    @property
    def _router(self) -> str:
        return selector({"tier": self.tier})

    @property
    def _runtime(self) -> str:
        return selector({"namespace": self.namespace, "tier": self.tier})

    def _gpu(self) -> str:
        if self.gpu_source == "dcgm":
            return selector({"namespace": self.namespace}, {"pod": f"{self.tier}-.*"})
        node_re = "|".join(self.nodes) if self.nodes else "^$"
        return selector({}, {"node": node_re})

    def inflight(self) -> str:
        return f"sum(terrace_router_inflight{self._router})"

    def demand(self) -> str:
        """Requests per second whose routing decision chose this tier first,
        whichever tier served them: the demand that wakes a tier at zero."""
        return f"sum(rate(terrace_router_demand_total{self._router}[{self.window}]))"

    def rps(self) -> str:
        return f"sum(rate(terrace_router_requests_total{self._router}[{self.window}]))"

    def latency_p95_ms(self) -> str:
        return (
            "histogram_quantile(0.95, sum by (le) (rate("
            f"terrace_router_request_duration_seconds_bucket{self._router}[{self.window}]))) * 1000"
        )

    def gpu_utilization_percent(self) -> str:
        if self.gpu_source == "dcgm":
            return f"avg(DCGM_FI_DEV_GPU_UTIL{self._gpu()})"
        return f"avg(terrace_gpu_utilization_ratio{self._gpu()}) * 100"

    def gpu_power_watts(self) -> str:
        if self.gpu_source == "dcgm":
            return f"sum(DCGM_FI_DEV_POWER_USAGE{self._gpu()})"
        return f"sum(terrace_gpu_power_watts{self._gpu()})"

    def for_metric(self, metric: str, custom: str | None = None) -> str:
        if metric == "inflight":
            return self.inflight()
        if metric == "rps":
            return self.rps()
        if metric == "latencyP95":
            return self.latency_p95_ms()
        if metric == "gpuUtilization":
            return self.gpu_utilization_percent()
        if metric == "custom":
            if not custom or not custom.strip():
                raise QueryError("scaling.metric is custom but scaling.query is empty")
            return custom
        raise QueryError(f"unknown scaling metric {metric!r}")

    # Energy accounting: every counter over the same window.
    def gpu_energy_joules(self) -> str:
        return f"sum(increase(terrace_gpu_energy_joules_total{self._gpu()}[{self.window}]))"

    def runtime_energy_joules(self) -> str:
        return f"sum(increase(terrace_runtime_energy_joules_total{self._runtime}[{self.window}]))"

    def runtime_requests(self) -> str:
        return f"sum(increase(terrace_runtime_requests_total{self._runtime}[{self.window}]))"

    def router_requests(self) -> str:
        return f"sum(increase(terrace_router_requests_total{self._router}[{self.window}]))"

    def runtime_tokens(self) -> str:
        return (
            f"sum(increase(terrace_runtime_tokens_generated_total{self._runtime}[{self.window}]))"
        )

    def runtime_busy_seconds(self) -> str:
        return f"sum(increase(terrace_runtime_busy_seconds_total{self._runtime}[{self.window}]))"
