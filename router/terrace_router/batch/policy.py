"""When a batch's pending lines go out: the release policy, pure.

Each pass (`release`) says how many more lines of one batch to send now:

1. **Deadline first.** If the lines left, at the pace measured so far
   (`seconds_per_line` per slot, times `safety`), would not finish before the
   batch expires unless sent now, every free slot is filled, whatever the
   grid says: a batch is never late because the grid was dirty.
2. **Clean or cheap hours.** Otherwise lines go out only while the grid
   signal (a PromQL value such as a carbon intensity in gCO2/kWh or a price)
   is at or below `threshold`. A signal with no data is unknown, never zero:
   lines wait for it, until the deadline says go. With no signal configured,
   capacity alone decides.
3. **Spare capacity.** Never more lines in flight than `slots`: the share of
   the tiers batch work may use. The worker shrinks `slots` when the router
   sheds its requests (429, 503) and grows it back slowly (AIMD), so batch
   work backs off when a tier saturates.
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


@dataclass(frozen=True)
class Grid:
    signal: float | None  # the signal's value now; None: no signal or no data
    threshold: float | None  # release freely at or below this; None: no signal configured


@dataclass(frozen=True)
class Release:
    lines: int
    reason: str


def seconds_needed(pace: Pace, safety: float) -> float:
    """Time to finish what is left with every slot busy, with a safety factor."""
    slots = max(1, pace.slots)
    rounds = math.ceil((pace.pending + pace.in_flight) / slots)
    return rounds * pace.seconds_per_line * safety


def release(pace: Pace, grid: Grid, safety: float = 2.0) -> Release:
    free = max(0, pace.slots - pace.in_flight)
    if pace.pending == 0:
        return Release(0, "nothing pending")
    left = pace.expires_at - pace.now
    if left <= seconds_needed(pace, safety):
        return Release(min(free, pace.pending), f"deadline: {left:.0f} s left")
    if grid.threshold is None:
        return Release(min(free, pace.pending), "spare capacity")
    if grid.signal is None:
        return Release(0, "waiting: grid signal unknown")
    if grid.signal <= grid.threshold:
        return Release(
            min(free, pace.pending), f"grid {grid.signal:g} <= threshold {grid.threshold:g}"
        )
    return Release(
        0,
        f"waiting: grid {grid.signal:g} > threshold {grid.threshold:g}, "
        f"{left - seconds_needed(pace, safety):.0f} s of slack",
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
