"""Configuration reloads of a running gateway: file replace, SIGHUP, refused files, and no
failed request while reloading under load."""

from __future__ import annotations

import copy
import signal
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import yaml
from gateway_e2e_support import ETERNAL_PLANS, TIMEOUT, sample_sum, scrape, values, wait_for
from harness import Gateway, echo_upstream, example_product, gateway_config, run_gateway


def config_doc(gw: Gateway) -> dict[str, Any]:
    response = httpx.get(f"{gw.admin_url}/config", timeout=TIMEOUT)
    assert response.status_code == 200
    doc: dict[str, Any] = response.json()
    return doc


def reloads(gw: Gateway, result: str) -> float:
    return sample_sum(scrape(gw), "meshgate_config_reloads_total", result=result)


def status(gw: Gateway, key: str) -> int:
    return httpx.get(f"{gw.url}/echo/x", headers={"X-API-Key": key}, timeout=TIMEOUT).status_code


def reloaded_since(gw: Gateway, applied: float) -> bool:
    return reloads(gw, "applied") > applied


def admitted(gw: Gateway, key: str) -> bool:
    return status(gw, key) == 200


def with_app(config: dict[str, Any], app: str, key: str) -> dict[str, Any]:
    new = copy.deepcopy(config)
    new["products"][0]["applications"].append({"id": app, "plan": "basic", "keys": [key]})
    return new


