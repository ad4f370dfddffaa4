"""A sidecar's life: readiness of its app, the app started once it serves, batch jobs that
end, SIGTERM, configuration reloads that are refused, and bad flags."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
from harness import free_port, wait_port
from mesh_support import Process, metric, running, start_app, start_sidecar, static_service


def test_ready_only_when_the_app_is(tmp_path: Path) -> None:
    port = free_port()  # nothing listens yet
    sidecar = start_sidecar(
        tmp_path,
        "orders",
        port,
        config={
            "services": [],
            "sidecar": {"readiness": {"http": "/ready", "interval": 0.1, "timeout": 0.5}},
        },
        wait_ready=False,
    )
    with running(sidecar):
        time.sleep(0.5)
        r = httpx.get(f"{sidecar.admin_url}/readyz", timeout=5)
        assert r.status_code == 503
        assert r.json()["reason"] == "the app is not ready"
        assert httpx.get(f"{sidecar.admin_url}/healthz", timeout=5).status_code == 200
        app = start_app(tmp_path, "orders", port=port)
        with running(app):
            sidecar.wait_ready(5)
            app.slow(2)  # /ready answers later than the probe's timeout
            time.sleep(1.5)
            assert not sidecar.ready()
            app.recover()
            sidecar.wait_ready(5)


APP = """
import json, sys, urllib.request
proxy = urllib.request.ProxyHandler({"http": sys.argv[1]})
opener = urllib.request.build_opener(proxy)
body = opener.open("http://payments/from-the-job", timeout=5).read()
open(sys.argv[2], "w").write(json.loads(body)["service"])
sys.exit(int(sys.argv[3]))
"""


def test_the_app_starts_once_the_sidecar_serves_and_its_status_is_the_sidecars(
    tmp_path: Path,
) -> None:
    payments = start_app(tmp_path, "payments")
    script = tmp_path / "job.py"
    script.write_text(APP)
    out = tmp_path / "answer.txt"
    outbound = free_port()
    config = tmp_path / "mesh.yaml"
    config.write_text(yaml.safe_dump({"services": [static_service("payments", [payments])]}))
    args = [
        "-m", "meshgate", "sidecar", "--service", "job", "--app-port", str(free_port()),
        "--inbound", f"127.0.0.1:{free_port()}", "--outbound", f"127.0.0.1:{outbound}",
        "--admin", f"127.0.0.1:{free_port()}", "--config", str(config), "--",
        sys.executable, str(script), f"http://127.0.0.1:{outbound}", str(out), "3",
    ]  # fmt: skip
    with running(payments):
        done = subprocess.run(
            [sys.executable, *args], capture_output=True, timeout=60, cwd=tmp_path
        )
    # The job reached payments through the sidecar at its first attempt, then ended, and
    # the sidecar ended with it, with its exit status.
    assert out.read_text() == "payments", done.stderr.decode()
    assert done.returncode == 3


def test_quitquitquit_ends_a_sidecar(tmp_path: Path) -> None:
    app = start_app(tmp_path, "batch")
    sidecar = start_sidecar(tmp_path, "batch", app.port, config={"services": []})
    with running(app, sidecar):
        assert httpx.get(f"{sidecar.admin_url}/quitquitquit", timeout=5).status_code == 405
        r = httpx.post(f"{sidecar.admin_url}/quitquitquit", timeout=5)
        assert r.status_code == 200
        sidecar.proc.popen.wait(10)
        assert sidecar.proc.popen.returncode == 0


def test_sigterm_reaches_the_app_and_the_sidecar_waits_for_it(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    # An app that takes 0.5 s to drain after SIGTERM, then exits 0.
    script.write_text(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.5), sys.exit(0)))\n"
        "while True: time.sleep(1)\n"
    )
    admin = free_port()
    args = [
        "-m", "meshgate", "sidecar", "--service", "svc", "--app-port", str(free_port()),
        "--inbound", f"127.0.0.1:{free_port()}", "--outbound", f"127.0.0.1:{free_port()}",
        "--admin", f"127.0.0.1:{admin}", "--config", "/dev/null", "--",
        sys.executable, str(script),
    ]  # fmt: skip
    (tmp_path / "empty.yaml").write_text("services: []\n")
    args[args.index("/dev/null")] = str(tmp_path / "empty.yaml")
    proc = Process(args, tmp_path, "sidecar")
    try:
        wait_port(admin, proc=proc.popen)
        time.sleep(0.3)
        started = time.monotonic()
        proc.popen.terminate()
        assert proc.popen.wait(10) == 0
        assert time.monotonic() - started >= 0.5
    finally:
        proc.stop()


def test_a_bad_configuration_on_reload_keeps_the_running_one(tmp_path: Path) -> None:
    payments = start_app(tmp_path, "payments")
    caller = start_app(tmp_path, "orders")
    config = {"services": [static_service("payments", [payments])]}
    sidecar = start_sidecar(tmp_path, "orders", caller.port, config=config)
    with running(payments, caller, sidecar), sidecar.client() as client:
        assert client.get("http://payments/x").status_code == 200
        assert sidecar.config_path is not None
        sidecar.config_path.write_text(
            "services:\n  - name: payments\n    routes: [{timeout: -1}]\n"
        )
        sidecar.proc.popen.send_signal(1)  # SIGHUP
        time.sleep(0.5)
        assert client.get("http://payments/x").status_code == 200
        assert (
            metric(sidecar.metrics(), "meshgate_mesh_config_updates_total", result="refused") == 1
        )
        assert "services[0].routes[0].timeout: must be greater than 0" in sidecar.proc.stderr()


def test_bad_flags_are_one_clear_line(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshgate", "sidecar", *args],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=tmp_path,
        )

    r = run("--service", "Orders!", "--app-port", "70000", "--config", "/nonexistent.yaml")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "/nonexistent.yaml" in r.stderr
    r = run("--service", "Orders!", "--app-port", "70000", "--upstream", "x=1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "sidecar.service" in r.stderr and "sidecar.app_port" in r.stderr
    r = run("--service", "a", "--app-port", "1", "--upstream", "payments")
    assert r.returncode == 1 and "SERVICE=PORT" in r.stderr
    r = run("--service", "a", "--app-port", "1")
    assert r.returncode == 1 and "--control-plane" in r.stderr
    r = run("--service", "a", "--app-port", "1", "--control-plane", "http://127.0.0.1:1")
    assert r.returncode == 1 and "--token" in r.stderr
