"""The kind cluster `make kind-up` started, as the kind tests reach it.

Everything goes through the real programs a user runs: kubectl and helm
(pinned, from hack/build-tools.sh) with the kubeconfig kind-up wrote,
`docker exec` into the nodes (crictl), and the `openai` client on the
router's node port, published on 127.0.0.1:8080 by kind-config.yaml.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(
    os.environ.get("TERRACE_KIND_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "terrace" / "kind"
)
DOCKER_HOST = "unix:///run/terrace-kind/docker.sock"  # hack/kind/lib.sh
ROUTER_URL = "http://127.0.0.1:8080"  # kind-config.yaml: node port 30080
RELEASE = "terrace"
SYSTEM_NS = "terrace-system"
NS = "demo"
API_KEY = "sk-terrace-demo-1"  # crds/samples/kind/tierrouter.yaml
VALUES = ROOT / "charts" / "terrace" / "ci" / "kind-values.yaml"
SAMPLES = ROOT / "crds" / "samples" / "kind"


@dataclass
class Kind:
    """Run kubectl, helm and docker against the kind cluster."""

    kubeconfig: Path = CACHE / "state" / "kubeconfig"

    @cached_property
    def tools(self) -> Path:
        out = subprocess.run(["bash", str(ROOT / "hack" / "build-tools.sh")], check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
        return Path(out.strip().splitlines()[-1])

    def _run(self, argv: list[str], timeout: float, check: bool) -> subprocess.CompletedProcess:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "DOCKER_HOST": DOCKER_HOST}
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:4])} ... failed ({p.returncode}): {p.stderr}")
        return p

    def kubectl(self, *args: str, timeout: float = 120, check: bool = True):
        return self._run([str(self.tools / "kubectl"), *args], timeout, check)

    def helm(self, *args: str, timeout: float = 300, check: bool = True):
        return self._run([str(self.tools / "helm"), *args], timeout, check)

    def docker(self, *args: str, timeout: float = 60, check: bool = True):
        return self._run(["docker", *args], timeout, check)

    def get(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def pods(self, namespace: str, selector: str) -> list[dict]:
        return self.get("pods", "-n", namespace, "-l", selector)["items"]

    def nodes(self) -> list[str]:
        return [n["metadata"]["name"] for n in self.get("nodes")["items"]]

    def containers_on_nodes(self) -> list[str]:
        """Every container's name on every node, from containerd (crictl)."""
        names = []
        for node in self.nodes():
            out = self.docker("exec", node, "crictl", "ps", "-a", "-o", "json").stdout
            names += [c["metadata"]["name"] for c in json.loads(out)["containers"]]
        return names

    def install(self, *extra: str) -> None:
        self.helm("upgrade", "--install", RELEASE, str(ROOT / "charts" / "terrace"),
                  "-n", SYSTEM_NS, "--create-namespace", "-f", str(VALUES), *extra,
                  "--wait", "--timeout", "300s")  # fmt: skip


def running(pod: dict) -> bool:
    """Running, every container ready, and not on its way out."""
    status = pod.get("status") or {}
    return (
        status.get("phase") == "Running"
        and not pod["metadata"].get("deletionTimestamp")
        and all(c.get("ready") for c in status.get("containerStatuses") or [{}])
    )
