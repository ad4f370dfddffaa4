"""Policies: the registry of known policies and the chain a product runs them in.

A product's ``policies`` list (``[{name: {config}}]``) becomes a :class:`PolicyChain`.
Every phase runs the policies in the configured order, the response and log phases
included (as APIcast does; Kong orders by priority instead). A rewrite or access phase
that returns a response ends its phase and the request is answered locally; the
response and log phases still run for every policy. Adding a policy is one module
and one line in :data:`REGISTRY`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from meshgate.policies._base import Policy, PolicyConfig
from meshgate.policies.cors import CorsPolicy
from meshgate.policies.headers import HeadersPolicy
from meshgate.policies.ip_filter import IpFilterPolicy
from meshgate.policies.maintenance import MaintenancePolicy
from meshgate.policies.request_size_limit import RequestSizeLimitPolicy
from meshgate.policies.url_rewrite import UrlRewritePolicy
from meshgate.proxy import Exchange, Headers, Response

__all__ = ["REGISTRY", "Policy", "PolicyChain", "PolicyConfig", "PolicyError", "schemas"]

log = logging.getLogger(__name__)

REGISTRY: dict[str, type[Policy]] = {
    CorsPolicy.name: CorsPolicy,
    HeadersPolicy.name: HeadersPolicy,
    IpFilterPolicy.name: IpFilterPolicy,
    MaintenancePolicy.name: MaintenancePolicy,
    RequestSizeLimitPolicy.name: RequestSizeLimitPolicy,
    UrlRewritePolicy.name: UrlRewritePolicy,
}


class PolicyError(ValueError):
    """A policy chain entry names an unknown policy or has an invalid configuration."""


def schemas() -> dict[str, type[PolicyConfig]]:
    """Each registered policy's configuration model, by policy name."""
    return {name: cls.Config for name, cls in REGISTRY.items()}


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def _overrides(policy: Policy, phase: str) -> bool:
    return getattr(type(policy), phase) is not getattr(Policy, phase)


class PolicyChain:
    """A product's policies, with one precomputed list of bound methods per phase."""

    __slots__ = ("policies", "_rewrite", "_access", "_response", "_log")

    def __init__(self, policies: Sequence[Policy] = ()) -> None:
        self.policies: tuple[Policy, ...] = tuple(policies)
        self._rewrite: tuple[Callable[[Exchange], Response | None], ...] = tuple(
            p.rewrite for p in self.policies if _overrides(p, "rewrite")
        )
        self._access: tuple[Callable[[Exchange], Response | None], ...] = tuple(
            p.access for p in self.policies if _overrides(p, "access")
        )
        self._response: tuple[Callable[[Exchange, int, Headers], None], ...] = tuple(
            p.response for p in self.policies if _overrides(p, "response")
        )
        self._log: tuple[Callable[[Exchange], None], ...] = tuple(
            p.log for p in self.policies if _overrides(p, "log")
        )

    @classmethod
    def build(cls, entries: Iterable[Mapping[str, Mapping[str, Any] | None]]) -> PolicyChain:
        """Instantiate ``[{name: {config}}]``; raise :class:`PolicyError` naming the entry."""
        policies = []
        for i, entry in enumerate(entries):
            if len(entry) != 1:
                raise PolicyError(f"policies[{i}]: name exactly one policy, e.g. {{cors: {{}}}}")
            ((name, config),) = entry.items()
            policy_cls = REGISTRY.get(name)
            if policy_cls is None:
                known = ", ".join(sorted(REGISTRY))
                raise PolicyError(f"policies[{i}]: unknown policy {name!r}; known: {known}")
            try:
                policies.append(policy_cls(policy_cls.Config.model_validate(config or {})))
            except ValidationError as exc:
                raise PolicyError(f"policies[{i}] {name}: {_describe(exc)}") from exc
            except ValueError as exc:
                raise PolicyError(f"policies[{i}] {name}: {exc}") from exc
        return cls(policies)

    def __len__(self) -> int:
        return len(self.policies)

    def __repr__(self) -> str:
        return f"PolicyChain([{', '.join(p.name for p in self.policies)}])"

    def rewrite(self, exchange: Exchange) -> Response | None:
        """Before authentication; the first response returned answers the request."""
        for phase in self._rewrite:
            answer = phase(exchange)
            if answer is not None:
                return answer
        return None

    def access(self, exchange: Exchange) -> Response | None:
        """After authentication and usage; the first response returned answers the request."""
        for phase in self._access:
            answer = phase(exchange)
            if answer is not None:
                return answer
        return None

    def response(self, exchange: Exchange, status: int, headers: Headers) -> None:
        """Let every policy edit the response head, upstream's or local."""
        for phase in self._response:
            phase(exchange, status, headers)

    def log(self, exchange: Exchange) -> None:
        """After the last byte; a failing policy is logged and the others still run."""
        for phase in self._log:
            try:
                phase(exchange)
            except Exception:
                log.exception("policy log phase failed for %s", exchange.request.path)
