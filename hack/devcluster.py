#!/usr/bin/env python3
"""A real Kubernetes control plane on 127.0.0.1, without a container engine.

etcd, kube-apiserver (TLS, RBAC, a service-account signing key), kube-
controller-manager, kube-scheduler and kwok (which fakes two nodes, `cpu-node`
and `gpu-node`, and the lifecycle of their pods), plus a real Prometheus.
Every binary is the real one, built by hack/build-tools.sh; certificates and
keys are generated per run; every process is started and stopped by PID.

    python hack/devcluster.py up   [--dir .cache/cluster]
    python hack/devcluster.py down [--dir .cache/cluster]
    python hack/devcluster.py status|env [--dir .cache/cluster]

Tests import `Cluster` from here (tests/conftest.py's `cluster` fixture).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / ".cache" / "cluster"
# Started in this order, stopped in reverse.
COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "prometheus",
)
READY_TIMEOUT_S = 60.0

NODES = """
apiVersion: v1
kind: Node
metadata:
  name: cpu-node
  annotations: {kwok.x-k8s.io/node: fake, node.alpha.kubernetes.io/ttl: "0"}
  labels:
    kubernetes.io/hostname: cpu-node
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
spec: {}
status:
  capacity: {cpu: "16", memory: 64Gi, pods: "110"}
  allocatable: {cpu: "16", memory: 64Gi, pods: "110"}
---
apiVersion: v1
kind: Node
metadata:
  name: gpu-node
  annotations: {kwok.x-k8s.io/node: fake, node.alpha.kubernetes.io/ttl: "0"}
  labels:
    kubernetes.io/hostname: gpu-node
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
    terrace.dev/accelerator: nvidia
spec:
  # Like GPU node pools on managed clouds: only pods that ask for a GPU (and
  # so get the toleration from the ExtendedResourceToleration admission
  # plugin) land here.
  taints:
  - {key: nvidia.com/gpu, value: present, effect: NoSchedule}
status:
  capacity: {cpu: "16", memory: 128Gi, pods: "110", nvidia.com/gpu: "1"}
  allocatable: {cpu: "16", memory: 128Gi, pods: "110", nvidia.com/gpu: "1"}
"""


class ClusterError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tools_dir() -> Path:
    """Build (or find, when the cache is warm) the real binaries; return their folder."""
    out = subprocess.run(
        ["bash", str(ROOT / "hack" / "build-tools.sh")], stdout=subprocess.PIPE, text=True
    )
    if out.returncode != 0:
        raise ClusterError("hack/build-tools.sh failed: see its output above (is Go installed?)")
    return Path(out.stdout.strip().splitlines()[-1])


def prometheus_binary() -> str:
    for candidate in (os.environ.get("TERRACE_PROMETHEUS"), "/usr/bin/prometheus"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise ClusterError(
        "prometheus not found: install Debian's package (apt-get install prometheus) "
        "or set TERRACE_PROMETHEUS to a prometheus binary"
    )


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(pki: Path) -> None:
    """A CA, the apiserver's serving cert, an admin client cert, a service-account key."""
    pki.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        f"{pki}/ca.key",
        "-out",
        f"{pki}/ca.crt",
        "-days",
        "3650",
        "-subj",
        "/CN=terrace-dev-ca",
    )
    sans = (
        "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    )
    for name, subject, ext in (
        ("apiserver", "/CN=kube-apiserver", sans),
        ("admin", "/O=system:masters/CN=terrace-admin", "extendedKeyUsage=clientAuth"),
    ):
        _openssl(
            "req",
            *ec,
            "-keyout",
            f"{pki}/{name}.key",
            "-out",
            f"{pki}/{name}.csr",
            "-subj",
            subject,
            "-addext",
            ext,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{pki}/{name}.csr",
            "-CA",
            f"{pki}/ca.crt",
            "-CAkey",
            f"{pki}/ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-copy_extensions",
            "copyall",
            "-out",
            f"{pki}/{name}.crt",
        )
    _openssl("genrsa", "-out", f"{pki}/sa.key", "2048")
    _openssl("rsa", "-in", f"{pki}/sa.key", "-pubout", "-out", f"{pki}/sa.pub")


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), if alive."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie has exited
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        except ChildProcessError:
            pass
        return None
    return fields[19]


