"""Authorization policies, compiled once per configuration and checked on every inbound request.

Istio's AuthorizationPolicy semantics: deny policies first (any matching rule refuses), then,
when the service has allow policies, the request must match a rule of one of them; with no
policy at all, everything is allowed. Values match exactly, by prefix (``/api/*``), by
suffix (``*.json``) or by presence (``*``); nothing is parsed on the request path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from meshgate.config.mesh import (
    AuthorizationPolicy,
    AuthorizationRule,
    ConsumerMatch,
    OperationMatch,
    SourceMatch,
)
from meshgate.mesh._metrics import Family
from meshgate.proxy import Request, Response, problem

if TYPE_CHECKING:
    from meshgate.identity.consumer import Consumer

__all__ = ["Authorizer", "Decision", "ValueMatcher"]

# The metric's policy label when no policy decided (default allow, or no allow policy matched).
NO_POLICY = "(none)"


class ValueMatcher:
    """A list of Istio values: any of them matches. An absent or empty value never matches
    (so ``not_principals: ["*"]`` holds for a caller without mutual TLS)."""

    __slots__ = ("exact", "prefixes", "suffixes", "any")

    def __init__(self, patterns: Iterable[str], scheme: str = "") -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        self.any = False
        for pattern in patterns:
            if pattern == "*":
                self.any = True
            elif pattern.startswith("*"):
                suffixes.append(pattern[1:])
            elif pattern.endswith("*"):
                prefixes.append(_with_scheme(pattern[:-1], scheme))
            else:
                exact.add(_with_scheme(pattern, scheme))
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)
        self.suffixes = tuple(suffixes)

    def __call__(self, value: str | None) -> bool:
        if not value:
            return False
        return (
            self.any
            or value in self.exact
            or (bool(self.prefixes) and value.startswith(self.prefixes))
            or (bool(self.suffixes) and value.endswith(self.suffixes))
        )


def _with_scheme(value: str, scheme: str) -> str:
    """Principals may be written as Istio does, without ``spiffe://``."""
    if scheme and not value.startswith(scheme):
        return scheme + value
    return value


def _matcher(values: Sequence[str] | None, scheme: str = "") -> ValueMatcher | None:
    return None if values is None else ValueMatcher(values, scheme)


def _header(request: Request, name: bytes) -> str | None:
    """A header's value; several fields of one name joined by commas, as Envoy matches them
    (so a second field cannot hide a value from a deny rule)."""
    values = [v for k, v in request.headers.raw() if k == name]
    if not values:
        return None
    return b",".join(values).decode("latin-1")


class _Rule:
    __slots__ = (
        "principals",
        "not_principals",
        "paths",
        "not_paths",
        "methods",
        "not_methods",
        "headers",
        "consumer",
        "applications",
        "plans",
        "products",
        "accounts",
    )

    def __init__(self, rule: AuthorizationRule) -> None:
        source = rule.source or SourceMatch()
        to = rule.to or OperationMatch()
        consumer = rule.consumer or ConsumerMatch()
        self.principals = _matcher(source.principals, "spiffe://")
        self.not_principals = _matcher(source.not_principals, "spiffe://")
        self.paths = _matcher(to.paths)
        self.not_paths = _matcher(to.not_paths)
        self.methods = frozenset(to.methods) if to.methods else None
        self.not_methods = frozenset(to.not_methods) if to.not_methods else None
        self.headers = tuple(
            (c.header.lower().encode("latin-1"), _matcher(c.values), _matcher(c.not_values))
            for c in rule.when
        )
        self.consumer = rule.consumer is not None
        self.applications = _matcher(consumer.applications)
        self.plans = _matcher(consumer.plans)
        self.products = _matcher(consumer.products)
        self.accounts = _matcher(consumer.accounts)

    @property
    def uses_principal(self) -> bool:
        return self.principals is not None or self.not_principals is not None

    def holds(self, request: Request, principal: str | None, consumer: Consumer | None) -> bool:
        if self.methods is not None and request.method not in self.methods:
            return False
        if self.not_methods is not None and request.method in self.not_methods:
            return False
        path = request.path
        if self.paths is not None and not self.paths(path):
            return False
        if self.not_paths is not None and self.not_paths(path):
            return False
        if self.principals is not None and not self.principals(principal):
            return False
        if self.not_principals is not None and self.not_principals(principal):
            return False
        for name, values, not_values in self.headers:
            value = _header(request, name)
            if values is not None and not values(value):
                return False
            if not_values is not None and not_values(value):
                return False
        if self.consumer:
            if consumer is None:
                return False
            for matcher, value in (
                (self.applications, consumer.application),
                (self.plans, consumer.plan),
                (self.products, consumer.product),
                (self.accounts, consumer.account),
            ):
                if matcher is not None and not matcher(value):
                    return False
        return True


