"""`terrace-operator`: reconcile ModelTiers and TierRouters (kopf underneath).

    terrace-operator                         # all namespaces, settings from TERRACE_* env
    terrace-operator -n demo -n prod         # only these namespaces
    terrace-operator --metrics-port 0        # any free port (logged)
    terrace-operator --leader-elect          # one of several replicas acts (a Lease)

kopf watches (handlers.py) into one cache; two controllers act on it, one
per kind: ModelTierController (tiers.py) and TierRouterController
(routers.py). With --leader-elect every replica watches but only the holder
of the Lease acts (leader.py); one that loses the Lease exits with status 1
and is restarted, so it comes back with a clean state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from typing import Any

import kopf
from kubernetes.config import ConfigException

from . import handlers
from .cache import Cache
from .children import MANAGER
from .kube import KubeClient, load_configuration
from .leader import LeaderElector
from .metrics import Metrics
from .prometheus import PrometheusClient
from .routers import TierRouterController
from .settings import OperatorSettings
from .tiers import ModelTierController
from .wake import serve_wake

log = logging.getLogger("terrace_operator")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="terrace-operator", description=__doc__.split("\n")[0])
    p.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        metavar="NS",
        help="namespace to watch (repeatable; default: all, or $TERRACE_NAMESPACES)",
    )
    p.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        help="watch every namespace even if TERRACE_NAMESPACES is set",
    )
    p.add_argument(
        "--liveness",
        dest="liveness_endpoint",
        metavar="URL",
        help="serve kopf's liveness probe here, e.g. http://0.0.0.0:8081/healthz ('' disables)",
    )
    p.add_argument("--metrics-host", help="address for /metrics (default 0.0.0.0)")
    p.add_argument(
        "--metrics-port", type=int, help="port for /metrics (0: any free port; -1 disables)"
    )
    p.add_argument(
        "--leader-elect",
        dest="leader_election",
        action="store_true",
        default=None,
        help="elect a leader through a Lease before acting (run several replicas)",
    )
    p.add_argument("--lease-name", help="the Lease's name (default terrace-operator)")
    p.add_argument("--lease-namespace", help="the Lease's namespace (default $POD_NAMESPACE)")
    p.add_argument("--prometheus-url", help="Prometheus for the control tick (default: none)")
    p.add_argument("--workers", type=int, help="reconciles in parallel")
    p.add_argument("--runtime-image", help="image for terrace-runtime pods")
    p.add_argument("--router-image", help="image for terrace-router pods")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    return p.parse_args(argv)


def build_settings(args: argparse.Namespace) -> OperatorSettings:
    overrides: dict[str, Any] = {
        k: v for k, v in vars(args).items() if v is not None and k in OperatorSettings.model_fields
    }
    if args.all_namespaces:
        overrides["namespaces"] = []
    if args.metrics_port is not None and args.metrics_port < 0:
        overrides["metrics_port"] = None
    if args.verbose:
        overrides["log_level"] = "DEBUG"
    return OperatorSettings(**overrides)


class NoDiffBaseStorage(kopf.DiffBaseStorage):
    """Skip kopf's per-event change tracking when nothing uses it.

    kopf deep-copies an "essence" of every object on every watch event, only
    for change-detecting handlers (on.create/update/resume/field). With none
    registered that is pure overhead: about 40% of the operator's CPU with a
    few hundred tiers.
    """

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: Any) -> Any:
        return None

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        return None


def has_change_handlers(registry: kopf.OperatorRegistry) -> bool:
    changing = getattr(registry, "_changing", None)
    if changing is None:
        return True  # a kopf we do not know: keep its default behaviour
    return any(True for _ in changing.get_all_handlers())


def kopf_settings(settings: OperatorSettings) -> kopf.OperatorSettings:
    ks = kopf.OperatorSettings()
    # kopf only watches (handlers.py); who acts is decided by the Lease
    # (leader.py), so kopf's own peering is off.
    ks.peering.standalone = True
    ks.peering.clusterwide = settings.clusterwide
    # The controller posts its own Events; kopf's per-handler log events would
    # only repeat them (and need their own RBAC).
    ks.posting.enabled = False
    # Re-list now and then so a silently dead watch cannot stall the operator.
    ks.watching.server_timeout = 600
    ks.watching.client_timeout = 660
    ks.watching.connect_timeout = 30
    ks.networking.request_timeout = settings.request_timeout_seconds
    return ks


async def run(settings: OperatorSettings, configuration: Any = None) -> int:
    """Watch with kopf, act with the two controllers; 1 if leadership was lost."""
    ks = kopf_settings(settings)

    client = KubeClient(MANAGER, settings.request_timeout_seconds, configuration)
    metrics = Metrics()
    if settings.metrics_port is not None:
        port = metrics.serve(settings.metrics_host, settings.metrics_port)
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, port)
    prometheus = None
    if settings.prometheus_url:
        prometheus = PrometheusClient(settings.prometheus_url, settings.prometheus_timeout_seconds)
    else:
        log.warning(
            "no Prometheus URL (TERRACE_PROMETHEUS_URL): the control tick only "
            "reports MetricsAvailable=False and holds replicas"
        )
    cache = Cache()
    tiers = ModelTierController(settings, client, cache, metrics, prometheus)
    routers = TierRouterController(settings, client, cache, metrics)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, cache, tiers, routers)
    if not has_change_handlers(registry):
        ks.persistence.diffbase_storage = NoDiffBaseStorage()

    stop = asyncio.Event()
    leading = False
    lost = False

    async def lead() -> None:
        nonlocal leading
        leading = True
        metrics.leader.set(1)
        try:
            await asyncio.gather(tiers.run(), routers.run())
        finally:
            leading = False
            metrics.leader.set(0)

    def lost_lease() -> None:
        # A fresh process is the clean way back (client-go's controllers exit
        # too): kopf stops, main returns 1, Kubernetes restarts the container.
        nonlocal lost
        log.error("lost the leader Lease; stopping")
        lost = True
        stop.set()

    async def wake(namespace: str, name: str) -> tuple[int, str]:
        if not leading:
            return 503, "this operator replica is not the leader; retry"
        return await tiers.wake(namespace, name)

    wake_server = None
    if settings.wake_port is not None:
        wake_server = await serve_wake(wake, settings.wake_host, settings.wake_port)
    if settings.leader_election:
        elector = LeaderElector(
            client,
            settings.lease_namespace or os.environ.get("POD_NAMESPACE") or "default",
            settings.lease_name,
            lease_duration_seconds=settings.lease_duration_seconds,
            renew_deadline_seconds=settings.renew_deadline_seconds,
            retry_period_seconds=settings.retry_period_seconds,
        )
        log.info("electing a leader through Lease %s as %s", settings.lease_name, elector.identity)
        acting = asyncio.create_task(elector.run(lead, lost_lease), name="terrace-leader")
    else:
        acting = asyncio.create_task(lead(), name="terrace-controllers")
    try:
        await kopf.operator(
            registry=registry,
            settings=ks,
            clusterwide=settings.clusterwide,
            namespaces=settings.namespaces,
            liveness_endpoint=settings.liveness_endpoint,
            standalone=True,
            stop_flag=stop,
        )
    finally:
        stop.set()
        acting.cancel()
        await asyncio.gather(acting, return_exceptions=True)
        if wake_server is not None:
            await wake_server.cleanup()
        if prometheus is not None:
            await prometheus.aclose()
        await client.close()
    return 1 if lost else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = build_settings(args)
    except ValueError as e:
        print(f"terrace-operator: invalid settings: {e}", file=sys.stderr)
        return 2
    try:
        configuration = load_configuration()
    except ConfigException as e:
        print(f"terrace-operator: no Kubernetes credentials: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kopf logs every watch event at DEBUG; keep that for --verbose only.
    logging.getLogger("kopf").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    # kopf says "Handler ... succeeded" for every watch event: 13,000 lines
    # for a thousand tiers starting up. Failures are still logged.
    logging.getLogger("kopf.objects").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    # One line per API request is only useful when debugging.
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    log.info(
        "watching %s", "all namespaces" if settings.clusterwide else ", ".join(settings.namespaces)
    )
    # kopf handles SIGINT/SIGTERM itself; a second Ctrl-C just ends quietly.
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(settings, configuration))
    return 0


if __name__ == "__main__":
    sys.exit(main())
