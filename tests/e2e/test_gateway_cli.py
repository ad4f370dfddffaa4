"""The ``meshgate`` command as a user runs it: validate, up, and refused starts."""

from __future__ import annotations

import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import yaml
from gateway_e2e_support import ETERNAL_PLANS, TIMEOUT, values, wait_for
from harness import (
    Proc,
    echo_upstream,
    example_product,
    free_port,
    gateway_config,
    run_gateway,
    wait_port,
)

KEY = {"X-API-Key": "k1"}
EXAMPLE = Path(__file__).resolve().parents[2] / "src" / "meshgate" / "examples" / "gateway.yaml"


def meshgate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshgate", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_validate_prints_every_error_with_its_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        """\
listen: nope
products:
  - name: echo
    backend: ftp://somewhere
    auth: {type: api_key}
    plans:
      - name: basic
        limits:
          - {metric: hits, period: fortnight, value: 5}
          - {metric: hits, period: day, value: -1}
    policies:
      - bogus: {}
"""
    )
    result = meshgate("validate", str(bad), cwd=tmp_path)
    assert result.returncode != 0
    errors = result.stderr.splitlines()
    assert errors == [
        "listen: must be HOST:PORT, e.g. 127.0.0.1:8080 or 0.0.0.0:8080",
        "products[0].backend: must be an http:// or https:// URL, e.g. http://127.0.0.1:9001",
        "products[0].plans[0].limits[0].period: must be one of 'minute', 'hour', 'day', "
        "'week', 'month', 'year', 'eternity'",
        "products[0].plans[0].limits[1].value: must be at least 0",
        "products[0].policies[0]: unknown policy 'bogus' (known: cors, headers, ip_filter, "
        "maintenance, request_size_limit, url_rewrite)",
    ]
    assert "Traceback" not in result.stderr

    references = tmp_path / "references.yaml"
    references.write_text(
        """\
products:
  - name: echo
    backend: http://127.0.0.1:9
    auth: {type: api_key}
    mapping_rules: [{pattern: /, metric: nope}]
    applications: [{id: app1, plan: gold, keys: [k1]}]
"""
    )
    result = meshgate("validate", str(references), cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        "products[0]: mapping rule '/' names unknown metric 'nope'",
        "products[0]: application 'app1' is on unknown plan 'gold'",
    ]

    # Five errors of different kinds, reported in one pass: field errors, and the
    # cross-references pydantic would check only once the fields were fixed.
    five = tmp_path / "five.yaml"
    five.write_text(
        """\
products:
  - name: shop
    backend: http://127.0.0.1:9
    auth: {type: api_key}
    timeout: -3
    plans:
      - name: basic
        limits: [{metric: nosuch, period: minute, value: 10}]
    applications: [{id: a1, plan: gold, keys: [k1]}]
  - name: shop
    backend: ftp://x
    auth: {type: api_key}
