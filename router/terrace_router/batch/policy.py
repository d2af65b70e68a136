"""When a batch's pending lines go out: the release policy, pure.

Each pass (`release`) says how many more lines of one batch to send now:

1. **Deadline first.** If the lines left, at the pace measured so far
   (`seconds_per_line` per slot, times `safety`), would not finish before the
   batch expires unless sent now, every free slot is filled, whatever the
   grid says: a batch is never late because the grid was dirty.
2. **The cleanest hours that suffice.** Otherwise lines go out only while
   the signal (a carbon intensity in gCO2/kWh, a price, or, with none
   configured, the cluster's own demand: its low-demand hours) is
   among the lowest of what is expected until the deadline. The outlook is
   the signal's forecast when there is one, else its values at the same
   hours yesterday (a persistence forecast). The batch needs a fraction
   f = time needed / time left of what is left; lines go while the signal
   now is at or below the f-quantile of the outlook (f at least
   `MIN_SHARE`, so a small batch is not held for the single cleanest
   minute). A `threshold`, when set, also releases at or below it, and is
   the whole rule when there is no outlook yet. A signal with no data is
   unknown, never zero: lines wait for it, until the deadline says go. With
   no signal (no Prometheus), capacity alone decides.
3. **Spare capacity.** Never more lines in flight than `slots`: the share of
   the tiers batch work may use. The worker shrinks `slots` when the router
   sheds its requests (429, 503) and grows it back slowly (AIMD), so batch
   work backs off when a tier saturates.

Worked example (docs/batch.md has it in full): 2,000 lines, 8 slots, 10 s
a line (the worker's guess until answers measure it), a 24 h window: 250
rounds x 10 s x safety 2 = 5,000 s needed of 86,400 s, f = 5.8 %, so
`MIN_SHARE` (10 %) applies: lines go while the signal is in the lowest tenth
of what is expected before the deadline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Pace:
    """What one batch looks like right now."""

    now: float  # unix seconds
    expires_at: float  # unix seconds
    pending: int  # lines not sent yet
    in_flight: int  # lines sent and not answered
    seconds_per_line: float  # measured service time of one line in one slot
    slots: int  # lines this batch may have in flight
    ahead: int = 0  # lines of batches due earlier that go first through the same slots


MIN_SHARE = 0.1  # the least fraction of the outlook counted as "clean"


@dataclass(frozen=True)
class Grid:
    signal: float | None  # the signal's value now; None: no data (or none configured)
    threshold: float | None = None  # also release at or below this
    outlook: tuple[float, ...] = ()  # expected values until the deadline, evenly spaced
    configured: bool = True  # False: no signal at all, capacity alone decides


@dataclass(frozen=True)
class Release:
    lines: int
    reason: str


def seconds_needed(pace: Pace, safety: float) -> float:
    """Time to finish what is left with every slot busy, with a safety factor."""
    slots = max(1, pace.slots)
    rounds = math.ceil((pace.pending + pace.in_flight + pace.ahead) / slots)
    return rounds * pace.seconds_per_line * safety


def quantile(values: tuple[float, ...], q: float) -> float:
    """The q-quantile of `values` (linear interpolation, as numpy's default)."""
    v = sorted(values)
    x = min(max(q, 0.0), 1.0) * (len(v) - 1)
    lo = int(x)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (x - lo)


def release(pace: Pace, grid: Grid, safety: float = 2.0) -> Release:
    free = max(0, pace.slots - pace.in_flight)
    if pace.pending == 0:
        return Release(0, "nothing pending")
    left = pace.expires_at - pace.now
    need = seconds_needed(pace, safety)
    if left <= need:
        return Release(min(free, pace.pending), f"deadline: {left:.0f} s left")
    go = min(free, pace.pending)
    if not grid.configured:
        return Release(go, "spare capacity")
    if grid.signal is None:
        return Release(0, "waiting: grid signal unknown")
    now = grid.signal
    if grid.threshold is not None and now <= grid.threshold:
        return Release(go, f"grid {now:g} <= threshold {grid.threshold:g}")
    if grid.outlook:
        share = max(MIN_SHARE, need / left)
        cut = quantile((*grid.outlook, now), share)
        if now <= cut:
            return Release(go, f"grid {now:g} in the cleanest {share:.0%} of the outlook")
        return Release(
            0,
            f"waiting: grid {now:g} > {cut:g}, the cleanest {share:.0%} of the outlook; "
            f"{left - need:.0f} s of slack",
        )
    if grid.threshold is None:
        return Release(go, f"grid {now:g}: no outlook yet to compare with")
    return Release(
        0,
        f"waiting: grid {now:g} > threshold {grid.threshold:g}, {left - need:.0f} s of slack",
    )


@dataclass(frozen=True)
class Slots:
    """AIMD on the batch's concurrency: halve on shed work, +1 per success
    round, within [1, ceiling]."""

    current: float
    ceiling: int

    def shed(self) -> Slots:
        return Slots(max(1.0, self.current / 2), self.ceiling)

    def served(self, n: int = 1) -> Slots:
        grown = self.current + n / max(1.0, self.current)
        return Slots(min(float(self.ceiling), grown), self.ceiling)

    @property
    def value(self) -> int:
        return max(1, int(self.current))
