"""How a request picks one of a fixed list of healthy endpoints, and the hash ring.

A balancer is built for one list and thrown away when the list changes (an endpoint comes,
goes, is ejected or returns), so a pick never filters: it is O(1), or O(log n) for the
weighted round robin and random. ``avoid`` (the endpoint a retry just failed on) is passed
over unless it is the only one.
"""

from __future__ import annotations

import heapq
import math
import random
import struct
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from hashlib import blake2b
from itertools import accumulate
from typing import Any

from meshgate.mesh._endpoint import Endpoint

# A floor for the peak-EWMA estimate, so in-flight requests still count once it has
# decayed to nothing.
_MIN_LATENCY = 1e-6


class Balancer:
    """Picks one endpoint of a non-empty list."""

    __slots__ = ("endpoints", "_rng", "_positions")

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random) -> None:
        self.endpoints = list(endpoints)
        self._rng = rng
        self._positions: dict[Endpoint, int] | None = None

    def choose(self, now: float, avoid: Endpoint | None) -> Endpoint:
        raise NotImplementedError

    def _position(self, endpoint: Endpoint | None) -> int:
        """Where ``endpoint`` is in the list, or -1 (built on the first retry)."""
        if endpoint is None:
            return -1
        if self._positions is None:
            self._positions = {e: i for i, e in enumerate(self.endpoints)}
        return self._positions.get(endpoint, -1)


class RoundRobin(Balancer):
    """Each in turn, from a random start so that sidecars do not move in step."""

    __slots__ = ("_next",)

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random) -> None:
        super().__init__(endpoints, rng)
        self._next = rng.randrange(len(self.endpoints))

    def choose(self, now: float, avoid: Endpoint | None) -> Endpoint:
        endpoints = self.endpoints
        i = self._next
        chosen = endpoints[i]
        i = i + 1 if i + 1 < len(endpoints) else 0
        if chosen is avoid and len(endpoints) > 1:
            chosen = endpoints[i]
            i = i + 1 if i + 1 < len(endpoints) else 0
        self._next = i
        return chosen


class SmoothWeightedRoundRobin(Balancer):
    """Weighted round robin, smooth: picks of a heavy endpoint are spread between the others.

    Nginx's smooth weighted round robin walks every endpoint on every pick; this is the
    earliest-deadline-first schedule Envoy uses instead, O(log n) a pick. Endpoint i's k-th
    turn falls due at (k + phase_i) / weight_i, the phases staggered over (0, 1) so that
    equal deadlines do not bunch. In every cycle of sum(weights) picks each endpoint has
    exactly its weight of turns, and none drifts more than about a pick from its share.
    Deadlines are kept as integers (scaled by 2n times the weights' least common multiple),
    so ties always break the same way and the schedule repeats exactly.
    """

    __slots__ = ("_heap",)

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random) -> None:
        super().__init__(endpoints, rng)
        n = len(self.endpoints)
        start = rng.randrange(n)
        scale = math.lcm(*(e.info.weight for e in self.endpoints))
        # Entries: [deadline, position, step, endpoint]; the position is unique, so the
        # endpoint is never compared. Phase (p + 0.5) / n, scaled: 2p + 1 over 2n.
        heap: list[list[Any]] = []
        for i, endpoint in enumerate(self.endpoints):
            per_weight = scale // endpoint.info.weight
            phase = 2 * ((i + start) % n) + 1
            heap.append([phase * per_weight, i, 2 * n * per_weight, endpoint])
        heapq.heapify(heap)
        self._heap = heap

    def choose(self, now: float, avoid: Endpoint | None) -> Endpoint:
        heap = self._heap
        entry = heap[0]
        if entry[3] is avoid and len(heap) > 1:
            # Passed over, it keeps its turn for the next pick.
            held = heapq.heappop(heap)
            chosen = self._take(heap[0])
            heapq.heappush(heap, held)
            return chosen
        return self._take(entry)

    def _take(self, entry: list[Any]) -> Endpoint:
        entry[0] += entry[2]
        heapq.heapreplace(self._heap, entry)
        endpoint: Endpoint = entry[3]
        return endpoint


class Random(Balancer):
    """Uniformly at random, or in proportion to the endpoints' weights."""

    __slots__ = ("_bounds", "_total")

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random) -> None:
        super().__init__(endpoints, rng)
        weights = [e.info.weight for e in self.endpoints]
        uniform = min(weights) == max(weights)
        # Cumulative weights: endpoint i owns [bounds[i-1], bounds[i]).
        bounds = list(accumulate(weights))
        self._bounds = None if uniform else bounds
        self._total = bounds[-1]

    def choose(self, now: float, avoid: Endpoint | None) -> Endpoint:
        endpoints = self.endpoints
        skip = self._position(avoid) if len(endpoints) > 1 else -1
        bounds = self._bounds
        if bounds is None:
            if skip < 0:
                return endpoints[int(self._rng.random() * len(endpoints))]
            i = int(self._rng.random() * (len(endpoints) - 1))
            return endpoints[i + 1 if i >= skip else i]
        if skip < 0:
            return endpoints[bisect_right(bounds, self._rng.random() * self._total)]
        # Draw over the others' weights, then step over the avoided endpoint's range.
        weight = endpoints[skip].info.weight
        point = self._rng.random() * (self._total - weight)
        if point >= bounds[skip] - weight:
            point += weight
        return endpoints[bisect_right(bounds, point)]


