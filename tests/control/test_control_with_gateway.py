"""A gateway attached to a real control plane: what the admin does reaches requests within
seconds, and the gateway keeps serving its last good snapshot when the control plane is gone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from control_support import (
    PROPAGATION_S,
    ControlPlane,
    attached_gateway,
    make_product,
    make_subscription,
    start_control,
    within,
)
from harness import echo_upstream, free_port


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[int]:
    with echo_upstream(tmp_path) as port:
        yield port


def test_admin_changes_reach_the_gateway_within_two_seconds(
    control: ControlPlane, upstream: int, tmp_path: Path
) -> None:
    product = make_product(control, upstream)
    control.post(f"/products/{product['id']}/promote")
    with attached_gateway(tmp_path, control.url, control.token) as gw:
        sub = make_subscription(control, product["id"])
        key = sub["application"]["key"]
        within(
            PROPAGATION_S,
            lambda: gw.get("/echo/hello", key).status_code == 200,
            "a new application admitted",
        )

        control.post(f"/applications/{sub['application']['id']}/suspend")
        within(
            PROPAGATION_S,
            lambda: gw.get("/echo/hello", key).status_code == 403,
            "a suspended application refused",
        )

        control.post(f"/applications/{sub['application']['id']}/resume")
        within(
            PROPAGATION_S,
            lambda: gw.get("/echo/hello", key).status_code == 200,
            "a resumed application admitted",
        )

        extra = control.post(f"/applications/{sub['application']['id']}/keys", {})
        within(
            PROPAGATION_S,
            lambda: gw.get("/echo/hello", extra["key"]).status_code == 200,
            "a second key admitted",
        )
        control.api.delete(f"/applications/{sub['application']['id']}/keys/{extra['id']}")
        within(
            PROPAGATION_S,
            lambda: gw.get("/echo/hello", extra["key"]).status_code == 403,
            "a revoked key refused",
        )

        # The gateway reports the version it runs; the control plane lists it.
        version = control.snapshot("production").json()["version"]

        def listed() -> bool:
            planes = control.api.get("/dataplanes").json()
            return any(
                p["id"] == "gw1" and p["version"] == version and p["connected"] for p in planes
            )

        within(15, listed, "the gateway listed with the version it runs")
        log = gw.proc.stdout() + gw.proc.stderr() + control.log()
        assert key not in log and extra["key"] not in log


def test_promote_and_rollback_reach_the_gateway(
    control: ControlPlane, upstream: int, tmp_path: Path
) -> None:
    product = make_product(control, upstream)
    sub = make_subscription(control, product["id"])
    key = sub["application"]["key"]
    first = control.post(f"/products/{product['id']}/promote")
    with attached_gateway(tmp_path, control.url, control.token) as gw:
        within(
            PROPAGATION_S, lambda: gw.get("/echo/hello", key).status_code == 200, "served at /echo"
        )
        # A change lands in staging only; production moves when it is promoted.
        control.api.patch(f"/products/{product['id']}", json={"path_prefix": "/v2"})
        control.wait_snapshot(
            "staging", lambda d: d["products"] and d["products"][0]["path_prefix"] == "/v2"
        )
        time.sleep(0.5)
        assert gw.get("/v2/hello", key).status_code == 404
        assert gw.get("/echo/hello", key).status_code == 200

        control.post(f"/products/{product['id']}/promote")
        within(
            PROPAGATION_S,
            lambda: gw.get("/v2/hello", key).status_code == 200,
            "the promoted prefix served",
        )
        assert gw.get("/echo/hello", key).status_code == 404

        back = control.post(f"/environments/production/rollback?to={first['version']}")
        assert back["version"] > first["version"]
        within(
            PROPAGATION_S,
            lambda: gw.get("/echo/hello", key).status_code == 200,
            "the rolled-back prefix served",
        )
        # The application and its key stayed current through the rollback.
        assert gw.get("/v2/hello", key).status_code == 404


def test_an_unusable_snapshot_is_reported_and_the_last_good_one_kept(
    upstream: int, tmp_path: Path
) -> None:
    # A control plane told to accept custom policies, in front of a gateway that lacks one.
    control = start_control(
        tmp_path, f"sqlite:///{tmp_path / 'control.db'}", None, "--custom-policies"
    )
    try:
        _unusable_snapshot(control, upstream, tmp_path)
    finally:
        control.stop()


def _unusable_snapshot(control: ControlPlane, upstream: int, tmp_path: Path) -> None:
    product = make_product(control, upstream)
    key = make_subscription(control, product["id"])["application"]["key"]
    control.post(f"/products/{product['id']}/promote")
    with attached_gateway(tmp_path, control.url, control.token) as gw:
        within(PROPAGATION_S, lambda: gw.get("/echo/hello", key).status_code == 200, "served")
        good = control.snapshot("production").json()["version"]
        # This gateway does not have the policy: it must refuse the snapshot, not serve
        # the product without it.
        response = control.api.patch(
            f"/products/{product['id']}", json={"policies": [{"not_installed_here": {}}]}
        )
        assert response.status_code == 200, response.text
        bad = control.post(f"/products/{product['id']}/promote")["version"]

        def reported() -> bool:
            planes = control.api.get("/dataplanes").json()
            return any(
                p["id"] == "gw1" and p["error"] and "not_installed_here" in p["error"]
                for p in planes
            )

        within(15, reported, "the refusal reported to the control plane")
        [plane] = [p for p in control.api.get("/dataplanes").json() if p["id"] == "gw1"]
        assert plane["version"] == good and str(bad) != good
        assert gw.get("/echo/hello", key).status_code == 200


def test_the_gateway_serves_while_the_control_plane_is_down_and_restarts_from_its_cache(
    tmp_path: Path, upstream: int
) -> None:
    db = f"sqlite:///{tmp_path / 'control.db'}"
    port = free_port()
    control = start_control(tmp_path, db, port)
    product = make_product(control, upstream)
    key = make_subscription(control, product["id"])["application"]["key"]
    control.post(f"/products/{product['id']}/promote")
    with attached_gateway(tmp_path, control.url, control.token) as gw:
        within(PROPAGATION_S, lambda: gw.get("/echo/hello", key).status_code == 200, "served")
        control.stop()
        for _ in range(5):
            assert gw.get("/echo/hello", key).status_code == 200
            time.sleep(0.2)
    # Restarted while the control plane is still down: the cached snapshot is served.
    with attached_gateway(tmp_path, f"http://127.0.0.1:{port}", control.token) as gw:
        within(10, lambda: gw.get("/echo/hello", key).status_code == 200, "served from the cache")
        assert gw.get("/echo/hello", "not-a-key").status_code == 403
        # The control plane comes back; the gateway picks up what changed meanwhile.
        control = start_control(tmp_path, db, port)
        try:
            other = make_subscription(control, product["id"])["application"]["key"]
            within(
                10,
                lambda: gw.get("/echo/hello", other).status_code == 200,
                "a change made after the control plane came back",
            )
        finally:
            control.stop()
