"""Commands pipelined to one Redis on one connection: the hot path of the Redis counters.

Commands are written as they come, all those of one event loop iteration in one write, and
replies (parsed by hiredis, as redis-py does) resolve one future each, in order. Each
command fails when its own time is up. A connection that breaks or answers garbage fails all
of its pending commands and is dropped; one whose oldest command timed out takes no new
commands (the next opens a new connection) and is dropped once every command it carries
has its reply or has timed out.

A command a caller gave up on may still run when a stalled Redis resumes. So a *fenced*
command gets as its last argument the Redis time (microseconds, from the offset of Redis's
clock measured with TIME when the connection is set up) past which its reply could not
come in time; the script it calls must do nothing after that time (see ``_redis``). A
command that timed out here then either ran in time, and its reply came, or does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis

log = logging.getLogger("meshgate.limits")

# Connect attempts after a failed one wait this long (less when the timeout is shorter), so
# that a dead Redis costs one attempt per interval, shared by every command meanwhile.
RECONNECT_BACKOFF = 0.1

# Timers may fire a little early (uvloop rounds to milliseconds).
_TIMER_SLACK = 0.002

# A fenced command's Redis deadline is this much before its own (a quarter of the timeout
# at most): the time its reply may take to come back, once the script has run.
FENCE_MARGIN = 0.1

_TIME = b"*1\r\n$4\r\nTIME\r\n"


class PipelineError(Exception):
    """A command got no reply; its message says why. The command may or may not have run."""


@dataclass(frozen=True, slots=True)
class Address:
    """Where Redis listens: ``path`` (a Unix socket) or ``host`` and ``port``; ``tls`` gives
    the TLS context, built on first connect so that a bad certificate file is a failed
    connect, not a failed start."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None
    tls: Callable[[], ssl.SSLContext] | None = None


