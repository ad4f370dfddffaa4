"""A cluster: the instances of one service and how a request picks one (Envoy's cluster).

Pure logic, driven by the sidecar: ``set_endpoints`` from the registry stream,
``set_policy`` from the configuration, then for each request ``pick`` an endpoint, ``begin``
(the circuit breaker) and ``end`` (latency and outlier detection). Time and randomness are
injected, so all of it is tested without sockets or sleeps.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from meshgate.config.mesh import DestinationPolicy, Instance, Subset
from meshgate.mesh._balancers import Balancer, HashRing, make_balancer
from meshgate.mesh._endpoint import DEFAULT_LATENCY, Endpoint
from meshgate.mesh._outlier import Outliers
from meshgate.proxy import Headers, Request

__all__ = ["Cluster", "Endpoint"]


class _Choice:
    """What the picks of one subset choose from, until an endpoint comes, goes, is ejected
    or returns."""

    __slots__ = ("generation", "balancer", "wider", "panic")

    def __init__(
        self,
        generation: int,
        balancer: Balancer | None,
        wider: Balancer | None = None,
        panic: bool = False,
    ) -> None:
        self.generation = generation
        # None when the subset is empty.
        self.balancer = balancer
        # All healthy zones, for a retry when the local zone has only the endpoint it avoids.
        self.wider = wider
        # Every endpoint of the subset is ejected: pick among them all (Envoy's panic mode).
        self.panic = panic


class Cluster:
    """The endpoints of one service, its load balancer, circuit breaker and outlier state.

    A pick takes the healthy endpoints of the subset (not ejected; the local zone's when
    the policy prefers locality and the zone has any), and the policy's balancer, or the
    hash ring when the policy hashes and the request has a key. The candidate list of each
    subset is built once and kept until something changes, so a pick does not filter.
    """

    def __init__(
        self,
        service: str,
        policy: DestinationPolicy,
        subsets: list[Subset],
        *,
        zone: str = "",
        pool_factory: Callable[[Instance], Any],
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.service = service
        self.zone = zone
        self.endpoints: list[Endpoint] = []
        # Requests in flight to the service, and the refusals of the circuit breaker.
        self.active = 0
        self.overflows = 0
        self._pool_factory = pool_factory
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._by_key: dict[tuple[str, int], Endpoint] = {}
        self._outliers = Outliers(policy.outlier_detection)
        # Bumped on every change of who is healthy; a _Choice of another generation is stale.
        self._generation = 0
        self._choices: dict[str | None, _Choice] = {}
        self._members: dict[str | None, list[Endpoint]] = {}
        self._rings: dict[str | None, HashRing] = {}
        self.set_policy(policy, subsets)

    @property
    def ejections_total(self) -> int:
        return self._outliers.ejections_total

    def set_policy(self, policy: DestinationPolicy, subsets: list[Subset]) -> None:
        """A new destination policy; endpoints keep their state."""
        self.policy = policy
        self.subsets = list(subsets)
        self._subset_labels = {s.name: s.labels for s in subsets}
        self._local = policy.locality and bool(self.zone)
        self._max_requests = policy.connection_pool.max_requests
        hashing = policy.consistent_hash
        self._hashing = hashing is not None
        self._hash_header = (
            hashing.header.lower().encode("latin-1") if hashing and hashing.header else None
        )
        self._hash_cookie = hashing.cookie.encode("ascii") if hashing and hashing.cookie else None
        if policy.outlier_detection is None:
            self._outliers.release_all()
        self._outliers.config = policy.outlier_detection
        self._members.clear()
        self._choices.clear()
        for name in [n for n in self._rings if n is not None and n not in self._subset_labels]:
            del self._rings[name]
        self._generation += 1

    def set_endpoints(self, instances: Iterable[Instance]) -> None:
        """The service's instances now. Those that stay (same address and port) keep their
        state and pool, with their new settings; the pools of those gone are closed."""
        now = self._clock()
        previous = self._by_key
        by_key: dict[tuple[str, int], Endpoint] = {}
        endpoints: list[Endpoint] = []
        neutral: float | None = None
        for info in instances:
            key = (info.address, info.port)
            endpoint = by_key.get(key)
            if endpoint is not None:
                endpoint.info = info  # Listed twice: the last settings win.
                continue
            endpoint = previous.get(key)
            if endpoint is None:
                if neutral is None:
                    neutral = self._neutral_latency(now)
                endpoint = Endpoint(info, neutral, now)
            else:
                endpoint.info = info
            by_key[key] = endpoint
            endpoints.append(endpoint)
        gone = [e for key, e in previous.items() if key not in by_key]
        for endpoint in gone:
            self._close(endpoint)
        self._outliers.forget(gone)
        self.endpoints = endpoints
        self._by_key = by_key
        self._members.clear()
        self._choices.clear()
        self._generation += 1

    def close(self) -> None:
        """The cluster is no longer used: close every endpoint's pool."""
        for endpoint in self.endpoints:
            self._close(endpoint)

    def hash_key(self, request: Request) -> bytes | None:
        """The request's consistent-hash key: None when the policy does not hash, or the
        request has no such header, cookie or client address (the balancer then applies)."""
        if not self._hashing:
            return None
        if self._hash_header is not None:
            return request.headers.get_raw(self._hash_header) or None
        if self._hash_cookie is not None:
            return _cookie(request.headers, self._hash_cookie)
        return request.client_ip.encode("latin-1") or None

    def pick(
        self,
        subset: str | None = None,
        *,
        key: bytes | None = None,
        avoid: Endpoint | None = None,
    ) -> Endpoint | None:
        """An endpoint for one request, or None when the subset has none (a 503).

        ``subset`` names one of the policy's subsets (an unknown name has no endpoints);
        ``key`` is the request's :meth:`hash_key`; ``avoid`` is the endpoint a retry moves
        away from, picked anyway when it is the only candidate.
        """
        now = self._clock()
        outliers = self._outliers
        if now >= outliers.next_expiry and outliers.expire(now):
            self._generation += 1
        choice = self._choices.get(subset)
        if choice is None or choice.generation != self._generation:
            choice = self._choose_from(subset)
        chooser = choice.balancer
        if chooser is None:
            return None
        endpoint: Endpoint | None
        if key is not None and self._hashing:
            endpoint = self._ring(subset).lookup(key, avoid, choice.panic)
            if endpoint is None:
                return None
        else:
            if avoid is not None and choice.wider is not None and chooser.endpoints[0] is avoid:
                chooser = choice.wider
            endpoint = chooser.choose(now, avoid)
        if endpoint.pool is None:
            endpoint.pool = self._pool_factory(endpoint.info)
        return endpoint

    def begin(self, endpoint: Endpoint) -> bool:
        """Count a request in flight, or False (and count an overflow) when the service
        already has ``max_requests`` in flight: the caller answers a fast 503."""
        if self.active >= self._max_requests:
            self.overflows += 1
            return False
        self.active += 1
        endpoint.active += 1
        return True

    def release(self, endpoint: Endpoint) -> None:
        """A request that :meth:`begin` let through never reached ``endpoint`` (refused
        before it was sent): no longer in flight, and no mark on the endpoint."""
        if self.active > 0:
            self.active -= 1
        if endpoint.active > 0:
            endpoint.active -= 1

    def end(self, endpoint: Endpoint, status: int, seconds: float, error: bool = False) -> None:
        """A request that :meth:`begin` let through is over, answered ``status`` after
        ``seconds``; ``error`` when it failed without an answer (connect failure, reset,
        timeout). A 5xx or an error counts as a failure."""
        if self.active > 0:
            self.active -= 1
        if endpoint.active > 0:
            endpoint.active -= 1
        now = self._clock()
        if error or status >= 500:
            # A fast failure must not make an endpoint look fast.
            seconds = max(seconds, endpoint.latency(now))
        endpoint.observe(seconds, now)
        outliers = self._outliers
        if outliers.config is None:
            return
        if now >= outliers.next_expiry and outliers.expire(now):
            self._generation += 1
        if self._by_key.get(endpoint.key) is endpoint and outliers.record(
            endpoint, status, error, now, len(self.endpoints)
        ):
            self._generation += 1

    def _choose_from(self, subset: str | None) -> _Choice:
        members = self._members_of(subset)
        healthy = [e for e in members if not e.ejected_until]
        name = self.policy.load_balancer
        if not healthy:
            choice = _Choice(
                self._generation,
                make_balancer(name, members, self._rng) if members else None,
                panic=bool(members),
            )
        else:
            candidates, wider = healthy, None
            if self._local:
                local = [e for e in healthy if e.info.zone == self.zone]
                if local and len(local) < len(healthy):
                    candidates = local
                    if len(local) == 1:
                        wider = make_balancer(name, healthy, self._rng)
            choice = _Choice(self._generation, make_balancer(name, candidates, self._rng), wider)
        self._choices[subset] = choice
        return choice

    def _members_of(self, subset: str | None) -> list[Endpoint]:
        members = self._members.get(subset)
        if members is None:
            if subset is None:
                members = self.endpoints
            else:
                labels = self._subset_labels.get(subset)
                members = (
                    []
                    if labels is None
                    else [e for e in self.endpoints if _matches(e.info, labels)]
                )
            self._members[subset] = members
        return members

    def _ring(self, subset: str | None) -> HashRing:
        members = self._members_of(subset)
        ring = self._rings.get(subset)
        if ring is None or (ring.members is not members and ring.members != members):
            ring = self._rings[subset] = HashRing(members)
        # The same endpoints under a new list (an update that changed no membership).
        ring.members = members
        return ring

    def _neutral_latency(self, now: float) -> float:
        """A new endpoint's first estimate: the others' mean, so it neither draws every
        request nor starves."""
        if not self.endpoints:
            return DEFAULT_LATENCY
        return sum(e.latency(now) for e in self.endpoints) / len(self.endpoints)

    @staticmethod
    def _close(endpoint: Endpoint) -> None:
        if endpoint.pool is not None:
            endpoint.pool.close()
            endpoint.pool = None


def _matches(info: Instance, labels: dict[str, str]) -> bool:
    """Whether an instance has every label of a subset; its version is the label ``version``."""
    for name, value in labels.items():
        if name == "version" and info.version:
            if info.version != value:
                return False
        elif info.labels.get(name) != value:
            return False
    return True


def _cookie(headers: Headers, name: bytes) -> bytes | None:
    """The value of cookie ``name`` in the request's Cookie fields (RFC 6265), else None."""
    for field, value in headers.raw():
        if field != b"cookie":
            continue
        for pair in value.split(b";"):
            found, sep, content = pair.partition(b"=")
            if sep and found.strip() == name:
                content = content.strip()
                if len(content) >= 2 and content[0] == content[-1] == 0x22:
                    content = content[1:-1]
                return content or None
    return None
