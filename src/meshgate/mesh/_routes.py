"""HTTP routes compiled for the request path: match, weighted destination, faults, mirror.

A service's routes are tried in order; the first whose match holds takes the request, as in
Istio's VirtualService. With no route, every request goes to the whole service.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from random import Random
from urllib.parse import parse_qsl

from meshgate.config.mesh import (
    HeaderMatch,
    HeaderOps,
    HttpRoute,
    RetryPolicy,
    RouteMatch,
    StringMatch,
)
from meshgate.proxy import Headers, Request

__all__ = ["CompiledRoute", "DEFAULT_RETRIES", "HeaderEdit", "compile_routes"]

# Istio's behaviour when nothing is configured: 2 retries on connection failures and 503.
DEFAULT_RETRIES = RetryPolicy()

_Test = Callable[[str], bool]


def _string_test(m: StringMatch) -> _Test:
    if m.exact is not None:
        exact = m.exact
        return lambda v: v == exact
    if m.prefix is not None:
        prefix = m.prefix
        return lambda v: v.startswith(prefix)
    pattern = re.compile(m.regex or "")
    return lambda v: pattern.fullmatch(v) is not None


def _path_test(m: StringMatch) -> _Test:
    if m.prefix is not None and m.prefix != "/":
        # Whole segments: /api matches /api and /api/x, not /apix.
        prefix = m.prefix.rstrip("/")
        return lambda v: v == prefix or v.startswith(prefix + "/")
    return _string_test(m)


def _value_test(m: HeaderMatch) -> Callable[[str | None], bool]:
    if m.present is not None:
        want = m.present
        return lambda v: (v is not None) == want
    test = _string_test(m)
    return lambda v: v is not None and test(v)


class _Match:
    __slots__ = ("path", "method", "headers", "query")

    def __init__(self, m: RouteMatch) -> None:
        self.path = _path_test(m.path) if m.path is not None else None
        self.method = m.method
        self.headers = [(name.lower(), _value_test(v)) for name, v in m.headers.items()]
        self.query = [(name, _value_test(v)) for name, v in m.query.items()]

    def holds(self, request: Request) -> bool:
        if self.method is not None and request.method != self.method:
            return False
        if self.path is not None and not self.path(request.path):
            return False
        headers = request.headers
        for name, test in self.headers:
            if not test(headers.get(name)):
                return False
        if self.query:
            params: dict[str, str] = {}
            for k, v in parse_qsl(request.query, keep_blank_values=True):
                params.setdefault(k, v)
            for name, query_test in self.query:
                if not query_test(params.get(name)):
                    return False
        return True


@dataclass(frozen=True, slots=True)
class HeaderEdit:
    """Header changes, compiled: fields set (replacing), added, removed."""

    set: tuple[tuple[str, str], ...]
    add: tuple[tuple[str, str], ...]
    remove: tuple[str, ...]

    @classmethod
    def of(cls, ops: HeaderOps) -> HeaderEdit | None:
        if not (ops.set or ops.add or ops.remove):
            return None
        return cls(tuple(ops.set.items()), tuple(ops.add.items()), tuple(ops.remove))

    def apply(self, headers: Headers) -> None:
        for name in self.remove:
            headers.remove(name)
        for name, value in self.set:
            headers.set(name, value)
        for name, value in self.add:
            headers.add(name, value)


@dataclass(frozen=True, slots=True)
class Target:
    """A destination as compiled: the service (name) and subset, and its share."""

    service: str
    subset: str | None
    weight: int


class CompiledRoute:
    """One route of a service, ready for the request path."""

    __slots__ = (
        "name",
        "matches",
        "targets",
        "_cumulative",
        "_total",
        "timeout",
        "retries",
        "delay",
        "delay_percent",
        "abort",
        "abort_percent",
        "mirror",
        "mirror_percent",
        "request_headers",
        "response_headers",
        "retry_statuses",
        "retry_errors",
    )

    def __init__(self, service: str, route: HttpRoute | None, index: int) -> None:
        self.name = (route.name if route is not None else None) or (
            f"route-{index}" if route is not None else "default"
        )
        self.matches = [_Match(m) for m in route.match] if route is not None else []
        destinations = route.destinations if route is not None else []
        self.targets: Sequence[Target] = [
            Target(d.service or service, d.subset, d.weight) for d in destinations if d.weight > 0
        ] or [Target(service, None, 1)]
        total = 0
        cumulative = []
        for t in self.targets:
            total += t.weight
            cumulative.append(total)
        self._cumulative = cumulative
        self._total = total
        self.timeout = route.timeout if route is not None else None
        retries = route.retries if route is not None and route.retries is not None else None
        self.retries = retries if retries is not None else DEFAULT_RETRIES
        statuses: set[int] = set()
        on = set(self.retries.retry_on)
        if "5xx" in on:
            statuses.update(range(500, 600))
        if "gateway-error" in on:
            statuses.update((502, 503, 504))
        if "retriable-status-codes" in on:
            statuses.update(self.retries.retriable_status_codes)
        self.retry_statuses = frozenset(statuses) if statuses and self.retries.attempts else None
        # Conditions met when no response came back at all.
        self.retry_errors = frozenset(on)
        fault = route.fault if route is not None else None
        self.delay = fault.delay.seconds if fault is not None and fault.delay is not None else 0.0
        self.delay_percent = fault.delay.percent if fault and fault.delay else 0.0
        self.abort = fault.abort.status if fault is not None and fault.abort is not None else 0
        self.abort_percent = fault.abort.percent if fault and fault.abort else 0.0
        mirror = route.mirror if route is not None else None
        self.mirror = (
            Target(mirror.service or service, mirror.subset, 1) if mirror is not None else None
        )
        self.mirror_percent = mirror.percent if mirror is not None else 0.0
        changes = route.headers if route is not None else None
        self.request_headers = HeaderEdit.of(changes.request) if changes is not None else None
        self.response_headers = HeaderEdit.of(changes.response) if changes is not None else None

    def holds(self, request: Request) -> bool:
        if not self.matches:
            return True
        for m in self.matches:
            if m.holds(request):
                return True
        return False

    def pick(self, rng: Random) -> Target:
        targets = self.targets
        if len(targets) == 1:
            return targets[0]
        point = rng.random() * self._total
        for target, bound in zip(targets, self._cumulative, strict=True):
            if point < bound:
                return target
        return targets[-1]


def compile_routes(service: str, routes: Sequence[HttpRoute]) -> list[CompiledRoute]:
    """A service's routes in order; one catch-all route when none is configured."""
    if not routes:
        return [CompiledRoute(service, None, 0)]
    return [CompiledRoute(service, r, i) for i, r in enumerate(routes)]