"""
    )
    result = meshgate("validate", str(five), cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith("products[0].timeout: unknown field")
    assert lines[1:] == [
        "products[1].backend: must be an http:// or https:// URL, e.g. http://127.0.0.1:9001",
        "top level: product names must be unique: 'shop'",
        "products[0]: plan 'basic' limits unknown metric 'nosuch'",
        "products[0]: application 'a1' is on unknown plan 'gold'",
    ]
    # Thousands of errors are not a wall of text: the first 200, then a count.
    many = tmp_path / "many.yaml"
    broken = {"backend": "ftp://x", "auth": {"type": "api_key"}}
    many.write_text(yaml.safe_dump({"products": [{"name": f"p{i}", **broken} for i in range(300)]}))
    lines = meshgate("validate", str(many), cwd=tmp_path).stderr.splitlines()
    assert len(lines) == 201 and lines[-1] == f"{many}: ... and 100 more errors"
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("listen: [\n")
    result = meshgate("validate", str(syntax), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"{syntax}: line 2, column 1: "), result.stderr

    missing = meshgate("validate", str(tmp_path / "absent.yaml"), cwd=tmp_path)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "absent.yaml" in missing.stderr


def test_validate_refuses_control_characters_where_they_would_reach_the_wire(
    tmp_path: Path,
) -> None:
    injected = tmp_path / "injected.yaml"
    product = {
        "name": "echo",
        "hosts": ["api.example\r\nX-Injected: 1"],
        "backend": "http://127.0.0.1:9101/a HTTP/1.1\r\nX-Injected: 1\r\nX-Pad: ",
        "auth": {"type": "api_key", "header": "X-API-Key\r\nX-Injected: 1"},
        "policies": [
            {"url_rewrite": {"commands": [{"regex": "^/", "replace": "/a\r\nX-Injected: 1"}]}}
        ],
    }
    injected.write_text(yaml.safe_dump({"products": [product]}))
    result = meshgate("validate", str(injected), cwd=tmp_path)
    assert result.returncode != 0
    errors = result.stderr.splitlines()
    assert [line.partition(":")[0] for line in errors] == [
        "products[0].hosts[0]",
        "products[0].backend",
        "products[0].auth.header",
        "products[0].policies[0].url_rewrite.commands[0]",
    ], errors
    assert "Traceback" not in result.stderr


def test_validate_accepts_the_example(tmp_path: Path) -> None:
    result = meshgate("validate", str(EXAMPLE), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "valid (1 products)" in result.stdout


def test_workers_on_memory_counters_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    config = gateway_config([example_product(free_port())])
    path.write_text(yaml.safe_dump(config))
    result = meshgate("gateway", "--config", str(path), "--workers", "2", cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --workers above 1 needs shared counters")
    assert "redis" in lines[0]
    # It refused before listening.
    port = int(config["listen"].rpartition(":")[2])
    assert httpx_refuses(port)


def httpx_refuses(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
    except httpx.ConnectError:
        return True
    return False


def test_up_prints_curl_lines_that_work_and_stops_on_sigterm(tmp_path: Path) -> None:
    upstream = free_port()
    config = gateway_config([example_product(upstream)])
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["up", "--config", str(path), "--upstream", f"127.0.0.1:{upstream}"]
    args += ["--control-listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "d")]
    args += ["--integration-listen", f"127.0.0.1:{free_port()}"]
    args += ["--tls-listen", f"127.0.0.1:{free_port()}"]
    proc = Proc(args, tmp_path, "up")
    try:
        port = int(config["listen"].rpartition(":")[2])
        wait_port(port, proc=proc.popen, timeout=60)
        wait_for(lambda: "stop with Ctrl-C" in proc.stdout(), what="the banner")
        out = proc.stdout()
        curls = [
            shlex.split(line, comments=True)
            for line in out.splitlines()
            if line.strip().startswith("curl ")
        ]
        assert len(curls) == 10, out
        gateway, https, admin, alerts, orders, via_sidecar, via_app, clusters, denied, shop = curls
        assert gateway[:3] == ["curl", "-i", "-H"]
        name, _, value = gateway[3].partition(": ")
        answer = httpx.get(gateway[4], headers={name: value}, timeout=TIMEOUT)
        assert answer.status_code == 200
        assert answer.json()["path"] == "/hello"
        assert answer.headers["ratelimit-policy"] == '"hits-minute";q=5;w=60'
        assert https[:3] == ["curl", "-i", "--cacert"]
        name, _, value = https[5].partition(": ")
        with httpx.Client(verify=ssl.create_default_context(cafile=https[3])) as client:
            answer = client.get(https[6], headers={name: value}, timeout=TIMEOUT)
        assert answer.status_code == 200
        name, _, value = admin[3].partition(": ")
        products = httpx.get(admin[4], headers={name: value}, timeout=TIMEOUT).json()
        assert [p["name"] for p in products["items"]] == ["echo", "shop"]
        name, _, value = alerts[3].partition(": ")
        listed = httpx.get(alerts[4], headers={name: value}, timeout=TIMEOUT)
        assert listed.status_code == 200 and "items" in listed.json()
        # The usage and billing lines are commands that answer.
        commands = [
            shlex.split(line) for line in out.splitlines() if line.startswith("  meshgate ")
        ]
        assert [c[1:3] for c in commands] == [
            ["usage", "series"],
            ["usage", "limits"],
            ["billing", "run"],
            ["billing", "invoices"],
        ], out
        for command in commands:
            # As printed: the control plane's address (not the default here) included.
            done = subprocess.run(
                [sys.executable, "-m", "meshgate", *command[1:]],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, (command, done.stderr)
        assert orders[-1].endswith("/orders")
        accepted = httpx.post(
            orders[-1],
            content=orders[-2],
            timeout=TIMEOUT,
            headers={"content-type": "application/json"},
        )
        assert accepted.status_code == 200 and accepted.json() == {"accepted": True, "id": "o-1"}
        # The mesh: orders calls payments through its sidecar (the HTTP proxy port).
        assert via_sidecar[:3] == ["curl", "-s", "-x"]
        with httpx.Client(proxy=via_sidecar[3], timeout=TIMEOUT) as client:
            answer = client.get(via_sidecar[4])
        assert answer.status_code == 200 and answer.json()["service"] == "payments"
        assert answer.json()["source"] == "orders/v1"
        called = httpx.get(via_app[-1], timeout=TIMEOUT).json()
        assert (called["service"], called["called"], called["status"]) == (
            "orders",
            "payments",
            200,
        )
        known = httpx.get(clusters[-1], timeout=TIMEOUT).json()
        assert len(known["payments"]) == 2
        # payments' own sidecar may not call payments: the demo's authorization policy.
        with httpx.Client(proxy=denied[3], timeout=TIMEOUT) as client:
            assert client.get(denied[4]).status_code == 403
        name, _, value = shop[3].partition(": ")
        through = httpx.get(shop[4], headers={name: value}, timeout=TIMEOUT)
        assert through.status_code == 200 and through.json()["answer"]["service"] == "payments"
    finally:
        code = proc.stop()
    assert code == 0, proc.stderr()
    assert "Traceback" not in proc.stderr()


def test_sigterm_lets_in_flight_requests_finish(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config([example_product(upstream, plans=ETERNAL_PLANS)])
        with run_gateway(config, tmp_path) as gw:
            results: list[httpx.Response | Exception] = []

            def slow() -> None:
                try:
                    results.append(
                        httpx.get(f"{gw.url}/echo/delay/1.5", headers=KEY, timeout=TIMEOUT)
                    )
                except httpx.HTTPError as exc:
                    results.append(exc)

            thread = threading.Thread(target=slow)
            thread.start()
            # Wait until the request is in flight: counted, so past the access phase.
            wait_for(lambda: values(gw, "app1")[("hits", "eternity")] == 1, what="in flight")
            gw.proc.signal(signal.SIGTERM)
            thread.join(TIMEOUT)
            assert gw.proc.popen.wait(TIMEOUT) == 0
            (answer,) = results
            assert isinstance(answer, httpx.Response), answer
            assert answer.status_code == 200 and answer.json() == {"delayed": True}
            assert answer.headers["connection"] == "close"
            assert httpx_refuses(gw.port)


def test_a_busy_port_is_one_clear_error_with_or_without_workers(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        # Redis is never contacted: the start fails before any request.
        limits = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{free_port()}/0"}
        for listen, admin in (
            (address, f"127.0.0.1:{free_port()}"),
            (f"127.0.0.1:{free_port()}", address),
        ):
            path = tmp_path / "busy.yaml"
            config = gateway_config(
                [example_product(free_port())], listen=listen, admin_listen=admin, limits=limits
            )
            path.write_text(yaml.safe_dump(config))
            for workers in ("1", "2"):
                result = meshgate(
                    "gateway", "--config", str(path), "--workers", workers, cwd=tmp_path
                )
                assert result.returncode == 1, (workers, result.stderr)
                errors = [line for line in result.stderr.splitlines() if " INFO " not in line]
                assert errors == [f"error: cannot listen on {address}: Address already in use"]
