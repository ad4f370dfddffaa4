"""The pipelined hot path of RedisCounters: shared connection and syscalls, replies in order,
NOSCRIPT, timeouts, lost connections, reconnect backoff, and URLs with AUTH, SELECT, TLS."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import hiredis
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_redis_counters import PrivateRedis, free_port

from meshgate.limits import BackendUnavailable, Decision, LimitCheck, RedisCounters, _pipeline

HITS = [LimitCheck("hits", "minute", 100, 1)]
# A script reply as the fake server gives it: allowed, the counter at 1.
ALLOWED = b"*2\r\n:0\r\n*1\r\n:1\r\n"
# The fake server's clock is this far ahead of ours: deadlines are in its time, not ours.
FAKE_CLOCK_AHEAD = 1000.0


@pytest.fixture
def private_redis(redis_server_binary: str, tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(redis_server_binary, tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.kill()


class FakeRedis:
    """A Redis stand-in on loopback that answers as each test needs, and records what came.

    ``answer`` maps a command (its words) to the reply bytes, or ``None`` for no reply;
    ``close_after`` closes a connection once it has answered that many EVALSHA (0: at once).
    """

    def __init__(self) -> None:
        self.answer: Callable[[list[bytes]], bytes | None] = self.normal
        self.close_after: int | None = None
        self.commands: list[list[bytes]] = []
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    @staticmethod
    def normal(words: list[bytes]) -> bytes | None:
        if words[0] == b"EVALSHA":
            return ALLOWED
        if words[:2] == [b"SCRIPT", b"LOAD"]:
            return b"$40\r\n" + b"0" * 40 + b"\r\n"
        if words[0] == b"TIME":
            return FakeRedis.time(FAKE_CLOCK_AHEAD + time.time())
        return b"+OK\r\n"

    @staticmethod
    def time(at: float) -> bytes:
        """TIME's reply for ``at`` (seconds since the epoch)."""
        seconds, micros = (b"%d" % part for part in divmod(int(at * 1_000_000), 1_000_000))
        return b"*2\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
            len(seconds),
            seconds,
            len(micros),
            micros,
        )

    def evalshas(self) -> int:
        return sum(words[0] == b"EVALSHA" for words in self.commands)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        parser = hiredis.Reader()
        answered = 0
        try:
            while answered != self.close_after and (data := await reader.read(1 << 20)):
                parser.feed(data)
                received = []
                while (words := parser.gets()) is not False:
                    received.append(words)
                self.commands += received
                for words in received:
                    reply = self.answer(words)
                    if reply is not None:
                        writer.write(reply)
                        answered += words[0] == b"EVALSHA"
                    if answered == self.close_after:
                        break
        finally:
            writer.close()


def with_fake(scenario: Callable[[FakeRedis], Awaitable[None]]) -> None:
    async def main() -> None:
        fake = FakeRedis()
        await fake.start()
        try:
            await scenario(fake)
        finally:
            await fake.stop()

    asyncio.run(main())


async def outcomes(calls: list[Awaitable[Decision]]) -> list[Decision | BaseException]:
    return await asyncio.gather(*calls, return_exceptions=True)


def test_concurrent_calls_share_one_connection_and_few_reads(
    private_redis: PrivateRedis,
) -> None:
    admin = private_redis.client()

    async def scenario() -> None:
        counters = RedisCounters(private_redis.url)
        try:
            await counters.check_and_increment("warm/up", HITS)
            reads = admin.info("stats")["total_reads_processed"]
            # Each call has its own scope and increment, and every other one is refused,
            # so a reply matched to the wrong call shows.
            calls = [
                counters.check_and_increment(
                    f"p/app{i}", [LimitCheck("hits", "minute", i if i % 2 else 1000, i + 1)]
                )
                for i in range(500)
            ]
            decisions = await asyncio.gather(*calls)
            reads = admin.info("stats")["total_reads_processed"] - reads
            for i, decision in enumerate(decisions):
                assert decision.allowed == (i % 2 == 0), i
                assert decision.usages[0].value == (0 if i % 2 else i + 1), i
                assert decision.usages[0].limit == (i if i % 2 else 1000)
            # 500 commands arrive in a few writes (the INFO calls are reads too).
            assert reads <= 12, reads
            clients = admin.client_list()
            assert len(clients) == 2, clients  # admin and the counters' one connection
        finally:
            await counters.close()

    try:
        asyncio.run(scenario())
    finally:
        admin.close()


