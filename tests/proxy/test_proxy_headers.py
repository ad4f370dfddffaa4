"""Header handling: hop-by-hop fields removed both ways (RFC 9110 7.6.1), forwarding
fields set, request ids kept or generated and returned."""

from __future__ import annotations

import re

from proxy_helpers import RawClient, get, request

HOP_BY_HOP = {"connection", "keep-alive", "te", "transfer-encoding", "upgrade", "proxy-connection"}
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")


def test_hop_by_hop_request_fields_are_not_forwarded(proxy_env):
    reply = request(
        proxy_env.port,
        get(
            "/rec/hop-request",
            "Connection: keep-alive, X-Hop-One",
            "Connection: x-hop-two",
            "X-Hop-One: 1",
            "X-Hop-Two: 2",
            "Keep-Alive: timeout=5",
            "TE: trailers",
            "Trailer: x-checksum",
            "Upgrade: h2c",
            "Proxy-Connection: keep-alive",
            "X-End-To-End: kept",
        ),
    )
    assert reply.status == 200
    (seen,) = proxy_env.recorder.requests_for("/hop-request")
    names = seen.header_names()
    assert not HOP_BY_HOP & set(names), names
    assert "x-hop-one" not in names and "x-hop-two" not in names and "trailer" not in names
    assert seen.header("x-end-to-end") == "kept"
    assert seen.header("host") == f"127.0.0.1:{proxy_env.recorder.port}"
    assert names.count("host") == 1


def test_an_upgrade_the_upstream_declines_is_answered_and_the_connection_closed(proxy_env):
    with RawClient(proxy_env.port) as client:
        client.send(get("/rec/upgrade-me", "Connection: Upgrade", "Upgrade: websocket"))
        reply = client.read_response()
        assert reply.status == 200
        assert client.closed(), "after an upgrade request the connection is not HTTP any more"
    (seen,) = proxy_env.recorder.requests_for("/upgrade-me")
    assert seen.header("upgrade") == "websocket"
    assert seen.header("connection") == "upgrade"
    proxy_env.assert_serving()


def _hop_response(req):
    body = b"response with hop-by-hop fields"
    return (
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: X-Resp-Hop, keep-alive\r\n"
        b"X-Resp-Hop: secret\r\n"
        b"Keep-Alive: timeout=30, max=100\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Upgrade: h2c\r\n"
        b"TE: trailers\r\n"
        b"X-End-To-End: yes\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    ), False


def test_hop_by_hop_response_fields_are_not_returned(proxy_env):
    proxy_env.recorder.scripts["/hop-response"] = _hop_response
    with RawClient(proxy_env.port) as client:
        reply = client.exchange(get("/rec/hop-response"))
        assert reply.status == 200
        assert reply.body == b"response with hop-by-hop fields"
        assert not HOP_BY_HOP & reply.names(), reply.headers
        assert "x-resp-hop" not in reply.names()
        assert reply.get("x-end-to-end") == "yes"
        assert reply.get("content-length") == str(len(reply.body))
        assert client.exchange(get("/rec/after-hop")).status == 200


def test_forwarding_fields_are_appended_and_set(proxy_env):
    reply = request(
        proxy_env.port,
        b"GET /rec/forwarded HTTP/1.1\r\nHost: api.example.com:8443\r\n"
        b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 198.51.100.2, 192.0.2.1\r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n\r\n",
    )
    assert reply.status == 200
    (seen,) = proxy_env.recorder.requests_for("/forwarded")
    names = seen.header_names()
    assert names.count("x-forwarded-for") == 1
    assert seen.header("x-forwarded-for") == "203.0.113.7, 198.51.100.2, 192.0.2.1, 127.0.0.1"
    assert names.count("x-forwarded-proto") == 1
    assert seen.header("x-forwarded-proto") == "http"
    assert names.count("x-forwarded-host") == 1
    assert seen.header("x-forwarded-host") == "api.example.com:8443"


def test_forwarding_fields_without_client_values(proxy_env):
    assert request(proxy_env.port, get("/rec/forwarded-plain")).status == 200
    (seen,) = proxy_env.recorder.requests_for("/forwarded-plain")
    assert seen.header("x-forwarded-for") == "127.0.0.1"
    assert seen.header("x-forwarded-host") == "gw.test"


def test_valid_request_id_is_kept_and_returned(proxy_env):
    rid = "client-id_1.2:3"
    reply = request(proxy_env.port, get("/rec/rid-valid", f"X-Request-Id: {rid}"))
    assert reply.get_all("x-request-id") == [rid]
    (seen,) = proxy_env.recorder.requests_for("/rid-valid")
    assert seen.header("x-request-id") == rid


def test_invalid_or_missing_request_id_is_replaced(proxy_env):
    cases = {
        "rid-missing": None,
        "rid-space": "two words",
        "rid-markup": "<script>",
        "rid-long": "a" * 201,
        "rid-empty": "",
    }
    for name, value in cases.items():
        extra = [] if value is None else [f"X-Request-Id: {value}"]
        reply = request(proxy_env.port, get(f"/rec/{name}", *extra))
        assert reply.status == 200
        (returned,) = reply.get_all("x-request-id")
        assert GENERATED_ID.match(returned), (name, returned)
        (seen,) = proxy_env.recorder.requests_for(f"/{name}")
        assert seen.header_names().count("x-request-id") == 1
        assert seen.header("x-request-id") == returned


def test_local_responses_carry_the_request_id(proxy_env):
    reply = request(proxy_env.port, get("/nowhere", "X-Request-Id: local-1"))
    assert reply.status == 404
    assert reply.get_all("x-request-id") == ["local-1"]


def test_upstream_request_id_does_not_duplicate_the_gateways(proxy_env):
    proxy_env.recorder.scripts["/rid-echoed"] = lambda req: (
        b"HTTP/1.1 200 OK\r\nx-request-id: upstream-made\r\ncontent-length: 0\r\n\r\n",
        False,
    )
    reply = request(proxy_env.port, get("/rec/rid-echoed", "X-Request-Id: from-client"))
    assert reply.get_all("x-request-id") == ["from-client"]


def test_absolute_form_target_overrides_the_host_field(proxy_env):
    reply = request(
        proxy_env.port,
        b"GET http://api.example.com:8080/rec/absolute-host?q=1 HTTP/1.1\r\n"
        b"Host: other.example\r\n\r\n",
    )
    assert reply.status == 200
    (seen,) = proxy_env.recorder.requests_for("/absolute-host")
    assert seen.target == "/absolute-host?q=1"
    assert seen.header("x-forwarded-host") == "api.example.com:8080"
    reply = request(proxy_env.port, get("http://user:pw@api.example.com/rec/absolute-userinfo"))
    assert reply.status == 400
    assert proxy_env.recorder.requests_for("/absolute-userinfo") == []
