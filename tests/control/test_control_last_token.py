"""The last token that may write cannot be deleted: nobody could make another one."""

from __future__ import annotations

import httpx
from control_support import ControlPlane, problem


def test_the_last_write_token_stays(control_sqlite: ControlPlane) -> None:
    cp = control_sqlite
    [bootstrap] = cp.api.get("/tokens").json()
    refused = problem(cp.api.delete(f"/tokens/{bootstrap['id']}"), 409)
    assert "last token with the write scope" in refused["detail"]
    reader = cp.post("/tokens", {"name": "reader", "scopes": ["read"]})
    problem(cp.api.delete(f"/tokens/{bootstrap['id']}"), 409)

    writer = cp.post("/tokens", {"name": "writer", "scopes": ["read", "write"]})
    assert cp.api.delete(f"/tokens/{bootstrap['id']}").status_code == 204
    other = httpx.Client(
        base_url=cp.api.base_url, headers={"Authorization": f"Bearer {writer['token']}"}
    )
    listed = {t["name"] for t in other.get("/tokens").json()}
    assert listed == {"reader", "writer"}
    problem(other.delete(f"/tokens/{writer['id']}"), 409)
    assert other.delete(f"/tokens/{reader['id']}").status_code == 204
    other.close()