def test_many_callers_in_a_row_each_get_their_own_replies(private_redis: PrivateRedis) -> None:
    async def scenario() -> None:
        counters = RedisCounters(private_redis.url)

        async def caller(n: int) -> list[int]:
            checks = [LimitCheck("hits", "minute", 10**6, n), LimitCheck("hits", "day", 10, 0)]
            seen = []
            for _ in range(20):
                decision = await counters.check_and_increment(f"p/app{n}", checks)
                seen.append(decision.usages[0].value)
                assert decision.usages[1].value == 0
            return seen

        try:
            results = await asyncio.gather(*(caller(n) for n in range(1, 65)))
        finally:
            await counters.close()
        for n, seen in enumerate(results, start=1):
            assert seen == [n * k for k in range(1, 21)]

    asyncio.run(scenario())


def test_noscript_after_script_flush_reloads_once_and_counts_once(
    private_redis: PrivateRedis,
) -> None:
    admin = private_redis.client()

    async def scenario() -> None:
        counters = RedisCounters(private_redis.url)
        try:
            assert (await counters.check_and_increment("p/app", HITS)).usages[0].value == 1
            admin.script_flush()
            admin.config_resetstat()
            decisions = await asyncio.gather(
                *(counters.check_and_increment("p/app", HITS) for _ in range(20))
            )
            assert sorted(d.usages[0].value for d in decisions) == list(range(2, 22))
            stats = admin.info("commandstats")
            assert stats["cmdstat_script|load"]["calls"] == 1  # one SCRIPT LOAD for all retries
            assert stats["cmdstat_evalsha"]["failed_calls"] == 20
            assert stats["cmdstat_evalsha"]["calls"] == 40

            admin.script_flush()
            assert (await counters.check_and_increment("p/app", HITS)).usages[0].value == 22
            assert (await counters.usage("p/app", HITS))[0].value == 22
        finally:
            await counters.close()

    try:
        asyncio.run(scenario())
    finally:
        admin.close()


def test_noscript_twice_fails_without_a_third_try() -> None:
    async def scenario(fake: FakeRedis) -> None:
        def noscript(words: list[bytes]) -> bytes | None:
            if words[0] == b"EVALSHA":
                return b"-NOSCRIPT No matching script. Please use EVAL.\r\n"
            return FakeRedis.normal(words)

        fake.answer = noscript
        counters = RedisCounters(fake.url, timeout=2.0)
        try:
            with pytest.raises(BackendUnavailable, match="check_and_increment: .*NOSCRIPT"):
                await counters.check_and_increment("p/app", HITS)
        finally:
            await counters.close()
        assert fake.evalshas() == 2

    with_fake(scenario)


def test_error_replies_are_backend_unavailable() -> None:
    async def scenario(fake: FakeRedis) -> None:
        def readonly(words: list[bytes]) -> bytes | None:
            if words[0] == b"EVALSHA":
                return b"-READONLY You can't write against a read only replica.\r\n"
            return FakeRedis.normal(words)

        fake.answer = readonly
        counters = RedisCounters(fake.url, timeout=2.0)
        try:
            with pytest.raises(BackendUnavailable, match="READONLY You can't write"):
                await counters.check_and_increment("p/app", HITS)
        finally:
            await counters.close()
        assert fake.evalshas() == 1

    with_fake(scenario)


