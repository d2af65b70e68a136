"""terrace-agent: the power agent's entry point (DaemonSet on GPU nodes).

    terrace-agent --node-name $NODE_NAME [--kubeconfig FILE] [--metrics-port 9400]
    terrace-agent --node-name gpu-node --fake-gpus 1 --fake-model h100 \\
        --fake-load-file /tmp/load   # or --fake-load-url http://runtime/metrics

Every ``--interval`` seconds, and at once when its Node changes, it reads the
desired limit from the Node's annotations (`protocol.py`), applies it through
NVML (or the fake), reads the enforced limit back and reports it on the Node.
On SIGTERM/SIGINT it restores every GPU it changed to the default limit.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server

from terrace_operator.agent.backend import BackendError, GpuBackend
from terrace_operator.agent.core import PowerAgent
from terrace_operator.agent.fake import MODELS, FakeNvmlBackend, file_load, runtime_metrics_load
from terrace_operator.agent.metrics import AgentCollector
from terrace_operator.agent.protocol import (
    DEFAULT_TTL_SECONDS,
    ENFORCED_KEY,
    effective_desired,
    encode_enforced,
)

log = logging.getLogger("terrace.agent")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="terrace-agent", description=__doc__.split("\n\n")[0])
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME"),
                   help="this Node's name (default $NODE_NAME, from the downward API)")
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"),
                   help="kubeconfig file; in-cluster config when unset")
    p.add_argument("--metrics-port", type=int, default=9400)
    p.add_argument("--metrics-address", default="0.0.0.0")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between passes")
    p.add_argument("--desired-ttl", type=float, default=DEFAULT_TTL_SECONDS,
                   help="ignore desired limits older than this (seconds)")
    p.add_argument("--report-every", type=float, default=30.0,
                   help="re-report readings at least this often (seconds)")
    p.add_argument("--fake-gpus", type=int, default=0, help="use N fake GPUs instead of NVML")
    p.add_argument("--fake-model", choices=sorted(MODELS), default="h100")
    p.add_argument("--fake-peak-watts", type=float, default=None,
                   help="fake workload's unconstrained busy power (default: TDP)")
    p.add_argument("--fake-load-file", type=Path, default=None,
                   help='demand in [0,1] for the fake GPUs: "0.5" or {"0": 0.5}')
    p.add_argument("--fake-load-url", default=None,
                   help="a runtime's /metrics URL; demand = rate of its busy seconds")
    p.add_argument("--advertise-resource", default="",
                   help="set the Node's capacity of this extended resource (e.g. nvidia.com/gpu) "
                        "to the GPU count, as a device plugin would; for fake GPUs on kind")
    p.add_argument("--log-level", default="INFO")
    return p


def make_backend(args: argparse.Namespace) -> GpuBackend:
    if args.fake_gpus > 0:
        if args.fake_load_url:
            load = runtime_metrics_load(args.fake_load_url)
        elif args.fake_load_file:
            load = file_load(args.fake_load_file)
        else:
            load = None
        return FakeNvmlBackend(
            args.fake_gpus, args.fake_model, load, peak_watts=args.fake_peak_watts
        )
    from terrace_operator.agent.backend import NvmlBackend

    return NvmlBackend()


class AgentLoop:
    """Ties the Node annotations to the PowerAgent."""

    def __init__(self, agent: PowerAgent, node, interval: float, ttl: float, report_every: float):
        self.agent = agent
        self.node = node
        self.interval = interval
        self.ttl = ttl
        self.report_every = report_every
        self.stop = threading.Event()
        self._last_report: str | None = None
        self._last_report_at = 0.0
        self._last_limits: str | None = None

    def pass_once(self) -> None:
        now = datetime.now(UTC)
        desired, tiers = effective_desired(self.node.annotations, now, self.ttl)
        reports = self.agent.reconcile(desired)
        limits = repr([(r.index, r.enforced_watts) for r in reports])
        stale = now.timestamp() - self._last_report_at >= self.report_every
        if limits != self._last_limits or stale:
            self._publish(encode_enforced(reports, "running", now), now)
            self._last_limits = limits

    def _publish(self, payload: str, now: datetime) -> None:
        try:
            self.node.patch({ENFORCED_KEY: payload})
            self._last_report_at = now.timestamp()
        except Exception as exc:  # the apiserver being away must not stop the GPUs' loop
            log.warning("cannot report to the Node: %s", exc)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.pass_once()
            except Exception:
                log.exception("agent pass failed")
            self.node.changed.wait(self.interval)
            self.node.changed.clear()

    def shutdown(self) -> None:
        self.agent.restore_defaults()
        try:
            reports = self.agent.reconcile(None)
        except BackendError:
            reports = self.agent.reports()
        self._publish(encode_enforced(reports, "stopped"), datetime.now(UTC))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.node_name:
        print("terrace-agent: --node-name (or $NODE_NAME) is required", file=sys.stderr)
        return 2
    from terrace_operator.agent.node import NodeAnnotations, load_kube_config

    backend = make_backend(args)
    agent = PowerAgent(backend, args.node_name)
    try:
        agent.start()
    except BackendError as exc:
        print(f"terrace-agent: cannot initialise NVML: {exc}", file=sys.stderr)
        return 1
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent))
    server, thread = start_http_server(args.metrics_port, args.metrics_address, registry)
    node = NodeAnnotations(load_kube_config(args.kubeconfig), args.node_name)
    try:
        node.refresh()
    except Exception as exc:
        log.warning("cannot read Node %s yet: %s", args.node_name, exc)
    if args.advertise_resource:
        try:
            node.advertise(args.advertise_resource, len(agent.gpus))
        except Exception as exc:  # scheduling waits for it; the power loop need not
            log.warning("cannot advertise %s on Node %s: %s", args.advertise_resource,
                        args.node_name, exc)
    node.start_watch()
    loop = AgentLoop(agent, node, args.interval, args.desired_ttl, args.report_every)

    def on_signal(signum, frame):
        log.info("signal %d: restoring default limits and exiting", signum)
        loop.stop.set()
        node.changed.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("terrace-agent on %s: %d GPU(s), metrics on %s:%d", args.node_name,
             len(agent.gpus), args.metrics_address, server.server_port)
    try:
        loop.run()
    finally:
        loop.shutdown()
        if args.advertise_resource:
            try:  # no agent, no GPUs to schedule on (as when a device plugin goes)
                node.advertise(args.advertise_resource, 0)
            except Exception as exc:  # e.g. its RBAC already gone (helm uninstall)
                log.warning("cannot withdraw %s: %s", args.advertise_resource, exc)
        node.stop()
        server.shutdown()
        agent.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
