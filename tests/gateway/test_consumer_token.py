"""The consumer token: signed by the edge gateway's workload identity, cached and signed again
at half its life, verified by sidecars; hostile tokens are refused. End to end: client ->
gateway (file identity) -> sidecar -> app, the app reading who the consumer is."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import threading
import time
from pathlib import Path

import httpx
import jwt
import pytest
from harness import Proc, example_product, free_port, gateway_config, run_gateway
from mesh_support import running, start_app, start_sidecar
from pki_support import GATEWAY, TestCA

from meshgate.config import ConfigError, parse_config
from meshgate.identity import Identity, peer_id
from meshgate.identity.consumer import (
    MAX_TOKEN_BYTES,
    Consumer,
    ConsumerSigner,
    ConsumerVerifier,
    ExpiredToken,
    InvalidToken,
)


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_tokens_are_cached_and_signed_again_at_half_life(ca: TestCA) -> None:
    now = [1_000_000.0]
    identity = ca.issue(GATEWAY).identity()
    signer = ConsumerSigner(identity, ttl=60, clock=lambda: now[0])
    first = signer.token("shop", "app-1", "One", "acme", "gold")
    now[0] += 29
    assert signer.token("shop", "app-1", "One", "acme", "gold") == first
    assert signer.token("shop", "app-1", "One", "acme", "silver") != first
    now[0] += 2
    second = signer.token("shop", "app-1", "One", "acme", "gold")
    assert second != first
    claims = jwt.decode(second, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 60
    # A renewed certificate signs from then on.
    identity.update(ca.issue(GATEWAY).identity().material)
    assert signer.token("shop", "app-1", "One", "acme", "gold") != second
    header = jwt.get_unverified_header(second)
    assert header["alg"] == "ES256" and len(header["x5c"]) == 1


def test_hostile_tokens_are_refused(ca: TestCA) -> None:
    gateway = ca.issue(GATEWAY).identity()
    verifier = ConsumerVerifier(ca.issue("orders").identity())
    signer = ConsumerSigner(gateway)
    good = signer.token("shop", "app-1", "One", "acme", "gold")
    assert verifier.verify(good).plan == "gold"
    head, payload, signature = good.decode().split(".")
    header = jwt.get_unverified_header(good)
    claims = jwt.decode(good, options={"verify_signature": False})

    def refused(token: str | bytes, why: str) -> None:
        with pytest.raises(InvalidToken) as caught:
            verifier.verify(token if isinstance(token, bytes) else token.encode())
        assert why in str(caught.value)
        assert not isinstance(caught.value, ExpiredToken)

    refused(b"A" * (MAX_TOKEN_BYTES + 1), "longer than")
    refused("not a token", "not a JWT")
    refused("\x00\xff.\x01.", "not a JWT")
    refused(f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{payload}.", "x5c")
    refused(f"{_b64({**header, 'alg': 'none'})}.{payload}.", "alg 'none'")
    refused(f"{_b64({**header, 'alg': 'HS256'})}.{payload}.{signature}", "alg 'HS256'")
    refused(f"{_b64({**header, 'x5c': 'abc'})}.{payload}.{signature}", "x5c")
    refused(f"{_b64({**header, 'x5c': ['@@@']})}.{payload}.{signature}", "base64")
    refused(f"{_b64({**header, 'x5c': header['x5c'] * 5})}.{payload}.{signature}", "1 to 4")
    # The claims changed under the gateway's signature.
    refused(f"{head}.{_b64({**claims, 'plan': 'platinum'})}.{signature}", "does not verify")
    # Signed by the gateway's key, but claims it must not make.
    key = gateway.material.key_pem
    x5c = {"x5c": header["x5c"], "typ": header["typ"]}

    def signed(**changes: object) -> str:
        return jwt.encode({**claims, **changes}, key, algorithm="ES256", headers=x5c)

    refused(signed(exp=int(time.time()) + 86400), "lifetime above")
    refused(signed(plan=None), "plan claim")
    refused(signed(application="app-1"), "application claim")
    refused(signed(product="p" * 300), "product claim")
    refused(signed(iss="spiffe://meshgate.local/ns/production/sa/other"), "does not verify")
    refused(signed(nbf=int(time.time()) + 600), "does not verify")
    # Another trust domain's gateway, under the same root.
    outsider = ConsumerSigner(ca.issue(GATEWAY, trust_domain="other.example").identity())
    refused(outsider.token("shop", "app-1", "", "", "gold"), "not an edge gateway of")
    # Signed by the gateway, past its lifetime: refused as expired (a 401 at the sidecar).
    with pytest.raises(ExpiredToken):
        past = ConsumerSigner(gateway, ttl=10, clock=lambda: time.time() - 30)
        verifier.verify(past.token("shop", "app-1", "", "", "gold"))


def test_the_verified_cache_is_bounded_and_follows_the_clock(ca: TestCA) -> None:
    now = [time.time()]
    signer = ConsumerSigner(ca.issue(GATEWAY).identity(), ttl=30)
    verifier = ConsumerVerifier(ca.issue("orders").identity(), clock=lambda: now[0], max_cached=3)
    tokens = [signer.token("shop", f"app-{i}", "", "", "gold") for i in range(5)]
    for token in tokens:
        assert isinstance(verifier.verify(token), Consumer)
    assert len(verifier._cache) <= 3
    assert verifier.cached(tokens[-1]) is not None
    now[0] += 40
    with pytest.raises(ExpiredToken):
        verifier.verify(tokens[-1])


def test_a_real_gateway_sends_the_consumer_through_a_sidecar(tmp_path: Path, ca: TestCA) -> None:
    gateway_files = ca.issue(GATEWAY).write(tmp_path, "gateway")
    orders_files = ca.issue("orders").write(tmp_path, "orders")
    app = start_app(tmp_path, "orders")
    sidecar = start_sidecar(
        tmp_path,
        "orders",
        app.port,
        config={
            "services": [
                {
                    "name": "orders",
                    "authorization": [
                        {"name": "gold-only", "rules": [{"consumer": {"plans": ["gold"]}}]}
                    ],
                }
            ],
            "sidecar": {
                "identity_cert": orders_files["cert"],
                "identity_key": orders_files["key"],
                "trust_bundle": orders_files["bundle"],
            },
        },
    )
    product = example_product(
        sidecar.inbound,
        plans=[{"name": "gold"}, {"name": "free"}],
        applications=[
            {"id": "app-7", "plan": "gold", "keys": ["k7"], "name": "App Seven", "account": "acme"},
            {"id": "app-8", "plan": "free", "keys": ["k8"]},
        ],
        policies=[],
    )
    config = gateway_config([product], identity=gateway_files, consumer_token={"ttl": 30})
    with running(app, sidecar), run_gateway(config, tmp_path) as gw:
        with httpx.Client(base_url=gw.url, timeout=10) as client:
            forged = ConsumerSigner(ca.issue("orders").identity()).token(
                "shop", "x", "", "", "gold"
            )
            r = client.get(
                "/echo/hello", headers={"x-api-key": "k7", "x-meshgate-consumer": forged.decode()}
            )
            assert r.status_code == 200, r.text
            token = r.json()["headers"]["x-meshgate-consumer"]
            assert token != forged.decode()
            claims = jwt.decode(token, options={"verify_signature": False})
            assert claims["iss"] == f"spiffe://meshgate.local/ns/production/sa/{GATEWAY}"
            assert claims["product"] == "echo"
            assert claims["application"] == {"id": "app-7", "name": "App Seven"}
            assert (claims["account"], claims["plan"]) == ("acme", "gold")
            assert claims["exp"] - claims["iat"] == 30
            # The same consumer's next request carries the same token (no signing per request).
            again = client.get("/echo/hello", headers={"x-api-key": "k7"})
            assert again.json()["headers"]["x-meshgate-consumer"] == token
            # The free plan's application is refused by the sidecar's policy.
            r = client.get("/echo/hello", headers={"x-api-key": "k8"})
            assert r.status_code == 403
            assert r.json()["policy"] is None


def test_a_gateway_without_identity_strips_the_header_and_a_bad_identity_is_refused(
    tmp_path: Path, ca: TestCA
) -> None:
    app = start_app(tmp_path, "echo-app")
    product = example_product(app.port, policies=[])
    with running(app), run_gateway(gateway_config([product]), tmp_path) as gw:
        r = httpx.get(
            f"{gw.url}/echo/x",
            headers={"x-api-key": "k1", "x-meshgate-consumer": "made.up.token"},
            timeout=10,
        )
        assert r.status_code == 200
        assert "x-meshgate-consumer" not in r.json()["headers"]
    service = ca.issue("orders").write(tmp_path, "not-a-gateway")
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(gateway_config([product])))
    flags = ["--identity-cert", service["cert"], "--identity-key", service["key"]]
    proc = Proc(
        ["gateway", "--config", str(path), *flags, "--trust-bundle", service["bundle"]],
        tmp_path,
        "bad-gw",
    )
    assert proc.popen.wait(30) != 0
    assert "is not an edge gateway's SPIFFE ID" in proc.stderr()
    proc.stop()


class _TlsApp:
    """An HTTPS server that requires a client certificate (a sidecar's inbound side, as far
    as the gateway can tell) and answers with the SPIFFE ID of the caller it verified."""

    def __init__(self, identity: Identity) -> None:
        self.context = identity.server_context()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(raw, server_side=True) as conn:
                    conn.recv(65536)
                    caller = peer_id(conn.getpeercert(binary_form=True))
                    body = json.dumps({"caller": caller.uri if caller else None}).encode()
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
                    )
            except (OSError, ssl.SSLError, ValueError):
                continue  # a caller that left mid-handshake (the gateway refusing the peer)

    def close(self) -> None:
        self.sock.close()


def test_the_gateway_calls_a_mesh_service_with_its_identity(tmp_path: Path, ca: TestCA) -> None:
    files = ca.issue(GATEWAY).write(tmp_path, "gateway")
    orders = _TlsApp(ca.issue("orders").identity())
    impostor = _TlsApp(ca.issue("billing").identity())
    mesh = {"mesh_service": "orders"}
    products = [
        example_product(orders.port, name="orders", path_prefix="/orders", policies=[],
                        backend=f"https://127.0.0.1:{orders.port}", upstream_tls=mesh),
        example_product(impostor.port, name="impostor", path_prefix="/impostor", policies=[],
                        backend=f"https://127.0.0.1:{impostor.port}", upstream_tls=mesh),
    ]  # fmt: skip
    try:
        with run_gateway(gateway_config(products, identity=files), tmp_path) as gw:
            r = httpx.get(f"{gw.url}/orders/x", headers={"x-api-key": "k1"}, timeout=10)
            assert r.status_code == 200, r.text
            assert r.json()["caller"] == f"spiffe://meshgate.local/ns/production/sa/{GATEWAY}"
            r = httpx.get(f"{gw.url}/impostor/x", headers={"x-api-key": "k1"}, timeout=10)
            assert r.status_code == 503
            assert "sa/billing, not spiffe://meshgate.local/ns/production/sa/orders" in r.text
    finally:
        orders.close()
        impostor.close()
    for bad, why in (
        ({"backend": "http://127.0.0.1:9"}, "give its sidecars' inbound address as an https://"),
        ({"upstream_tls": {"mesh_service": "orders", "verify": False}}, "give no ca_file"),
        ({"upstream_tls": {"mesh_service": "Not A Name"}}, "mesh_service"),
    ):
        product = example_product(9, backend="https://127.0.0.1:9", upstream_tls=mesh)
        with pytest.raises(ConfigError) as caught:
            parse_config(json.dumps(gateway_config([{**product, **bad}])))
        assert why in str(caught.value)


def test_an_integration_route_behind_the_gateway_sees_the_consumer(
    tmp_path: Path, ca: TestCA
) -> None:
    from meshgate.integration import IntegrationContext, from_

    files = ca.issue(GATEWAY).write(tmp_path, "gateway")
    route_port = free_port()
    app = start_app(tmp_path, "next-hop")
    route = (
        from_("http:/orders?method=GET", id="orders")
        .set_header("x-seen", expr='headers."x-meshgate-consumer"')
        .to(f"http://127.0.0.1:{app.port}/next")
        .build()
    )
    product = example_product(route_port, policies=[])
    config = gateway_config([product], identity=files)

    async def scenario() -> None:
        context = IntegrationContext(settings={"http_listen": f"127.0.0.1:{route_port}"})
        context.add_routes([route])
        await context.start()
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                r = await client.get(f"{gw.url}/echo/orders", headers={"x-api-key": "k1"})
        finally:
            await context.stop(grace=2.0)
        assert r.status_code == 200, r.text
        # The route's exchange had it (its x-seen header was set from it), and the route's
        # own HTTP call passed it on to the next hop.
        headers = r.json()["headers"]
        seen = headers["x-seen"]
        assert headers["x-meshgate-consumer"] == seen
        assert jwt.decode(seen, options={"verify_signature": False})["application"]["id"] == "app1"

    with running(app), run_gateway(config, tmp_path) as gw:
        asyncio.run(asyncio.wait_for(scenario(), 30))
