"""kind-config.yaml is checked by kind's own loader and validator.

kind needs a container engine to create a cluster, and CI has none. kind
loads and validates the config before it touches a node, so we run the real
`kind create cluster` with a stand-in `docker` on PATH that answers kind's
two read-only questions (engine info, existing nodes) and refuses the first
command that would create something. Reaching that refusal means kind
accepted the file; a bad file fails earlier, with kind's own message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "hack"))
from devcluster import tools_dir  # noqa: E402

STOP = "terrace-kind-check: config accepted; refusing to create"
FAKE_DOCKER = f"""#!/bin/sh
case "$1" in
  -v|--version|version) echo "Docker version 28.0.0, build terrace-check" ;;
  info) echo '{{"CgroupDriver":"systemd","CgroupVersion":"2","MemoryLimit":true,"PidsLimit":true,"CPUShares":true,"SecurityOptions":[]}}' ;;
  ps) exit 0 ;;
  *) echo "{STOP} ($1)" >&2; exit 97 ;;
esac
"""


def kind_create(config: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "docker").write_text(FAKE_DOCKER)
    (shim / "docker").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{shim}:{os.environ['PATH']}",
        "KIND_EXPERIMENTAL_PROVIDER": "docker",
        "HOME": str(tmp_path),
    }
    return subprocess.run(
        [
            str(tools_dir() / "kind"),
            "create",
            "cluster",
            "--config",
            str(config),
            "--kubeconfig",
            str(tmp_path / "kubeconfig"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_kind_accepts_our_config(tmp_path: Path) -> None:
    out = kind_create(ROOT / "kind-config.yaml", tmp_path)
    assert out.returncode != 0  # it cannot create anything here
    assert STOP in out.stdout + out.stderr, out.stderr


@pytest.mark.parametrize(
    ("mutation", "complaint"),
    [
        (lambda s: s.replace("role: worker", "rol: worker", 1), "rol"),
        (lambda s: s.replace("hostPort: 8080", "hostPort: eighty"), "eighty"),
        (lambda s: s.replace("role: worker", "role: foreman", 1), "foreman"),
        (
            lambda s: s.replace(
                "apiVersion: kind.x-k8s.io/v1alpha4", "apiVersion: kind.x-k8s.io/v9"
            ),
            "v9",
        ),
    ],
)
def test_kind_rejects_a_broken_config(tmp_path: Path, mutation, complaint: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(mutation((ROOT / "kind-config.yaml").read_text()))
    out = kind_create(bad, tmp_path)
    assert out.returncode != 0
    assert STOP not in out.stdout + out.stderr
    assert complaint in out.stderr, out.stderr