def kubeconfig_yaml(server: str, ca_file: Path, user: dict) -> str:
    ca = base64.b64encode(ca_file.read_bytes()).decode()
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "terrace-dev", "cluster": {"server": server, "certificate-authority-data": ca}}
        ],
        "users": [{"name": "user", "user": user}],
        "contexts": [
            {"name": "terrace-dev", "context": {"cluster": "terrace-dev", "user": "user"}}
        ],
        "current-context": "terrace-dev",
    }
    return json.dumps(doc, indent=2)  # JSON is YAML


@dataclass
class Cluster:
    """One dev cluster, living in `dir` (state, logs, PIDs, kubeconfig)."""

    dir: Path = DEFAULT_DIR
    bin_dir: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)

    # -- paths and facts -------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def ca_file(self) -> Path:
        return self.dir / "pki" / "ca.crt"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['prometheus']}"

    @property
    def targets_dir(self) -> Path:
        return self.dir / "prometheus" / "targets"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        if self.bin_dir:
            env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _pidfile(self, name: str) -> Path:
        return self.dir / "pids" / f"{name}.pid"

    def _state(self) -> Path:
        return self.dir / "state.json"

    @classmethod
    def attach(cls, dir: Path = DEFAULT_DIR) -> Cluster | None:
        """The cluster already running in `dir`, or None."""
        state = Path(dir) / "state.json"
        if not state.exists():
            return None
        data = json.loads(state.read_text())
        c = cls(dir=Path(dir), bin_dir=Path(data["bin_dir"]), ports=data["ports"])
        return c if c.healthy() else None

    # -- processes ---------------------------------------------------------
    def _pid(self, name: str) -> int | None:
        """PID of our own `name` process if it is alive; never a recycled PID.

        The pidfile holds the PID and the process's start time (from
        /proc/PID/stat); a PID whose start time differs belongs to someone else.
        """
        try:
            pid_s, started = self._pidfile(name).read_text().split()
            pid = int(pid_s)
        except (OSError, ValueError):
            return None
        return pid if _start_time(pid) == started else None

    def _exited(self, name: str) -> bool:
        """True when `name` was started and its process is gone."""
        return self._pidfile(name).exists() and self._pid(name) is None

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.dir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.dir,
        )
        log.close()
        self._pidfile(name).write_text(f"{proc.pid} {_start_time(proc.pid)}")

    def _stop(self, name: str, timeout: float = 10.0) -> None:
        pid = self._pid(name)
        if pid is None:
            self._pidfile(name).unlink(missing_ok=True)
            return
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._alive(pid):
            time.sleep(0.1)
        if self._alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            while self._alive(pid):
                time.sleep(0.05)
        self._pidfile(name).unlink(missing_ok=True)

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            # A zombie of ours counts as gone: reap it.
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return False
        except ChildProcessError:
            pass
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"

    def running(self) -> list[str]:
        return [n for n in COMPONENTS if self._pid(n) is not None]

    # -- health --------------------------------------------------------------
    def _get(self, url: str, timeout: float = 2.0) -> tuple[int, str]:
        ctx = None
        if url.startswith("https://"):
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
            pki = self.dir / "pki"
            ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        try:
            with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (OSError, ssl.SSLError) as e:
            return 0, str(e)

    def healthy(self) -> bool:
        if set(self.running()) != set(COMPONENTS):
            return False
        return (
            self._get(f"{self.server}/readyz")[0] == 200
            and self._get(f"{self.prometheus_url}/-/ready")[0] == 200
        )

    def _wait(self, what: str, check, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            ok, last = check()
            if ok:
                return
            dead = [n for n in COMPONENTS if self._exited(n)]
            if dead:
                raise ClusterError(
                    f"{', '.join(dead)} exited while waiting for {what}:\n"
                    f"{self._log_tail(dead[0])}\n(logs in {self.dir / 'logs'})"
                )
            time.sleep(0.2)
        raise ClusterError(f"timed out waiting for {what}: {last}; logs in {self.dir / 'logs'}")

    def _log_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join(
                (self.dir / "logs" / f"{name}.log")
                .read_text(errors="replace")
                .splitlines()[-lines:]
            )
        except OSError:
            return "(no log)"

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess:
        assert self.bin_dir is not None
        proc = subprocess.run(
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise ClusterError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc

    # -- lifecycle -------------------------------------------------------------
    def up(self) -> bool:
        """Start everything; False (and nothing changed) when already running."""
        existing = Cluster.attach(self.dir)
        if existing is not None:
            self.bin_dir, self.ports = existing.bin_dir, existing.ports
            return False
        if self.dir.exists():  # a half-dead earlier run: clear it first
            self.down()
        started = time.monotonic()
        self.bin_dir = self.bin_dir or tools_dir()
        prometheus = prometheus_binary()
        for attempt in (1, 2):
            for sub in ("pki", "logs", "pids", "etcd", "prometheus/data", "prometheus/targets"):
                (self.dir / sub).mkdir(parents=True, exist_ok=True)
            self.ports = {
                k: free_port() for k in ("etcd", "etcd_peer", "apiserver", "kwok", "prometheus")
            }
            try:
                self._start_all(prometheus)
                break
            except ClusterError as e:
                # A port taken between choosing and binding it is the usual cause on
                # a busy machine: one more try from scratch, with new ports.
                self.stop_processes()
                if attempt == 2:
                    raise
                print(
                    f"devcluster: start failed ({str(e).splitlines()[0]}); retrying",
                    file=sys.stderr,
                )
                self.down()
            except BaseException:
                self.stop_processes()  # keep the logs for the post-mortem; the next `up` clears them
                raise
        self._state().write_text(json.dumps({"bin_dir": str(self.bin_dir), "ports": self.ports}))
        print(f"cluster up in {time.monotonic() - started:.1f}s", file=sys.stderr)
        return True

    def _start_all(self, prometheus: str) -> None:
        b, d, p = self.bin_dir, self.dir, self.ports
        pki = d / "pki"
        make_pki(pki)
        self.kubeconfig.write_text(
            kubeconfig_yaml(
                self.server,
                self.ca_file,
                {
                    "client-certificate-data": base64.b64encode(
                        (pki / "admin.crt").read_bytes()
                    ).decode(),
                    "client-key-data": base64.b64encode((pki / "admin.key").read_bytes()).decode(),
                },
            )
        )
        etcd_url = f"http://127.0.0.1:{p['etcd']}"
        peer_url = f"http://127.0.0.1:{p['etcd_peer']}"
        self._spawn(
            "etcd",
            [
                str(b / "etcd"),
                "--name=terrace",
                f"--data-dir={d / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=terrace={peer_url}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self._wait("etcd", lambda: (self._get(f"{etcd_url}/health")[0] == 200, "etcd /health"))
        self._spawn(
            "kube-apiserver",
            [
                str(b / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={p['apiserver']}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--authorization-mode=RBAC",
                "--service-cluster-ip-range=10.96.0.0/16",
                # No kubelets and no real pod network: nothing may dial 127.0.0.1 as an endpoint.
                "--endpoint-reconciler-type=none",
                "--enable-admission-plugins=ExtendedResourceToleration",
                "--allow-privileged=true",
                "--profiling=false",
            ],
        )
        self._wait("kube-apiserver /readyz", lambda: self._ready(f"{self.server}/readyz"))
        common = [
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
        ]
        self._spawn(
            "kube-controller-manager",
            [
                str(b / "kube-controller-manager"),
                *common,
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=false",
                "--controllers=*",
            ],
        )
        self._spawn("kube-scheduler", [str(b / "kube-scheduler"), *common])
        self._spawn(
            "kwok",
            [
                str(b / "kwok"),
                f"--kubeconfig={self.kubeconfig}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                f"--server-address=127.0.0.1:{p['kwok']}",
                "--node-ip=10.240.0.1",
                "--cidr=10.244.0.0/16",
                "--node-lease-duration-seconds=40",
                f"--config={ROOT / 'hack' / 'kwok-stages.yaml'}",
            ],
        )
        self._write_prometheus_config()
        self._spawn(
            "prometheus",
            [
                prometheus,
                f"--config.file={d / 'prometheus' / 'prometheus.yml'}",
                f"--storage.tsdb.path={d / 'prometheus' / 'data'}",
                f"--web.listen-address=127.0.0.1:{p['prometheus']}",
                "--web.enable-lifecycle",
                "--storage.tsdb.retention.time=1d",
            ],
        )
        self.kubectl("apply", "-f", "-", input=NODES)
        self._wait("nodes Ready", self._nodes_ready)
        # The service-account controller makes the `default` SA that pods need.
        self._wait(
            "default ServiceAccount",
            lambda: (
                self.kubectl(
                    "get", "serviceaccount", "default", "-n", "default", check=False
                ).returncode
                == 0,
                "serviceaccount default/default",
            ),
        )
        self._wait("Prometheus", lambda: self._ready(f"{self.prometheus_url}/-/ready"))

    def _ready(self, url: str) -> tuple[bool, str]:
        status, body = self._get(url)
        return status == 200, f"{url} -> {status} {body[:200]}"

    def _nodes_ready(self) -> tuple[bool, str]:
        out = self.kubectl(
            "get",
            "nodes",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=='Ready')].status} {end}",
            check=False,
        )
        ready = {kv.split("=")[0] for kv in out.stdout.split() if kv.endswith("=True")}
        return {"cpu-node", "gpu-node"} <= ready, out.stdout or out.stderr

    def _write_prometheus_config(self) -> None:
        prom = self.dir / "prometheus"
        config = {
            "global": {
                "scrape_interval": "1s",
                "evaluation_interval": "1s",
                "scrape_timeout": "1s",
            },
            "scrape_configs": [
                {
                    "job_name": "prometheus",
                    "static_configs": [{"targets": [f"127.0.0.1:{self.ports['prometheus']}"]}],
                },
                {
                    "job_name": "etcd",
                    "static_configs": [{"targets": [f"127.0.0.1:{self.ports['etcd']}"]}],
                },
                # Terrace's own processes (router, runtimes, agent) register here;
                # a target file may set `job` and any other label.
                {
                    "job_name": "terrace",
                    "file_sd_configs": [
                        {"files": [str(prom / "targets" / "*.json")], "refresh_interval": "1s"}
                    ],
                },
            ],
        }
        (prom / "prometheus.yml").write_text(json.dumps(config, indent=2))

    def stop_processes(self) -> None:
        for name in reversed(COMPONENTS):
            self._stop(name)

    def down(self) -> None:
        self.stop_processes()
        if self.dir.exists():
            subprocess.run(["rm", "-rf", str(self.dir)], check=False)

    # -- helpers for tests and the demo -----------------------------------
    def add_scrape_target(
        self, job: str, address: str, labels: dict[str, str] | None = None
    ) -> None:
        """Have Prometheus scrape `address` (host:port) as `job`, with extra labels."""
        group = [{"targets": [address], "labels": {"job": job, **(labels or {})}}]
        tmp = self.targets_dir / f".{job}.json.tmp"
        tmp.write_text(json.dumps(group))
        tmp.replace(self.targets_dir / f"{job}.json")  # atomic: Prometheus never reads half a file

    def remove_scrape_target(self, job: str) -> None:
        (self.targets_dir / f"{job}.json").unlink(missing_ok=True)

    def stop_prometheus(self) -> None:
        self._stop("prometheus")

    def start_prometheus(self) -> None:
        if self._pid("prometheus") is None:
            self._spawn(
                "prometheus",
                [
                    prometheus_binary(),
                    f"--config.file={self.dir / 'prometheus' / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.dir / 'prometheus' / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.ports['prometheus']}",
                    "--web.enable-lifecycle",
                    "--storage.tsdb.retention.time=1d",
                ],
            )
        self._wait("Prometheus", lambda: self._ready(f"{self.prometheus_url}/-/ready"))

    def stop_component(self, name: str) -> None:
        """Stop one component by PID (the others keep running), keeping its
        command line for start_component. Stopping etcd leaves the apiserver
        running but not ready."""
        if name not in COMPONENTS:
            raise ClusterError(f"unknown component {name!r}: one of {', '.join(COMPONENTS)}")
        pid = self._pid(name)
        if pid is None:
            raise ClusterError(f"{name} is not running")
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        (self.dir / "pids" / f"{name}.argv").write_text(json.dumps([a.decode() for a in argv]))
        self._stop(name)

    def start_component(self, name: str, timeout: float = READY_TIMEOUT_S) -> None:
        """Start a component stop_component stopped, with the same command line
        (same ports, data and certificates); wait until the cluster is healthy."""
        saved = self.dir / "pids" / f"{name}.argv"
        if self._pid(name) is None:
            if not saved.exists():
                raise ClusterError(f"{name} was not stopped by stop_component")
            self._spawn(name, json.loads(saved.read_text()))
        saved.unlink(missing_ok=True)
        self._wait(
            f"{name} restarted, cluster healthy",
            lambda: (self.healthy(), f"running: {self.running()}"),
            timeout,
        )

    def restart(self, name: str) -> None:
        """Stop one component and start it again (stop_component, start_component)."""
        self.stop_component(name)
        self.start_component(name)

    def service_account_kubeconfig(self, namespace: str, name: str, duration: str = "24h") -> Path:
        """A kubeconfig that authenticates as a ServiceAccount (a TokenRequest token)."""
        token = self.kubectl(
            "create", "token", name, "-n", namespace, f"--duration={duration}"
        ).stdout.strip()
        path = self.dir / f"kubeconfig-{namespace}-{name}"
        path.write_text(kubeconfig_yaml(self.server, self.ca_file, {"token": token}))
        return path

    def describe(self) -> str:
        return (
            f"Kubernetes API:  {self.server}\n"
            f"Prometheus:      {self.prometheus_url}\n"
            f"Logs:            {self.dir / 'logs'}\n\n"
            f"Use it:\n  export KUBECONFIG={self.kubeconfig}\n  export PATH={self.bin_dir}:$PATH\n"
            f"  kubectl get nodes\n"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["up", "down", "status", "env"])
    ap.add_argument(
        "--dir", type=Path, default=Path(os.environ.get("TERRACE_CLUSTER_DIR", DEFAULT_DIR))
    )
    args = ap.parse_args(argv)
    cluster = Cluster(dir=args.dir.resolve())
    try:
        if args.command == "up":
            if not cluster.up():
                print("cluster already running (make cluster-down to stop it)", file=sys.stderr)
            print(cluster.describe())
        elif args.command == "down":
            running = cluster.running()
            cluster.down()
            print(f"stopped {', '.join(running) or 'nothing (no cluster was running)'}")
        elif args.command == "status":
            attached = Cluster.attach(cluster.dir)
            if attached is None:
                print("no healthy cluster in", cluster.dir)
                return 1
            print(attached.describe())
        elif args.command == "env":
            attached = Cluster.attach(cluster.dir)
            if attached is None:
                print("no healthy cluster in", cluster.dir, file=sys.stderr)
                return 1
            print(
                f"export KUBECONFIG={attached.kubeconfig}\nexport PATH={attached.bin_dir}:$PATH\n"
                f"export PROMETHEUS_URL={attached.prometheus_url}"
            )
    except ClusterError as e:
        print(f"devcluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
