"""Run the real terrace-operator against the dev cluster, as its ServiceAccount.

Shared by tests/integration/test_operator_*.py, test_crd_*.py and
bench/operator.py: install the CRDs and the shipped RBAC, start
`terrace-operator` as a subprocess with a TokenRequest token of the
`terrace-operator` ServiceAccount (never admin), poll until things converge,
stop it by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from localproc import AGENT_PORT, port_from_log
from terrace_operator import manifests

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "crds"
SAMPLES = ROOT / "crds" / "samples"
OPERATOR_NAMESPACE = "terrace-system"
OPERATOR_SA = "terrace-operator"

T = TypeVar("T")


def free_port() -> int:
    """A port free now, maybe not later: only for programs that cannot bind
    port 0 and report it; their starter retries when it was taken."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# What a server that lost the race for its port says (errno 98, EADDRINUSE).
PORT_TAKEN = "address already in use"
START_ATTEMPTS = 3


def wait_for(
    check: Callable[[], T], timeout: float = 60.0, interval: float = 0.25, what: str = ""
) -> T:
    """Poll `check` until it returns something truthy; fail with its last answer."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except (RuntimeError, subprocess.CalledProcessError, KeyError, IndexError, ValueError) as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or check}: last {last!r}"
            )
        time.sleep(interval)


def kubectl_json(cluster: Any, *args: str) -> dict:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def get_or_none(cluster: Any, kind: str, name: str, namespace: str) -> dict | None:
    out = cluster.kubectl(
        "get", kind, name, "-n", namespace, "-o", "json", "--ignore-not-found", check=True
    )
    return json.loads(out.stdout) if out.stdout.strip() else None


def install_crds(cluster: Any) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/modeltiers.terrace.dev",
        "crd/tierrouters.terrace.dev",
    )


def install_rbac(cluster: Any, namespace: str = OPERATOR_NAMESPACE) -> None:
    ensure_namespace(cluster, namespace)
    cluster.kubectl("apply", "-f", "-", input=manifests.rbac_yaml(namespace))


def fresh_namespace(cluster: Any, namespace: str) -> None:
    """An empty namespace: a left-over one (an earlier run) is deleted first."""
    cluster.kubectl(
        "delete",
        "namespace",
        namespace,
        "--ignore-not-found",
        "--wait=true",
        "--timeout=120s",
        timeout=150,
    )
    ensure_namespace(cluster, namespace)


def ensure_namespace(cluster: Any, namespace: str) -> None:
    doc = json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    cluster.kubectl("apply", "-f", "-", input=doc)


def condition(obj: dict | None, type_: str) -> dict:
    """The object's condition of that type, {} when it has none."""
    return next(
        (c for c in ((obj or {}).get("status") or {}).get("conditions") or []
         if c.get("type") == type_),
        {},
    )  # fmt: skip


def ready_condition(obj: dict | None) -> dict:
    return condition(obj, "Ready")


class Watch:
    """`kubectl get --watch` on one object: every version the apiserver sends,
    so a condition that holds for a single tick is not missed. Stop it."""

    def __init__(self, cluster: Any, kind: str, name: str, namespace: str) -> None:
        self.versions: list[dict] = []
        self.proc = subprocess.Popen(
            [str(cluster.bin_dir / "kubectl"), f"--kubeconfig={cluster.kubeconfig}", "get", kind,
             name, "-n", namespace, "--watch", "-o", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        decoder, buffer = json.JSONDecoder(), ""
        for line in self.proc.stdout:
            buffer += line
            try:
                obj, end = decoder.raw_decode(buffer.strip())
            except ValueError:
                continue  # an object spans many lines: read on
            self.versions.append(obj)
            buffer = buffer.strip()[end:]

    def conditions(self, type_: str) -> list[dict]:
        """That condition in every version seen so far, oldest first."""
        return [c for v in list(self.versions) if (c := condition(v, type_))]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def is_ready(obj: dict | None) -> bool:
    """Ready=True for the object's current generation."""
    c = ready_condition(obj)
    return (
        c.get("status") == "True"
        and obj is not None
        and c.get("observedGeneration") == obj["metadata"].get("generation")
    )


def private_gpu_node(cluster: Any, name: str, gpus: int) -> None:
    """A kwok GPU Node (labelled and tainted like the dev cluster's gpu-node,
    `gpus` nvidia.com/gpu) that only pods tolerating `terrace.dev/test=NAME`
    land on: no other test's pods, requests or agent there. Waits until Ready;
    the caller deletes it."""
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", "type": "kwok",
                       "terrace.dev/accelerator": "nvidia"},
        },
        "spec": {"taints": [
            {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
            {"key": "terrace.dev/test", "value": name, "effect": "NoSchedule"},
        ]},
        "status": {
            "capacity": {"cpu": "16", "memory": "128Gi", "pods": "110",
                         "nvidia.com/gpu": str(gpus)},
            "allocatable": {"cpu": "16", "memory": "128Gi", "pods": "110",
                            "nvidia.com/gpu": str(gpus)},
        },
    }  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=json.dumps(node))
    wait_for(lambda: condition(get_or_none(cluster, "node", name, ""), "Ready").get("status")
             == "True", 60, what=f"node {name} Ready")  # fmt: skip


