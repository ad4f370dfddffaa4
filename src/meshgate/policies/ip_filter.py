"""Allow or deny clients by address (APIcast ``ip_check``, Kong ``ip-restriction``).

``allow`` and ``deny`` hold IPv4 or IPv6 addresses or CIDR blocks. Deny wins; a non-empty
``allow`` admits only its members. Everyone else gets 403, before authentication. An
IPv4-mapped IPv6 peer (``::ffff:10.0.0.1``, from a dual-stack listener) counts as its
IPv4 address.

The client is the socket peer. Behind a load balancer set ``trust_x_forwarded_for``: the
client is then the right-most ``X-Forwarded-For`` entry that is not in
``trusted_proxies`` (the address your own proxies saw; entries further left are whatever
the client sent). With ``trusted_proxies`` set, the header is only believed from a peer
in that list. A port after an entry (``1.2.3.4:5678``, ``[2001:db8::1]:443``) is
ignored; an address that cannot be parsed is refused.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, ClassVar

from pydantic import AfterValidator, Field, model_validator

from meshgate.policies._base import Policy, PolicyConfig
from meshgate.proxy import Exchange, Request, Response, problem

__all__ = ["IpFilterConfig", "IpFilterPolicy", "parse_address"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse_networks(value: list[str]) -> list[str]:
    for entry in value:
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise ValueError(
                f"{entry!r} is not an IP address or CIDR block, e.g. 10.0.0.0/8 or 2001:db8::/32"
            ) from None
    return [entry.strip() for entry in value]


_Networks = Annotated[list[str], AfterValidator(_parse_networks)]


def _networks(value: list[str]) -> tuple[_Network, ...]:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in value)


def parse_address(text: str) -> _Address | None:
    """An IP address, IPv4-mapped IPv6 unwrapped; None if ``text`` is not one."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _forwarded(entry: str) -> _Address | None:
    """One X-Forwarded-For entry; some proxies append a port ("[2001:db8::1]:443")."""
    entry = entry.strip()
    if entry.startswith("["):
        entry, bracket, port = entry[1:].partition("]")
        if not bracket or (port and not (port[:1] == ":" and port[1:].isdigit())):
            return None
    elif entry.count(":") == 1:
        entry, _, port = entry.partition(":")
        if not port.isdigit():
            return None
    return parse_address(entry)


def _member(address: _Address, networks: tuple[_Network, ...]) -> bool:
    # Comparing across versions is simply False with `in`, no error.
    return any(address in network for network in networks)


class IpFilterConfig(PolicyConfig):
    allow: _Networks = Field([], description="Only these addresses or CIDRs, if any are given.")
    deny: _Networks = Field([], description="Never these addresses or CIDRs; deny wins.")
    trust_x_forwarded_for: bool = Field(
        False, description="Take the client from X-Forwarded-For (see trusted_proxies)."
    )
    trusted_proxies: _Networks = Field(
        [], description="Your proxies' addresses or CIDRs, skipped in X-Forwarded-For."
    )

    @model_validator(mode="after")
    def _something(self) -> IpFilterConfig:
        if not self.allow and not self.deny:
            raise ValueError("give allow or deny (or both)")
        if self.trusted_proxies and not self.trust_x_forwarded_for:
            raise ValueError("trusted_proxies needs trust_x_forwarded_for: true")
        return self


class IpFilterPolicy(Policy):
    """Refuse clients outside ``allow`` or inside ``deny`` with 403."""

    name: ClassVar[str] = "ip_filter"
    Config: ClassVar[type[PolicyConfig]] = IpFilterConfig

    def __init__(self, config: IpFilterConfig) -> None:
        super().__init__(config)
        self._allow = _networks(config.allow)
        self._deny = _networks(config.deny)
        self._forwarded = config.trust_x_forwarded_for
        self._proxies = _networks(config.trusted_proxies)

    def client_address(self, request: Request) -> _Address | None:
        """The client's address as this policy sees it; None if it cannot be parsed."""
        peer = parse_address(request.client_ip)
        if not self._forwarded or peer is None:
            return peer
        if self._proxies and not _member(peer, self._proxies):
            return peer
        entries = ",".join(request.headers.get_all("x-forwarded-for")).split(",")
        client = peer
        for entry in reversed(entries):
            if not entry.strip():
                continue
            address = _forwarded(entry)
            if address is None or not _member(address, self._proxies):
                return address
            client = address
        # Every entry is one of our proxies: the left-most is the nearest thing to a client.
        return client

    def rewrite(self, exchange: Exchange) -> Response | None:
        address = self.client_address(exchange.request)
        if address is None:
            return problem(403, "Forbidden", "the client address could not be determined")
        if _member(address, self._deny) or (self._allow and not _member(address, self._allow)):
            return problem(403, "Forbidden", "the client address is not allowed")
        return None
