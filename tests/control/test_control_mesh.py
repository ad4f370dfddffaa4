"""The mesh's traffic configuration on a real control plane, on each store: services staged
and validated as a whole, refused changes that store nothing, promotion to production,
declarative apply and export with a mesh section, and the sidecars' configuration long poll."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from control_support import TOKEN, ControlPlane, audit, count_rows, problem

REVIEWS = {
    "port": 9080,
    "instances": [{"address": "10.0.0.1", "port": 9080, "version": "v1"}],
    "subsets": [
        {"name": "v1", "labels": {"version": "v1"}},
        {"name": "v2", "labels": {"version": "v2"}},
    ],
}
PRODUCTPAGE = {
    "routes": [
        {
            "match": [{"path": {"prefix": "/api"}}],
            "destinations": [
                {"service": "reviews", "subset": "v1", "weight": 90},
                {"service": "reviews", "subset": "v2", "weight": 10},
            ],
            "timeout": 2.5,
        }
    ]
}


def put(cp: ControlPlane, name: str, body: Any, **kwargs: Any) -> httpx.Response:
    """PUT the service ``body`` under ``name``, named so in the body unless it says."""
    if isinstance(body, dict):
        body = {"name": name, **body}
    return cp.api.put(f"/mesh/services/{name}", json=body, **kwargs)


def config(cp: ControlPlane, env: str = "production", **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {TOKEN}", **kwargs.pop("headers", {})}
    return httpx.get(
        f"{cp.url}/dp/v1/mesh/config",
        params={"env": env, **kwargs},
        headers=headers,
        timeout=90,
    )


def version(cp: ControlPlane, env: str) -> int:
    return int(config(cp, env).json()["version"])


def test_services_are_created_read_replaced_listed_and_deleted_in_staging(
    control: ControlPlane,
) -> None:
    start = version(control, "staging")
    created = put(control, "reviews", REVIEWS)
    assert created.status_code == 201, created.text
    assert created.headers["location"] == "/admin/api/mesh/services/reviews"
    assert created.json() == {"name": "reviews", **REVIEWS}  # as given: defaults left out
    assert put(control, "productpage", {**PRODUCTPAGE, "name": "productpage"}).status_code == 201

    read = control.api.get("/mesh/services/reviews")
    assert read.status_code == 200 and read.json() == {"name": "reviews", **REVIEWS}
    replaced = put(control, "reviews", {**REVIEWS, "port": 9081})
    assert replaced.status_code == 200 and replaced.json()["port"] == 9081
    listed = control.api.get("/mesh/services").json()
    assert [s["name"] for s in listed["items"]] == ["productpage", "reviews"]
    assert listed["total"] == 2

    # Every change is a new staging version; production waits for a promotion.
    staged = config(control, "staging").json()
    assert int(staged["version"]) == start + 3
    assert {s["name"]: s.get("port") for s in staged["services"]} == {
        "productpage": None,
        "reviews": 9081,
    }
    assert config(control, "production").json()["services"] == []
    assert control.api.get("/mesh/services", params={"env": "production"}).json()["total"] == 0

    # An unchanged PUT is no new version and no audit entry.
    assert put(control, "reviews", {**REVIEWS, "port": 9081}).status_code == 200
    assert version(control, "staging") == start + 3

    deleted = control.api.delete("/mesh/services/productpage")
    assert deleted.status_code == 204
    problem(control.api.get("/mesh/services/productpage"), 404)
    problem(control.api.delete("/mesh/services/productpage"), 404)
    assert version(control, "staging") == start + 4
    entries = audit(control, resource="mesh_service")
    assert [(e["action"], e["resource_id"]) for e in reversed(entries)] == [
        ("create", "reviews"),
        ("create", "productpage"),
        ("update", "reviews"),
        ("delete", "productpage"),
    ]
    assert entries[1]["before"]["port"] == 9080 and entries[1]["after"]["port"] == 9081
    assert count_rows(control.database_url, "mesh_services") == 1


def test_invalid_services_are_refused_with_the_field_and_the_stored_config_is_kept(
    control: ControlPlane,
) -> None:
    assert put(control, "reviews", REVIEWS).status_code == 201
    assert put(control, "productpage", PRODUCTPAGE).status_code == 201
    before = config(control, "staging").json()
    audited = len(audit(control))

    cases = [
        ({**REVIEWS, "colour": "blue"}, "body.colour", "unknown field"),
        ({**REVIEWS, "port": "9080"}, "body.port", "must be an integer"),
        ({**REVIEWS, "port": 70000}, "body.port", "at most 65535"),
        (
            {**REVIEWS, "instances": [{"address": "not an address", "port": 1}]},
            "body.instances[0].address",
            "IP address or a host name",
        ),
        ({**REVIEWS, "name": "other"}, "body.name", "the path's name"),
        ({**REVIEWS, "name": None}, "body.name", "the path's name"),
        ({**REVIEWS, "protocol": "tcp", "routes": [{}]}, "body", "a tcp service has none"),
        (
            {"routes": [{"destinations": [{"subset": "v9"}]}]},
            "body.routes[0].destinations[0]",
            "subset 'v9' is not one of this service's subsets",
        ),
        (
            {
                **REVIEWS,
                "routes": [{"match": [{"path": {"exact": "/a\u0000b"}}], "destinations": [{}]}],
            },
            "body.routes[0].match[0].path.exact",
            "NUL",
        ),
        ([REVIEWS], "body", "must be an object"),
    ]
    for body, field, words in cases:
        refused = problem(put(control, "reviews", body), 422, field)
        assert words in refused["detail"], (field, refused)

    # A change that breaks another service's reference: that service's path is named.
    cut = {**REVIEWS, "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}
    refused = problem(
        put(control, "reviews", cut), 422, "services[productpage].routes[0].destinations[1]"
    )
    assert "service 'reviews' has no subset 'v2'" in refused["detail"]
    dangling = {"routes": [{"destinations": [{"service": "ratings"}]}]}
    problem(put(control, "details", dangling), 422, "body.routes[0].destinations[0]")
    # Removing a service others route to is a conflict.
    refused = problem(control.api.delete("/mesh/services/reviews"), 409)
    assert refused["errors"][0]["field"].startswith("services[productpage].routes[0]")

    unnamed = control.api.put("/mesh/services/reviews", json=REVIEWS)
    problem(unnamed, 422, "body.name")
    # Not JSON, not an object, the wrong media type, a bad name in the path.
    not_json = control.api.put(
        "/mesh/services/reviews", content=b"{", headers={"Content-Type": "application/json"}
    )
    problem(not_json, 400, "body")
    text = control.api.put(
        "/mesh/services/reviews", content=b"port: 1", headers={"Content-Type": "text/yaml"}
    )
    problem(text, 415, "header.content-type")
    problem(put(control, "Not_A_DNS_Name", REVIEWS), 422, "path.name")

    assert config(control, "staging").json() == before
    assert len(audit(control)) == audited
    assert control.api.get("/mesh/services/reviews").json() == {"name": "reviews", **REVIEWS}


def test_writes_need_the_write_scope(control_sqlite: ControlPlane) -> None:
    cp = control_sqlite
    reader = cp.post("/tokens", {"name": "reader", "scopes": ["read"]})["token"]
    headers = {"Authorization": f"Bearer {reader}"}
    problem(put(cp, "reviews", REVIEWS, headers=headers), 403)
    problem(cp.api.post("/mesh/promote", headers=headers), 403)
    assert cp.api.get("/mesh/services", headers=headers).status_code == 200
    no_token = httpx.get(f"{cp.url}/dp/v1/mesh/config")
    problem(no_token, 401)
    assert put(cp, "reviews", REVIEWS).status_code == 201


def test_promotion_makes_a_new_production_version_that_sidecars_pull(
    control: ControlPlane,
) -> None:
    first = config(control, "production")
    assert first.status_code == 200 and first.json()["services"] == []
    assert put(control, "reviews", REVIEWS).status_code == 201
    assert put(control, "productpage", PRODUCTPAGE).status_code == 201

    promoted = control.api.post("/mesh/promote")
    assert promoted.status_code == 200, promoted.text
    result = promoted.json()
    assert result["env"] == "production" and result["changed"] is True
    assert result["version"] == int(first.json()["version"]) + 1

    pulled = config(control, "production")
    assert pulled.headers["etag"].startswith(f'"mesh-production-{result["version"]}-')
    assert pulled.headers["x-meshgate-version"] == str(result["version"])
    document = pulled.json()
    assert document["version"] == str(result["version"])
    assert document == config(control, "staging").json() | {"version": document["version"]}
    # What a sidecar runs: the document validates as a MeshConfig.
    from meshgate.config.loader import validate_mesh

    mesh = validate_mesh(document)
    page = mesh.service("productpage")
    assert page is not None and page.routes[0].destinations[1].weight == 10

    again = control.api.post("/mesh/promote").json()
    assert again["changed"] is False and again["version"] == result["version"]

    # Staging moves on; production keeps what was promoted until the next promotion.
    assert control.api.delete("/mesh/services/productpage").status_code == 204
    assert len(config(control, "production").json()["services"]) == 2
    versions = control.api.get("/mesh/snapshots", params={"env": "production"}).json()
    assert [v["version"] for v in versions["items"]] == [result["version"], 1]
    assert versions["items"][0]["reason"] == "promote"
    old = control.api.get(f"/mesh/snapshots/{result['version']}", params={"env": "production"})
    assert old.json() == document
    problem(control.api.get("/mesh/snapshots/99", params={"env": "production"}), 404)
    [entry] = audit(control, resource="mesh", action="promote")
    assert entry["after"] == {"version": result["version"]}


def test_the_config_long_poll_answers_304_until_a_new_version_then_200(
    control_sqlite: ControlPlane,
) -> None:
    cp = control_sqlite
    current = config(cp)
    etag = current.headers["etag"]
    unchanged = config(cp, headers={"If-None-Match": etag})
    assert unchanged.status_code == 304 and unchanged.headers["etag"] == etag

    held = time.monotonic()
    waited = config(cp, wait=0.6, headers={"If-None-Match": etag})
    assert waited.status_code == 304 and time.monotonic() - held >= 0.55

    answers: list[tuple[float, httpx.Response]] = []

    def poll() -> None:
        response = config(cp, wait=30, headers={"If-None-Match": etag})
        answers.append((time.monotonic(), response))

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.5)
    assert put(cp, "reviews", REVIEWS).status_code == 201
    promoted_at = time.monotonic()
    assert cp.api.post("/mesh/promote").json()["changed"] is True
    poller.join(10)
    [(answered_at, response)] = answers
    assert response.status_code == 200 and response.headers["etag"] != etag
    assert [s["name"] for s in response.json()["services"]] == ["reviews"]
    # Woken by the promotion, not by its 2 s re-read of the store.
    assert answered_at - promoted_at < 1.0, answered_at - promoted_at

    problem(config(cp, wait=61), 422, "query.wait")
    problem(config(cp, env="qa"), 422, "query.env")


def mesh_file() -> dict[str, Any]:
    return copy.deepcopy(
        {
            "products": [
                {
                    "name": "echo",
                    "path_prefix": "/echo",
                    "backend": "http://127.0.0.1:9",
                    "auth": {"type": "api_key"},
                    "metrics": [{"name": "hits"}],
                }
            ],
            "mesh": {
                "services": [
                    {"name": "reviews", **REVIEWS},
                    {"name": "productpage", **PRODUCTPAGE},
                ]
            },
        }
    )


def apply(cp: ControlPlane, document: Any, **params: Any) -> httpx.Response:
    query = {k: str(v).lower() for k, v in params.items()}
    return cp.api.post(
        "/declarative",
        content=yaml.safe_dump(document),
        params=query,
        headers={"Content-Type": "application/yaml"},
    )


def export(cp: ControlPlane) -> dict[str, Any]:
    response = cp.api.get("/declarative", params={"format": "yaml"})
    assert response.status_code == 200, response.text
    return dict(yaml.safe_load(response.text))


def test_apply_and_export_carry_the_mesh_section_and_round_trip(control: ControlPlane) -> None:
    start = version(control, "staging")
    dry = apply(control, mesh_file(), dry_run=True)
    assert dry.status_code == 200, dry.text
    lines = [c["text"] for c in dry.json()["changes"]]
    assert any(line.startswith("+ mesh_service reviews: ") for line in lines), lines
    assert control.api.get("/mesh/services").json()["total"] == 0

    done = apply(control, mesh_file())
    assert done.status_code == 200, done.text
    assert done.json()["summary"]["add"] >= 3
    staged = config(control, "staging").json()
    assert [s["name"] for s in staged["services"]] == ["productpage", "reviews"]
    assert int(staged["version"]) == start + 1  # one apply, one version

    exported = export(control)
    assert exported["mesh"] == {
        "services": [{"name": "productpage", **PRODUCTPAGE}, {"name": "reviews", **REVIEWS}]
    }
    again = apply(control, exported)
    assert again.status_code == 200 and again.json()["changes"] == []
    assert version(control, "staging") == start + 1
    # Staging only, as products: production has the services once promoted.
    assert config(control, "production").json()["services"] == []
    assert control.api.post("/mesh/promote").json()["changed"] is True
    assert len(config(control, "production").json()["services"]) == 2

    # A file without the section leaves the mesh alone; with it, unnamed services go.
    assert apply(control, {"products": exported["products"]}).json()["changes"] == []
    only_page = {**exported, "mesh": {"services": [{"name": "productpage", **PRODUCTPAGE}]}}
    kept = apply(control, only_page, prune=False)
    assert kept.status_code == 200 and kept.json()["changes"] == []
    # Pruning reviews would leave productpage routing to nothing: refused, nothing changed.
    problem(apply(control, only_page), 422, "mesh.services[0].routes[0].destinations[0]")
    assert control.api.get("/mesh/services").json()["total"] == 2
    changed = {**REVIEWS, "port": 9090}
    document = {
        **exported,
        "mesh": {"services": [{"name": "reviews", **changed}]},
    }
    removed = apply(control, document)
    assert removed.status_code == 200, removed.text
    assert [c["text"] for c in removed.json()["changes"]] == [
        "~ mesh_service reviews: port: 9080 → 9090",
        "- mesh_service productpage",
    ]
    assert [s["name"] for s in control.api.get("/mesh/services").json()["items"]] == ["reviews"]
    entries = audit(control, resource="mesh_service")
    assert [(e["action"], e["resource_id"]) for e in entries[:2]] == [
        ("delete", "productpage"),
        ("update", "reviews"),
    ]


def test_an_invalid_mesh_section_is_refused_with_its_paths_and_nothing_applied(
    control: ControlPlane,
) -> None:
    bad = mesh_file()
    bad["mesh"]["services"][1]["routes"][0]["destinations"][0]["subset"] = "v7"
    bad["mesh"]["services"].append({"name": "ratings", "port": "80", "bogus": 1})
    refused = problem(apply(control, bad), 422)
    fields = {e["field"] for e in refused["errors"]}
    assert {"mesh.services[2].port", "mesh.services[2].bogus"} <= fields, refused

    refs = mesh_file()
    refs["mesh"]["services"][1]["routes"][0]["destinations"][0]["subset"] = "v7"
    refused = problem(apply(control, refs), 422, "mesh.services[1].routes[0].destinations[0]")
    assert "has no subset 'v7'" in refused["detail"]
    twice = mesh_file()
    twice["mesh"]["services"].append({"name": "reviews"})
    assert "reviews given twice" in problem(apply(control, twice), 422, "mesh")["detail"]
    versioned = {**mesh_file(), "mesh": {"services": [], "version": "3"}}
    problem(apply(control, versioned), 422, "mesh.version")
    problem(apply(control, {**mesh_file(), "mesh": ["reviews"]}), 422, "mesh")

    assert control.api.get("/mesh/services").json()["total"] == 0
    assert export(control) == {"products": []}  # the product was not applied either


def test_the_apply_command_takes_a_file_with_a_mesh_section(
    control_sqlite: ControlPlane, tmp_path: Path
) -> None:
    cp = control_sqlite
    file = tmp_path / "mesh.yaml"
    file.write_text(yaml.safe_dump(mesh_file()))
    target = ("--control-plane", cp.url, "--token", TOKEN)

    def meshgate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshgate", *args, *target],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env=dict(os.environ),
        )

    done = meshgate("apply", str(file))
    assert done.returncode == 0, done.stderr
    assert "+ mesh_service reviews" in done.stdout
    assert "POST /admin/api/mesh/promote" in done.stdout
    out = tmp_path / "out.yaml"
    assert meshgate("export", "--output", str(out)).returncode == 0
    assert yaml.safe_load(out.read_text())["mesh"]["services"][1]["name"] == "reviews"
    assert meshgate("apply", str(out)).stdout.strip() == "no changes"

    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"products": [], "mesh": {"services": [{"name": "A"}]}}))
    refused = meshgate("apply", str(bad))
    assert refused.returncode == 1 and "mesh.services[0].name" in refused.stderr


def test_concurrent_changes_each_make_one_version_holding_every_change_before_it(
    control: ControlPlane,
) -> None:
    start = version(control, "staging")
    errors: list[str] = []

    def write(n: int) -> None:
        with httpx.Client(
            base_url=f"{control.url}/admin/api",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=60,
        ) as client:
            body = {"name": f"svc-{n}", "port": 1000 + n}
            response = client.put(f"/mesh/services/svc-{n}", json=body)
            if response.status_code != 201:
                errors.append(response.text)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    staged = config(control, "staging").json()
    assert int(staged["version"]) == start + 16
    assert sorted(s["port"] for s in staged["services"]) == [1000 + n for n in range(16)]
    versions = control.api.get("/mesh/snapshots", params={"env": "staging"}).json()["items"]
    # Each version has one service more than the one before it.
    for newer, older in zip(versions, versions[1:], strict=False):
        assert newer["version"] == older["version"] + 1
    sizes = [
        len(
            control.api.get(f"/mesh/snapshots/{v['version']}", params={"env": "staging"}).json()[
                "services"
            ]
        )
        for v in versions
    ]
    assert sizes == list(range(16, 0, -1)) + [0]
