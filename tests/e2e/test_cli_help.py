"""The CLI's help reads as a well-kept CLI's: no value shown on flags, descriptions wrapped
to the terminal, the scope each command's token needs, and --version."""

from __future__ import annotations

import os
import subprocess
import sys

import meshgate

COMMANDS = [
    [],
    ["up"],
    ["gateway"],
    ["control"],
    ["sidecar"],
    ["validate"],
    ["apply"],
    ["export"],
    ["import", "openapi"],
    ["usage", "series"],
    ["billing", "run"],
    ["integration", "run"],
]


def _meshgate(*args: str, columns: int = 60) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "meshgate", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": str(columns)},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_shows_no_value_on_flags_and_fits_the_terminal() -> None:
    for command in COMMANDS:
        text = _meshgate(*command, "--help")
        assert "<bool>" not in text and "BOOLEAN" not in text, (command, text)
        assert max(len(line) for line in text.splitlines()) <= 60, (command, text)
    up = " ".join(_meshgate("up", "--help").split())
    assert "Start the demo: the control plane (SQLite), the echo upstream, a gateway" in up
    assert "read scope" in " ".join(_meshgate("export", "--help").split())
    assert "write scope" in " ".join(_meshgate("apply", "--help").split())


def test_version() -> None:
    assert _meshgate("--version").startswith(f"meshgate {meshgate.__version__} ")
