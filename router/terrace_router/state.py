"""Everything a request needs, built from one RouterConfig and swapped as a
whole on reload.

A request reads `app.state.router` once at its start and keeps using that
object, so a reload never changes the rules under a request in flight; the
old state is dropped when its last request finishes. Parts that carry live
knowledge survive a reload when their config did not change: the classifier
(loading it is slow), the calibrator's score window, each endpoint's health
and in-flight count (matched by URL), the realized-share window.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import upstream
from .auth import ApiKeys
from .cache import ResponseCache
from .config import RouterConfig, TierConfig
from .policy import tier_for_score
from .pool import Endpoint, TierPool, normalize_base_url


@dataclass(slots=True, eq=False)
class Tier:
    name: str
    index: int  # position among the OpenAI tiers (cost order); -1 for v2-only tiers
    config: TierConfig
    pool: TierPool
    timeout: upstream.Timeout
    upstream_model: str | None
    woken_at: float = float("-inf")  # when the router last asked for this tier to wake

    def model_for(self, requested: str, auto: bool) -> str:
        """The model name sent upstream."""
        if self.upstream_model is not None:
            return self.upstream_model
        return self.name if auto else requested


class ShareTracker:
    """Which tier served each of the last `window` routed requests."""

    __slots__ = ("names", "_ring", "_pos", "_filled", "_counts")

    def __init__(self, names: Sequence[str], window: int) -> None:
        self.names = tuple(names)
        self._ring = [0] * window
        self._pos = 0
        self._filled = 0
        self._counts = [0] * len(self.names)

    def record(self, tier_index: int) -> None:
        ring = self._ring
        if self._filled == len(ring):
            self._counts[ring[self._pos]] -= 1
        else:
            self._filled += 1
        ring[self._pos] = tier_index
        self._counts[tier_index] += 1
        self._pos = (self._pos + 1) % len(ring)

    def shares(self) -> dict[str, float]:
        n = self._filled
        counts = zip(self.names, self._counts, strict=True)
        return {name: (c / n if n else 0.0) for name, c in counts}


def source_digest(config_path: str | Path, config: RouterConfig | None = None) -> str:
    """Hash of what a reload depends on: the config file's bytes and the key
    file it names. Content, not mtime: a mounted ConfigMap swaps a symlink."""
    h = hashlib.sha256(Path(config_path).read_bytes())
    if config is not None and config.auth.api_keys_file:
        try:
            h.update(Path(config.auth.api_keys_file).read_bytes())
        except OSError:
            h.update(b"\0missing")
    return h.hexdigest()


def load_classifier(model: str) -> Any:
    # Imported here, not at module top: loading onnxruntime is only needed
    # once a state is built, and importing this module must start nothing.
    from .classifier import Classifier

    return Classifier.load(model)


def make_calibrator(config: RouterConfig, classifier: Any) -> Any:
    from .calibration import ShareCalibrator

    cal = config.calibration
    return ShareCalibrator(
        target_large_share=cal.aim,
        window=cal.window,
        warmup=cal.warmup,
        initial_threshold=classifier.default_threshold,
    )


class RouterState:
    def __init__(
        self,
        config: RouterConfig,
        *,
        classifier: Any,
        calibrator: Any,
        endpoints: dict[tuple[str, str], Endpoint] | None = None,
        share: ShareTracker | None = None,
    ) -> None:
        self.config = config
        self.classifier = classifier
        self.calibrator = calibrator
        self.escalation = config.escalation
        self.max_body_bytes = config.max_body_bytes
        self.auto_names = frozenset({"auto", config.name})
        self.keys = ApiKeys.from_config(config.auth)
        cache = config.cache
        self.cache = (
            ResponseCache(cache.max_entries, cache.ttl_seconds)
            if cache.enabled and cache.max_entries > 0 and cache.ttl_seconds > 0
            else None
        )
        self.thresholds = config.calibration.thresholds

        reuse = endpoints or {}
        self.tiers: list[Tier] = []
        self.openai_tiers: list[Tier] = []
        for tc in config.tiers:
            # Carried over per (tier, URL): two tiers on one URL keep their own
            # in-flight counts and health, as they had before the reload.
            eps = [reuse.get((tc.name, normalize_base_url(u))) or Endpoint(u) for u in tc.endpoints]
            pool = TierPool(
                eps,
                max_inflight=tc.max_inflight_per_endpoint,
                eject_after=tc.eject_after_failures,
                eject_seconds=tc.eject_seconds,
            )
            timeout = upstream.timeout(tc.connect_timeout_seconds, tc.read_timeout_seconds)
            index = len(self.openai_tiers) if tc.protocol == "openai" else -1
            tier = Tier(tc.name, index, tc, pool, timeout, tc.upstream_model)
            self.tiers.append(tier)
            if index >= 0:
                self.openai_tiers.append(tier)
        self.by_name = {t.name: t for t in self.openai_tiers}
        # OIP v2 models: a tier answers to its name and to its upstream model name.
        self.v2_models: dict[str, Tier] = {}
        for t in sorted(self.tiers, key=lambda t: t.config.protocol != "v2"):
            for alias in (t.name, t.upstream_model):
                if alias:
                    self.v2_models.setdefault(alias, t)
        names = [t.name for t in self.openai_tiers]
        self.share = (
            share
            if share is not None and share.names == tuple(names)
            else ShareTracker(names, config.calibration.window)
        )

    @classmethod
    def build(cls, config: RouterConfig, previous: RouterState | None = None) -> RouterState:
        """Build a state, reusing what still applies from `previous`.

        May block (loads the classifier): call it off the event loop."""
        if previous is not None and previous.config.classifier == config.classifier:
            classifier = previous.classifier
            # A new effective share (the operator's budget) keeps the score
            # window: the calibrator only aims elsewhere.
            before = previous.config.calibration.model_copy(update={"effective_large_share": None})
            after = config.calibration.model_copy(update={"effective_large_share": None})
            same_cal = before == after and len(previous.openai_tiers) == sum(
                t.protocol == "openai" for t in config.tiers
            )
            calibrator = previous.calibrator if same_cal else make_calibrator(config, classifier)
            if same_cal:
                calibrator.retarget(config.calibration.aim)
        else:
            classifier = load_classifier(config.classifier.model)
            calibrator = make_calibrator(config, classifier)
        endpoints = None
        share = None
        if previous is not None:
            endpoints = previous.endpoints()
            share = previous.share
        return cls(
            config, classifier=classifier, calibrator=calibrator, endpoints=endpoints, share=share
        )

    def route(self, score: float, record: bool = True) -> int:
        """Index of the OpenAI tier a request with this complexity starts on;
        `record` False leaves the calibration window alone (`record` later)."""
        n = len(self.openai_tiers)
        if n == 1:
            return 0
        if self.thresholds is not None:
            return tier_for_score(score, self.thresholds)
        return min(max(int(self.calibrator.route(score, n, record)), 0), n - 1)

    def record(self, score: float, tier: int) -> None:
        """Count a request routed with `record=False` in the calibration window."""
        if len(self.openai_tiers) > 1 and self.thresholds is None:
            self.calibrator.record(score, tier)

    def endpoints(self) -> dict[tuple[str, str], Endpoint]:
        """Every endpoint by (tier name, base URL)."""
        return {(t.name, ep.base): ep for t in self.tiers for ep in t.pool.endpoints}
