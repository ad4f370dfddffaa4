"""ETag and If-Match: a change based on a stale read is refused (412), never lost."""

from __future__ import annotations

import threading

import httpx
from control_support import (
    TOKEN,
    ControlPlane,
    audit,
    etag_of,
    make_product,
    make_subscription,
    problem,
)


def test_a_stale_if_match_is_412_and_changes_nothing(control: ControlPlane) -> None:
    cp = control
    product = make_product(cp)
    path = f"/products/{product['id']}"
    first = cp.api.get(path)
    stale = etag_of(first)
    changed = cp.api.patch(path, json={"description": "v2"}, headers={"If-Match": stale})
    assert changed.status_code == 200 and etag_of(changed) != stale

    body = problem(cp.api.patch(path, json={"description": "v3"}, headers={"If-Match": stale}), 412)
    assert body["etag"] == etag_of(changed)
    problem(cp.api.delete(path, headers={"If-Match": stale}), 412)
    now = cp.api.get(path)
    assert now.json()["description"] == "v2" and etag_of(now) == etag_of(changed)
    assert [e["after"]["description"] for e in audit(cp, resource="product", action="update")] == [
        "v2"
    ]

    # A list of ETags or * holds when one of them is current; a weak tag never does.
    problem(cp.api.patch(path, json={}, headers={"If-Match": f"W/{etag_of(now)}"}), 412)
    for n, if_match in enumerate(('"999", {}', "*")):
        current = etag_of(cp.api.get(path))
        response = cp.api.patch(
            path, json={"description": f"v{n + 4}"}, headers={"If-Match": if_match.format(current)}
        )
        assert response.status_code == 200, (if_match, response.text)
    current = etag_of(cp.api.get(path))
    assert cp.api.delete(path, headers={"If-Match": current}).status_code == 204

    # Application transitions and plan changes honour it too.
    app = make_subscription(cp, make_product(cp)["id"])["application"]
    path = f"/applications/{app['id']}"
    stale = etag_of(cp.api.get(path))
    suspended = cp.api.post(f"{path}/suspend", headers={"If-Match": stale})
    assert suspended.status_code == 200 and suspended.json()["state"] == "suspended"
    assert etag_of(suspended) == etag_of(cp.api.get(path)) != stale
    problem(cp.api.post(f"{path}/resume", headers={"If-Match": stale}), 412)
    problem(
        cp.api.post(f"{path}/change_plan", json={"plan_id": 1}, headers={"If-Match": stale}), 412
    )
    assert cp.api.get(path).json()["state"] == "suspended"


def test_concurrent_updates_of_one_resource_lose_nothing(control: ControlPlane) -> None:
    """Threads PATCH one product, each with the ETag it read: per round exactly one of those
    holding the current ETag wins, the others get 412, and every win is in the audit log.
    Without If-Match, each update applies or is told to retry."""
    cp = control
    product = make_product(cp)
    path = f"{cp.url}/admin/api/products/{product['id']}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    threads_per_round, rounds = 6, 4
    outcomes: list[tuple[int, str, int]] = []
    lock = threading.Lock()

    for round_ in range(rounds):
        tag = etag_of(httpx.get(path, headers=headers))
        barrier = threading.Barrier(threads_per_round)

        def patch(
            n: int, round_: int = round_, tag: str = tag, barrier: threading.Barrier = barrier
        ) -> None:
            text = f"r{round_}-t{n}"
            with httpx.Client(headers=headers, timeout=60) as client:
                barrier.wait()
                response = client.patch(path, json={"description": text}, headers={"If-Match": tag})
            with lock:
                outcomes.append((round_, text, response.status_code))

        workers = [threading.Thread(target=patch, args=(n,)) for n in range(threads_per_round)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    for round_ in range(rounds):
        codes = sorted(code for r, _, code in outcomes if r == round_)
        assert codes == [200] + [412] * (threads_per_round - 1), (round_, codes)
    winners = [text for _, text, code in outcomes if code == 200]
    final = httpx.get(path, headers=headers).json()
    assert final["version"] == 1 + rounds
    assert final["description"] == [t for t in winners if t.startswith(f"r{rounds - 1}-")][0]
    logged = [e["after"]["description"] for e in audit(cp, resource="product", action="update")]
    assert sorted(logged) == sorted(winners)

    # Without If-Match every update applies or is told to retry; none is silently lost.
    account = cp.post("/accounts", {"name": "busy"})
    path = f"{cp.url}/admin/api/accounts/{account['id']}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    barrier = threading.Barrier(8)
    statuses: list[int] = []

    def patch_account(n: int) -> None:
        with httpx.Client(headers=headers, timeout=60) as client:
            barrier.wait()
            statuses.append(client.patch(path, json={"description": f"d{n}"}).status_code)

    workers = [threading.Thread(target=patch_account, args=(n,)) for n in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert set(statuses) <= {200, 412} and 200 in statuses, statuses
    final = httpx.get(path, headers=headers).json()
    # Every 200 is one version and one audit entry; a 412 changed nothing.
    assert final["version"] == 1 + statuses.count(200)
    assert len(audit(cp, resource="account", action="update")) == statuses.count(200)