class _TwoChoices(Balancer):
    """The power of two choices: the cheaper of two endpoints drawn at random.

    The first draw is uniform, so returning it on a tie breaks ties at random.
    """

    __slots__ = ()

    def choose(self, now: float, avoid: Endpoint | None) -> Endpoint:
        endpoints = self.endpoints
        n = len(endpoints)
        if n == 1:
            return endpoints[0]
        skip = self._position(avoid)
        if skip >= 0:
            n -= 1
            if n == 1:
                return endpoints[1 - skip]
        draw = self._rng.random
        i = int(draw() * n)
        j = int(draw() * (n - 1))
        if j >= i:
            j += 1
        if skip >= 0:
            # From the n-1 others back to positions in the whole list.
            if i >= skip:
                i += 1
            if j >= skip:
                j += 1
        first, second = endpoints[i], endpoints[j]
        return second if self._cost(second, now) < self._cost(first, now) else first

    def _cost(self, endpoint: Endpoint, now: float) -> float:
        raise NotImplementedError


class LeastRequest(_TwoChoices):
    """Fewer requests in flight wins, relative to the endpoint's weight."""

    __slots__ = ()

    def _cost(self, endpoint: Endpoint, now: float) -> float:
        return (endpoint.active + 1) / endpoint.info.weight


class PeakEwma(_TwoChoices):
    """Finagle's and Linkerd's peak EWMA: latency estimate times requests in flight."""

    __slots__ = ()

    def _cost(self, endpoint: Endpoint, now: float) -> float:
        latency = max(endpoint.latency(now), _MIN_LATENCY)
        return latency * (endpoint.active + 1) / endpoint.info.weight


BALANCERS: dict[str, tuple[type[Balancer], type[Balancer]]] = {
    # The load balancer's name: its class for equal weights, and for unequal ones.
    "round_robin": (RoundRobin, SmoothWeightedRoundRobin),
    "random": (Random, Random),
    "least_request": (LeastRequest, LeastRequest),
    "peak_ewma": (PeakEwma, PeakEwma),
}


def make_balancer(name: str, endpoints: Sequence[Endpoint], rng: random.Random) -> Balancer:
    """The balancer called ``name`` over a non-empty list of endpoints."""
    uniform, weighted = BALANCERS[name]
    first = endpoints[0].info.weight
    equal = all(e.info.weight == first for e in endpoints)
    return (uniform if equal else weighted)(endpoints, rng)


# Points a ring gives each endpoint: Ketama's 160, eight from each 64-byte digest.
VIRTUAL_NODES = 160
_DIGEST = struct.Struct(">8Q")
# A point is a double: 39 bits of hash above 14 bits naming its endpoint (a service has at
# most 10,000 instances). Sorting doubles takes CPython's fast path, 2-3 times quicker than
# 64-bit ints, and no table from point to endpoint is needed.
_OWNER_BITS = 14
_OWNER_MASK = (1 << _OWNER_BITS) - 1
_HASH_SHIFT = 64 - (53 - _OWNER_BITS)


def ring_points(key: tuple[str, int]) -> array[float]:
    """An endpoint's points on every ring, from its address and port alone."""
    seed = f"{key[0]} {key[1]}#".encode()
    points = array("d")
    for i in range(VIRTUAL_NODES // 8):
        digest = blake2b(seed + str(i).encode(), digest_size=64).digest()
        points.extend(float(p >> _HASH_SHIFT << _OWNER_BITS) for p in _DIGEST.unpack(digest))
    return points


def _key_point(key: bytes) -> float:
    """A request key's place on the ring: the same in every process (not ``hash()``)."""
    h = int.from_bytes(blake2b(key, digest_size=8).digest(), "big")
    return float(h >> _HASH_SHIFT << _OWNER_BITS)


class HashRing:
    """Ketama consistent hashing: a key goes to the endpoint of the first point at or
    after its hash on the circle.

    Each endpoint's points come from its address and port only, so the ring is the same
    in every process whatever the order it was built in; an endpoint that leaves takes only
    its own keys with it, one that comes takes about 1/n of the keys. Ejected endpoints stay
    on the ring and are walked past, so their keys come back when they do.
    """

    __slots__ = ("members", "_owners", "_points")

    def __init__(self, members: list[Endpoint]) -> None:
        if len(members) > _OWNER_MASK + 1:
            raise ValueError(f"a hash ring holds at most {_OWNER_MASK + 1} endpoints")
        self.members = members
        # Ranked by key, so that two points that share their hash bits (rare) are in the
        # same order everywhere.
        self._owners = sorted(members, key=lambda e: e.key)
        points: list[float] = []
        for rank, endpoint in enumerate(self._owners):
            if endpoint.ring_points is None:
                endpoint.ring_points = ring_points(endpoint.key)
            points.extend([point + rank for point in endpoint.ring_points])
        points.sort()
        self._points = points

    def lookup(self, key: bytes, avoid: Endpoint | None, panic: bool) -> Endpoint | None:
        """The key's endpoint, walking past ejected ones (unless in panic) and ``avoid``
        (unless it is the only one left)."""
        points = self._points
        n = len(points)
        if not n:
            return None
        owners = self._owners
        i = bisect_left(points, _key_point(key))
        for _ in range(n):
            if i == n:
                i = 0
            endpoint = owners[int(points[i]) & _OWNER_MASK]
            if endpoint is not avoid and (panic or not endpoint.ejected_until):
                return endpoint
            i += 1
        return avoid
