"""The Node annotations between the operator and the agent: one source of truth.

Desired (operator -> agent), one annotation per tier so that concurrent tier
loops never overwrite each other under a JSON merge patch:

    power.terrace.dev/<hash of namespace/tier>:
        {"tier": "demo/large-gpu", "watts": 350, "time": "2025-01-01T00:00:00Z"}

The agent enforces, on every GPU of its node, the highest fresh request (so
no tier is throttled below what its own controller decided) and ignores
entries older than a TTL: if the operator stops refreshing them, the GPUs
drift back to their default limit, the safe direction. No entry: the agent
leaves the GPUs at their default (``power.policy: off``).

Enforced (agent -> operator), written by the agent only:

    terrace.dev/power-enforced:
        {"time": ..., "agent": "running"|"stopped", "gpus": {"0": {
            "enforcedWatts": 350, "defaultWatts": 700, "minWatts": 200,
            "maxWatts": 700, "powerWatts": 212.4, "name": ..., "uuid": ...}}}

``enforcedWatts`` is nvmlDeviceGetEnforcedPowerLimit read back after setting;
it is what `status.powerLimitWatts` shows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

DESIRED_PREFIX = "power.terrace.dev/"
ENFORCED_KEY = "terrace.dev/power-enforced"
DEFAULT_TTL_SECONDS = 600.0


def desired_key(namespace: str, tier: str) -> str:
    digest = hashlib.sha256(f"{namespace}/{tier}".encode()).hexdigest()[:20]
    return f"{DESIRED_PREFIX}tier-{digest}"


def now_iso(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except (TypeError, ValueError):
        return None


def encode_desired(namespace: str, tier: str, watts: int, now: datetime | None = None) -> str:
    return json.dumps(
        {"tier": f"{namespace}/{tier}", "watts": int(watts), "time": now_iso(now)},
        separators=(",", ":"),
    )


@dataclass(frozen=True)
class DesiredEntry:
    tier: str
    watts: int
    time: datetime


def desired_entries(annotations: Mapping[str, str] | None) -> list[DesiredEntry]:
    """Every well-formed desired entry; malformed ones are skipped, never fatal."""
    out = []
    for key, value in (annotations or {}).items():
        if not key.startswith(DESIRED_PREFIX):
            continue
        try:
            data = json.loads(value)
            watts = int(data["watts"])
            t = parse_time(data["time"])
            tier = str(data["tier"])
        except (ValueError, TypeError, KeyError):
            continue
        if t is None or watts <= 0:
            continue
        out.append(DesiredEntry(tier, watts, t))
    return out


def effective_desired(
    annotations: Mapping[str, str] | None,
    now: datetime,
    ttl_seconds: float = DEFAULT_TTL_SECONDS,
) -> tuple[int | None, list[str]]:
    """The limit to enforce on this node's GPUs (None: leave at default)."""
    fresh = [
        e for e in desired_entries(annotations)
        if (now - e.time).total_seconds() <= ttl_seconds
    ]
    if not fresh:
        return None, []
    return max(e.watts for e in fresh), sorted(e.tier for e in fresh)


@dataclass(frozen=True)
class GpuReport:
    index: int
    enforced_watts: float
    default_watts: float
    min_watts: float
    max_watts: float
    power_watts: float | None = None
    name: str = ""
    uuid: str = ""


def encode_enforced(
    gpus: list[GpuReport], agent: str = "running", now: datetime | None = None
) -> str:
    return json.dumps(
        {
            "time": now_iso(now),
            "agent": agent,
            "gpus": {
                str(g.index): {
                    "enforcedWatts": round(g.enforced_watts, 3),
                    "defaultWatts": round(g.default_watts, 3),
                    "minWatts": round(g.min_watts, 3),
                    "maxWatts": round(g.max_watts, 3),
                    "powerWatts": None if g.power_watts is None else round(g.power_watts, 1),
                    "name": g.name,
                    "uuid": g.uuid,
                }
                for g in gpus
            },
        },
        separators=(",", ":"),
        sort_keys=True,
    )


def decode_enforced(annotations: Mapping[str, str] | None) -> dict | None:
    raw = (annotations or {}).get(ENFORCED_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("gpus"), dict):
        return None
    return data
