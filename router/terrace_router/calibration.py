"""Live calibration: keep the share of traffic past tier 0 at targetLargeShare.

A threshold fixed on the training distribution drifts with the traffic mix
(RouteLLM: a threshold set for 30% gave 11% or 76% on other data). The
calibrator keeps the last `window` scores and sets the threshold at their
(1 - target) quantile, so whatever the mix, about `target` of recent
requests score above it. Until `warmup` scores have arrived it uses
`initial_threshold` (the classifier's default, from its training quantiles).

More than two tiers: the above-threshold mass is split evenly over the upper
tiers by further quantiles of the window. With u = n_tiers - 1 upper tiers,
boundary j (j = 0 .. u-1) is the quantile at 1 - target * (u - j) / u, and a
score goes past every boundary it reaches (>=): tier 0 gets 1 - target of
the traffic and each upper tier target / u. Before warm-up, the upper
boundaries divide [initial_threshold, 1] evenly.

Cost per call: a bisect into a sorted list of `window` floats plus a
list insert/delete (a memmove of at most `window` pointers, about a
microsecond for 2,000) and O(1) quantile reads; a lock makes it safe to call
from several threads.
"""

from __future__ import annotations

import bisect
import math
import threading


class ShareCalibrator:
    def __init__(
        self,
        target_large_share: float = 0.3,
        window: int = 2000,
        warmup: int = 50,
        initial_threshold: float = 0.5,
    ) -> None:
        if not 0.0 <= target_large_share <= 1.0:
            raise ValueError(f"target_large_share must be in [0, 1], got {target_large_share}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        if not math.isfinite(initial_threshold):
            raise ValueError(f"initial_threshold must be finite, got {initial_threshold}")
        self.target_large_share = float(target_large_share)
        self.window = int(window)
        self.warmup = min(int(warmup), self.window)
        self.initial_threshold = float(initial_threshold)
        self._ring: list[float] = []  # scores in arrival order (ring buffer)
        self._sorted: list[float] = []  # the same scores, sorted
        self._decisions: list[bool] = []  # past tier 0?, same ring positions
        self._past = 0  # how many of _decisions are True
        self._pos = 0
        self._lock = threading.Lock()

    def retarget(self, target_large_share: float) -> None:
        """Aim at another share from the next request on, keeping the window
        (the operator's budget-following cut-off moves it; operator budget.py)."""
        if not 0.0 <= target_large_share <= 1.0:
            raise ValueError(f"target_large_share must be in [0, 1], got {target_large_share}")
        with self._lock:
            self.target_large_share = float(target_large_share)

    # -- quantiles of the window --------------------------------------------

    def _quantile(self, q: float) -> float:
        s = self._sorted
        x = q * (len(s) - 1)  # linear interpolation, like numpy's default
        lo = int(x)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (x - lo)

    def _warm(self) -> bool:
        return len(self._sorted) >= max(self.warmup, 1)

    def _boundaries(self, n_tiers: int) -> list[float]:
        u = n_tiers - 1
        t = self.target_large_share
        if not self._warm():
            t0 = self.initial_threshold
            return [t0 + (1.0 - t0) * j / u for j in range(u)]
        return [self._quantile(1.0 - t * (u - j) / u) for j in range(u)]

    # -- request path -------------------------------------------------------

    def route(self, score: float, n_tiers: int, record: bool = True) -> int:
        """Tier index for `score` (0 = cheapest); records the score and the
        decision into the window unless `record` is False (a request that
        may yet be refused: `record` it once it is taken)."""
        if n_tiers <= 1:
            return 0
        if math.isnan(score):
            score = 0.0  # a broken score must not poison the window; cheapest tier
        with self._lock:
            if record:
                self._record(score)
            if self.target_large_share <= 0.0:
                tier = 0
            elif self.target_large_share >= 1.0:
                tier = max(1, sum(score >= b for b in self._boundaries(n_tiers)))
            else:
                tier = sum(score >= b for b in self._boundaries(n_tiers))
            if record:
                self._record_decision(tier > 0)
            return tier

    def record(self, score: float, tier: int) -> None:
        """Put a request routed with `record=False` into the window."""
        if math.isnan(score):
            score = 0.0
        with self._lock:
            self._record(score)
            self._record_decision(tier > 0)

    def _record(self, score: float) -> None:
        if len(self._ring) < self.window:
            self._ring.append(score)
        else:
            old = self._ring[self._pos]
            del self._sorted[bisect.bisect_left(self._sorted, old)]
            self._ring[self._pos] = score
        bisect.insort(self._sorted, score)

    def _record_decision(self, past: bool) -> None:
        if len(self._decisions) < self.window:
            self._decisions.append(past)
        else:
            self._past -= self._decisions[self._pos]
            self._decisions[self._pos] = past
        self._past += past
        self._pos = (self._pos + 1) % self.window

    # -- introspection ------------------------------------------------------

    @property
    def threshold(self) -> float:
        """Current score boundary between tier 0 and the rest."""
        with self._lock:
            if self.target_large_share <= 0.0:
                return math.inf
            if not self._warm():
                return self.initial_threshold
            return self._quantile(1.0 - self.target_large_share)

    def thresholds(self, n_tiers: int) -> list[float]:
        """All n_tiers - 1 boundaries (ascending)."""
        with self._lock:
            return self._boundaries(n_tiers) if n_tiers > 1 else []

    def realized_share(self) -> float:
        """Share of the last `window` routed requests that went past tier 0."""
        with self._lock:
            return self._past / len(self._decisions) if self._decisions else 0.0

    @property
    def warm(self) -> bool:
        with self._lock:
            return self._warm()
