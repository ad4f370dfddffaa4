"""Usage reporting on the memory backend: exact counts per application, metric and status,
a graceful stop that reports everything, a spool that keeps batches while the control plane
is away (bounded, the oldest dropped) and sends each once when it is back."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import echo_upstream, within
from usage_support import Receiver, UsageGateway, product, usage_gateway

APPS = [
    {"id": "app1", "plan": "big", "keys": ["k1"]},
    {"id": "app2", "plan": "basic", "keys": ["k2"]},  # 5 hits a minute
    {"id": "app3", "plan": "free", "keys": ["k3"]},  # no limit at all
]


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    with echo_upstream(tmp_path) as port:
        rx = Receiver({"version": "v1", "products": [product(port, APPS)]})
        yield rx
        rx.stop()


def mixed_traffic(gw: UsageGateway) -> tuple[Counter[tuple[str, str, str]], Counter[object]]:
    """Requests of several applications and outcomes; the usage and responses they make."""
    statuses: Counter[object] = Counter()

    def hit(path: str, key: str | None, app: str) -> None:
        status = gw.get(path, key)
        statuses[(app, status)] += 1

    for _ in range(7):
        hit("/echo/a", "k1", "app1")
    for _ in range(4):
        hit("/echo/search", "k1", "app1")
    for _ in range(8):
        hit("/echo/a", "k2", "app2")  # 5 pass, 3 are limited
    for _ in range(3):
        hit("/echo/search", "k3", "app3")
    for _ in range(2):
        hit("/echo/a", None, "")  # 401
        hit("/echo/a", "wrong", "")  # 403
        hit("/nothing/here", "k1", "")  # 404: no product
    assert gw.client.post("/echo/a", headers={"X-API-Key": "k1"}).status_code == 404
    assert statuses == {
        ("app1", 200): 11,
        ("app2", 200): 5,
        ("app2", 429): 3,
        ("app3", 200): 3,
        ("", 401): 2,
        ("", 403): 2,
        ("", 404): 2,
    }
    usage = Counter(
        {
            ("echo", "app1", "hits"): 11,
            ("echo", "app1", "search"): 4,
            ("echo", "app2", "hits"): 5,
            ("echo", "app3", "hits"): 3,
            ("echo", "app3", "search"): 3,
        }
    )
    responses: Counter[object] = Counter(
        {
            ("echo", "app1", 200, "ok"): 11,
            ("echo", "app1", 404, "not_found"): 1,  # no mapping rule for POST
            ("echo", "app2", 200, "ok"): 5,
            ("echo", "app2", 429, "limited"): 3,
            ("echo", "app3", 200, "ok"): 3,
            ("echo", "", 401, "unauthenticated"): 2,
            ("echo", "", 403, "forbidden"): 2,
            ("", "", 404, "not_found"): 2,
        }
    )
    return usage, responses


def test_usage_and_responses_reach_the_control_plane_exactly(
    receiver: Receiver, tmp_path: Path
) -> None:
    with usage_gateway(tmp_path, receiver) as gw:
        usage, responses = mixed_traffic(gw)
        within(10, lambda: receiver.responses() == responses, "every response reported")
        assert receiver.usage() == usage
        assert receiver.latency() == {"echo": 27, "": 2}
        within(5, lambda: gw.metric("meshgate_usage_batches_pending") == 0, "nothing pending")
        assert gw.metric("meshgate_usage_batches_sent_total") == len(receiver.batches)
        assert receiver.duplicates == 0 and receiver.unauthorized == 0
        ids = list(receiver.batches)
        # One gateway run: its data-plane id, one UUID of the run, a sequence.
        assert len({i.rsplit(":", 1)[0] for i in ids}) == 1 and ids[0].startswith("gw1:")


def test_a_graceful_stop_reports_what_was_not_sent_yet(receiver: Receiver, tmp_path: Path) -> None:
    with usage_gateway(tmp_path, receiver, usage={"interval": 600}) as gw:
        usage, responses = mixed_traffic(gw)
        time.sleep(0.3)
        assert receiver.batches == {}  # nothing is due for ten minutes
        assert gw.proc.stop() == 0
        assert gw.spooled() == []
    assert receiver.usage() == usage
    assert receiver.responses() == responses


def test_batches_wait_on_disk_for_the_control_plane_and_are_sent_once(
    receiver: Receiver, tmp_path: Path
) -> None:
    with usage_gateway(tmp_path, receiver) as gw:
        receiver.stop()
        sent = 0
        for _ in range(4):
            for _ in range(5):
                assert gw.get("/echo/a", "k1") == 200
                sent += 1
            time.sleep(0.4)
        within(5, lambda: len(gw.spooled()) >= 3, "batches spooled while nobody answers")
        assert gw.metric("meshgate_usage_batches_pending") == len(gw.spooled())
        receiver.start()
        within(40, lambda: receiver.usage()[("echo", "app1", "hits")] == sent, "all sent")
        within(5, lambda: gw.spooled() == [], "the spool emptied")
        assert receiver.duplicates == 0


def test_what_a_killed_gateway_spooled_is_sent_at_its_next_start(
    receiver: Receiver, tmp_path: Path
) -> None:
    with usage_gateway(tmp_path, receiver) as gw:
        receiver.mode = "fail"
        for _ in range(6):
            assert gw.get("/echo/search", "k3") == 200
        within(5, lambda: gw.spooled() and receiver.attempts, "spooled, refused with 503")
        time.sleep(0.7)  # two more intervals: nothing left in the process's sums
        gw.proc.kill()
    receiver.mode = "ok"
    with usage_gateway(tmp_path, receiver):
        within(10, lambda: receiver.usage()[("echo", "app3", "search")] == 6, "sent at start")
    assert receiver.usage() == {("echo", "app3", "search"): 6, ("echo", "app3", "hits"): 6}
    assert receiver.responses() == {("echo", "app3", 200, "ok"): 6}


def test_a_full_spool_drops_the_oldest_with_a_warning_and_a_count(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.mode = "fail"
    with usage_gateway(tmp_path, receiver, usage={"spool_max_batches": 2}) as gw:
        for _ in range(5):
            assert gw.get("/echo/a", "k1") == 200
            time.sleep(0.4)
        within(5, lambda: gw.metric("meshgate_usage_batches_dropped_total") >= 2, "dropped")
        assert len(gw.spooled()) <= 2
        receiver.mode = "ok"
        within(40, lambda: gw.spooled() == [], "the kept batches sent")
        kept = receiver.usage()[("echo", "app1", "hits")]
        assert 1 <= kept <= 3
        # The newest were kept: the last batch is among them.
        assert receiver.attempts[-1] in receiver.batches
    assert "usage spool full" in gw.proc.stderr()


def test_a_batch_refused_for_good_is_dropped_not_retried(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.mode = "refuse"
    with usage_gateway(tmp_path, receiver) as gw:
        assert gw.get("/echo/a", "k1") == 200
        within(5, lambda: gw.metric("meshgate_usage_batches_refused_total") == 1, "refused")
        assert gw.spooled() == []
        time.sleep(1)
        assert len(receiver.attempts) == 1  # never sent again
        receiver.mode = "ok"
        assert gw.get("/echo/a", "k1") == 200
        within(5, lambda: receiver.usage() == {("echo", "app1", "hits"): 1}, "the next one")
    assert "refused usage batch" in gw.proc.stderr()
