"""Run the pods kwok fakes as local processes: a kubelet stand-in for Terrace.

kwok makes pods Running and Ready without running their containers. For the
demo and the end-to-end test, Terrace's own pods must really serve, so this
module watches the pods of Terrace's images (operator, router, runtime,
agent) and runs each Ready pod's container command as a local process — the
same entry point the image runs — with the few things a kubelet would have
provided translated to this machine:

- ports: every process binds 127.0.0.1 on a free port (no pod network);
- Services: the router's routing table (its ConfigMap) names tiers by their
  Service URL; here each tier's Service resolves to the local addresses of its
  Ready pods' processes, rewritten into a local copy of the table whenever
  pods come or go (the router hot-reloads it, as it would a ConfigMap);
- volumes: the ConfigMap and Secret mounts become local files; model URIs
  under /models/ point into a local folder of demo models;
- ServiceAccounts: the process gets a kubeconfig holding a token for its pod's
  ServiceAccount (so RBAC is the chart's, not an administrator's);
- scraping: each process is registered with the dev cluster's Prometheus with
  `namespace`, `pod` and `tier` (or `router`, `node`) labels;
- no GPU here: a pod asking for CUDA runs on the CPU (the fake-GPU agent
  models the watts).

Scale a Deployment and processes start or stop with its pods; delete a pod and
its process goes. Everything it starts it stops, by PID.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from devcluster import Cluster, free_port
from kubernetes import client, config

log = logging.getLogger("podrunner")
IMAGES = ("terrace-operator", "terrace-router", "terrace-runtime", "terrace-agent")
# External tiers' images that run as a local program: llama.cpp's server image
# runs the llama-server that hack/build-llama-server.sh built from source.
EXTERNAL_IMAGES = {"ghcr.io/ggml-org/llama.cpp:server": "llama-server"}
NO_ENDPOINT = "http://127.0.0.1:9"  # discard port: refused, so the router moves on


@dataclass
class LocalPod:
    uid: str
    namespace: str
    name: str
    program: str
    port: int
    proc: subprocess.Popen
    labels: dict[str, str]
    node: str = ""
    ready: bool = False
    router_config: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class PodRunner:
    cluster: Cluster
    namespaces: list[str]
    models_dir: Path
    work_dir: Path
    # Extra arguments per program, e.g. {"terrace-agent": ["--fake-load-url", ...]}.
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    pods: dict[str, LocalPod] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _busy: dict[str, tuple[float, float]] = field(default_factory=dict)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        api = config.new_client_from_config(config_file=str(self.cluster.kubeconfig))
        self.core = client.CoreV1Api(api)
        self._has_cuda = shutil.which("nvidia-smi") is not None

    # -- the loop ----------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="podrunner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception:  # a glitch in one pass must not end the runner
                log.exception("podrunner pass failed")
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        for uid in list(self.pods):
            self._kill(uid)

    def sync(self) -> None:
        wanted: dict[str, Any] = {}
        for ns in self.namespaces:
            for pod in self.core.list_namespaced_pod(ns).items:
                if (
                    self._program(pod)
                    and pod.metadata.deletion_timestamp is None
                    and pod.status.phase == "Running"
                ):
                    wanted[pod.metadata.uid] = pod
        for uid in [u for u in self.pods if u not in wanted]:
            self._kill(uid)
        for uid, pod in wanted.items():
            local = self.pods.get(uid)
            if local is not None and local.proc.poll() is not None:
                log.warning(
                    "%s/%s exited with %s; restarting",
                    local.namespace,
                    local.name,
                    local.proc.returncode,
                )
                self._kill(uid)
                local = None
            if local is None:
                self._launch(pod)
                # Like a kubelet's readiness probe: the pod is Ready only once
                # its process answers (kwok marked it Ready at once). So the
                # Deployment's readyReplicas are honest, and a scale-down
                # removes a pod that is still loading, not one that serves.
                self._set_ready(self.pods[uid], False)
        for local in self.pods.values():
            if not local.ready and _answers(local):
                local.ready = True
                self._set_ready(local, True)
        for local in self.pods.values():
            if local.program == "terrace-router":
                self._render_router_config(local)
        self._write_gpu_loads()

    # -- what a fake GPU sees --------------------------------------------------
    def _load_file(self, node: str) -> Path:
        return self.work_dir / f"gpu-load-{node}.json"

    def _write_gpu_loads(self) -> None:
        """Per node with a fake-GPU agent: the busy fraction of the runtimes placed there."""
        now = time.monotonic()
        for agent in [p for p in self.pods.values() if p.program == "terrace-agent"]:
            busy = 0.0
            for rt in self.pods.values():
                if rt.program == "terrace-runtime" and rt.node == agent.node and rt.ready:
                    busy += _busy_seconds(rt)
            last = self._busy.get(agent.node)
            self._busy[agent.node] = (now, busy)
            if last is None or now - last[0] < 0.2:
                continue
            utilization = max(0.0, min(1.0, (busy - last[1]) / (now - last[0])))
            tmp = self._load_file(agent.node).with_suffix(".tmp")
            tmp.write_text(f'{{"*": {utilization:.3f}}}')
            tmp.replace(self._load_file(agent.node))

    # -- one pod -------------------------------------------------------------
    @staticmethod
    def _program(pod: Any) -> str | None:
        for c in pod.spec.containers[:1]:
            argv = [*(c.command or []), *(c.args or [])]
            if argv and argv[0] in IMAGES:
                return argv[0]
            if c.image in EXTERNAL_IMAGES:
                return EXTERNAL_IMAGES[c.image]
        return None

    def _launch(self, pod: Any) -> None:
        c = pod.spec.containers[0]
        argv = [*(c.command or []), *(c.args or [])]
        program = self._program(pod) or argv[0]
        port = free_port()
        meta = pod.metadata
        env = {**os.environ, **self._env(pod, c)}
        local_dir = self.work_dir / f"{meta.namespace}-{meta.name}"
        local_dir.mkdir(parents=True, exist_ok=True)
        router_config = None
        if program == "terrace-runtime":
            argv = self._runtime_argv(argv, port)
        elif program == "terrace-router":
            router_config = local_dir / "router.yaml"
            argv = _set_flag(_set_flag(argv, "--port", str(port)), "--config", str(router_config))
            argv = _set_flag(argv, "--host", "127.0.0.1")
        elif program == "llama-server":
            # The image's entrypoint is the server; its args are the pod's.
            argv = [_llama_server(), *(c.args or [])]
            argv = _set_flag(_set_flag(argv, "--port", str(port)), "--host", "127.0.0.1")
            model = _get_flag(argv, "-m") or _get_flag(argv, "--model")
            if model and model.startswith("/models/"):
                argv = _set_flag(argv, "-m", str(self.models_dir / model[len("/models/") :]))
        elif program == "terrace-agent":
            argv = _set_flag(argv, "--metrics-port", str(port))
            argv = _set_flag(argv, "--metrics-address", "127.0.0.1")
            argv = _set_flag(argv, "--kubeconfig", str(self._sa_kubeconfig(pod)))
            if _get_flag(argv, "--fake-gpus") not in (None, "0"):
                # The fake GPU's demand is what the GPU pods on its node keep busy.
                argv = _set_flag(
                    argv, "--fake-load-file", str(self._load_file(pod.spec.node_name or ""))
                )
        elif program == "terrace-operator":
            env["KUBECONFIG"] = str(self._sa_kubeconfig(pod))
            env["TERRACE_METRICS_HOST"] = "127.0.0.1"
            env["TERRACE_METRICS_PORT"] = str(port)
            env["TERRACE_LIVENESS_ENDPOINT"] = f"http://127.0.0.1:{free_port()}/healthz"
        argv += self.extra_args.get(program, [])
        local = LocalPod(
            uid=meta.uid,
            namespace=meta.namespace,
            name=meta.name,
            program=program,
            port=port,
            proc=None,
            labels=dict(meta.labels or {}),  # type: ignore[arg-type]
            node=pod.spec.node_name or "",
            router_config=router_config,
        )
        if router_config is not None:
            self._render_router_config(local, force=True)
        logf = open(local_dir / "log", "ab")  # noqa: SIM115 - handed to the child
        local.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=local_dir,
        )
        logf.close()
        self.pods[meta.uid] = local
        self.cluster.add_scrape_target(
            self._job(local), f"127.0.0.1:{port}", self._scrape_labels(local, pod)
        )
        log.info(
            "started %s/%s (%s) on %s, pid %s",
            meta.namespace,
            meta.name,
            program,
            local.url,
            local.proc.pid,
        )

    def _set_ready(self, local: LocalPod, ready: bool) -> None:
        status = "True" if ready else "False"
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        conditions = [{"type": t, "status": status, "lastTransitionTime": now}
                      for t in ("Ready", "ContainersReady")]
        try:
            self.core.patch_namespaced_pod_status(
                local.name, local.namespace, {"status": {"conditions": conditions}})
        except client.ApiException as e:
            if e.status != 404:  # a pod deleted meanwhile needs no status
                raise

    def _runtime_argv(self, argv: list[str], port: int) -> list[str]:
        argv = _set_flag(_set_flag(argv, "--port", str(port)), "--host", "127.0.0.1")
        model = _get_flag(argv, "--model")
        if model:
            path = urlparse(model).path if model.startswith("file://") else model
            if path.startswith("/models/"):
                argv = _set_flag(argv, "--model", str(self.models_dir / path[len("/models/") :]))
        if _get_flag(argv, "--device") == "cuda" and not self._has_cuda:
            argv = _set_flag(argv, "--device", "cpu")
        return argv

    def _env(self, pod: Any, c: Any) -> dict[str, str]:
        env: dict[str, str] = {}
        field_values = {
            "spec.nodeName": pod.spec.node_name or "",
            "metadata.name": pod.metadata.name,
            "metadata.namespace": pod.metadata.namespace,
        }
        for e in c.env or []:
            if e.value is not None:
                env[e.name] = e.value
            elif e.value_from and e.value_from.field_ref:
                env[e.name] = field_values.get(e.value_from.field_ref.field_path, "")
        return env

    def _sa_kubeconfig(self, pod: Any) -> Path:
        return self.cluster.service_account_kubeconfig(
            pod.metadata.namespace, pod.spec.service_account_name or "default"
        )

    @staticmethod
    def _job(local: LocalPod) -> str:
        return f"pod-{local.namespace}-{local.name}"

    @staticmethod
    def _scrape_labels(local: LocalPod, pod: Any) -> dict[str, str]:
        labels = {"namespace": local.namespace, "pod": local.name, "program": local.program}
        tier = local.labels.get("terrace.dev/modeltier")
        router = local.labels.get("terrace.dev/tierrouter")
        if tier:
            labels["tier"] = tier
        if router:
            labels["router"] = router
        if local.program == "terrace-agent":
            labels["node"] = pod.spec.node_name or ""
        return labels

    def _kill(self, uid: str) -> None:
        local = self.pods.pop(uid)
        self.cluster.remove_scrape_target(self._job(local))
        if local.proc.poll() is None:
            os.killpg(local.proc.pid, signal.SIGTERM)
            try:
                local.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(local.proc.pid, signal.SIGKILL)
                local.proc.wait()
        log.info("stopped %s/%s (%s)", local.namespace, local.name, local.program)

    # -- Services and volumes, the local way ---------------------------------
    def _render_router_config(self, router: LocalPod, force: bool = False) -> None:
        """Write the router's table with each tier's Service resolved to its Ready local pods."""
        from terrace_router.config import RouterConfig

        pod = self.core.read_namespaced_pod(router.name, router.namespace)
        mounts = {m.name: m.mount_path for m in pod.spec.containers[0].volume_mounts or []}
        table: dict | None = None
        files: dict[str, dict[str, bytes]] = {}
        for vol in pod.spec.volumes or []:
            if vol.config_map is not None:
                cm = self.core.read_namespaced_config_map(vol.config_map.name, router.namespace)
                data, items = (
                    {k: v.encode() for k, v in (cm.data or {}).items()},
                    vol.config_map.items,
                )
            elif vol.secret is not None:
                secret = self.core.read_namespaced_secret(vol.secret.secret_name, router.namespace)
                data, items = (
                    {k: base64.b64decode(v) for k, v in (secret.data or {}).items()},
                    vol.secret.items,
                )
            else:
                continue
            # Like the kubelet: `items` maps keys to file names; without it every key is a file.
            if items:
                data = {i.path: data[i.key] for i in items if i.key in data}
            files[mounts.get(vol.name, "")] = data
        for content in files.values():
            for key, data in content.items():
                if key.endswith((".yaml", ".yml", ".json")) and b"tiers" in data:
                    table = yaml.safe_load(data)
        if table is None:
            return
        cfg = RouterConfig.model_validate(table)
        tiers = []
        for tier in cfg.tiers:
            endpoints = []
            for url in tier.endpoints:
                host = urlparse(url).hostname or ""
                service = host.split(".")[0]
                namespace = host.split(".")[1] if host.count(".") >= 2 else router.namespace
                endpoints += self._service_endpoints(namespace, service)
            tiers.append(tier.model_copy(update={"endpoints": sorted(endpoints) or [NO_ENDPOINT]}))
        auth = cfg.auth
        if auth.api_keys_file:
            mount_dir, key = os.path.split(auth.api_keys_file)
            secret_files = files.get(mount_dir) or {}
            if key in secret_files:
                local_keys = router.router_config.parent / "api-keys"
                local_keys.write_bytes(secret_files[key])
                auth = auth.model_copy(update={"api_keys_file": str(local_keys)})
        rendered = cfg.model_copy(update={"tiers": tiers, "auth": auth}).dump()
        target = router.router_config
        if force or not target.exists() or target.read_text() != rendered:
            tmp = target.with_suffix(".tmp")
            tmp.write_text(rendered)
            tmp.replace(target)

    def _service_endpoints(self, namespace: str, service: str) -> list[str]:
        try:
            svc = self.core.read_namespaced_service(service, namespace)
        except client.ApiException:
            return []
        selector = svc.spec.selector or {}
        return [
            p.url
            for p in self.pods.values()
            if p.namespace == namespace
            and p.ready
            and selector
            and all(p.labels.get(k) == v for k, v in selector.items())
        ]

    def wait_ready(self, predicate, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(list(self.pods.values())):
                return
            time.sleep(0.5)
        raise TimeoutError(
            "local pods did not become ready: "
            + ", ".join(
                f"{p.namespace}/{p.name}({'ready' if p.ready else 'starting'})"
                for p in self.pods.values()
            )
        )




def _llama_server() -> str:
    """The llama-server binary (built once; a no-op when warm)."""
    root = Path(__file__).resolve().parent
    done = subprocess.run(
        ["bash", str(root / "build-llama-server.sh")], capture_output=True, text=True, check=True
    )
    return done.stdout.strip().splitlines()[-1]


def _answers(local: LocalPod) -> bool:
    path = {
        "terrace-runtime": "/v2/health/ready",
        "terrace-router": "/readyz",
        "llama-server": "/health",
    }.get(local.program, "/metrics")
    if local.program == "terrace-operator":
        return local.proc.poll() is None
    try:
        with urllib.request.urlopen(local.url + path, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _busy_seconds(local: LocalPod) -> float:
    try:
        with urllib.request.urlopen(local.url + "/metrics", timeout=1) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("terrace_runtime_busy_seconds_total")
    )


def _get_flag(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    out: list[str] = []
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == flag and i + 1 < len(argv):
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return [*out, flag, value]
