"""The file connector on real folders: polled, locked, moved at least once, written atomically."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from integration_kit import killed_mid_route_then_restarted, run_routes

from meshgate.integration import Exchange, IntegrationContext, from_
from meshgate.integration._errors import EndpointError
from meshgate.integration._model import ErrorHandler
from meshgate.integration.testing import mock_endpoint

FAST = "delay=10&initial_delay=0&read_lock_check_interval=50"


async def until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def listing(folder: Path) -> list[str]:
    """Every file under ``folder``, relative, hidden ones included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_dropped_file_is_consumed_once_and_moved_to_done(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    route = from_(f"file:{inbox}?{FAST}", id="r").to("mock:out").build()

    async def scenario(context: IntegrationContext) -> None:
        (inbox / "order.json").write_bytes(b'{"id": 7}')
        received = (await mock_endpoint(context, "mock:out").wait_for(1))[0]
        assert received.body == b'{"id": 7}'
        assert received.headers["file_name"] == "order.json"
        assert received.headers["file_path"] == str(inbox / "order.json")
        assert received.headers["file_size"] == 9
        assert received.headers["file_modified"].endswith("+00:00")
        assert received.properties["redelivered"] is False
        await until(lambda: listing(inbox) == [".done/order.json"])
        await asyncio.sleep(0.1)
        assert len(mock_endpoint(context, "mock:out").received) == 1

    run_routes([route], scenario)


def test_the_folder_is_created_and_text_read_with_a_charset(tmp_path: Path) -> None:
    inbox = tmp_path / "not" / "yet"
    route = from_(f"file:{inbox}?{FAST}&charset=latin-1&delete=true", id="r").to("mock:out").build()

    async def scenario(context: IntegrationContext) -> None:
        assert inbox.is_dir()
        (inbox / "a.txt").write_bytes("café".encode("latin-1"))
        received = (await mock_endpoint(context, "mock:out").wait_for(1))[0]
        assert received.body == "café"
        await until(lambda: listing(inbox) == [])

    run_routes([route], scenario)


def test_a_missing_folder_without_auto_create_fails_the_start(tmp_path: Path) -> None:
    route = from_(f"file:{tmp_path}/absent?auto_create=false", id="r").to("mock:out").build()

    async def main() -> None:
        context = IntegrationContext()
        context.add_route(route)
        with pytest.raises(Exception, match=r"absent does not exist \(auto_create=false\)"):
            await context.start()
        assert context.route_status("r") == "failed"
        await context.stop()

    asyncio.run(main())
    assert not (tmp_path / "absent").exists()


def test_a_failing_route_moves_the_file_to_error(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"

    def broken(exchange: Exchange) -> None:
        raise ValueError("cannot parse")

    route = from_(f"file:{inbox}?{FAST}", id="r").process(broken).build()

    async def scenario(context: IntegrationContext) -> None:
        (inbox / "bad.csv").write_bytes(b"x")
        await until(lambda: listing(inbox) == [".error/bad.csv"])
        assert context.route_stats("r")["failed"] == 1

    run_routes([route], scenario)


def test_without_a_failed_folder_a_failed_file_is_retried(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    attempts = 0

    def flaky(exchange: Exchange) -> None:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise ConnectionError("database down")

    route = from_(f"file:{inbox}?{FAST}&move_failed=", id="r").process(flaky).to("mock:out")

    async def scenario(context: IntegrationContext) -> None:
        (inbox / "a.csv").write_bytes(b"x")
        await mock_endpoint(context, "mock:out").wait_for(1)
        assert attempts == 3
        await until(lambda: listing(inbox) == [".done/a.csv"])

    run_routes([route.build()], scenario)


def test_the_dead_letter_channel_takes_the_file_and_it_is_done(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    handler = ErrorHandler(dead_letter="mock:dead", maximum_redeliveries=1)

    def broken(exchange: Exchange) -> None:
        raise ValueError("cannot parse")

    route = from_(f"file:{inbox}?{FAST}", id="r", error_handler=handler).process(broken).build()

    async def scenario(context: IntegrationContext) -> None:
        (inbox / "a.csv").write_bytes(b"original")
        dead = (await mock_endpoint(context, "mock:dead").wait_for(1))[0]
        assert dead.body == b"original"
        assert dead.headers["file_name"] == "a.csv"
        await until(lambda: listing(inbox) == [".done/a.csv"])

    run_routes([route], scenario)


def test_a_growing_file_is_taken_only_once_stable(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    route = (
        from_(f"file:{inbox}?delay=10&initial_delay=0&read_lock_check_interval=200", id="r")
        .to("mock:out")
        .build()
    )

    async def scenario(context: IntegrationContext) -> None:
        out = mock_endpoint(context, "mock:out")
        path = inbox / "big.dat"
        with open(path, "wb") as handle:
            for _ in range(8):  # a write every 50 ms for 400 ms: never stable for 200 ms
                handle.write(b"x" * 1000)
                handle.flush()
                await asyncio.sleep(0.05)
                assert out.received == []
        received = (await out.wait_for(1))[0]
        assert received.body == b"x" * 8000

    run_routes([route], scenario)


def test_include_and_exclude_are_globs_on_the_name(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    uri = f"file:{inbox}?{FAST}&include=*.csv,*.txt&exclude=skip-*&recursive=true&delete=true"
    route = from_(uri, id="r").to("mock:out").build()

    async def scenario(context: IntegrationContext) -> None:
        (inbox / "sub").mkdir()
        for name in ("a.csv", "b.txt", "c.json", "skip-d.csv", "sub/e.csv", ".hidden.csv"):
            (inbox / name).write_bytes(name.encode())
        (inbox / ".secret").mkdir()
        (inbox / ".secret" / "f.csv").write_bytes(b"f")
        await mock_endpoint(context, "mock:out").wait_for(3)
        await asyncio.sleep(0.1)
        names = sorted(e.headers["file_name"] for e in mock_endpoint(context, "mock:out").received)
        assert names == ["a.csv", "b.txt", "sub/e.csv"]
        assert listing(inbox) == [".hidden.csv", ".secret/f.csv", "c.json", "skip-d.csv"]

    run_routes([route], scenario)


def test_symbolic_links_are_never_followed(tmp_path: Path) -> None:
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    route = from_(f"file:{inbox}?{FAST}&recursive=true", id="r").to("mock:out").build()

    async def scenario(context: IntegrationContext) -> None:
        (inbox / "link.txt").symlink_to(outside / "secret.txt")
        (inbox / "linked-folder").symlink_to(outside)
        (inbox / "plain.txt").write_bytes(b"plain")
        await mock_endpoint(context, "mock:out").wait_for(1)
        await asyncio.sleep(0.1)
        assert mock_endpoint(context, "mock:out").bodies == [b"plain"]

    run_routes([route], scenario)
    assert (outside / "secret.txt").read_bytes() == b"secret"


def test_an_oversized_file_goes_to_the_failed_folder_unread(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = tmp_path / "inbox"
    route = from_(f"file:{inbox}?{FAST}&max_size=100", id="r").to("mock:out").build()

    async def scenario(context: IntegrationContext) -> None:
        (inbox / "huge.bin").write_bytes(b"x" * 101)
        (inbox / "small.bin").write_bytes(b"x" * 100)
        await mock_endpoint(context, "mock:out").wait_for(1)
        await until(lambda: listing(inbox) == [".done/small.bin", ".error/huge.bin"])
        assert mock_endpoint(context, "mock:out").bodies == [b"x" * 100]

    with caplog.at_level(logging.ERROR, logger="meshgate.integration.file"):
        run_routes([route], scenario)
    assert "huge.bin has 101 bytes, more than max_size (100)" in caplog.text


def test_many_files_are_consumed_concurrently_each_once(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    active = peak = 0

    async def work(exchange: Exchange) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.01)
        active -= 1

    route = (
        from_(f"file:{inbox}?{FAST}&concurrent_consumers=8&max_per_poll=50", id="r")
        .process(work)
        .to("mock:out")
        .build()
    )

    async def scenario(context: IntegrationContext) -> None:
        for i in range(200):
            (inbox / f"{i:03}.txt").write_bytes(str(i).encode())
        done = await mock_endpoint(context, "mock:out").wait_for(200, timeout=4)
        assert sorted(int(e.body) for e in done) == list(range(200))
        await until(lambda: len(listing(inbox)) == 200)
        assert all(name.startswith(".done/") for name in listing(inbox))
        assert peak == 8

    run_routes([route], scenario)


def test_two_consumers_of_one_folder_take_each_file_once(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    routes = [
        from_(f"file:{inbox}?{FAST}&delete=true", id=f"r{i}").delay("5ms").to("mock:out").build()
        for i in range(2)
    ]

    async def scenario(context: IntegrationContext) -> None:
        for i in range(50):
            (inbox / f"{i}.txt").write_bytes(str(i).encode())
        await mock_endpoint(context, "mock:out").wait_for(50, timeout=4)
        await until(lambda: listing(inbox) == [])
        await asyncio.sleep(0.1)
        bodies = sorted(int(e.body) for e in mock_endpoint(context, "mock:out").received)
        assert bodies == list(range(50))

    run_routes(routes, scenario)


def test_noop_leaves_files_and_takes_each_name_once(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    route = from_(f"file:{inbox}?{FAST}&noop=true", id="r").to("mock:out").build()

    async def scenario(context: IntegrationContext) -> None:
        (inbox / "a.txt").write_bytes(b"a")
        await mock_endpoint(context, "mock:out").wait_for(1)
        await asyncio.sleep(0.15)
        assert mock_endpoint(context, "mock:out").bodies == [b"a"]
        assert listing(inbox) == ["a.txt"]

    run_routes([route], scenario)


def test_sort_by_modified_and_a_move_template(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    move = "archive/{{ headers.file_modified[:4] }}/{{ headers.file_name }}.bak"
    route = from_(f"file:{inbox}?{FAST}&sort_by=modified&move={move}", id="r").to("mock:out")

    async def scenario(context: IntegrationContext) -> None:
        await context.stop_route("r")
        for name, mtime in (("b", 1_000_000_000), ("a", 1_000_000_300), ("c", 1_000_000_100)):
            (inbox / name).write_bytes(name.encode())
            os.utime(inbox / name, (mtime, mtime))
        await context.start_route("r")
        received = await mock_endpoint(context, "mock:out").wait_for(3)
        assert [e.body for e in received] == [b"b", b"c", b"a"]
        archived = ["archive/2001/a.bak", "archive/2001/b.bak", "archive/2001/c.bak"]
        await until(lambda: listing(inbox) == archived)

    run_routes([route.build()], scenario)


def test_the_producer_writes_atomically_and_names_the_file(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    routes = [
        from_("direct:json", id="j")
        .to(f"file:{outbox}?file_name=orders/{{{{ body.id }}}}.json")
        .build(),
        from_("direct:named", id="n").to(f"file:{outbox}").build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        reply = await context.request("direct:json", {"id": 7, "total": 2})
        assert reply.headers["file_path"] == str(outbox / "orders" / "7.json")
        assert json.loads((outbox / "orders" / "7.json").read_bytes()) == {"id": 7, "total": 2}
        await context.send("direct:named", "text", {"file_name": "in/a.txt"})
        assert (outbox / "in" / "a.txt").read_text() == "text"
        sent = await context.send("direct:named", b"raw")
        assert (outbox / sent.id).read_bytes() == b"raw"
        assert not [p for p in listing(outbox) if ".meshgate-tmp" in p]

    run_routes(routes, scenario)


@pytest.mark.parametrize(
    ("file_exist", "expected", "error"),
    [
        ("override", b"new", None),
        ("append", b"oldnew", None),
        ("ignore", b"old", None),
        ("fail", b"old", "a.txt exists already"),
    ],
)
def test_file_exist(tmp_path: Path, file_exist: str, expected: bytes, error: str | None) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / "a.txt").write_bytes(b"old")
    route = from_("direct:in", id="r").to(f"file:{outbox}?file_exist={file_exist}").build()

    async def scenario(context: IntegrationContext) -> None:
        sent = await context.send("direct:in", b"new", {"file_name": "a.txt"})
        assert (str(sent.exception) if sent.exception else None) == (
            None if error is None else f"file:{outbox}?file_exist=fail: {error} (file_exist=fail)"
        )
        assert (outbox / "a.txt").read_bytes() == expected
        assert listing(outbox) == ["a.txt"]

    run_routes([route], scenario)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../escape.txt", "leaves the folder"),
        ("a/../../escape.txt", "leaves the folder"),
        ("/etc/passwd", "is absolute"),
        ("a\x00b", "NUL character"),
        ("", "is empty"),
        ("sub/", "names a folder"),
        ("link/x.txt", "leads out of the folder"),
    ],
)
def test_a_file_name_escaping_the_folder_is_refused(tmp_path: Path, name: str, why: str) -> None:
    outbox, outside = tmp_path / "outbox", tmp_path / "outside"
    outbox.mkdir()
    outside.mkdir()
    (outbox / "link").symlink_to(outside)
    route = from_("direct:in", id="r").to(f"file:{outbox}").build()

    async def scenario(context: IntegrationContext) -> None:
        sent = await context.send("direct:in", b"x", {"file_name": name})
        assert why in str(sent.exception)

    run_routes([route], scenario)
    assert listing(tmp_path) == []


def test_bad_uris_are_clear_errors(tmp_path: Path) -> None:
    context = IntegrationContext()
    cases = {
        "file:": "give a folder",
        "file:in?read_lock=marker": "option 'read_lock' must be one of changed, none",
        "file:in?charset=klingon": "option 'charset' names no known encoding",
        "file:in?noop=true&delete=true": "'noop' and 'delete' exclude each other",
        "file:in?include=*.csv,": "option 'include' must be glob patterns",
        "file:in?file_name=../x": "option 'file_name': the file name '../x' leaves the folder",
        "file:in?file_name={{ body": "option 'file_name': invalid template",
        "file:in?max_size=0": "option 'max_size' must be between 1",
        "file:in?pattern=x": "unknown option 'pattern'",
    }
    for uri, message in cases.items():
        with pytest.raises(EndpointError, match=message.replace("(", r"\(").replace("*", r"\*")):
            context.endpoint(uri)


def _without_root_file_access() -> None:
    """In the child before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH for good."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_an_unreadable_file_goes_to_the_failed_folder(tmp_path: Path) -> None:
    """The file's mode refuses reading (to root too: the runtime runs without the
    capabilities that let root read anything)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "locked.txt").write_bytes(b"x")
    (inbox / "locked.txt").chmod(0)
    (inbox / "open.txt").write_bytes(b"y")
    script = f"""
import asyncio
import contextlib
from meshgate.integration import IntegrationContext, from_
from meshgate.integration.testing import mock_endpoint

async def main():
    context = IntegrationContext()
    context.add_route(from_("file:{inbox}?{FAST}", id="r").to("mock:out").build())
    await context.start()
    await mock_endpoint(context, "mock:out").wait_for(1)
    for _ in range(300):
        if (context.endpoint("file:{inbox}?{FAST}").folder / ".error/locked.txt").exists():
            break
        await asyncio.sleep(0.01)
    await context.stop()
    print(mock_endpoint(context, "mock:out").bodies)

asyncio.run(main())
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=tmp_path,
        preexec_fn=_without_root_file_access if os.geteuid() == 0 else None,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[b'y']"
    assert "cannot read locked.txt: Permission denied" in done.stderr
    assert listing(inbox) == [".done/open.txt", ".error/locked.txt"]


def test_a_runtime_killed_mid_route_leaves_the_file_for_the_next(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    log_path = tmp_path / "runtime.log"
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        f"""
routes:
  - id: slow
    from: "file:{inbox}?delay=10&initial_delay=0&read_lock_check_interval=20"
    steps:
      - delay: 500ms
      - log: "done {{{{ body }}}}"
"""
    )

    def killed_with_the_file_locked() -> None:
        names = listing(inbox)
        assert len(names) == 2 and names[1] == names[0] + ".meshgate-lock", names

    killed_mid_route_then_restarted(
        routes, log_path, f"file:{inbox}", {}, between=killed_with_the_file_locked
    )
    assert "left by a consumer that stopped mid-route" in log_path.read_text()
    assert [name.split("/")[0] for name in listing(inbox)] == [".done"]


def test_locks_held_elsewhere_are_respected_until_stale(tmp_path: Path) -> None:
    """A fresh lock of another host keeps its file; a stale one, or one of a dead process
    of this host, is taken over and the file redelivered; an orphan lock is removed."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(finished.stdout)
    locks = {
        "held.txt": {"host": "elsewhere", "pid": 1, "token": "t1"},
        "stale.txt": {"host": "elsewhere", "pid": 1, "token": "t2"},
        "dead.txt": {"host": socket.gethostname(), "pid": dead_pid, "token": "t3"},
    }
    for name, owner in locks.items():
        (inbox / name).write_bytes(name.encode())
        (inbox / f"{name}.meshgate-lock").write_text(json.dumps(owner))
    old = time.time() - 60
    os.utime(inbox / "stale.txt.meshgate-lock", (old, old))
    (inbox / "gone.txt.meshgate-lock").write_text("{}")
    os.utime(inbox / "gone.txt.meshgate-lock", (old, old))
    route = from_(f"file:{inbox}?{FAST}&lock_timeout=30s", id="r").to("mock:out").build()

    async def scenario(context: IntegrationContext) -> None:
        received = await mock_endpoint(context, "mock:out").wait_for(2)
        assert sorted(e.body for e in received) == [b"dead.txt", b"stale.txt"]
        assert all(e.properties["redelivered"] is True for e in received)
        expected = [".done/dead.txt", ".done/stale.txt", "held.txt", "held.txt.meshgate-lock"]
        await until(lambda: listing(inbox) == expected)
        await asyncio.sleep(0.1)
        assert len(mock_endpoint(context, "mock:out").received) == 2

    run_routes([route], scenario)


def test_a_slow_route_keeps_its_lock_fresh(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    lock = inbox / "a.txt.meshgate-lock"

    async def slow(exchange: Exchange) -> None:
        old = time.time() - 100
        os.utime(lock, (old, old))
        await until(lambda: time.time() - lock.stat().st_mtime < 5, timeout=2)

    route = from_(f"file:{inbox}?{FAST}&lock_timeout=1500ms", id="r").process(slow)

    async def scenario(context: IntegrationContext) -> None:
        (inbox / "a.txt").write_bytes(b"a")
        await mock_endpoint(context, "mock:out").wait_for(1, timeout=4)
        await until(lambda: listing(inbox) == [".done/a.txt"])

    run_routes([route.to("mock:out").build()], scenario)


def test_a_stop_cancelled_at_the_deadline_still_releases_the_repository(tmp_path: Path) -> None:
    """The drain deadline cancels the consumer's stop: the file stays for the next run (not
    moved, no lock, its key not recorded) and the repository and lock owner are released."""
    from meshgate.integration._sql_state import _ENGINES, database_url
    from meshgate.integration.components import file as file_component

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    url = f"sqlite:///{tmp_path / 'state.db'}"
    uri = f"file:{inbox}?{FAST}&noop=true&idempotent_repository=sql"
    route = from_(uri, id="slow").delay("5s").to("mock:out").build()
    tokens = set(file_component._LIVE_TOKENS)

    async def main() -> None:
        context = IntegrationContext(settings={"database_url": url})
        context.add_route(route)
        await context.start()
        (inbox / "a.txt").write_bytes(b"a")
        await until(lambda: context.route_stats("slow")["inflight"] == 1)
        assert await context.stop(grace=0.2) is False

    asyncio.run(asyncio.wait_for(main(), 10))
    assert file_component._LIVE_TOKENS == tokens
    assert database_url(url) not in _ENGINES
    assert listing(inbox) == ["a.txt"]
    # Not recorded: the next run takes the file.
    route = from_(uri, id="again").to("mock:out").build()

    async def scenario(context: IntegrationContext) -> None:
        received = await mock_endpoint(context, "mock:out").wait_for(1)
        assert received[0].body == b"a"

    run_routes([route], scenario, settings={"database_url": url})


def test_a_persistent_idempotent_key_is_recorded_only_once_the_route_completed(
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    log_path = tmp_path / "runtime.log"
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        f"""
database_url: "sqlite:///{tmp_path / "state.db"}"
routes:
  - id: slow
    from: "file:{inbox}?delay=10&initial_delay=0&read_lock=none&noop=true&idempotent_repository=sql"
    steps:
      - delay: 500ms
      - log: "done {{{{ body }}}}"
"""
    )
    killed_mid_route_then_restarted(routes, log_path, f"file:{inbox}?file_name=p.txt", {})
    assert listing(inbox) == ["p.txt"]  # noop: left in place, and taken only once
    assert log_path.read_text().count("done precious") == 1


def test_two_consumers_racing_for_a_stale_lock_take_it_over_once(tmp_path: Path) -> None:
    """Both see the same stale lock at the same moment: exactly one takes it over, the
    other finds the winner's fresh lock and leaves the file; many times over."""
    import threading

    from meshgate.integration.components import file as file_component

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    lock = str(inbox / "a.txt.meshgate-lock")
    consumers: list[Any] = []
    for _ in range(2):
        endpoint = IntegrationContext().endpoint(f"file:{inbox}?lock_timeout=1s")
        consumers.append(endpoint.create_consumer(mock_endpoint))
    for consumer in consumers:
        file_component._LIVE_TOKENS.add(consumer._token)
    stale = json.dumps({"host": "elsewhere", "pid": 1, "token": "gone"})
    try:
        for _ in range(300):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            Path(lock).write_text(stale)
            old = time.time() - 60
            os.utime(lock, (old, old))
            start = threading.Barrier(2)
            results: list[bool | None] = [None, None]

            def take(index: int, start: threading.Barrier, results: list[bool | None]) -> None:
                start.wait()
                results[index] = consumers[index]._lock(lock)

            threads = [threading.Thread(target=take, args=(i, start, results)) for i in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            # One holds the lock (taken over, or created once the stale one was gone).
            holders = [index for index, taken in enumerate(results) if taken is not None]
            assert len(holders) == 1, results
            owner = json.loads(Path(lock).read_text())
            winner = consumers[holders[0]]
            assert owner["token"] == winner._token
            assert [p for p in os.listdir(inbox) if p != "a.txt.meshgate-lock"] == []
    finally:
        for consumer in consumers:
            file_component._LIVE_TOKENS.discard(consumer._token)