def test_a_server_that_reads_but_never_answers_fails_every_pending_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_pipeline, "RECONNECT_BACKOFF", 0.5)

    async def scenario(fake: FakeRedis) -> None:
        answering = False

        def answer(words: list[bytes]) -> bytes | None:
            # Connection setup is answered; the calls are not, until told.
            if words[0] == b"EVALSHA" and not answering:
                return None
            return FakeRedis.normal(words)

        fake.answer = answer
        counters = RedisCounters(fake.url, timeout=1.0)
        try:
            started = time.monotonic()
            first = asyncio.ensure_future(
                outcomes([counters.check_and_increment(f"p/a{i}", HITS) for i in range(30)])
            )
            first_failed: list[float] = []
            first.add_done_callback(lambda _: first_failed.append(time.monotonic() - started))
            await asyncio.sleep(0.5)
            later = await outcomes([counters.check_and_increment("p/b", HITS) for _ in range(30)])
            elapsed = time.monotonic() - started
            results = await first + later
            assert all(isinstance(r, BackendUnavailable) for r in results), results
            assert all("no answer within 1.0s" in str(r) for r in results)
            # Each call fails when its own time is up, not before: a younger one may still
            # get its reply. The connection is dropped after the last.
            assert 0.98 <= first_failed[0] < 1.4, first_failed
            assert 1.48 <= elapsed < 1.9, elapsed
            assert fake.evalshas() == 60

            answering = True
            started = time.monotonic()
            decision = await counters.check_and_increment("p/app", HITS)
            assert decision.allowed and decision.usages[0].value == 1
            assert time.monotonic() - started < 0.4  # no backoff: a timeout is no failed connect
            assert fake.connections == 2
        finally:
            await counters.close()

    with_fake(scenario)


def test_connection_loss_mid_batch_fails_only_the_unanswered_calls() -> None:
    async def scenario(fake: FakeRedis) -> None:
        fake.close_after = 5
        counters = RedisCounters(fake.url, timeout=2.0)
        try:
            results = await outcomes(
                [counters.check_and_increment("p/app", HITS) for _ in range(20)]
            )
            assert all(isinstance(r, Decision) for r in results[:5]), results[:5]
            assert all(isinstance(r, BackendUnavailable) for r in results[5:]), results[5:]
            assert "Redis closed the connection" in str(results[5])
            # A call that may have run is never sent again: it would count twice.
            assert fake.evalshas() == 20

            fake.close_after = None
            assert (await counters.check_and_increment("p/app", HITS)).allowed
            assert fake.evalshas() == 21 and fake.connections == 2
        finally:
            await counters.close()

    with_fake(scenario)


def test_after_a_failed_connect_calls_share_the_next_attempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_pipeline, "RECONNECT_BACKOFF", 0.5)

    async def scenario(fake: FakeRedis) -> None:
        fake.close_after = 0  # closes every connection before it answers anything
        counters = RedisCounters(fake.url, timeout=2.0)
        try:
            started = time.monotonic()
            # Closed with our handshake unread: the kernel resets the connection.
            with pytest.raises(BackendUnavailable, match="ConnectionResetError|closed"):
                await counters.check_and_increment("p/app", HITS)
            assert time.monotonic() - started < 0.4
            assert fake.connections == 1

            started = time.monotonic()
            results = await outcomes(
                [counters.check_and_increment("p/app", HITS) for _ in range(50)]
            )
            elapsed = time.monotonic() - started
            assert all(isinstance(r, BackendUnavailable) for r in results)
            assert fake.connections == 2  # one attempt for all 50, after the backoff
            assert 0.45 <= elapsed < 1.5, elapsed

            fake.close_after = None
            decision = await counters.check_and_increment("p/app", HITS)
            assert decision.allowed and fake.connections == 3
        finally:
            await counters.close()

    with_fake(scenario)


def test_close_fails_the_calls_still_waiting() -> None:
    async def scenario(fake: FakeRedis) -> None:
        fake.answer = lambda words: None
        counters = RedisCounters(fake.url, timeout=5.0)
        pending = asyncio.ensure_future(
            outcomes([counters.check_and_increment("p/app", HITS) for _ in range(5)])
        )
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await counters.close()
        results = await pending
        assert time.monotonic() - started < 1.0
        assert all(isinstance(r, BackendUnavailable) for r in results)
        assert "closed" in str(results[0])

    with_fake(scenario)


