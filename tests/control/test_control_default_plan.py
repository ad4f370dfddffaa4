"""A product has one default plan, even when two requests make one at the same time."""

from __future__ import annotations

import threading

from control_support import ControlPlane, make_product


def test_concurrent_defaults_leave_exactly_one(control: ControlPlane) -> None:
    product = make_product(control)
    plans = [
        control.post(f"/products/{product['id']}/plans", {"name": f"plan-{i}"})["id"]
        for i in range(4)
    ]
    for _ in range(5):
        statuses: list[int] = []
        barrier = threading.Barrier(len(plans))

        def make_default(plan_id: int, barrier: threading.Barrier, statuses: list[int]) -> None:
            barrier.wait()
            response = control.api.patch(f"/plans/{plan_id}", json={"is_default": True})
            statuses.append(response.status_code)

        threads = [
            threading.Thread(target=make_default, args=(p, barrier, statuses)) for p in plans
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert set(statuses) <= {200, 409, 412}, statuses
        assert 200 in statuses
        listed = control.api.get(f"/products/{product['id']}/plans").json()["items"]
        assert sum(p["is_default"] for p in listed) == 1, listed
