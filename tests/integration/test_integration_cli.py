"""``meshgate integration validate`` and ``run``, as a user runs them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from harness import free_port, wait_port
from typer.testing import CliRunner

from meshgate.integration.cli import app

COMMAND = [sys.executable, "-c", "from meshgate.integration.cli import app; app()"]


def test_validate_prints_every_error_with_its_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "routes:\n  - id: a\n    from: direct:a\n    steps:\n"
        "      - filter: {expr: 'a[', steps: [{to: 'direct:a'}]}\n      - to: 'smtp:x'\n"
    )
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0].startswith("routes[0].steps[0].filter.expr: invalid JMESPath: ")
    assert lines[1].startswith("routes[0].steps[1].to: unknown endpoint scheme 'smtp'")
    assert lines[2] == (
        "routes[0].steps[0].filter.steps[0].to: direct endpoints call each other in a cycle:"
        " direct:a -> direct:a"
    )
    assert len(lines) == 3


def test_validate_accepts_a_good_file(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("routes: [{id: a, from: 'timer:t', steps: [{log: hi}]}]")
    result = CliRunner().invoke(app, ["validate", str(good)])
    assert (result.exit_code, result.output) == (0, f"{good}: 1 route(s), valid\n")
    missing = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 1
    assert "file not found" in missing.output


def test_run_serves_routes_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        f"""
http: {{listen: "127.0.0.1:{port}"}}
amqp_url: "amqp://guest:guest@127.0.0.1:1/"
routes:
  - id: ping
    from: http:/ping?method=GET
    steps:
      - transform: {{expr: "{{pong: `true`, who: headers.\\"x-who\\"}}"}}
  - id: broken
    from: amqp:queue:x
    steps: [{{log: never}}]
"""
    )
    err = tmp_path / "err.txt"
    with open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [*COMMAND, "run", str(routes)],
            cwd=tmp_path,
            stderr=stderr,
            env={**os.environ, "MESHGATE_TEST": "1"},
        )
        try:
            wait_port(port, proc=proc)
            reply = httpx.get(f"http://127.0.0.1:{port}/ping", headers={"x-who": "cli"})
            assert reply.json() == {"pong": True, "who": "cli"}
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(15)
    output = err.read_text()
    assert code == 0, output
    assert "error: route 'broken' failed to start: amqp: cannot connect to 127.0.0.1:1/" in output
    assert "integration routes started: ping\n" in output
    assert "stopping: draining in-flight exchanges" in output


def test_run_refuses_a_bad_file_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: [{id: a, from: 'ftp:x'}]")
    started = time.monotonic()
    result = subprocess.run([*COMMAND, "run", str(bad)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().startswith(
        f"error: {bad}: routes[0].from: unknown endpoint scheme"
    )
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 20
