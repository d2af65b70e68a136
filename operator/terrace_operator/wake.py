"""The wake endpoint: `POST /wake/{namespace}/{name}`, where a router that
holds a request for a tier at zero replicas asks the operator to bring it
up now, instead of after Prometheus's next scrape and the control loop's
next tick (KEDA's HTTP add-on and KServe's activator do the same).

Only the HTTP part is here; what waking means is `tiers.ModelTierController.wake`.
Served on TERRACE_WAKE_PORT (off when unset) in the operator's own event
loop, with aiohttp's server (aiohttp already comes with kopf).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

log = logging.getLogger("terrace.wake")

Wake = Callable[[str, str], Awaitable[tuple[int, str]]]


def wake_app(wake: Wake) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        ns, name = request.match_info["namespace"], request.match_info["name"]
        try:
            status, message = await wake(ns, name)
        except Exception:  # the API server failed: the router escalates meanwhile
            log.exception("waking %s/%s failed", ns, name)
            status, message = 503, "the operator could not reach the API server"
        return web.json_response({"message": message}, status=status)

    app = web.Application()
    app.router.add_post("/wake/{namespace}/{name}", handle)
    return app


async def serve_wake(wake: Wake, host: str, port: int) -> web.AppRunner:
    """Start the endpoint; the caller stops it with `runner.cleanup()`."""
    runner = web.AppRunner(wake_app(wake), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("wake endpoint on %s:%d", host, port)
    return runner
