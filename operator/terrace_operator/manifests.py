"""Plain Kubernetes manifests shipped inside the package (the operator's RBAC).

The Helm chart renders the same files; tests and benchmarks apply them with
the namespace filled in, so the RBAC that is tested is the RBAC that ships.
"""

from __future__ import annotations

from importlib.resources import files

import yaml

PLACEHOLDER_NAMESPACE = "terrace-system"
RBAC_FILES = (
    "serviceaccount.yaml",
    "clusterrole.yaml",
    "clusterrolebinding.yaml",
    "role.yaml",
    "rolebinding.yaml",
)
NAMESPACED = ("ServiceAccount", "Role", "RoleBinding")


def rbac(namespace: str = PLACEHOLDER_NAMESPACE) -> list[dict]:
    """ServiceAccount, ClusterRole and ClusterRoleBinding for `namespace`,
    and the Role and RoleBinding of its leader-election Lease there."""
    docs = []
    folder = files("terrace_operator") / "rbac"
    for name in RBAC_FILES:
        doc = yaml.safe_load((folder / name).read_text())
        if doc["kind"] in NAMESPACED:
            doc["metadata"]["namespace"] = namespace
        for subject in doc.get("subjects", []):
            subject["namespace"] = namespace
        docs.append(doc)
    return docs


def rbac_yaml(namespace: str = PLACEHOLDER_NAMESPACE) -> str:
    return yaml.safe_dump_all(rbac(namespace), sort_keys=False)
