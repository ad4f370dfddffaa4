"""The code stays lint-clean and type-checked, and the layout keeps its boundaries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "meshgate"


def test_ruff_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "src", "tests", "bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "src/meshgate"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _imports(package: str) -> set[str]:
    found: set[str] = set()
    for path in (SRC / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("meshgate.")}


def test_the_engine_imports_no_role() -> None:
    assert {m for m in _imports("proxy") if not m.startswith("meshgate.proxy")} == set()


def test_config_is_shared_not_dependent() -> None:
    assert {m for m in _imports("config") if not m.startswith("meshgate.config")} == set()


def test_limits_and_policies_know_no_role() -> None:
    roles = ("meshgate.gateway", "meshgate.mesh", "meshgate.control", "meshgate.integration")
    for package in ("limits", "policies", "telemetry"):
        assert not {m for m in _imports(package) if m.startswith(roles)}, package


def test_workload_identity_is_the_data_planes_own() -> None:
    # The gateway and the sidecar share it; the CA that signs it is the control plane's.
    allowed = ("meshgate.identity", "meshgate.config", "meshgate.proxy", "meshgate.telemetry")
    assert {m for m in _imports("identity") if not m.startswith(allowed)} == set()


def test_control_plane_and_data_planes_share_only_config() -> None:
    # Analytics and billing are the control plane's: it serves their APIs, they use its store.
    allowed = ("meshgate.control", "meshgate.config", "meshgate.analytics", "meshgate.billing")
    for package in ("control", "analytics", "billing"):
        assert {m for m in _imports(package) if not m.startswith(allowed)} == set(), package
    management = ("meshgate.control", "meshgate.analytics", "meshgate.billing")
    for data_plane in ("proxy", "gateway", "mesh", "integration", "limits", "policies", "identity"):
        assert not {m for m in _imports(data_plane) if m.startswith(management)}, data_plane


def test_roles_do_not_import_each_other() -> None:
    roles = ("gateway", "mesh", "control", "integration")
    for role in roles:
        others = tuple(f"meshgate.{r}" for r in roles if r != role)
        assert not {m for m in _imports(role) if m.startswith(others)}, role
