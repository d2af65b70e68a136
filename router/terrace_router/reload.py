"""Hot reload of the routing table.

Polls the config file every `interval` seconds and compares a hash of its
content (and of the API key file it names): kubelet updates a mounted
ConfigMap by swapping a `..data` symlink, so mtimes and inotify on the file
are unreliable, content is not. A changed file is parsed and a new state is
built off the event loop, then swapped in with one assignment; requests in
flight keep the state they started with. A file that does not parse leaves
the old state serving and is reported once per distinct content.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from .config import RouterConfig, load
from .metrics import RouterMetrics
from .state import RouterState, source_digest

log = logging.getLogger(__name__)


class StateHolder:
    """The app's current state; replaced whole, never mutated."""

    def __init__(self, state: RouterState) -> None:
        self.state = state
        self.ready = False

    def __call__(self) -> RouterState:
        return self.state


class ConfigWatcher:
    def __init__(
        self, path: str | Path, holder: StateHolder, metrics: RouterMetrics, interval: float = 1.0
    ) -> None:
        self.path = Path(path)
        self.holder = holder
        self.metrics = metrics
        self.interval = interval
        self.digest = self._digest(holder.state.config)

    def _digest(self, config: RouterConfig | None) -> str | None:
        try:
            return source_digest(self.path, config)
        except OSError:
            return None  # mid-swap or removed: try again next tick

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # a watcher that dies would silently freeze the config
                log.exception("config reload check failed")

    async def check(self) -> bool:
        """Reload if the sources changed; True when a new state was swapped in."""
        digest = await asyncio.to_thread(self._digest, self.holder.state.config)
        if digest is None or digest == self.digest:
            return False
        self.digest = digest
        try:
            config = await asyncio.to_thread(load, self.path)
            new = await asyncio.to_thread(RouterState.build, config, self.holder.state)
        except Exception as exc:
            self.metrics.reloads.labels("error").inc()
            log.error("routing table %s not reloaded, keeping the previous one: %s", self.path, exc)
            return False
        # Key file named by the new config may differ from the old one's.
        self.digest = self._digest(config) or digest
        self.holder.state = new
        self.metrics.reloads.labels("success").inc()
        log.info("routing table reloaded: tiers %s", ", ".join(t.name for t in new.tiers))
        return True