class _Policy:
    __slots__ = ("name", "action", "rules", "count")

    def __init__(self, policy: AuthorizationPolicy, counter: Family, service: str) -> None:
        self.name = policy.name
        self.action = policy.action
        self.rules = tuple(_Rule(r) for r in policy.rules)
        # The count of its decisions, made once: the request path only adds to it.
        result = "allowed" if policy.action == "allow" else "denied"
        self.count = counter.labels(service, policy.name, policy.action, result)

    def matches(self, request: Request, principal: str | None, consumer: Consumer | None) -> bool:
        for rule in self.rules:
            if rule.holds(request, principal, consumer):
                return True
        return False


class Decision:
    """What the authorizer decided: ``policy`` is None when no policy decided."""

    __slots__ = ("allowed", "policy")

    def __init__(self, allowed: bool, policy: str | None) -> None:
        self.allowed = allowed
        self.policy = policy


class Authorizer:
    """One service's policies, compiled: :meth:`check` answers 403 or lets the request by."""

    def __init__(
        self, service: str, policies: Sequence[AuthorizationPolicy], counter: Family
    ) -> None:
        self.service = service
        self.deny = tuple(_Policy(p, counter, service) for p in policies if p.action == "deny")
        self.allow = tuple(_Policy(p, counter, service) for p in policies if p.action == "allow")
        self.uses_principal = any(
            rule.uses_principal for p in (*self.deny, *self.allow) for rule in p.rules
        )
        self._default_allowed = counter.labels(service, NO_POLICY, "default", "allowed")
        self._default_denied = counter.labels(service, NO_POLICY, "default", "denied")

    @property
    def empty(self) -> bool:
        return not self.deny and not self.allow

    def decide(
        self, request: Request, principal: str | None, consumer: Consumer | None
    ) -> Decision:
        """The decision, counted."""
        for policy in self.deny:
            if policy.matches(request, principal, consumer):
                policy.count.inc()
                return Decision(False, policy.name)
        if not self.allow:
            self._default_allowed.inc()
            return _ALLOWED
        for policy in self.allow:
            if policy.matches(request, principal, consumer):
                policy.count.inc()
                return Decision(True, policy.name)
        self._default_denied.inc()
        return _DENIED

    def check(
        self, request: Request, principal: str | None, consumer: Consumer | None
    ) -> Response | None:
        """None to let the request by, else the 403 to answer."""
        decision = self.decide(request, principal, consumer)
        if decision.allowed:
            return None
        if decision.policy is None:
            names = ", ".join(p.name for p in self.allow)
            detail = (
                f"no allow policy of service {self.service!r} matched this request "
                f"(allow policies: {names})"
            )
        else:
            detail = (
                f"denied by authorization policy {decision.policy!r} of service {self.service!r}"
            )
        return problem(
            403,
            "Forbidden",
            detail,
            policy=decision.policy,
            allow_policies=[p.name for p in self.allow],
            service=self.service,
        )


_ALLOWED = Decision(True, None)
_DENIED = Decision(False, None)
