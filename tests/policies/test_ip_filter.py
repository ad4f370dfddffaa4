from __future__ import annotations

import pytest
from pydantic import ValidationError

from meshgate.policies import PolicyChain, PolicyError
from meshgate.policies.ip_filter import IpFilterConfig


def status(chain, make_exchange, client_ip: str, xff: list[str] | None = None, **config) -> int:
    exchange = make_exchange(
        client_ip=client_ip, headers=[("X-Forwarded-For", v) for v in xff or []]
    )
    answer = chain("ip_filter", **config).rewrite(exchange)
    return 200 if answer is None else answer.status


def test_allow_list_admits_only_members(chain, make_exchange) -> None:
    allow = ["10.0.0.0/8", "192.168.1.7", "2001:db8::/32"]
    assert status(chain, make_exchange, "10.1.2.3", allow=allow) == 200
    assert status(chain, make_exchange, "192.168.1.7", allow=allow) == 200
    assert status(chain, make_exchange, "2001:db8::1", allow=allow) == 200
    assert status(chain, make_exchange, "192.168.1.8", allow=allow) == 403
    assert status(chain, make_exchange, "2001:db9::1", allow=allow) == 403


def test_deny_list_refuses_members_only(chain, make_exchange) -> None:
    deny = ["203.0.113.0/24", "::1"]
    assert status(chain, make_exchange, "203.0.113.9", deny=deny) == 403
    assert status(chain, make_exchange, "::1", deny=deny) == 403
    assert status(chain, make_exchange, "198.51.100.1", deny=deny) == 200
    assert status(chain, make_exchange, "::2", deny=deny) == 200


def test_deny_wins_over_allow(chain, make_exchange) -> None:
    config = {"allow": ["10.0.0.0/8"], "deny": ["10.6.6.0/24"]}
    assert status(chain, make_exchange, "10.6.6.6", **config) == 403
    assert status(chain, make_exchange, "10.6.7.6", **config) == 200


def test_refusal_is_a_problem(chain, make_exchange, read_problem) -> None:
    answer = chain("ip_filter", deny=["203.0.113.7"]).rewrite(make_exchange())
    assert answer is not None
    doc = read_problem(answer)
    assert doc["status"] == 403 and doc["detail"] == "the client address is not allowed"


def test_ipv4_mapped_ipv6_peer_counts_as_ipv4(chain, make_exchange) -> None:
    assert status(chain, make_exchange, "::ffff:10.0.0.1", deny=["10.0.0.0/8"]) == 403
    assert status(chain, make_exchange, "::ffff:10.0.0.1", allow=["10.0.0.1"]) == 200
    assert status(chain, make_exchange, "::ffff:192.0.2.1", allow=["10.0.0.0/8"]) == 403


def test_scoped_ipv6_peer(chain, make_exchange) -> None:
    assert status(chain, make_exchange, "fe80::1%eth0", allow=["fe80::/10"]) == 200
    assert status(chain, make_exchange, "fe80::1%eth0", deny=["fe80::/10"]) == 403


def test_versions_do_not_match_each_other(chain, make_exchange) -> None:
    assert status(chain, make_exchange, "10.0.0.1", allow=["::/0"]) == 403
    assert status(chain, make_exchange, "::1", deny=["0.0.0.0/0"]) == 200


@pytest.mark.parametrize("peer", ["", "unknown", "10.0.0.300", "unix:/tmp/s", "x" * 100_000])
def test_unparsable_peer_is_refused(chain, make_exchange, read_problem, peer: str) -> None:
    answer = chain("ip_filter", deny=["192.0.2.1"]).rewrite(make_exchange(client_ip=peer))
    assert answer is not None and answer.status == 403
    assert read_problem(answer)["detail"] == "the client address could not be determined"


def test_forwarded_for_is_ignored_unless_trusted(chain, make_exchange) -> None:
    assert status(chain, make_exchange, "10.0.0.1", ["192.0.2.1"], deny=["192.0.2.1"]) == 200
    assert status(chain, make_exchange, "192.0.2.1", ["10.0.0.1"], deny=["192.0.2.1"]) == 403


def test_trusted_forwarded_for_takes_the_right_most_entry(chain, make_exchange) -> None:
    config = {"deny": ["198.51.100.0/24"], "trust_x_forwarded_for": True}
    # The left entry is whatever the client claimed; the right one is what our proxy saw.
    assert status(chain, make_exchange, "10.0.0.1", ["1.1.1.1, 198.51.100.4"], **config) == 403
    assert status(chain, make_exchange, "10.0.0.1", ["198.51.100.4, 1.1.1.1"], **config) == 200
    # Several fields join into one list, in order.
    assert status(chain, make_exchange, "10.0.0.1", ["1.1.1.1", "198.51.100.4"], **config) == 403
    # No header: the peer is the client.
    assert status(chain, make_exchange, "198.51.100.9", [], **config) == 403