def test_replaced_file_adds_an_application_without_restart(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config([example_product(upstream, plans=ETERNAL_PLANS)])
        with run_gateway(config, tmp_path) as gw:
            assert status(gw, "k1") == 200
            assert status(gw, "k2") == 403
            first = config_doc(gw)
            assert first["last_error"] is None

            gw.write_config(with_app(config, "app2", "k2"))
            changed = time.monotonic()
            wait_for(lambda: status(gw, "k2") == 200, what="the new application")
            # The watcher looks every second; allow for a busy machine.
            assert time.monotonic() - changed < 6
            after = config_doc(gw)
            assert after["version"] != first["version"]
            assert after["loaded_at"] > first["loaded_at"] and after["last_error"] is None
            # Same process, same counters: app1's earlier request is still counted.
            assert gw.proc.popen.poll() is None
            assert values(gw, "app1") == {("hits", "eternity"): 1, ("search", "eternity"): 0}
            assert values(gw, "app2") == {("hits", "eternity"): 1, ("search", "eternity"): 0}
            assert reloads(gw, "applied") == 1


def test_sighup_reloads_when_file_watching_is_off(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config([example_product(upstream)])
        with run_gateway(config, tmp_path, "--no-watch") as gw:
            path = gw.config_path
            text = path.read_text()
            assert text.count("k1") == 1
            path.write_text(text.replace("k1", "kX"))
            time.sleep(2.5)  # more than two watch intervals: prove nothing reloaded by itself
            assert status(gw, "kX") == 403 and status(gw, "k1") == 200

            gw.proc.signal(signal.SIGHUP)
            wait_for(lambda: status(gw, "kX") == 200, what="the SIGHUP reload")
            assert status(gw, "k1") == 403
            assert reloads(gw, "applied") == 1


def test_an_invalid_file_is_refused_and_the_old_config_keeps_serving(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config([example_product(upstream)])
        with run_gateway(config, tmp_path) as gw:
            good = config_doc(gw)
            broken = copy.deepcopy(config)
            broken["products"][0]["plans"][0]["limits"][0]["period"] = "fortnight"
            gw.write_config(broken)
            doc = wait_for(
                lambda: (d := config_doc(gw))["last_error"] and d, what="the refusal in /config"
            )
            assert "products[0].plans[0].limits[0].period" in doc["last_error"]
            assert doc["version"] == good["version"]
            assert status(gw, "k1") == 200
            assert reloads(gw, "refused") >= 1

            # SIGHUP on a broken file: refused again, still serving.
            gw.write_config("listen: [this is not\n")
            wait_for(lambda: "line" in (config_doc(gw)["last_error"] or ""), what="YAML error")
            gw.proc.signal(signal.SIGHUP)
            wait_for(lambda: reloads(gw, "refused") >= 3, what="the refused SIGHUP reload")
            assert status(gw, "k1") == 200
            assert "gateway serving" in gw.proc.stderr()
            assert "configuration refused" in gw.proc.stderr()

            gw.write_config(with_app(config, "app2", "k2"))
            wait_for(lambda: status(gw, "k2") == 200, what="a good file after a bad one")
            fixed = config_doc(gw)
            assert fixed["last_error"] is None and fixed["version"] != good["version"]


def test_no_request_fails_during_reloads_under_load(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        product = example_product(upstream, plans=[{"name": "basic"}])
        config = gateway_config([product], access_log=False)
        with run_gateway(config, tmp_path) as gw:
            stop = threading.Event()
            failures: list[str] = []
            done = [0, 0]

            def fire(slot: int, keep_alive: bool) -> None:
                headers = (
                    {"X-API-Key": "k1"}
                    if keep_alive
                    else {"X-API-Key": "k1", "Connection": "close"}
                )
                with httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client:
                    while not stop.is_set():
                        try:
                            answer = client.get("/echo/load", headers=headers)
                            if answer.status_code != 200:
                                failures.append(f"{answer.status_code} {answer.text[:200]}")
                        except httpx.HTTPError as exc:
                            failures.append(repr(exc))
                        done[slot] += 1

            threads = [
                threading.Thread(target=fire, args=(0, True)),
                threading.Thread(target=fire, args=(1, False)),
            ]
            for thread in threads:
                thread.start()
            try:
                current = config
                for i in range(6):
                    current = with_app(current, f"extra{i}", f"key{i}")
                    applied = reloads(gw, "applied")
                    gw.write_config(current)
                    if i % 2:
                        gw.proc.signal(signal.SIGHUP)
                    wait_for(partial(reloaded_since, gw, applied), what=f"reload {i}")
                    wait_for(partial(admitted, gw, f"key{i}"), what=f"application {i}")
                wait_for(lambda: min(done) > 20, what="requests on both clients")
            finally:
                stop.set()
                for thread in threads:
                    thread.join(TIMEOUT)
            assert failures == [], failures[:5]
            assert "Traceback" not in gw.proc.stderr()
            assert yaml.safe_load(gw.config_path.read_text()) == current


def reloaded(gw: Gateway) -> float:
    """Reloads tried: applied or refused."""
    return reloads(gw, "applied") + reloads(gw, "refused")


def test_files_that_would_inject_into_upstream_requests_are_refused(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config([example_product(upstream, plans=ETERNAL_PLANS)])
        with run_gateway(config, tmp_path) as gw:
            injected = f"http://127.0.0.1:{upstream}/a HTTP/1.1\r\nX-Injected: 1\r\nX-Pad: "
            rewrite = {"regex": "^/", "replace": "/a HTTP/1.1\r\nX-Injected: 1\r\nX-Pad: /"}
            attempts = [
                {"backend": injected},
                {"hosts": ["*", "api.example\r\nX-Injected: 1"]},
                {"auth": {"type": "api_key", "header": "X-API-Key\r\nX-Injected: 1"}},
                {"policies": [{"url_rewrite": {"commands": [rewrite]}}]},
                {"policies": [{"headers": {"request": {"set": {"X-A": "1\r\nX-Injected: 1"}}}}]},
            ]
            for tried, change in enumerate(attempts, start=1):
                bad = copy.deepcopy(config)
                bad["products"][0].update(change)
                gw.write_config(bad)
                wait_for(lambda n=tried: reloaded(gw) >= n, what=f"reload {tried}")
                answer = httpx.get(f"{gw.url}/echo/x", headers={"X-API-Key": "k1"}, timeout=TIMEOUT)
                assert answer.status_code == 200, answer.text
                seen = answer.json()
                assert "x-injected" not in seen["headers"] and "x-pad" not in seen["headers"]
                assert seen["path"] == "/x"
            assert reloads(gw, "refused") == len(attempts)
            assert config_doc(gw)["last_error"]
