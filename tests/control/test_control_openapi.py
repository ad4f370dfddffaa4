"""OpenAPI import against a real control plane: products from realistic documents, served
by a gateway; re-import; hostile documents refused with the path of what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from control_support import TOKEN, ControlPlane, attached_gateway
from harness import echo_upstream, within

from meshgate.config.loader import MAX_BYTES

DATA = Path(__file__).parent / "data_openapi"
PETSTORE = (DATA / "petstore.yaml").read_bytes()
SHOP = (DATA / "shop-oidc.json").read_bytes()
JWKS = "https://idp.example.com/realms/shop/protocol/openid-connect/certs"
SHOP_SERVER = "https://api.shop.example.com/v2"


def import_spec(
    cp: ControlPlane, body: bytes | str, content_type: str = "application/yaml", **params: Any
) -> httpx.Response:
    query = {k: str(v).lower() if isinstance(v, bool) else v for k, v in params.items()}
    return cp.api.post(
        "/imports/openapi", content=body, params=query, headers={"Content-Type": content_type}
    )


def imported(cp: ControlPlane, body: bytes, **params: Any) -> dict[str, Any]:
    response = import_spec(cp, body, **params)
    assert response.status_code in (200, 201), response.text
    return dict(response.json())


def product_state(cp: ControlPlane, name: str) -> dict[str, Any]:
    document = cp.api.get("/declarative", params={"format": "json"}).json()
    return next(p for p in document["products"] if p["name"] == name)


def test_a_petstore_with_an_api_key_becomes_a_product(control: ControlPlane) -> None:
    response = import_spec(control, PETSTORE, product="petstore")
    assert response.status_code == 201, response.text
    result = response.json()
    assert result["created"] is True and result["operations"] == 5
    assert "+ product petstore: " in result["changes"][0]["text"]

    product = product_state(control, "petstore")
    assert product["path_prefix"] == "/petstore"
    assert product["backend"] == "http://127.0.0.1:9001/v1"  # servers[0], its variable filled
    assert product["auth"] == {"type": "api_key", "header": "X-Pet-Key"}
    assert product["metrics"] == [
        {"name": "hits"},
        {"name": "listPets", "parent": "hits", "description": "List all pets"},
        {"name": "createPets", "parent": "hits", "description": "Create a pet"},
        {"name": "pets.mine_owned", "parent": "hits", "description": "The caller's pets"},
        {"name": "showPetById", "parent": "hits", "description": "Info for a specific pet"},
        {"name": "delete_pets_petId", "parent": "hits"},
    ]
    assert [
        (r["method"], r["pattern"], r["metric"], r["last"]) for r in product["mapping_rules"]
    ] == [
        ("GET", "/pets$", "listPets", True),
        ("POST", "/pets$", "createPets", True),
        ("GET", "/pets/mine$", "pets.mine_owned", True),
        ("GET", "/pets/{petId}$", "showPetById", True),
        ("DELETE", "/pets/{petId}$", "delete_pets_petId", True),
    ]

    read = control.api.get(f"/products/{result['product']['id']}/openapi")
    assert read.status_code == 200 and read.headers["content-type"] == "application/json"
    stored = read.json()
    assert stored["info"]["title"] == "Swagger Petstore"
    example = stored["paths"]["/pets"]["get"]["responses"]["200"]["content"]["application/json"]
    assert example["example"][0]["born"] == "2020-01-01"  # YAML's date and number key, as text
    entries = control.api.get("/audit", params={"action": "import_openapi"}).json()["items"]
    assert entries[0]["after"] == {"openapi": {"title": "Swagger Petstore", "version": "1.0.0"}}
    control.wait_snapshot("staging", lambda d: [p["name"] for p in d["products"]] == ["petstore"])


def test_an_imported_product_serves_its_operations_at_a_gateway(
    control_sqlite: ControlPlane, tmp_path: Path
) -> None:
    cp = control_sqlite
    with echo_upstream(tmp_path) as port:
        result = imported(cp, PETSTORE, product="petstore", backend=f"http://127.0.0.1:{port}/v1")
        product_id = result["product"]["id"]
        metrics = {
            m["name"]: m["id"]
            for m in cp.api.get(f"/products/{product_id}/metrics").json()["items"]
        }
        plan = cp.post(f"/products/{product_id}/plans", {"name": "basic"})
        for metric in ("hits", "listPets", "showPetById"):
            cp.post(
                f"/plans/{plan['id']}/limits",
                {"metric_id": metrics[metric], "period": "day", "value": 100},
            )
        account = cp.post("/accounts", {"name": "pet-lovers"})
        app = cp.post(
            "/applications", {"account_id": account["id"], "plan_id": plan["id"], "name": "a"}
        )
        headers = {"X-Pet-Key": app["key"]}
        with attached_gateway(tmp_path, cp.url, TOKEN, env="staging") as gw:

            def listed() -> bool:
                response = httpx.get(f"{gw.url}/petstore/pets", headers=headers, timeout=5)
                return response.status_code == 200

            within(5, listed, "the imported product served")
            echoed = httpx.get(f"{gw.url}/petstore/pets/42", headers=headers, timeout=5)
            assert echoed.status_code == 200 and echoed.json()["path"] == "/v1/pets/42"
            unknown = httpx.get(f"{gw.url}/petstore/cats", headers=headers, timeout=5)
            assert unknown.status_code == 404  # no operation of the document matches
            anonymous = httpx.get(f"{gw.url}/petstore/pets", timeout=5)
            assert anonymous.status_code == 401
            usage = httpx.get(f"{gw.admin_url}/usage/{app['app_id']}", timeout=5).json()
            values = {u["metric"]: u["value"] for u in usage["products"][0]["limits"]}
            assert values["showPetById"] == 1 and values["listPets"] >= 1
            assert values["hits"] == values["listPets"] + 1


def test_openid_connect_becomes_jwt_and_needs_the_signing_keys(control: ControlPlane) -> None:
    backend = "http://127.0.0.1:9005/v2"
    response = import_spec(control, SHOP, "application/json", product="shop", backend=backend)
    assert response.status_code == 422
    [error] = response.json()["errors"]
    assert error["field"] == "components.securitySchemes.oidc"
    assert "pass jwks_url" in error["message"]
    assert "/.well-known/openid-configuration" in error["message"]

    result = imported(control, SHOP, product="shop", backend=backend, jwks_url=JWKS)
    assert any("'basic' (http) cannot be enforced" in note for note in result["notes"])
    product = product_state(control, "shop")
    assert product["auth"] == {
        "type": "jwt",
        "issuer": "https://idp.example.com/realms/shop",
        "jwks_url": JWKS,
    }
    assert [r["pattern"] for r in product["mapping_rules"]] == [
        "/orders$",
        "/orders$",
        "/orders/{id}/items/{item}$",
    ]
    # A re-import without jwks_url keeps the keys the product has.
    assert imported(control, SHOP, product="shop", backend=backend)["changes"] == []
    # Without backend=, the document's https:// server is the backend.
    changes = imported(control, SHOP, product="shop")["changes"]
    assert [(c["resource"], c["fields"]["url"]["new"]) for c in changes] == [
        ("backend", SHOP_SERVER)
    ]


def test_a_reimport_matches_methods_and_rules_and_keeps_plans_and_applications(
    control_sqlite: ControlPlane,
) -> None:
    cp = control_sqlite
    product_id = imported(cp, PETSTORE, product="petstore")["product"]["id"]
    metrics = {
        m["name"]: m["id"] for m in cp.api.get(f"/products/{product_id}/metrics").json()["items"]
    }
    bytes_metric = cp.post(f"/products/{product_id}/metrics", {"name": "bytes"})
    plan = cp.post(f"/products/{product_id}/plans", {"name": "gold", "state": "published"})
    for metric_id in (metrics["listPets"], metrics["createPets"], bytes_metric["id"]):
        cp.post(
            f"/plans/{plan['id']}/limits", {"metric_id": metric_id, "period": "day", "value": 9}
        )
    account = cp.post("/accounts", {"name": "acme"})
    app = cp.post(
        "/applications", {"account_id": account["id"], "plan_id": plan["id"], "name": "a"}
    )
    before = product_state(cp, "petstore")

    document = yaml.safe_load(PETSTORE)
    del document["paths"]["/pets"]["post"]
    document["paths"]["/pets/{petId}"] = {
        "put": {"operationId": "updatePet", "responses": {"200": {"description": "ok"}}}
    }
    document["info"]["version"] = "2.0.0"
    result = imported(cp, json.dumps(document, default=str).encode(), product="petstore")
    assert result["created"] is False
    assert [c["text"] for c in result["changes"]] == [
        '+ metric petstore updatePet: parent="hits"',
        "- mapping_rule petstore POST /pets$",
        "- mapping_rule petstore GET /pets/{petId}$",
        '+ mapping_rule petstore PUT /pets/{petId}$: metric="updatePet", increment=1, last=true',
        "- mapping_rule petstore DELETE /pets/{petId}$",
        "- limit petstore gold createPets/day",
        "- metric petstore createPets",
        "- metric petstore showPetById",
        "- metric petstore delete_pets_petId",
    ]

    after = product_state(cp, "petstore")
    assert after["applications"] == before["applications"]  # the key still works
    assert after["applications"][0]["id"] == app["app_id"]
    [gold] = after["plans"]
    assert {lim["metric"] for lim in gold["limits"]} == {"listPets", "bytes"}
    assert {"name": "bytes"} in after["metrics"]  # not a method: the document does not own it
    stored = cp.api.get(f"/products/{product_id}/openapi").json()
    assert stored["info"]["version"] == "2.0.0"

    again = imported(cp, json.dumps(document, default=str).encode(), product="petstore")
    assert again["changes"] == []


def test_a_dry_run_import_creates_nothing(control_sqlite: ControlPlane) -> None:
    result = imported(control_sqlite, PETSTORE, product="petstore", dry_run=True)
    assert result["dry_run"] is True and result["product"]["id"] is None
    assert len(result["changes"]) > 10
    assert control_sqlite.api.get("/products").json()["total"] == 0


def _spec(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "t", "version": "1"},
        "servers": [{"url": "http://127.0.0.1:9001"}],
        "paths": {"/a": {"get": {"operationId": "a", "responses": {}}}},
    }
    document.update(overrides)
    return document


def _json(document: Any) -> bytes:
    return json.dumps(document, default=str).encode()


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
)

HOSTILE = [
    ("swagger 2", _json({"swagger": "2.0", "info": {}, "paths": {}}), 422, "swagger"),
    ("not an object", b"[1, 2]", 422, "must be an OpenAPI object"),
    ("openapi 4", _json(_spec(openapi="4.0.0")), 422, "openapi: must be a 3.x version"),
    ("no title", _json(_spec(info={"version": "1"})), 422, "info.title: is required"),
    (
        "a $ref loop",
        _json(
            _spec(
                components={
                    "schemas": {
                        "A": {"$ref": "#/components/schemas/B"},
                        "B": {"$ref": "#/components/schemas/A"},
                    }
                }
            )
        ),
        422,
        "the references loop",
    ),
    (
        "a dangling $ref",
        _json(_spec(paths={"/a": {"$ref": "#/components/pathItems/nope"}})),
        422,
        "'#/components/pathItems/nope' points at nothing",
    ),
    (
        "an external path item",
        _json(_spec(paths={"/a": {"$ref": "other.yaml#/paths/a"}})),
        422,
        "only references within the document",
    ),
    ("a relative path", _json(_spec(paths={"pets": {}})), 422, "paths.pets: a path must start"),
    ("an ftp server", _json(_spec(servers=[{"url": "ftp://x"}])), 422, "backend=http://"),
    ("a billion laughs", LAUGHS.encode(), 422, "values once aliases are expanded"),
    ("a recursive alias", b"openapi: &a [*a]\n", 422, "refers to its own ancestor"),
    ("deep JSON", b"[" * 100_000 + b"]" * 100_000, 422, "nested deeper than"),
    ("deep YAML", b"a: " + b"[" * 150 + b"]" * 150, 422, "nested deeper than 100 levels"),
    ("not UTF-8", b"openapi: \xff\xfe 3.0.0\n", 422, "not UTF-8 text: byte 0xff on line 1"),
    ("a Python tag", b"openapi: !!python/object/apply:os.system [id]\n", 422, "invalid YAML"),
    ("NaN", b'{"openapi": NaN}', 422, "invalid document: NaN is not a JSON number"),
    ("YAML's nan", b"openapi: .nan\n", 422, "openapi: must be a finite number"),
    ("empty", b"  \n", 422, "the document is empty"),
    ("oversized", b"#" * (MAX_BYTES + 1), 413, "exceeds"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_and_malformed_documents_are_refused_and_nothing_is_created(
    control_sqlite: ControlPlane, case: tuple[str, bytes, int, str]
) -> None:
    _, body, status, expected = case
    media = "application/json" if body[:1] in (b"{", b"[") else "application/yaml"
    response = import_spec(control_sqlite, body, media, product="x")
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert expected in response.text
    assert control_sqlite.api.get("/products").json()["total"] == 0


def test_unsupported_media_types_and_bad_parameters_are_refused(
    control_sqlite: ControlPlane,
) -> None:
    cp = control_sqlite
    assert import_spec(cp, PETSTORE, "application/xml", product="p").status_code == 415
    bad_backend = import_spec(cp, PETSTORE, product="p", backend="ftp://x")
    assert bad_backend.status_code == 422
    assert bad_backend.json()["errors"][0]["field"] == "query.backend"
    assert import_spec(cp, PETSTORE, product="no spaces").status_code == 422
    assert cp.api.get("/products/999/openapi").status_code == 404
    plain = cp.post("/products", {"name": "plain", "auth": {"type": "api_key"}})
    missing = cp.api.get(f"/products/{plain['id']}/openapi")
    assert missing.status_code == 404 and "import one" in missing.json()["detail"]


def test_the_import_command_end_to_end(control_sqlite: ControlPlane, tmp_path: Path) -> None:
    target = ["--control-plane", control_sqlite.url, "--token", TOKEN]

    def meshgate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshgate", *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env=dict(os.environ),
        )

    spec = str(DATA / "petstore.yaml")
    first = meshgate("import", "openapi", spec, "--product", "petstore", *target)
    assert first.returncode == 0, first.stderr
    assert "+ metric petstore listPets" in first.stdout
    assert (
        first.stdout.strip().endswith("operations") and "created product petstore" in first.stdout
    )
    second = meshgate("import", "openapi", spec, "--product", "petstore", *target)
    # A re-import that changes nothing says so, and only that.
    assert second.returncode == 0 and second.stdout.strip() == "no changes", second.stdout

    shop = str(DATA / "shop-oidc.json")
    refused = meshgate(
        "import",
        "openapi",
        shop,
        "--product",
        "shop",
        "--backend",
        "http://127.0.0.1:9/v2",
        *target,
    )
    assert refused.returncode == 1 and "HTTP 422" in refused.stderr
    assert "components.securitySchemes.oidc:" in refused.stderr
    missing = meshgate("import", "openapi", str(tmp_path / "nope.yaml"), "--product", "x", *target)
    assert missing.returncode == 1 and "cannot read" in missing.stderr