def encode_command(*parts: bytes | str | int) -> bytes:
    """``parts`` as one RESP command (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        if isinstance(part, int):
            part = b"%d" % part
        elif isinstance(part, str):
            part = part.encode()
        out.append(b"$%d\r\n%b\r\n" % (len(part), part))
    return b"".join(out)


class Pipeline:
    """Sends commands to Redis at ``address`` on one connection, opened on first use.

    ``handshake`` commands (AUTH, SELECT, SCRIPT LOAD...) start every connection; commands
    are written only once each has answered without error, so that none runs on a
    connection in the wrong state. ``timeout`` bounds each command from :meth:`send` to its
    reply, connecting included.
    """

    def __init__(self, address: Address, handshake: Sequence[bytes], timeout: float) -> None:
        self.address = address
        self.handshake = list(handshake)
        self.timeout = timeout
        self.backoff = min(RECONNECT_BACKOFF, timeout / 2)
        self.fence_margin = min(FENCE_MARGIN, timeout / 4)
        self.connection: _Connection | None = None
        # Connections that take no new commands, kept until their commands are answered
        # or timed out.
        self.retiring: set[_Connection] = set()
        self.retry_at = 0.0
        # Posted commands that Redis answered with an error (see :meth:`post`).
        self.post_errors = 0

    def send(self, data: bytes, fenced: bool = False) -> asyncio.Future[Any]:
        """Queue ``data`` (one encoded command); the future gets its reply.

        ``fenced``: ``data`` lacks its last argument, the Redis time (microseconds) past
        which the command must do nothing; it is added here.

        An error reply is the result (a ``hiredis.ReplyError``), not an exception; the
        future fails with :class:`PipelineError` when no reply can come.
        """
        connection = self.connection
        if connection is None:
            connection = self.connection = _Connection(self, asyncio.get_running_loop())
        return connection.send(data, fenced)

    def post(self, data: bytes, now: bool = False) -> None:
        """Queue ``data`` (one encoded command) whose reply nobody waits for.

        ``now``: write it, and everything queued before it, at once rather than at the end of
        this loop iteration, so that it is on its way to Redis before anything this callback
        writes afterwards (a response to a client). A command that gets no reply (the
        connection broke) is lost; an error reply is logged.
        """
        connection = self.connection
        if connection is None:
            connection = self.connection = _Connection(self, asyncio.get_running_loop())
        connection.post(data, now)

    def close(self) -> None:
        """Drop the connections, failing their pending commands."""
        for retiring in list(self.retiring):
            retiring.abort("the counters were closed")
        if self.connection is not None:
            self.connection.abort("the counters were closed")
            self.retry_at = 0.0  # closing is no failed connect


class _Connection(asyncio.Protocol):
    """One connection and the futures of its commands, oldest first."""

    def __init__(self, pipeline: Pipeline, loop: asyncio.AbstractEventLoop) -> None:
        self._pipeline = pipeline
        self._loop = loop
        self._timeout = pipeline.timeout
        self._reader = hiredis.Reader()
        # A posted command's future is None.
        self._pending: deque[tuple[asyncio.Future[Any] | None, float]] = deque()
        self._buffer: list[bytes] = []
        # Fenced commands buffered before Redis's clock was known: (index, send time).
        self._unfenced: list[tuple[int, float]] = []
        self._transport: asyncio.Transport | None = None
        self._handshake_sent = 0
        self._ready = False
        self._retiring = False
        self._closed = False
        # Redis's clock minus ours (loop.time()), in microseconds: a lower bound, taken as
        # TIME's value minus when its reply was read, so deadlines err early.
        self._clock_offset = 0
        self._fence_stamp = -1.0
        self._fence_argument = b""
        # The send time of this loop iteration's commands, reset by the flush that ends it.
        self._stamp: float | None = None
        self._timer: asyncio.Handle | None = None
        self._opening: asyncio.Task[None] | None = None
        self._start: asyncio.TimerHandle | None = None
        delay = pipeline.retry_at - loop.time()
        if delay > 0:
            self._start = loop.call_later(delay, self._open)
        else:
            self._open()

    def send(self, data: bytes, fenced: bool) -> asyncio.Future[Any]:
        future = self._loop.create_future()
        stamp = self._stamp
        if stamp is None:
            stamp = self._stamp = self._loop.time()
            self._loop.call_soon(self._flush)
            if self._timer is None:
                self._timer = self._loop.call_at(stamp + self._timeout, self._expire)
        if fenced:
            if self._ready:
                data += self._fence(stamp)
            else:
                self._unfenced.append((len(self._buffer), stamp))
        self._buffer.append(data)
        self._pending.append((future, stamp))
        return future

    def post(self, data: bytes, now: bool) -> None:
        stamp = self._stamp
        if stamp is None:
            stamp = self._stamp = self._loop.time()
            self._loop.call_soon(self._flush)
            if self._timer is None:
                self._timer = self._loop.call_at(stamp + self._timeout, self._expire)
        self._buffer.append(data)
        self._pending.append((None, stamp))
        if now:
            self._write()

    def _fence(self, stamp: float) -> bytes:
        """The last argument of a fenced command sent at ``stamp``: the Redis time past which
        its reply might come after the command timed out here."""
        # The commands of one loop iteration share their send time, so their fence too.
        if stamp == self._fence_stamp:
            return self._fence_argument
        deadline = stamp + self._timeout - self._pipeline.fence_margin
        digits = b"%d" % (int(deadline * 1_000_000) + self._clock_offset)
        self._fence_stamp = stamp
        self._fence_argument = b"$%d\r\n%b\r\n" % (len(digits), digits)
        return self._fence_argument

    def _flush(self) -> None:
        self._stamp = None
        self._write()

    def _write(self) -> None:
        """Write what is buffered, once the connection is set up."""
        transport = self._transport
        # A transport that is closing (its connection_lost not called yet) takes no writes.
        if self._ready and self._buffer and not transport.is_closing():  # type: ignore[union-attr]
            buffer = self._buffer
            for index, stamp in self._unfenced:
                buffer[index] += self._fence(stamp)
            self._unfenced.clear()
            data = b"".join(buffer)
            buffer.clear()
            transport.write(data)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        try:
            reply = reader.gets()
            while reply is not False:
                future = pending.popleft()[0]
                if future is None:
                    if isinstance(reply, hiredis.ReplyError):
                        self._posted_error(reply)
                elif not future.done():  # cancelled by its caller, or timed out
                    future.set_result(reply)
                reply = reader.gets()
        except hiredis.ProtocolError as error:
            self.abort(f"invalid reply from Redis: {error}")
        except IndexError:
            self.abort("a reply from Redis to no command")
        else:
            if self._retiring and self._settled():
                self.abort(f"no answer within {self._timeout}s")

    def _posted_error(self, reply: hiredis.ReplyError) -> None:
        pipeline = self._pipeline
        pipeline.post_errors += 1
        # The first, then one in a thousand: the same error tends to repeat on every request.
        if pipeline.post_errors % 1000 == 1:
            log.warning("Redis refused a usage update (%d so far): %s", pipeline.post_errors, reply)

    def eof_received(self) -> None:
        self.abort("Redis closed the connection")

    def connection_lost(self, exc: Exception | None) -> None:
        self.abort("Redis closed the connection" if exc is None else _describe(exc))

    def _open(self) -> None:
        self._start = None
        self._opening = self._loop.create_task(self._connect())

    async def _connect(self) -> None:
        address = self._pipeline.address
        try:
            context = None if address.tls is None else address.tls()
            if address.path is not None:
                await self._loop.create_unix_connection(lambda: self, address.path, ssl=context)
            else:
                await self._loop.create_connection(
                    lambda: self,
                    address.host,
                    address.port,
                    ssl=context,
                    server_hostname=None if context is None else address.host,
                )
            # The handshake goes ahead of the queued commands and shares their deadline.
            started = self._pending[0][1] if self._pending else self._loop.time()
            replies = await asyncio.gather(
                *(self._handshake(data, started) for data in (*self._pipeline.handshake, _TIME))
            )
            read_at = self._loop.time()
        except asyncio.CancelledError:
            return
        except PipelineError as error:
            self.abort(str(error))
            return
        except (OSError, ValueError) as error:  # refused, unreachable, TLS failed...
            self.abort(_describe(error))
            return
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                self.abort(f"Redis refused the connection setup: {reply}")
                return
        clock = _microseconds(replies[-1])
        if clock is None:
            self.abort(f"Redis answered TIME with {replies[-1]!r}")
            return
        self._clock_offset = clock - int(read_at * 1_000_000)
        self._ready = True
        self._opening = None
        self._flush()

    def _handshake(self, data: bytes, started: float) -> asyncio.Future[Any]:
        """Send ``data`` ahead of every queued command; its reply comes first."""
        future = self._loop.create_future()
        self._pending.insert(self._handshake_sent, (future, started))
        self._handshake_sent += 1
        self._transport.write(data)  # type: ignore[union-attr]
        return future

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)
        if self._closed:  # timed out while connecting
            stream.abort()
            return
        self._transport = stream

    def _expire(self) -> None:
        # After one more turn of the loop, so that replies that came meanwhile are read
        # first: uvloop runs due timers before it polls.
        self._timer = self._loop.call_soon(self._expire_due)

    def _expire_due(self) -> None:
        self._timer = None
        pending = self._pending
        if not pending:
            return
        timeout = self._timeout
        now = self._loop.time() + _TIMER_SLACK
        if not self._ready:
            # Nothing of ours was written yet: failing every command is safe.
            if now >= pending[0][1] + timeout:
                if self._transport is None:
                    self.abort(f"could not connect within {timeout}s")
                else:
                    self.abort(f"no answer within {timeout}s")
                return
            self._timer = self._loop.call_at(pending[0][1] + timeout, self._expire)
            return
        # Written commands fail one by one, when each is due: a younger one may still get
        # its reply, and the Redis deadline of each is its own.
        for future, stamp in pending:
            if now < stamp + timeout:
                self._timer = self._loop.call_at(stamp + timeout, self._expire)
                return
            if future is not None and not future.done():
                future.set_exception(PipelineError(f"no answer within {timeout}s"))
            if not self._retiring:
                self._retire()
        # Every command is past its time: one that runs late in Redis does nothing.
        self.abort(f"no answer within {timeout}s")

    def _retire(self) -> None:
        """Take no new commands: the next one opens a new connection."""
        self._retiring = True
        pipeline = self._pipeline
        if pipeline.connection is self:
            pipeline.connection = None
        pipeline.retiring.add(self)

    def _settled(self) -> bool:
        """Whether every command sent here has its reply or is past its time."""
        pending = self._pending
        return not pending or self._loop.time() + _TIMER_SLACK >= pending[-1][1] + self._timeout

    def abort(self, reason: str) -> None:
        """Fail every pending command with ``reason`` and close; the pipeline forgets us."""
        if self._closed:
            return
        self._closed = True
        pipeline = self._pipeline
        if pipeline.connection is self:
            pipeline.connection = None
        pipeline.retiring.discard(self)
        if not self._ready:
            pipeline.retry_at = self._loop.time() + pipeline.backoff
        self._ready = False
        for handle in (self._start, self._timer):
            if handle is not None:
                handle.cancel()
        if self._opening is not None and self._transport is None:
            self._opening.cancel()
        if self._transport is not None:
            self._transport.abort()
        pending = self._pending
        while pending:
            future = pending.popleft()[0]
            if future is not None and not future.done():
                future.set_exception(PipelineError(reason))
        self._buffer.clear()
        self._unfenced.clear()


def _microseconds(reply: Any) -> int | None:
    """TIME's reply (seconds and microseconds) in microseconds; None if it is not one."""
    if type(reply) is not list or len(reply) != 2:
        return None
    try:
        return int(reply[0]) * 1_000_000 + int(reply[1])
    except ValueError:
        return None


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