def test_a_cancelled_call_leaves_the_others_their_replies(private_redis: PrivateRedis) -> None:
    async def scenario() -> None:
        counters = RedisCounters(private_redis.url)
        try:
            await counters.ping()
            tasks = [
                asyncio.ensure_future(
                    counters.check_and_increment(f"p/app{i}", [LimitCheck("hits", "day", 99, i)])
                )
                for i in range(1, 11)
            ]
            await asyncio.sleep(0)
            tasks[3].cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert isinstance(results[3], asyncio.CancelledError)
            for i, result in enumerate(results, start=1):
                if i != 4:
                    assert isinstance(result, Decision) and result.usages[0].value == i
        finally:
            await counters.close()

    asyncio.run(scenario())


class SecuredRedis(PrivateRedis):
    """A private Redis that asks for a password, with a second user for ACL logins."""

    def start(self) -> None:
        super().start()
        client = super().client()
        client.acl_setuser(
            "meter", enabled=True, passwords=["+m3ter"], keys="*", commands=["+@all"]
        )
        client.config_set("requirepass", "s3cret")
        client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password="s3cret", socket_timeout=2)


@pytest.fixture
def secured_redis(redis_server_binary: str, tmp_path: Path) -> Iterator[SecuredRedis]:
    server = SecuredRedis(redis_server_binary, tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.kill()


def test_password_user_and_database_from_the_url(secured_redis: SecuredRedis) -> None:
    admin = secured_redis.client()
    base = f"127.0.0.1:{secured_redis.port}"

    async def scenario() -> None:
        for url, db in ((f"redis://:s3cret@{base}/3", 3), (f"redis://meter:m3ter@{base}/5", 5)):
            counters = RedisCounters(url, key_prefix=f"db{db}")
            try:
                assert (await counters.check_and_increment("p/app", HITS)).usages[0].value == 1
                assert (await counters.check_and_increment("p/app", HITS)).usages[0].value == 2
                assert (await counters.usage("p/app", HITS))[0].value == 2
            finally:
                await counters.close()
            admin.execute_command("SELECT", db)
            assert admin.keys(f"db{db}:*") != []
            admin.execute_command("SELECT", 0)
            assert admin.keys(f"db{db}:*") == []

        counters = RedisCounters(f"redis://meter:wrong@{base}/0", key_prefix="nope")
        try:
            with pytest.raises(BackendUnavailable) as raised:
                await counters.check_and_increment("p/app", HITS)
            message = str(raised.value)
            assert "WRONGPASS" in message and "wrong" not in message.replace("WRONGPASS", "")
            assert "meter:***@" in message
        finally:
            await counters.close()
        assert admin.keys("nope:*") == []

    try:
        asyncio.run(scenario())
    finally:
        admin.close()


def test_a_unix_socket_url(redis_server_binary: str, tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    process = subprocess.Popen(
        [redis_server_binary, "--port", "0", "--unixsocket", str(socket_path), "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip

    async def scenario() -> None:
        counters = RedisCounters(f"unix://{socket_path}?db=2")
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    decision = await counters.check_and_increment("p/app", HITS)
                    break
                except BackendUnavailable:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
            assert decision.usages[0].value == 1
            assert (await counters.usage("p/app", HITS))[0].value == 1
        finally:
            await counters.close()

    try:
        asyncio.run(scenario())
        admin = redis.Redis(unix_socket_path=str(socket_path), db=2)
        assert len(admin.keys("meshgate:*")) == 1
        admin.close()
    finally:
        process.kill()
        process.wait()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "redis.crt", directory / "redis.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_a_tls_url(redis_server_binary: str, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    port = free_port()
    process = subprocess.Popen(
        [redis_server_binary, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip

    async def scenario() -> None:
        trusted = RedisCounters(f"rediss://localhost:{port}/0?ssl_ca_certs={cert}", timeout=2.0)
        untrusted = RedisCounters(f"rediss://localhost:{port}/0", timeout=2.0)
        # A CA file that is not there fails the calls, not the start.
        misconfigured = RedisCounters(f"rediss://localhost:{port}/0?ssl_ca_certs={tmp_path}/nope")
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    decision = await trusted.check_and_increment("p/app", HITS)
                    break
                except BackendUnavailable as error:
                    assert time.monotonic() < deadline, error
                    if process.poll() is not None:
                        pytest.skip("this redis-server has no TLS")
                    await asyncio.sleep(0.05)
            assert decision.usages[0].value == 1
            assert (await trusted.usage("p/app", HITS))[0].value == 1
            with pytest.raises(BackendUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusted.check_and_increment("p/app", HITS)
            with pytest.raises(BackendUnavailable, match="FileNotFoundError"):
                await misconfigured.check_and_increment("p/app", HITS)
        finally:
            for counters in (trusted, untrusted, misconfigured):
                await counters.close()

    try:
        asyncio.run(scenario())
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("stall", [0.35, 1.0])
def test_a_stalled_redis_counts_no_call_that_failed(
    private_redis: PrivateRedis, stall: float
) -> None:
    """Calls keep coming while Redis stops (as a long command, a fork or a paused VM stop
    it) and resumes: it then runs what it had read, but counts only the calls that got
    their answer here. The ones that failed meanwhile were refused (or let through
    uncounted) by the gateway: counting them too would take from the application's plan."""
    assert private_redis.process is not None
    pid = private_redis.process.pid
    admin = private_redis.client()

    async def scenario() -> None:
        counters = RedisCounters(private_redis.url, timeout=0.2, key_prefix="stall")
        checks = [LimitCheck("hits", "eternity", 10**6, 1)]
        answered = failed = 0

        async def call() -> None:
            nonlocal answered, failed
            try:
                await counters.check_and_increment("p/app", checks)
                answered += 1
            except BackendUnavailable:
                failed += 1

        async def stop_for_a_while() -> None:
            await asyncio.sleep(0.1)
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(stall)
            finally:
                os.kill(pid, signal.SIGCONT)

        try:
            stopping = asyncio.ensure_future(stop_for_a_while())
            calls = []
            for _ in range(int((stall + 0.4) / 0.005)):
                calls.append(asyncio.ensure_future(call()))
                await asyncio.sleep(0.005)
            await asyncio.gather(stopping, *calls)
            await asyncio.sleep(0.3)  # what Redis had read has run by now
        finally:
            await counters.close()
        assert failed > 0 and answered > 0, (answered, failed)
        counted = sum(int(admin.get(key) or 0) for key in admin.keys("stall:*"))
        assert counted == answered, (counted, answered, failed)

    try:
        asyncio.run(scenario())
    finally:
        admin.close()


def test_a_call_redis_runs_past_its_deadline_counts_nothing(private_redis: PrivateRedis) -> None:
    async def scenario() -> None:
        counters = RedisCounters(private_redis.url, key_prefix="late")
        try:
            assert (await counters.check_and_increment("p/app", HITS)).usages[0].value == 1
            connection = counters._pipeline.connection
            assert connection is not None
            # As if Redis reached the next call long after the caller gave up on it.
            connection._clock_offset -= 10_000_000
            with pytest.raises(BackendUnavailable, match="too late to answer in time"):
                await counters.check_and_increment("p/app", HITS)
            connection._clock_offset += 10_000_000
            assert (await counters.check_and_increment("p/app", HITS)).usages[0].value == 2
        finally:
            await counters.close()

    asyncio.run(scenario())


def test_a_call_carries_its_deadline_in_the_redis_clock() -> None:
    async def scenario(fake: FakeRedis) -> None:
        timeout = 2.0
        counters = RedisCounters(fake.url, timeout=timeout)
        try:
            sent = []
            # The first call waits for the connection; the second goes out at once.
            for _ in range(2):
                sent.append(time.time())
                await counters.check_and_increment("p/app", HITS)
        finally:
            await counters.close()
        margin = min(_pipeline.FENCE_MARGIN, timeout / 4)
        calls = [words for words in fake.commands if words[0] == b"EVALSHA"]
        assert len(calls) == 2
        for at, words in zip(sent, calls, strict=True):
            # Redis's time at which the reply would still come in time: a lower bound (the
            # TIME reply's delay), in the fake's clock.
            expected = (FAKE_CLOCK_AHEAD + at + timeout - margin) * 1_000_000
            assert expected - 50_000 <= int(words[-1]) <= expected + 5_000, (words, expected)

    with_fake(scenario)