class OperatorProcess:
    """`terrace-operator` as a subprocess watching `namespaces`."""

    def __init__(
        self,
        cluster: Any,
        namespaces: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        wake: bool = False,
    ) -> None:
        self.cluster = cluster
        self.wake = wake  # serve the wake endpoint (on wake_port, chosen at start)
        self.wake_port = 0
        self.args = args or []
        self.namespaces = namespaces
        self.log_path = log_path
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None
        self.liveness_port = 0
        self.metrics_port = 0
        self._log_file: Any = None

    def command(self) -> list[str]:
        exe = shutil.which("terrace-operator")
        base = [exe] if exe else [sys.executable, "-m", "terrace_operator.cli"]
        return [*base, *self.args]

    def start(self, timeout: float = 60.0) -> OperatorProcess:
        """Start it and wait for its liveness endpoint. Its ports come from
        free_port(), free only until somebody else binds them: when the log
        says one was taken meanwhile, it starts again on new ones (3 tries)."""
        for attempt in range(1, START_ATTEMPTS + 1):
            mark = len(self.log_text())
            try:
                return self._start_once(timeout)
            except AssertionError:
                taken = PORT_TAKEN in self.log_text()[mark:].lower()
                self.stop()
                if not taken or attempt == START_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> OperatorProcess:
        kubeconfig = self.cluster.service_account_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_SA)
        self.liveness_port, self.metrics_port = free_port(), free_port()
        wake = {}
        if self.wake:
            self.wake_port = free_port()
            wake = {"TERRACE_WAKE_HOST": "127.0.0.1", "TERRACE_WAKE_PORT": str(self.wake_port)}
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "TERRACE_NAMESPACES": ",".join(self.namespaces),
            "TERRACE_LIVENESS_ENDPOINT": f"http://127.0.0.1:{self.liveness_port}/healthz",
            "TERRACE_METRICS_HOST": "127.0.0.1",
            "TERRACE_METRICS_PORT": str(self.metrics_port),
            "TERRACE_RUNTIME_IMAGE": "terrace:test",
            "TERRACE_ROUTER_IMAGE": "terrace:test",
            **wake,
            **self.extra_env,
        }
        self._log_file = open(self.log_path, "a")  # noqa: SIM115 (closed in stop)
        self._log_file.write(f"\n===== start {time.strftime('%H:%M:%S')} =====\n")
        self._log_file.flush()
        self.proc = subprocess.Popen(
            self.command(),
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(self._alive, timeout, what="operator liveness endpoint")
        return self

    def wake_url(self, namespace: str, name: str = "") -> str:
        """The wake endpoint for a tier (or, without `name`, its namespace's prefix)."""
        assert self.wake_port, "started with wake=True"
        return f"http://127.0.0.1:{self.wake_port}/wake/{namespace}" + (f"/{name}" if name else "")

    def _alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"terrace-operator exited early:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=1
            ) as r:
                return r.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        try:
            return self._alive()
        except AssertionError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2
        ) as r:
            return r.read().decode()

    def peak_rss_mb(self) -> float:
        """VmHWM: the most resident memory the process ever had."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc status")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class AgentProcess:
    """`terrace-agent` for one Node with `gpus` fake H100s (700 W default,
    200-700 W), as its ServiceAccount (`kubeconfig`); its /metrics on a port
    the OS picks (`port`); stopped by its PID. `load_file` holds the fake
    GPUs' utilisation (0..1) when given."""

    def __init__(
        self, kubeconfig: Path, node: str, log: Path, gpus: int = 1, load_file: Path | None = None
    ) -> None:
        exe = shutil.which("terrace-agent")
        cmd = [exe] if exe else [sys.executable, "-m", "terrace_operator.agent.cli"]
        mark = len(log.read_text(errors="replace")) if log.exists() else 0
        self.log_path = log
        self.log = open(log, "a")  # noqa: SIM115 - closed in stop()
        load = ["--fake-load-file", str(load_file)] if load_file is not None else []
        self.proc = subprocess.Popen(
            [*cmd, "--node-name", node, "--kubeconfig", str(kubeconfig),
             "--fake-gpus", str(gpus), "--fake-model", "h100", *load,
             "--metrics-address", "127.0.0.1", "--metrics-port", "0", "--interval", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            self.port = port_from_log(self.proc, log, AGENT_PORT, after=mark)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> int | None:
        """SIGTERM (the agent restores the default limits), then its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not self.log.closed:
            self.log.close()
        return self.proc.returncode
