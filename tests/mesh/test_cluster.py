"""The sidecar's cluster: balancers, subsets, locality, outlier ejection, circuit breaking,
consistent hashing and the retry budget, on a fake clock and a seeded random source."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pytest

from meshgate.config.mesh import (
    ConnectionPool,
    ConsistentHash,
    DestinationPolicy,
    Instance,
    OutlierDetection,
    Subset,
)
from meshgate.config.mesh import RetryBudget as RetryBudgetPolicy
from meshgate.mesh._cluster import Cluster, Endpoint
from meshgate.mesh._retry_budget import RetryBudget
from meshgate.proxy import Headers, Request


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakePool:
    """A stand-in for an engine pool: the cluster only creates and closes it."""

    made: list[FakePool] = []

    def __init__(self, info: Instance) -> None:
        self.info = info
        self.closed = 0
        FakePool.made.append(self)

    def close(self) -> None:
        self.closed += 1


def instance(n: int, **settings: Any) -> Instance:
    return Instance(address=f"10.0.0.{n}", port=8080, **settings)


def make(
    instances: Iterable[Instance] = (),
    *,
    subsets: Iterable[Subset] = (),
    zone: str = "",
    seed: int = 1,
    **policy: Any,
) -> tuple[Cluster, Clock]:
    clock = Clock()
    cluster = Cluster(
        "orders",
        DestinationPolicy(**policy),
        list(subsets),
        zone=zone,
        pool_factory=FakePool,
        clock=clock,
        rng=random.Random(seed),
    )
    cluster.set_endpoints(instances)
    return cluster, clock


def picked(cluster: Cluster, **pick: Any) -> Endpoint:
    endpoint = cluster.pick(**pick)
    assert endpoint is not None
    return endpoint


def shares(cluster: Cluster, picks: int, **pick: Any) -> Counter[str]:
    return Counter(picked(cluster, **pick).info.address for _ in range(picks))


def call(cluster: Cluster, endpoint: Endpoint, status: int = 200, seconds: float = 0.01) -> None:
    assert cluster.begin(endpoint)
    cluster.end(endpoint, status, seconds)


def by_address(cluster: Cluster, n: int) -> Endpoint:
    return next(e for e in cluster.endpoints if e.info.address == f"10.0.0.{n}")


def outliers(**settings: Any) -> OutlierDetection:
    return OutlierDetection(**{"max_ejection_percent": 100, **settings})


def test_round_robin_takes_each_endpoint_in_turn() -> None:
    cluster, _ = make([instance(1), instance(2), instance(3)])
    sequence = [picked(cluster).info.address for _ in range(30)]
    assert Counter(sequence) == {"10.0.0.1": 10, "10.0.0.2": 10, "10.0.0.3": 10}
    assert all(len(set(sequence[i : i + 3])) == 3 for i in range(28))


def test_weighted_round_robin_gives_exact_shares_spread_out() -> None:
    cluster, _ = make([instance(1, weight=5), instance(2), instance(3)])
    sequence = [picked(cluster).info.address for _ in range(70)]
    assert Counter(sequence) == {"10.0.0.1": 50, "10.0.0.2": 10, "10.0.0.3": 10}
    # Every cycle of 7 has the exact shares, and the heavy one is interleaved (nginx
    # gives a run of 4 at most too).
    for i in range(64):
        assert Counter(sequence[i : i + 7]) == {"10.0.0.1": 5, "10.0.0.2": 1, "10.0.0.3": 1}
    runs = "".join("a" if a == "10.0.0.1" else "." for a in sequence)
    assert "aaaaa" not in runs


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_weighted_round_robin_shares_for_many_weights(seed: int) -> None:
    weights = random.Random(seed).choices(range(1, 20), k=12)
    cluster, _ = make([instance(i, weight=w) for i, w in enumerate(weights)], seed=seed)
    counts = shares(cluster, 3 * sum(weights))
    assert [counts[f"10.0.0.{i}"] for i in range(12)] == [3 * w for w in weights]


def test_random_honours_weights_90_10() -> None:
    cluster, _ = make([instance(1, weight=90), instance(2, weight=10)], load_balancer="random")
    counts = shares(cluster, 10_000)
    assert 8800 <= counts["10.0.0.1"] <= 9200
    assert counts["10.0.0.1"] + counts["10.0.0.2"] == 10_000


def test_random_without_weights_is_uniform() -> None:
    cluster, _ = make([instance(i) for i in range(4)], load_balancer="random")
    counts = shares(cluster, 10_000)
    assert all(2300 <= counts[f"10.0.0.{i}"] <= 2700 for i in range(4))


def test_least_request_prefers_idle_endpoints() -> None:
    cluster, _ = make([instance(1), instance(2), instance(3)], load_balancer="least_request")
    busy = by_address(cluster, 1)
    for _ in range(3):
        assert cluster.begin(busy)
    counts = shares(cluster, 3000)
    # Drawn with an idle one, the busy endpoint always loses; the idle ones tie at random.
    assert counts["10.0.0.1"] == 0
    assert 1350 <= counts["10.0.0.2"] <= 1650


def test_least_request_spreads_requests_that_stay_in_flight() -> None:
    cluster, _ = make([instance(i) for i in range(5)], load_balancer="least_request")
    for _ in range(50):
        assert cluster.begin(picked(cluster))
    # Two choices keep the spread within a couple of requests of even.
    assert all(8 <= e.active <= 12 for e in cluster.endpoints)


def test_peak_ewma_shifts_load_away_from_a_slow_endpoint() -> None:
    cluster, clock = make([instance(1), instance(2), instance(3)], load_balancer="peak_ewma")
    slow, fast, faster = (by_address(cluster, n) for n in (1, 2, 3))
    call(cluster, slow, seconds=1.0)
    call(cluster, fast, seconds=0.02)
    call(cluster, faster, seconds=0.01)
    counts = shares(cluster, 3000)
    assert counts["10.0.0.1"] == 0
    assert counts["10.0.0.3"] == 3000 - counts["10.0.0.2"]
    # Requests held in flight make the fast one costlier than the slow one: 0.01 × 101.
    for _ in range(100):
        assert cluster.begin(faster)
    assert shares(cluster, 300)["10.0.0.1"] > 0


def test_peak_ewma_takes_a_slow_answer_at_once_and_forgets_it_slowly() -> None:
    cluster, clock = make([instance(1)], load_balancer="peak_ewma")
    endpoint = by_address(cluster, 1)
    call(cluster, endpoint, seconds=1.0)
    assert endpoint.ewma == 1.0
    for _ in range(100):  # ten seconds of 10 ms answers, one each 100 ms
        clock.now += 0.1
        call(cluster, endpoint, seconds=0.01)
    # One time constant: e^-1 of the peak is left.
    assert 0.36 < endpoint.latency(clock.now) < 0.38
    # A fast failure does not make it look faster.
    clock.now += 0.1
    assert cluster.begin(endpoint)
    cluster.end(endpoint, 0, 0.001, error=True)
    assert endpoint.latency(clock.now) > 0.36


def test_peak_ewma_starts_a_new_endpoint_at_the_others_mean() -> None:
    cluster, clock = make([instance(1), instance(2)], load_balancer="peak_ewma")
    call(cluster, by_address(cluster, 1), seconds=0.2)
    call(cluster, by_address(cluster, 2), seconds=0.4)
    for endpoint in cluster.endpoints:
        for _ in range(2):
            assert cluster.begin(endpoint)
    cluster.set_endpoints([instance(1), instance(2), instance(3)])
    newcomer = by_address(cluster, 3)
    assert newcomer.ewma == pytest.approx(0.3)
    # Idle at the mean estimate, it wins against either busy one.
    assert shares(cluster, 300)["10.0.0.3"] >= 150


def test_subsets_select_by_version_and_labels() -> None:
    subsets = [
        Subset(name="v1", labels={"version": "v1"}),
        Subset(name="v2-canary", labels={"version": "v2", "track": "canary"}),
    ]
    cluster, _ = make(
        [
            instance(1, version="v1"),
            instance(2, version="v1", labels={"track": "canary"}),
            instance(3, version="v2", labels={"track": "canary"}),
            instance(4, version="v2", labels={"track": "stable"}),
            instance(5, labels={"version": "v2", "track": "canary"}),
        ],
        subsets=subsets,
    )
    assert set(shares(cluster, 20, subset="v1")) == {"10.0.0.1", "10.0.0.2"}
    assert set(shares(cluster, 20, subset="v2-canary")) == {"10.0.0.3", "10.0.0.5"}
    assert len(shares(cluster, 20)) == 5
    assert cluster.pick("nonexistent") is None
    # Labels change under a kept endpoint: the subsets follow.
    cluster.set_endpoints([instance(1, version="v2", labels={"track": "canary"}), instance(2)])
    assert set(shares(cluster, 10, subset="v2-canary")) == {"10.0.0.1"}
    assert cluster.pick("v1") is None


def test_an_empty_cluster_picks_nothing() -> None:
    cluster, _ = make([])
    assert cluster.pick() is None
    assert cluster.pick(key=b"user-1") is None


def test_locality_prefers_the_local_zone_and_fails_over() -> None:
    cluster, clock = make(
        [
            instance(1, zone="a"),
            instance(2, zone="b"),
            instance(3, zone="a"),
            instance(4, zone="b"),
        ],
        zone="a",
        outlier_detection=outliers(consecutive_5xx=1),
    )
    assert set(shares(cluster, 20)) == {"10.0.0.1", "10.0.0.3"}
    call(cluster, by_address(cluster, 1), 503)
    assert set(shares(cluster, 20)) == {"10.0.0.3"}
    call(cluster, by_address(cluster, 3), 503)
    assert set(shares(cluster, 20)) == {"10.0.0.2", "10.0.0.4"}
    clock.now += 30
    assert set(shares(cluster, 20)) == {"10.0.0.1", "10.0.0.3"}


def test_locality_off_or_without_a_zone_uses_every_zone() -> None:
    both = [instance(1, zone="a"), instance(2, zone="b")]
    cluster, _ = make(both, zone="a", locality=False)
    assert len(shares(cluster, 10)) == 2
    cluster, _ = make(both)
    assert len(shares(cluster, 10)) == 2


def test_panic_mode_picks_among_all_when_all_are_ejected() -> None:
    cluster, _ = make(
        [instance(1), instance(2), instance(3, version="v2")],
        subsets=[Subset(name="v2", labels={"version": "v2"})],
        outlier_detection=outliers(consecutive_5xx=1),
    )
    call(cluster, by_address(cluster, 3), 500)
    assert by_address(cluster, 3).ejected_until > 0
    assert set(shares(cluster, 10, subset="v2")) == {"10.0.0.3"}
    assert set(shares(cluster, 10)) == {"10.0.0.1", "10.0.0.2"}
    call(cluster, by_address(cluster, 1), 500)
    call(cluster, by_address(cluster, 2), 500)
    assert set(shares(cluster, 30)) == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}


@pytest.mark.parametrize("balancer", ["round_robin", "random", "least_request", "peak_ewma"])
@pytest.mark.parametrize("weights", [(1, 1, 1), (5, 1, 2)])
def test_a_retry_avoids_the_endpoint_it_failed_on(balancer: str, weights: tuple[int, ...]) -> None:
    cluster, _ = make(
        [instance(i, weight=w) for i, w in enumerate(weights)], load_balancer=balancer
    )
    avoid = by_address(cluster, 0)
    counts = shares(cluster, 600, avoid=avoid)
    assert "10.0.0.0" not in counts
    if balancer in ("round_robin", "random"):
        # The others keep their shares between them.
        assert counts["10.0.0.2"] / counts["10.0.0.1"] == pytest.approx(weights[2], rel=0.15)
    elif weights[1] == weights[2]:
        # Idle and equal, they tie, and ties break at random.
        assert 250 <= counts["10.0.0.1"] <= 350


@pytest.mark.parametrize("balancer", ["round_robin", "random", "least_request", "peak_ewma"])
def test_a_retry_returns_to_the_only_endpoint(balancer: str) -> None:
    cluster, _ = make([instance(1)], load_balancer=balancer)
    only = by_address(cluster, 1)
    assert cluster.pick(avoid=only) is only


def test_a_retry_leaves_a_local_zone_of_one() -> None:
    cluster, _ = make([instance(1, zone="a"), instance(2, zone="b")], zone="a")
    local = by_address(cluster, 1)
    assert set(shares(cluster, 5)) == {"10.0.0.1"}
    assert set(shares(cluster, 5, avoid=local)) == {"10.0.0.2"}


def test_a_retry_passes_over_an_ejected_only_when_it_can() -> None:
    cluster, _ = make([instance(1), instance(2)], outlier_detection=outliers(consecutive_5xx=1))
    healthy = by_address(cluster, 1)
    call(cluster, by_address(cluster, 2), 503)
    # The ejected one is no candidate: the retry goes back to the only healthy one.
    assert set(shares(cluster, 5, avoid=healthy)) == {"10.0.0.1"}


def test_consecutive_5xx_eject_then_expire_then_eject_for_longer() -> None:
    cluster, clock = make(
        [instance(1), instance(2)],
        outlier_detection=outliers(consecutive_5xx=3, base_ejection_time=30, interval=10),
    )
    bad = by_address(cluster, 1)
    call(cluster, bad, 500)
    call(cluster, bad, 503)
    assert not bad.ejected_until
    call(cluster, bad, 502)
    assert bad.ejected_until == clock.now + 30
    assert (bad.ejections, cluster.ejections_total) == (1, 1)
    assert set(shares(cluster, 10)) == {"10.0.0.2"}
    clock.now += 29.9
    assert set(shares(cluster, 10)) == {"10.0.0.2"}
    clock.now += 0.1
    assert set(shares(cluster, 10)) == {"10.0.0.1", "10.0.0.2"}
    assert bad.ejected_until == 0
    for _ in range(3):
        assert cluster.begin(bad)
        cluster.end(bad, 0, 1.0, error=True)
    assert bad.ejected_until == clock.now + 60
    assert (bad.ejections, cluster.ejections_total) == (2, 2)
    clock.now += 60
    for _ in range(3):
        call(cluster, bad, 503)
    assert bad.ejected_until == clock.now + 90


def test_the_ejection_multiplier_decays_while_healthy() -> None:
    cluster, clock = make(
        [instance(1), instance(2)],
        outlier_detection=outliers(consecutive_5xx=1, base_ejection_time=30, interval=10),
    )
    bad = by_address(cluster, 1)
    call(cluster, bad, 503)
    clock.now += 30
    call(cluster, bad, 503)
    assert bad.ejections == 2
    clock.now += 60  # released now, then healthy for 10 s: one interval
    assert cluster.pick() is not None
    clock.now += 10
    call(cluster, bad, 503)
    assert bad.ejections == 2 and bad.ejected_until == clock.now + 60
    clock.now += 60 + 25  # two whole intervals healthy: back to the first ejection's time
    call(cluster, bad, 503)
    assert bad.ejections == 1 and bad.ejected_until == clock.now + 30


def test_a_success_resets_the_consecutive_count() -> None:
    cluster, _ = make([instance(1), instance(2)], outlier_detection=outliers(consecutive_5xx=3))
    bad = by_address(cluster, 1)
    for _ in range(5):
        call(cluster, bad, 503)
        call(cluster, bad, 503)
        call(cluster, bad, 404)
    assert not bad.ejected_until and cluster.ejections_total == 0


def test_consecutive_gateway_errors_eject_sooner() -> None:
    cluster, _ = make(
        [instance(1), instance(2)],
        outlier_detection=outliers(consecutive_5xx=5, consecutive_gateway_errors=2),
    )
    bad = by_address(cluster, 1)
    call(cluster, bad, 502)
    call(cluster, bad, 500)  # a 5xx but no gateway error: that run starts again
    call(cluster, bad, 504)
    assert not bad.ejected_until
    assert cluster.begin(bad)
    cluster.end(bad, 0, 0.1, error=True)
    assert bad.ejected_until


def test_at_most_max_ejection_percent_but_always_one() -> None:
    cluster, _ = make(
        [instance(i) for i in range(10)],
        outlier_detection=OutlierDetection(consecutive_5xx=1, max_ejection_percent=20),
    )
    for endpoint in list(cluster.endpoints):
        call(cluster, endpoint, 503)
    assert sum(1 for e in cluster.endpoints if e.ejected_until) == 2
    assert cluster.ejections_total == 2

    cluster, clock = make(
        [instance(1), instance(2), instance(3)],
        outlier_detection=OutlierDetection(consecutive_5xx=1, max_ejection_percent=10),
    )
    first, second = by_address(cluster, 1), by_address(cluster, 2)
    call(cluster, first, 503)  # 33 % > 10 %, but one may always go
    call(cluster, second, 503)
    assert first.ejected_until and not second.ejected_until
    clock.now += 30
    call(cluster, second, 503)  # the first is back: room for one again
    assert second.ejected_until and cluster.ejections_total == 2


def test_without_outlier_detection_nothing_is_ejected() -> None:
    cluster, _ = make([instance(1), instance(2)], outlier_detection=None)
    for _ in range(20):
        call(cluster, by_address(cluster, 1), 503)
    assert set(shares(cluster, 10)) == {"10.0.0.1", "10.0.0.2"}


def test_turning_outlier_detection_off_releases_the_ejected() -> None:
    cluster, _ = make([instance(1), instance(2)], outlier_detection=outliers(consecutive_5xx=1))
    call(cluster, by_address(cluster, 1), 503)
    assert set(shares(cluster, 10)) == {"10.0.0.2"}
    cluster.set_policy(DestinationPolicy(outlier_detection=None), [])
    assert set(shares(cluster, 10)) == {"10.0.0.1", "10.0.0.2"}


def hashed(**settings: Any) -> dict[str, Any]:
    return {"consistent_hash": ConsistentHash(**(settings or {"header": "x-user"}))}


def placement(cluster: Cluster, keys: int = 10_000) -> dict[bytes, str]:
    return {
        key: picked(cluster, key=key).info.address
        for key in (f"user-{i}".encode() for i in range(keys))
    }


def test_a_key_stays_on_one_endpoint() -> None:
    cluster, _ = make([instance(i) for i in range(10)], **hashed())
    assert len(shares(cluster, 50, key=b"user-42")) == 1
    spread = Counter(placement(cluster).values())
    assert len(spread) == 10
    assert all(600 <= n <= 1400 for n in spread.values()), spread


def test_adding_an_endpoint_moves_about_one_key_in_eleven() -> None:
    cluster, _ = make([instance(i) for i in range(10)], **hashed())
    before = placement(cluster)
    cluster.set_endpoints([instance(i) for i in range(11)])
    after = placement(cluster)
    moved = [key for key in before if before[key] != after[key]]
    assert 500 <= len(moved) <= 1500
    assert {after[key] for key in moved} == {"10.0.0.10"}


def test_removing_an_endpoint_moves_only_its_keys() -> None:
    cluster, _ = make([instance(i) for i in range(10)], **hashed())
    before = placement(cluster)
    cluster.set_endpoints([instance(i) for i in range(10) if i != 4])
    after = placement(cluster)
    moved = {key for key in before if before[key] != after[key]}
    assert moved == {key for key, address in before.items() if address == "10.0.0.4"}


def test_clusters_built_in_different_orders_agree() -> None:
    instances = [instance(i) for i in range(10)]
    one, _ = make(instances, seed=1, **hashed())
    other, _ = make(reversed(instances), seed=2, **hashed())
    assert placement(one, 2000) == placement(other, 2000)
    # Known placements: the ring is a function of the addresses alone, the same in every
    # process and every release (sidecars of different versions must agree).
    known = {f"user-{i}".encode(): picked(one, key=f"user-{i}".encode()) for i in range(1, 6)}
    assert {key: endpoint.info.address for key, endpoint in known.items()} == {
        b"user-1": "10.0.0.2",
        b"user-2": "10.0.0.0",
        b"user-3": "10.0.0.5",
        b"user-4": "10.0.0.5",
        b"user-5": "10.0.0.1",
    }


def test_the_ring_walks_past_ejected_and_avoided_endpoints() -> None:
    cluster, clock = make(
        [instance(i) for i in range(5)],
        outlier_detection=outliers(consecutive_5xx=1),
        **hashed(),
    )
    before = placement(cluster, 2000)
    ejected = by_address(cluster, 2)
    call(cluster, ejected, 503)
    during = placement(cluster, 2000)
    moved = {key for key in before if before[key] != during[key]}
    assert moved == {key for key, address in before.items() if address == "10.0.0.2"}
    clock.now += 30
    assert placement(cluster, 2000) == before
    home = picked(cluster, key=b"user-7")
    assert picked(cluster, key=b"user-7", avoid=home) is not home
    assert cluster.pick(key=b"user-7", avoid=home) is cluster.pick(key=b"user-7", avoid=home)


def test_hashing_in_a_subset_and_in_panic() -> None:
    cluster, _ = make(
        [instance(i, version="v2" if i % 2 else "v1") for i in range(6)],
        subsets=[Subset(name="v2", labels={"version": "v2"})],
        outlier_detection=outliers(consecutive_5xx=1),
        **hashed(),
    )
    assert len(set(placement(cluster, 500).values())) == 6
    in_subset = {
        picked(cluster, subset="v2", key=f"k{i}".encode()).info.address for i in range(200)
    }
    assert in_subset == {"10.0.0.1", "10.0.0.3", "10.0.0.5"}
    for n in (1, 3, 5):
        call(cluster, by_address(cluster, n), 503)
    home = picked(cluster, subset="v2", key=b"k1")
    assert home.ejected_until  # panic: the key's own endpoint, ejected or not
    assert picked(cluster, subset="v2", key=b"k1") is home


def test_without_a_key_a_hashing_cluster_balances() -> None:
    cluster, _ = make([instance(1), instance(2)], **hashed())
    assert len(shares(cluster, 10)) == 2
    cluster, _ = make([instance(1), instance(2)])
    assert len(shares(cluster, 10, key=b"ignored: the policy does not hash")) == 2


def test_set_endpoints_keeps_state_and_closes_pools_of_those_gone() -> None:
    cluster, _ = make(
        [instance(1), instance(2), instance(3)], outlier_detection=outliers(consecutive_5xx=1)
    )
    for _ in range(6):
        picked(cluster)
    stays, goes = by_address(cluster, 1), by_address(cluster, 2)
    stays_pool, goes_pool = stays.pool, goes.pool
    assert isinstance(stays_pool, FakePool) and isinstance(goes_pool, FakePool)
    assert cluster.begin(stays)
    call(cluster, by_address(cluster, 3), 503)
    ejected_until = by_address(cluster, 3).ejected_until

    cluster.set_endpoints([instance(3, weight=4), instance(1, zone="b"), instance(9)])
    assert [e.info.address for e in cluster.endpoints] == ["10.0.0.3", "10.0.0.1", "10.0.0.9"]
    assert by_address(cluster, 1) is stays
    assert stays.pool is stays_pool and stays.active == 1 and stays.info.zone == "b"
    assert by_address(cluster, 3).ejected_until == ejected_until
    assert by_address(cluster, 3).info.weight == 4
    assert (goes_pool.closed, stays_pool.closed) == (1, 0)
    assert goes.pool is None
    assert by_address(cluster, 9).pool is None  # made on its first pick
    assert set(shares(cluster, 10)) == {"10.0.0.1", "10.0.0.9"}
    assert isinstance(by_address(cluster, 9).pool, FakePool)

    cluster.close()
    assert stays_pool.closed == 1


def test_a_pool_is_made_once_per_endpoint() -> None:
    cluster, _ = make([instance(1), instance(2)])
    FakePool.made.clear()
    for _ in range(20):
        picked(cluster)
    assert sorted(p.info.address for p in FakePool.made) == ["10.0.0.1", "10.0.0.2"]


def test_a_new_policy_keeps_endpoint_state() -> None:
    cluster, _ = make([instance(1), instance(2)], outlier_detection=outliers(consecutive_5xx=1))
    call(cluster, by_address(cluster, 1), 503)
    endpoint = by_address(cluster, 2)
    assert cluster.begin(endpoint)
    cluster.set_policy(
        DestinationPolicy(load_balancer="least_request", outlier_detection=outliers()),
        [Subset(name="v1", labels={"version": "v1"})],
    )
    assert by_address(cluster, 2) is endpoint and endpoint.active == 1
    assert set(shares(cluster, 10)) == {"10.0.0.2"}
    assert cluster.pick("v1") is None


def test_set_endpoints_with_thousands_of_instances() -> None:
    cluster, _ = make([instance(1)])
    many = [Instance(address=f"10.1.{i // 250}.{i % 250}", port=80) for i in range(5000)]
    cluster.set_endpoints(many)
    cluster.set_endpoints(many[1:])
    assert len(cluster.endpoints) == 4999
    assert len(shares(cluster, 100)) == 100


def test_the_circuit_breaker_refuses_over_max_requests_then_lets_through() -> None:
    cluster, _ = make([instance(1), instance(2)], connection_pool=ConnectionPool(max_requests=2))
    first, second = picked(cluster), picked(cluster)
    assert cluster.begin(first) and cluster.begin(second)
    third = picked(cluster)
    assert not cluster.begin(third)
    assert not cluster.begin(third)
    assert (cluster.overflows, cluster.active, third.active) == (2, 2, 1)
    cluster.end(first, 200, 0.01)
    assert cluster.begin(third)
    assert (cluster.overflows, cluster.active) == (2, 2)


def test_the_retry_budget_allows_a_share_of_the_requests_plus_a_floor() -> None:
    clock = Clock(0.0)
    budget = RetryBudget(RetryBudgetPolicy(percent=20, min_retries_per_second=10, ttl=10), clock)
    allowed = 0
    for tick in range(3000):  # 30 s at 100 requests a second, each wanting a retry
        clock.now = tick / 100
        budget.request()
        allowed += budget.try_retry()
    # 20 % of 100/s plus 10/s: 30 retries a second, 900 in 30 s.
    assert 870 <= allowed <= 930
    assert budget.exhausted == 3000 - allowed


def test_the_retry_budget_floor_alone_without_traffic() -> None:
    clock = Clock(0.0)
    budget = RetryBudget(RetryBudgetPolicy(percent=20, min_retries_per_second=1, ttl=10), clock)
    assert sum(budget.try_retry() for _ in range(20)) == 10
    clock.now = 5.0
    assert not budget.try_retry()
    clock.now = 10.0
    assert sum(budget.try_retry() for _ in range(20)) == 10
    assert budget.exhausted == 21


def test_the_retry_budget_recovers_when_old_retries_leave_the_window() -> None:
    clock = Clock(0.0)
    budget = RetryBudget(RetryBudgetPolicy(percent=50, min_retries_per_second=0, ttl=10), clock)
    for _ in range(10):
        budget.request()
    assert sum(budget.try_retry() for _ in range(10)) == 5
    clock.now = 10.0  # the requests are gone with the retries: nothing to spend
    assert not budget.try_retry()
    budget.request()
    budget.request()
    assert budget.try_retry() and not budget.try_retry()


def request(headers: list[tuple[bytes, bytes]], client_ip: str = "192.0.2.7") -> Request:
    return Request("GET", b"/", "/", "", Headers(headers), client_ip=client_ip)


def test_hash_key_from_a_header() -> None:
    cluster, _ = make([instance(1)], **hashed(header="X-User"))
    assert cluster.hash_key(request([(b"x-user", b"alice")])) == b"alice"
    assert cluster.hash_key(request([(b"x-other", b"alice")])) is None


def test_hash_key_from_a_cookie() -> None:
    cluster, _ = make([instance(1)], **hashed(cookie="session"))
    fields = [(b"cookie", b"theme=dark; session=abc123; lang=en")]
    assert cluster.hash_key(request(fields)) == b"abc123"
    fields = [(b"cookie", b"theme=dark"), (b"cookie", b'sessionid=x; session="q1"')]
    assert cluster.hash_key(request(fields)) == b"q1"
    assert cluster.hash_key(request([(b"cookie", b"theme=dark; sessions=1")])) is None
    assert cluster.hash_key(request([])) is None


def test_hash_key_from_the_client_address() -> None:
    cluster, _ = make([instance(1)], **hashed(source_ip=True))
    assert cluster.hash_key(request([], client_ip="192.0.2.7")) == b"192.0.2.7"
    assert cluster.hash_key(request([], client_ip="")) is None


def test_no_hash_key_without_consistent_hashing() -> None:
    cluster, _ = make([instance(1)])
    assert cluster.hash_key(request([(b"x-user", b"alice")])) is None
