"""Declarative management against a real control plane: the difference a file makes, applied
in one transaction; the model exported in the same format; the ``meshgate apply`` and
``meshgate export`` commands end to end."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml
from control_support import TOKEN, ControlPlane, make_product, make_subscription

from meshgate.config import hash_key, parse_config
from meshgate.config.loader import MAX_BYTES

KEY1 = "key-one-0123456789abcdef"
KEY2 = "key-two-0123456789abcdef"
KEY3 = "key-three-0123456789abcd"
KEY4 = "key-four-0123456789abcde"
KEY5 = "key-five-0123456789abcde"
SALT = "00112233445566778899aabbccddeeff"


def rich_file() -> dict[str, Any]:
    """Three products covering what the format says: backends at paths, every auth mode with
    applications, methods, rules with increments, plans with limits, policies, clear keys and
    key hashes, a suspended application."""
    return {
        "listen": "127.0.0.1:8080",
        "products": [
            {
                "name": "echo",
                "hosts": ["api.example.com", "*.example.org"],
                "path_prefix": "/echo",
                "backends": [
                    {"path": "/", "url": "http://127.0.0.1:9001"},
                    {"path": "/v2", "url": "http://127.0.0.1:9002/base"},
                ],
                "auth": {"type": "api_key", "header": "X-API-Key"},
                "metrics": [
                    {"name": "hits"},
                    {"name": "search", "parent": "hits", "description": "Searches"},
                    {"name": "bytes"},
                ],
                "mapping_rules": [
                    {"method": "GET", "pattern": "/search", "metric": "search", "last": True},
                    {"method": "POST", "pattern": "/upload", "metric": "bytes", "increment": 5},
                    {"method": "ANY", "pattern": "/", "metric": "hits"},
                ],
                "plans": [
                    {
                        "name": "basic",
                        "limits": [
                            {"metric": "hits", "period": "minute", "value": 5},
                            {"metric": "search", "period": "day", "value": 1000},
                        ],
                    },
                    {
                        "name": "pro",
                        "limits": [{"metric": "hits", "period": "minute", "value": 500}],
                    },
                ],
                "policies": [{"cors": {"allow_origins": ["*"]}}],
                "upstream_response_timeout": 12.5,
                "applications": [
                    {"id": "app-basic", "plan": "basic", "keys": [KEY1]},
                    {"id": "app-pro", "plan": "pro", "keys": [KEY2, KEY3], "state": "suspended"},
                ],
            },
            {
                "name": "tokens",
                "path_prefix": "/tokens",
                "backend": "http://127.0.0.1:9003",
                "auth": {
                    "type": "jwt",
                    "issuer": "https://idp.example.com",
                    "audience": "api",
                    "jwks_url": "https://idp.example.com/jwks",
                },
                "hide_credentials": False,
                "case_insensitive_rules": True,
                "plans": [{"name": "free"}],
                "applications": [{"id": "client-1", "plan": "free"}],
            },
            {
                "name": "hashed",
                "path_prefix": "/hashed",
                "backend": "http://127.0.0.1:9004",
                "auth": {"type": "app_id_key"},
                "key_salt": SALT,
                "plans": [{"name": "p"}],
                "applications": [
                    {"id": "app-h", "plan": "p", "key_hashes": [hash_key(SALT, KEY4)]}
                ],
            },
        ],
    }


def apply(cp: ControlPlane, document: Any, **params: Any) -> httpx.Response:
    body = document if isinstance(document, (str, bytes)) else yaml.safe_dump(document)
    query = {k: str(v).lower() for k, v in params.items()}
    return cp.api.post(
        "/declarative", content=body, params=query, headers={"Content-Type": "application/yaml"}
    )


def applied(cp: ControlPlane, document: Any, **params: Any) -> dict[str, Any]:
    response = apply(cp, document, **params)
    assert response.status_code == 200, response.text
    return dict(response.json())


def export(cp: ControlPlane, **params: Any) -> dict[str, Any]:
    response = cp.api.get("/declarative", params={"format": "yaml", **params})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/yaml")
    return dict(yaml.safe_load(response.text))


def texts(result: dict[str, Any]) -> list[str]:
    return [c["text"] for c in result["changes"]]


def equivalent(document: dict[str, Any], salts: dict[str, str]) -> list[dict[str, Any]]:
    """What a gateway would run, keys compared as hashes under the stored salts."""
    config = parse_config(yaml.safe_dump(document))
    out = []
    for product in config.products:
        salt = salts[product.name]
        data = product.model_dump(
            mode="json", exclude={"applications", "key_salt", "backend", "backends"}
        )
        data["backends"] = sorted((b.path, b.url) for b in product.backend_usages())
        data["metrics"].sort(key=lambda m: m["name"])  # a set: their order means nothing
        data["applications"] = sorted(
            (a.id, a.plan, a.state, sorted({hash_key(salt, k) for k in a.keys} | set(a.key_hashes)))
            for a in product.applications
        )
        out.append(data)
    return sorted(out, key=lambda d: d["name"])


def salts_of(exported: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p["key_salt"] for p in exported["products"]}


def audit(cp: ControlPlane, **params: Any) -> list[dict[str, Any]]:
    return list(cp.api.get("/audit", params={"per_page": 500, **params}).json()["items"])


def test_a_dry_run_shows_the_difference_and_changes_nothing(control: ControlPlane) -> None:
    result = applied(control, rich_file(), dry_run=True)
    assert result["dry_run"] is True and result["applied"] is False
    lines = texts(result)
    assert lines[0].startswith("+ product echo: ") and 'path_prefix="/echo"' in lines[0]
    assert '+ backend echo /v2: url="http://127.0.0.1:9002/base"' in lines
    assert '+ metric echo search: parent="hits", description="Searches"' in lines
    assert '+ mapping_rule echo POST /upload: metric="bytes", increment=5, last=false' in lines
    assert "+ limit echo basic search/day: value=1000" in lines
    assert '+ application echo app-pro: plan="pro", state="suspended"' in lines
    assert f"+ key hashed app-h {hash_key(SALT, KEY4)[:15]}…" in lines
    assert result["summary"] == {"add": len(lines), "change": 0, "remove": 0}
    assert any("listen" in note and "ignored" in note for note in result["notes"])
    assert export(control) == {"products": []}
    assert audit(control) == []


def test_apply_then_export_gives_back_an_equivalent_file_and_reapplying_is_a_no_op(
    control: ControlPlane,
) -> None:
    result = applied(control, rich_file())
    assert result["applied"] is True and result["summary"]["add"] > 20

    exported = export(control)
    salts = salts_of(exported)
    assert salts["hashed"] == SALT  # a new product takes the salt its key hashes were made with
    assert equivalent(exported, salts) == equivalent(rich_file(), salts)
    echo = next(p for p in exported["products"] if p["name"] == "echo")
    hashes = [h for app in echo["applications"] for h in app.get("key_hashes", [])]
    assert hash_key(salts["echo"], KEY1) in hashes and KEY1 not in str(exported)

    assert texts(applied(control, exported)) == []
    assert texts(applied(control, rich_file())) == []
    assert export(control) == exported

    staged = control.wait_snapshot("staging", lambda d: len(d["products"]) == 3)
    tokens_staged = next(p for p in staged["products"] if p["name"] == "tokens")
    assert tokens_staged["hide_credentials"] is False
    assert tokens_staged["case_insensitive_rules"] is True
    tokens = next(p for p in exported["products"] if p["name"] == "tokens")
    assert (tokens["hide_credentials"], tokens["case_insensitive_rules"]) == (False, True)
    echo_exported = next(p for p in exported["products"] if p["name"] == "echo")
    assert "hide_credentials" not in echo_exported  # defaults are left out, as in a file
    echo_staged = next(p for p in staged["products"] if p["name"] == "echo")
    assert {a["id"]: a.get("state", "live") for a in echo_staged["applications"]} == {
        "app-basic": "live",
        "app-pro": "suspended",
    }
    entries = audit(control, resource="declarative")
    assert [e["action"] for e in entries] == ["apply"]  # the no-ops wrote nothing


def test_each_change_is_reported_by_resource_and_field_then_applied(
    control_sqlite: ControlPlane,
) -> None:
    cp = control_sqlite
    applied(cp, rich_file())
    salt = salts_of(export(cp))["echo"]
    changed = rich_file()
    echo = changed["products"][0]
    echo["path_prefix"] = "/echo2"
    echo["auth"]["header"] = "X-Key"
    echo["case_insensitive_rules"] = True
    echo["metrics"] = [m for m in echo["metrics"] if m["name"] != "bytes"]
    echo["mapping_rules"] = [r for r in echo["mapping_rules"] if r["metric"] != "bytes"]
    echo["plans"] = [echo["plans"][0]]
    echo["plans"][0]["limits"][0]["value"] = 10
    echo["applications"] = [
        {"id": "app-basic", "plan": "basic", "keys": [KEY5]},
        {"id": "app-pro", "plan": "basic", "keys": [KEY2, KEY3]},
        {"id": "app-new", "plan": "basic"},
    ]
    del changed["products"][1]  # tokens: not named, so removed

    def key(name: str) -> str:
        return hash_key(salt, name)[:15] + "…"

    expected = [
        "- product tokens: applications=1",
        '~ product echo: path_prefix: "/echo" → "/echo2", auth.header: "X-API-Key" → "X-Key", '
        "case_insensitive_rules: false → true",
        "- mapping_rule echo POST /upload",
        "~ limit echo basic hits/minute: value: 5 → 10",
        "- limit echo pro hits/minute",
        '~ application echo app-pro: plan: "pro" → "basic", state: "suspended" → "live"',
        '+ application echo app-new: plan="basic", state="live"',
        f"- key echo app-basic {key(KEY1)}",
        f"+ key echo app-basic {key(KEY5)}",
        "- plan echo pro",
        "- metric echo bytes",
    ]
    preview = applied(cp, changed, dry_run=True)
    assert texts(preview) == expected
    assert preview["summary"] == {"add": 2, "change": 3, "remove": 6}
    assert texts(applied(cp, changed)) == expected

    exported = export(cp)
    assert [p["name"] for p in exported["products"]] == ["echo", "hashed"]
    assert equivalent(exported, salts_of(exported)) == equivalent(changed, salts_of(exported))
    [limit_update] = audit(cp, resource="limit", action="update")
    assert (limit_update["before"]["value"], limit_update["after"]["value"]) == (5, 10)
    assert limit_update["actor"] == "bootstrap"
    apps = cp.api.get("/applications", params={"per_page": 500}).json()["items"]
    new = next(a for a in apps if a["app_id"] == "app-new")
    account = cp.api.get(f"/accounts/{new['account_id']}").json()
    assert account["name"] == "default"  # the format has no accounts


def test_the_backend_protocol_is_applied_exported_staged_and_kept_per_product(
    control_sqlite: ControlPlane,
) -> None:
    cp = control_sqlite
    applied(cp, rich_file())
    grpc = rich_file()
    grpc["products"][1]["protocol"] = "h2c"
    assert texts(applied(cp, grpc)) == ['~ product tokens: protocol: "http1" → "h2c"']
    exported = export(cp)
    protocols = {p["name"]: p.get("protocol") for p in exported["products"]}
    assert protocols == {"echo": None, "tokens": "h2c", "hashed": None}  # http1 left implicit
    assert texts(applied(cp, exported)) == []
    staged = cp.wait_snapshot(
        "staging", lambda d: any(p.get("protocol") == "h2c" for p in d["products"])
    )
    assert {p["name"]: p.get("protocol") for p in staged["products"]} == protocols
    tokens = next(p for p in cp.api.get("/products").json()["items"] if p["name"] == "tokens")
    assert tokens["protocol"] == "h2c"
    changed = cp.api.patch(f"/products/{tokens['id']}", json={"protocol": "http1"})
    assert changed.status_code == 200 and changed.json()["protocol"] == "http1"
    assert cp.api.patch(f"/products/{tokens['id']}", json={"protocol": "h3"}).status_code == 422

    per_backend = rich_file()
    per_backend["products"][0]["backends"][1]["protocol"] = "h2c"
    response = apply(cp, per_backend)
    assert response.status_code == 422, response.text
    errors = {e["field"]: e["message"] for e in response.json()["errors"]}
    assert "one protocol per product" in errors["products[0].backends[1].protocol"]


def test_no_prune_leaves_unnamed_products_and_skip_applications_leaves_applications(
    control_sqlite: ControlPlane,
) -> None:
    cp = control_sqlite
    applied(cp, rich_file())
    only_hashed = {"products": [copy.deepcopy(rich_file()["products"][2])]}
    assert texts(applied(cp, only_hashed, prune=False)) == []
    preview = texts(applied(cp, only_hashed, dry_run=True))
    assert preview == ["- product echo: applications=2", "- product tokens: applications=1"]

    products = {p["name"]: p["id"] for p in cp.api.get("/products").json()["items"]}
    plans = cp.api.get(f"/products/{products['echo']}/plans").json()["items"]
    basic = next(p for p in plans if p["name"] == "basic")
    account = cp.post("/accounts", {"name": "acme"})
    portal_app = cp.post(
        "/applications", {"account_id": account["id"], "plan_id": basic["id"], "name": "signup"}
    )
    # The developer's application is not in the file: kept when applications are skipped.
    assert texts(applied(cp, rich_file(), applications=False)) == []
    full = texts(applied(cp, rich_file(), dry_run=True))
    assert full == [f"- application echo {portal_app['app_id']}"]
    assert texts(applied(cp, rich_file())) == full
    assert cp.api.get(f"/applications/{portal_app['id']}").status_code == 404
    [removal] = audit(cp, resource="application", action="delete")
    assert removal["resource_id"] == str(portal_app["id"])
    assert audit(cp, resource="application_key", action="delete") == []  # went with it
    assert texts(applied(cp, rich_file())) == []

    without_basic = rich_file()
    without_basic["products"][0]["plans"] = without_basic["products"][0]["plans"][1:]
    without_basic["products"][0]["applications"] = []
    refused = apply(cp, without_basic, applications=False)
    assert refused.status_code == 409
    assert refused.headers["content-type"] == "application/problem+json"
    assert "plan 'basic' is removed but application" in refused.json()["detail"]


def test_an_invalid_file_is_refused_with_every_path_and_nothing_applied(
    control: ControlPlane,
) -> None:
    applied(control, rich_file())
    before = export(control)
    entries = len(audit(control))

    broken = rich_file()
    echo = broken["products"][0]
    echo["plans"][0]["limits"][0]["period"] = "fortnight"
    echo["plans"][0]["limits"].append({"metric": "nope", "period": "day", "value": 1})
    echo["hosts"] = ["x" * 300]
    response = apply(control, broken)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    fields = {e["field"] for e in response.json()["errors"]}
    assert "products[0].plans[0].limits[0].period" in fields

    model_limits = rich_file()
    model_limits["products"][0]["hosts"] = ["x" * 300]
    model_limits["products"][0]["metrics"][1]["parent"] = "search"  # its own ancestor
    response = apply(control, model_limits)
    assert response.status_code == 422
    fields = {e["field"] for e in response.json()["errors"]}
    assert "products[0]" in fields  # the model's own cross-reference check

    semantic = rich_file()
    echo = semantic["products"][0]
    echo["metrics"] = [
        {"name": "calls"},
        {"name": "search", "parent": "calls"},
        {"name": "deep", "parent": "search"},
    ]
    echo["mapping_rules"] = [{"pattern": "/", "metric": "calls"}]
    echo["plans"] = [{"name": "basic"}, {"name": "pro"}]
    echo["hosts"] = ["y" * 300]
    semantic["products"][1]["applications"][0]["client_id"] = "other-client"
    semantic["products"][2]["applications"].append({"id": "app-basic", "plan": "p"})
    response = apply(control, semantic)
    assert response.status_code == 422, response.text
    errors = {e["field"]: e["message"] for e in response.json()["errors"]}
    assert "top-level hits" in errors["products[0].metrics"]
    assert "a method's parent must be a top-level metric" in errors["products[0].metrics[2].parent"]
    assert "at most 253 characters" in errors["products[0].hosts[0]"]
    assert "give id: 'other-client'" in errors["products[1].applications[0].client_id"]
    assert "unique across products" in errors["products[2].applications[1].id"]

    other_salt = rich_file()
    other_salt["products"][0]["key_salt"] = "ff" * 16
    other_salt["products"][0]["applications"][0]["key_hashes"] = [hash_key("ff" * 16, "k")]
    response = apply(control, other_salt)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "products[0].key_salt"

    response = apply(control, "products:\n  - name: [unclosed\n")
    assert response.status_code == 422 and response.json()["errors"][0]["field"].startswith("line")
    response = apply(control, b"products: \xff\xfe")
    assert response.status_code == 422 and "not UTF-8" in response.json()["detail"]
    response = control.api.post(
        "/declarative", content=b"products: []", headers={"Content-Type": "application/xml"}
    )
    assert response.status_code == 415
    response = apply(control, b" " * (MAX_BYTES + 1))
    assert response.status_code == 413

    assert export(control) == before
    assert len(audit(control)) == entries


def test_a_conflict_found_while_applying_rolls_everything_back(
    control_sqlite: ControlPlane,
) -> None:
    cp = control_sqlite
    applied(cp, rich_file())
    before = export(cp)
    # echo changes, but client-1 belongs to tokens, which --no-prune leaves alone.
    file = {"products": [copy.deepcopy(rich_file()["products"][0])]}
    file["products"][0]["path_prefix"] = "/moved"
    file["products"][0]["applications"].append({"id": "client-1", "plan": "basic"})
    response = apply(cp, file, prune=False)
    assert response.status_code == 409
    assert response.json()["errors"][0]["field"] == "products[0].applications[2].id"
    assert export(cp) == before


def test_a_model_built_through_the_admin_api_exports_and_reapplies_as_a_no_op(
    control: ControlPlane,
) -> None:
    product = make_product(control, 9001, hosts=["a.example.com"])
    sub = make_subscription(control, product["id"])
    metric = control.post(f"/products/{product['id']}/metrics", {"name": "orders"})
    control.post(
        f"/plans/{sub['plan']['id']}/limits",
        {"metric_id": metric["id"], "period": "hour", "value": 7},
    )
    control.post(f"/applications/{sub['application']['id']}/keys", {})
    exported = export(control)
    parse_config(yaml.safe_dump(exported))  # a valid gateway file
    [echo] = exported["products"]
    [app] = echo["applications"]
    assert app["id"] == sub["application"]["app_id"] and len(app["key_hashes"]) == 2
    assert texts(applied(control, exported)) == []
    assert export(control) == exported


def test_keys_given_in_clear_are_stored_only_as_hashes(
    control_sqlite: ControlPlane, tmp_path: Path
) -> None:
    applied(control_sqlite, rich_file())
    control_sqlite.stop()  # everything on disk, the WAL checkpointed
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("control.db*"))
    for key in (KEY1, KEY2, KEY3):
        assert key.encode() not in stored
        assert key[:4].encode() + "…".encode() in stored  # the hint, as the admin API keeps


def meshgate(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshgate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def test_the_apply_and_export_commands_end_to_end(
    control_sqlite: ControlPlane, tmp_path: Path
) -> None:
    cp = control_sqlite
    file = tmp_path / "api.yaml"
    file.write_text(yaml.safe_dump(rich_file()))
    target = ("--control-plane", cp.url, "--token", TOKEN)

    dry = meshgate("apply", str(file), "--dry-run", *target, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "+ product echo" in dry.stdout and "(dry run: nothing applied)" in dry.stdout
    assert "note: listen: settings of a gateway process" in dry.stderr
    assert export(cp) == {"products": []}

    with_env = {"MESHGATE_ADMIN_TOKEN": TOKEN}
    done = meshgate("apply", str(file), *target[:2], cwd=tmp_path, env=with_env)
    assert done.returncode == 0, done.stderr
    assert "applied: " in done.stdout and "0 removed" in done.stdout

    out = tmp_path / "exported.yaml"
    exported = meshgate("export", "--output", str(out), *target, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    document = yaml.safe_load(out.read_text())
    assert equivalent(document, salts_of(document)) == equivalent(rich_file(), salts_of(document))
    again = meshgate("apply", str(out), *target, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.strip() == "no changes"

    stdout_export = meshgate("export", "--skip-applications", *target, cwd=tmp_path)
    assert "applications" not in yaml.safe_load(stdout_export.stdout)["products"][0]

    bad = tmp_path / "bad.yaml"
    bad.write_text("products:\n  - name: x\n    backend: ftp://nope\n    auth: {type: api_key}\n")
    refused = meshgate("apply", str(bad), *target, cwd=tmp_path)
    assert refused.returncode == 1
    assert "products[0].backend: must be an http:// or https:// URL" in refused.stderr
    assert "Traceback" not in refused.stderr

    # The control plane's own refusal, as lines with paths (the local check passes).
    salted = rich_file()
    salted["products"][0]["key_salt"] = "ff" * 16
    salted["products"][0]["applications"][0]["key_hashes"] = [hash_key("ff" * 16, "k")]
    bad.write_text(yaml.safe_dump(salted))
    refused = meshgate("apply", str(bad), *target, cwd=tmp_path)
    assert refused.returncode == 1 and "HTTP 422" in refused.stderr
    assert "  products[0].key_salt: differs" in refused.stderr

    wrong = meshgate("apply", str(file), "--control-plane", cp.url, "--token", "nope", cwd=tmp_path)
    assert wrong.returncode == 1 and "HTTP 401" in wrong.stderr
    down = meshgate("export", "--control-plane", "http://127.0.0.1:9", "--token", "t", cwd=tmp_path)
    assert down.returncode == 1 and "cannot reach the control plane" in down.stderr