def test_trusted_proxies_are_skipped_from_the_right(chain, make_exchange) -> None:
    config = {
        "allow": ["192.0.2.0/24"],
        "trust_x_forwarded_for": True,
        "trusted_proxies": ["10.0.0.0/8", "fd00::/8"],
    }
    xff = ["6.6.6.6, 192.0.2.5, 10.0.0.3, fd00::2"]
    assert status(chain, make_exchange, "10.0.0.2", xff, **config) == 200
    spoofed = ["192.0.2.5, 6.6.6.6, 10.0.0.3"]
    assert status(chain, make_exchange, "10.0.0.2", spoofed, **config) == 403


def test_forwarded_for_from_an_untrusted_peer_is_ignored(chain, make_exchange) -> None:
    config = {
        "allow": ["192.0.2.0/24"],
        "trust_x_forwarded_for": True,
        "trusted_proxies": ["10.0.0.0/8"],
    }
    assert status(chain, make_exchange, "6.6.6.6", ["192.0.2.5"], **config) == 403


def test_only_trusted_entries_leave_the_left_most(chain, make_exchange) -> None:
    config = {
        "allow": ["10.0.0.5"],
        "trust_x_forwarded_for": True,
        "trusted_proxies": ["10.0.0.0/8"],
    }
    assert status(chain, make_exchange, "10.0.0.2", ["10.0.0.5, 10.0.0.3"], **config) == 200


def test_forwarded_entries_with_ports_and_mapped_addresses(chain, make_exchange) -> None:
    config = {"deny": ["198.51.100.4", "2001:db8::1"], "trust_x_forwarded_for": True}
    assert status(chain, make_exchange, "10.0.0.1", ["198.51.100.4:5123"], **config) == 403
    assert status(chain, make_exchange, "10.0.0.1", ["[2001:db8::1]:443"], **config) == 403
    assert status(chain, make_exchange, "10.0.0.1", ["::ffff:198.51.100.4"], **config) == 403
    assert status(chain, make_exchange, "10.0.0.1", [" 2001:db8::1 ,"], **config) == 403


@pytest.mark.parametrize(
    "xff",
    [
        "unknown",
        "1.1.1.1, garbage",
        "[2001:db8::1",
        "[2001:db8::1]x",
        "198.51.100.4:http",
        "\xe9",
        "1" * 100_000,
    ],
)
def test_unparsable_forwarded_client_is_refused(chain, make_exchange, xff: str) -> None:
    # Falling back to the peer (our own proxy) would let anyone past a deny list.
    config = {"deny": ["192.0.2.1"], "trust_x_forwarded_for": True}
    assert status(chain, make_exchange, "10.0.0.1", [xff], **config) == 403


def test_addresses_are_parsed_once_at_build() -> None:
    chain = PolicyChain.build([{"ip_filter": {"allow": [" 10.0.0.0/8 ", "10.1.2.3/8"]}}])
    policy = chain.policies[0]
    # Host bits are accepted and masked, as nginx does.
    assert [str(n) for n in policy._allow] == ["10.0.0.0/8", "10.0.0.0/8"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "give allow or deny"),
        ({"allow": [], "deny": []}, "give allow or deny"),
        ({"allow": ["10.0.0.0/33"]}, "'10.0.0.0/33' is not an IP address or CIDR block"),
        ({"deny": ["10.0.0.256"]}, "is not an IP address or CIDR block"),
        ({"deny": ["2001:db8:::1"]}, "is not an IP address or CIDR block"),
        ({"deny": ["example.com"]}, "is not an IP address or CIDR block"),
        ({"deny": [""]}, "is not an IP address or CIDR block"),
        ({"deny": ["10.0.0.1"], "trusted_proxies": ["10.0.0.0/8"]}, "needs trust_x_forwarded_for"),
        (
            {"deny": ["10.0.0.1"], "trust_x_forwarded_for": True, "trusted_proxies": ["lb"]},
            "'lb' is not an IP address",
        ),
        ({"deny": "10.0.0.1"}, "valid list"),
        ({"block": ["10.0.0.1"]}, "Extra inputs are not permitted"),
    ],
)
def test_bad_configs(config, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        IpFilterConfig.model_validate(config)
    with pytest.raises(PolicyError, match=r"policies\[0\] ip_filter: "):
        PolicyChain.build([{"ip_filter": config}])
