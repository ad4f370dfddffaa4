"""HTTP/2 connections as the engine sets them up, for clients and upstreams alike.

The ``h2`` library is the protocol core (framing, HPACK, stream states, flow control);
this module only configures it, and fills the two gaps the engine needs closed:

- a GOAWAY leaves the streams it covers open to finish (RFC 9113 6.8), where h2 closes
  the whole connection at once (python-hyper/h2#1181);
- a header block (HEADERS and its CONTINUATIONs) is refused as soon as it grows past the
  header limit, where h2 would buffer 64 frames of up to 16 KiB each first.

:class:`Outbound` holds what a stream may not send yet for want of flow-control window.
"""

from __future__ import annotations

from collections import deque

from h2.config import H2Configuration
from h2.connection import (
    ConnectionInputs,
    ConnectionState,
    H2Connection,
    H2ConnectionStateMachine,
)
from h2.exceptions import DenialOfServiceError
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes, Settings
from hyperframe.frame import Frame

__all__ = [
    "CONNECTION_WINDOW",
    "STREAM_WINDOW",
    "GracefulStates",
    "Outbound",
    "client_connection",
    "server_connection",
]

# Flow-control windows granted to the peer. A stream's window bounds what the engine holds
# for it while its other side is not ready (a request body before the handler decides, a
# response body the client is not reading); the connection's is large so that a stalled
# stream never holds the others back.
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
_DEFAULT_WINDOW = 65535


class GracefulStates(H2ConnectionStateMachine):
    """h2's connection states, except that a GOAWAY sent (by a server) or received leaves
    the connection open: the streams it covers finish, and the engine opens no new ones."""

    _transitions = {
        **H2ConnectionStateMachine._transitions,
        (ConnectionState.SERVER_OPEN, ConnectionInputs.SEND_GOAWAY): (
            None,
            ConnectionState.SERVER_OPEN,
        ),
        (ConnectionState.SERVER_OPEN, ConnectionInputs.RECV_GOAWAY): (
            None,
            ConnectionState.SERVER_OPEN,
        ),
        (ConnectionState.CLIENT_OPEN, ConnectionInputs.RECV_GOAWAY): (
            None,
            ConnectionState.CLIENT_OPEN,
        ),
    }


class _BoundedHeaderBlocks(FrameBuffer):
    """h2's frame buffer, with an unfinished header block bounded by ``limit`` bytes."""

    def __init__(self, server: bool, limit: int) -> None:
        super().__init__(server=server)
        self.limit = limit

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        out = super()._update_header_buffer(f)
        pending = self._headers_buffer
        if pending and sum(len(frame.data) for frame in pending) > self.limit:
            raise DenialOfServiceError(
                f"a header block without its end grew past {self.limit} bytes"
            )
        return out

    @property
    def in_header_block(self) -> bool:
        """Whether a header block has started and not ended (CONTINUATIONs are awaited)."""
        return bool(self._headers_buffer)


def _configure(conn: H2Connection, server: bool, header_limit: int) -> None:
    conn.state_machine = GracefulStates()
    conn.incoming_buffer = _BoundedHeaderBlocks(server, header_limit)
    # In force from the first request, not only once the peer acknowledged our SETTINGS.
    conn.decoder.max_header_list_size = header_limit


def server_connection(max_streams: int, header_limit: int) -> H2Connection:
    """A server connection that advertises ``max_streams`` and ``header_limit``, its
    SETTINGS already queued for sending.

    h2 itself only ends a connection that opens more streams than advertised; the engine
    refuses the extra streams one by one (REFUSED_STREAM), as RFC 9113 5.1.2 allows. So
    the limit h2 enforces is set higher than the one advertised: it stops only a client
    that ignores the refusals.
    """
    conn = H2Connection(_config(client_side=False))
    _configure(conn, True, header_limit)
    advertised = {
        SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
        SettingCodes.MAX_HEADER_LIST_SIZE: header_limit,
        SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
    }
    conn.local_settings = Settings(client=False, initial_values=advertised)
    conn.initiate_connection()
    conn.local_settings = Settings(
        client=False,
        initial_values={**advertised, SettingCodes.MAX_CONCURRENT_STREAMS: 2 * max_streams + 16},
    )
    conn.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)
    return conn


def _config(client_side: bool) -> H2Configuration:
    # What the peer sends is validated; what the engine sends is already valid: names
    # lowercased and values checked by the parser that read them (httptools or h2) or by the
    # configuration model, hop-by-hop fields removed. Checking it again costs a third of
    # the time h2 spends on a request.
    return H2Configuration(
        client_side=client_side,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )


def client_connection(header_limit: int) -> H2Connection:
    """A client connection (to an upstream), its preface and SETTINGS queued for sending."""
    conn = H2Connection(_config(client_side=True))
    _configure(conn, False, header_limit)
    conn.local_settings = Settings(
        client=True,
        initial_values={
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.MAX_HEADER_LIST_SIZE: header_limit,
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        },
    )
    conn.initiate_connection()
    conn.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)
    return conn


class Outbound:
    """A stream's body bytes that wait for flow-control window, and how the stream ends.

    ``drain`` sends what the windows allow, in frames no larger than the peer accepts,
    then the end (trailers, or END_STREAM) once everything before it has left.
    """

    __slots__ = ("chunks", "size", "end", "trailers", "ended")

    def __init__(self) -> None:
        self.chunks: deque[memoryview] = deque()
        self.size = 0
        self.end = False
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.ended = False

    def push(self, data: bytes) -> None:
        if data:
            self.chunks.append(memoryview(data))
            self.size += len(data)

    def finish(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.end = True
        if trailers:
            self.trailers = trailers

    def drain(self, conn: H2Connection, stream_id: int) -> bool:
        """Send what the windows allow; True once nothing waits (the end included, if set)."""
        chunks = self.chunks
        while chunks:
            room = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
            if room <= 0:
                return False
            chunk = chunks[0]
            if len(chunk) <= room:
                chunks.popleft()
                last = not chunks and self.end and self.trailers is None
                conn.send_data(stream_id, chunk, end_stream=last)
                self.size -= len(chunk)
                if last:
                    self.ended = True
            else:
                conn.send_data(stream_id, chunk[:room])
                chunks[0] = chunk[room:]
                self.size -= room
        if self.end and not self.ended:
            self.ended = True
            if self.trailers is not None:
                conn.send_headers(stream_id, self.trailers, end_stream=True)
            else:
                conn.end_stream(stream_id)
        return True

    @property
    def waiting(self) -> bool:
        return bool(self.chunks) or (self.end and not self.ended)
