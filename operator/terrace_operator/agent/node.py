"""The agent's only Kubernetes access: get, watch and patch its own Node
(and, with --advertise-resource, its status capacity)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

from kubernetes import client, config, watch

log = logging.getLogger("terrace.agent")


def load_kube_config(kubeconfig: str | None) -> client.ApiClient:
    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    return client.ApiClient(cfg)


class NodeAnnotations:
    """Keeps the Node's annotations fresh through a watch; patches them."""

    def __init__(self, api: client.ApiClient, node_name: str) -> None:
        self.v1 = client.CoreV1Api(api)
        self.node_name = node_name
        self.changed = threading.Event()
        self._annotations: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: watch.Watch | None = None

    @property
    def annotations(self) -> dict[str, str]:
        with self._lock:
            return dict(self._annotations)

    def refresh(self) -> dict[str, str]:
        node = self.v1.read_node(self.node_name)
        with self._lock:
            meta = node.metadata
            self._annotations = dict((meta.annotations if meta else None) or {})
            return dict(self._annotations)

    def patch(self, annotations: Mapping[str, str | None]) -> None:
        self.v1.patch_node(self.node_name, {"metadata": {"annotations": dict(annotations)}})

    def advertise(self, resource: str, count: int) -> None:
        """Set the Node's capacity of an extended resource (``nvidia.com/gpu``)
        to `count`, through the status subresource, as a device plugin's
        kubelet would; the kubelet then reports it allocatable too. For fake
        GPUs on kind, where no device plugin runs (Kubernetes docs:
        "Advertise Extended Resources for a Node")."""
        body = {"status": {"capacity": {resource: str(count)}}}
        self.v1.patch_node_status(self.node_name, body)
        log.info("advertised %s=%d on Node %s", resource, count, self.node_name)

    def start_watch(self) -> None:
        self._thread = threading.Thread(target=self._run, name="node-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def _run(self) -> None:
        # A field selector on metadata.name is authorised as the single named
        # Node, so RBAC can stay at get/watch/patch.
        while not self._stop.is_set():
            self._watch = watch.Watch()
            try:
                for event in self._watch.stream(
                    self.v1.list_node,
                    field_selector=f"metadata.name={self.node_name}",
                    timeout_seconds=60,
                ):
                    obj = event["object"]
                    with self._lock:
                        self._annotations = dict(obj.metadata.annotations or {})
                    self.changed.set()
                    if self._stop.is_set():
                        break
            except Exception as exc:  # network blips: back off and re-watch
                if self._stop.is_set():
                    break
                log.warning("node watch failed: %s; retrying", exc)
                self._stop.wait(2.0)
