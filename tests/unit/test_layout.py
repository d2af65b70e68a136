"""The package layout keeps Python's standard library intact and ships every entry point."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [
    "terrace-operator",
    "terrace-router",
    "terrace-runtime",
    "terrace-batch",
    "terrace-agent",
    "terrace-classifier",
]


def test_source_folders_are_not_packages() -> None:
    # A package named `operator` would shadow the standard library's module.
    assert not (ROOT / "operator" / "__init__.py").exists()
    assert not (ROOT / "router" / "__init__.py").exists()


def test_stdlib_operator_survives_repo_root_on_sys_path() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import operator; assert operator.itemgetter(1)([0, 7]) == 7, operator.__file__;"
        "print(operator.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "site-packages" not in out.stdout and str(ROOT) not in out.stdout, out.stdout


def test_import_packages_resolve_to_the_source_folders() -> None:
    import terrace_operator
    import terrace_router
    import terrace_runtime

    assert Path(terrace_operator.__file__).parent == ROOT / "operator" / "terrace_operator"
    assert Path(terrace_router.__file__).parent == ROOT / "router" / "terrace_router"
    assert Path(terrace_runtime.__file__).parent == ROOT / "runtime" / "terrace_runtime"


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_script_answers_help(script: str) -> None:
    path = shutil.which(script)
    assert path, f"{script} is not installed: run `pip install -e .`"
    out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()
