"""The control plane starts on each store, migrates it, and publishes what it is given."""

from __future__ import annotations

from control_support import ControlPlane, make_product, make_subscription


def test_a_subscription_reaches_both_environments_after_promotion(control: ControlPlane) -> None:
    product = make_product(control)
    sub = make_subscription(control, product["id"])
    key = sub["application"]["key"]
    assert key and len(key) >= 32

    staged = control.wait_snapshot(
        "staging", lambda d: any(p["applications"] for p in d["products"])
    )
    [echo] = staged["products"]
    assert echo["name"] == "echo"
    assert echo["applications"][0]["id"] == sub["application"]["app_id"]
    assert control.snapshot("production").json()["products"] == []

    promoted = control.post(f"/products/{product['id']}/promote")
    assert promoted["env"] == "production" and promoted["changed"]
    production = control.snapshot("production").json()
    assert [p["name"] for p in production["products"]] == ["echo"]
    assert production["version"] == str(promoted["version"])
