"""W3C Trace Context for the gateway, the sidecar and the integration runtime.

``traceparent`` (``version-traceid-spanid-flags``) and ``tracestate`` are parsed, checked
and propagated here by hand: a request that is not sampled costs a header scan and, when it
starts a trace, one new ``traceparent`` field; no OpenTelemetry object is built for it. Only
sampled requests get SDK spans, exported over OTLP/HTTP by a ``BatchSpanProcessor`` (its
own thread: export never runs on the request path). The SDK is imported when a process
turns tracing on, not before: a sidecar without tracing stays small.

The sampling decision is ParentBased(TraceIdRatio): a caller's sampled flag is followed,
a new trace is kept when its trace id's low 64 bits fall under ``rate * 2**64``, exactly
as the SDK's sampler (configured alike) decides, so that the two never disagree.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Mapping, MutableMapping
from random import getrandbits, randbytes
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshgate.config.tracing import TracingSettings

__all__ = [
    "CLIENT",
    "CONSUMER",
    "INTERNAL",
    "PRODUCER",
    "SERVER",
    "MAX_TRACESTATE",
    "TraceContext",
    "Tracing",
    "clean_tracestate",
    "parse_traceparent",
]

log = logging.getLogger("meshgate.telemetry.tracing")

# Span kinds, as the roles name them (the SDK's SpanKind once it is imported).
SERVER, CLIENT, PRODUCER, CONSUMER = "server", "client", "producer", "consumer"
INTERNAL = "internal"
TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
# The longest traceparent accepted: version 00 is 55 characters; later versions may append
# fields, but not without bound.
MAX_TRACEPARENT = 512
# tracestate as received is bounded before it is even split; what is passed on is at most
# 32 members and 512 characters (the W3C limits a vendor may truncate to).
MAX_TRACESTATE_INPUT = 8192
MAX_TRACESTATE = 512
MAX_TRACESTATE_MEMBERS = 32
_LOW64 = (1 << 64) - 1
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# Version 00 as received, for the hop's fast path: an unsampled caller's context is checked
# and passed on without building anything.
_TRACEPARENT_00 = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]([02468ace])")
_ZERO_TRACE_ID = b"0" * 32
_ZERO_SPAN_ID = b"0" * 16
_ZERO_TRACE_HEX = "0" * 32
_ZERO_SPAN_HEX = "0" * 16
_MEMBER = re.compile(
    r"((?:[a-z][_0-9a-z\-*/]{0,255})|(?:[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13}))"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)


class TraceContext:
    """One hop's trace context: ids as integers, flags, the tracestate to pass on, and the
    SDK span when this process records the hop (None when not sampled)."""

    __slots__ = ("trace_id", "span_id", "flags", "state", "span")

    def __init__(
        self, trace_id: int, span_id: int, flags: int, state: str | None = None, span: Any = None
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.flags = flags
        self.state = state
        self.span = span

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)

    def traceparent(self) -> str:
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{self.flags & 0xFF:02x}"

    def __repr__(self) -> str:
        return f"TraceContext({self.traceparent()!r}, state={self.state!r})"


def parse_traceparent(value: str | bytes | None) -> TraceContext | None:
    """The context a ``traceparent`` value names, or None when it is absent or not valid.

    Strict, as the W3C recommendation asks: lowercase hex only, version ``ff`` and all-zero
    ids refused, version 00 exactly 55 characters; a later version may be longer only with
    a ``-`` after the 55th character (its extra fields are ignored)."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        if len(value) > MAX_TRACEPARENT:
            return None
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    size = len(value)
    if size < 55 or size > MAX_TRACEPARENT:
        return None
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version = match.group(1)
    if version == "00":
        if size != 55:
            return None
    elif version == "ff" or (size > 55 and value[55] != "-"):
        return None
    trace_id = int(match.group(2), 16)
    span_id = int(match.group(3), 16)
    if not trace_id or not span_id:
        return None
    # Of a later version only the sampled flag is known (and kept).
    flags = int(match.group(4), 16)
    return TraceContext(trace_id, span_id, flags if version == "00" else flags & 1)


def clean_tracestate(value: str | bytes | None) -> str | None:
    """``tracestate`` as it may be passed on, or None to drop it.

    A value with a malformed member, a duplicate key, over 32 members or over 8 KiB is
    dropped whole (the recommendation's rule); one over 512 characters loses its members
    longer than 128 characters first, then its last members, until it fits."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        if len(value) > MAX_TRACESTATE_INPUT:
            return None
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if len(value) > MAX_TRACESTATE_INPUT:
        return None
    members = [m.strip(" \t") for m in value.split(",")]
    members = [m for m in members if m]
    if not members or len(members) > MAX_TRACESTATE_MEMBERS:
        return None
    keys = set()
    for member in members:
        match = _MEMBER.fullmatch(member)
        if match is None or match.group(1) in keys:
            return None
        keys.add(match.group(1))
    text = ",".join(members)
    while len(text) > MAX_TRACESTATE:
        long = [i for i, m in enumerate(members) if len(m) > 128]
        del members[long[-1] if long else -1]
        text = ",".join(members)
    return text or None


def _new_trace_id() -> int:
    trace_id = getrandbits(128)
    while not trace_id:
        trace_id = getrandbits(128)
    return trace_id


def _new_span_id() -> int:
    span_id = getrandbits(64)
    while not span_id:
        span_id = getrandbits(64)
    return span_id


def sample_rate(settings: TracingSettings) -> float:
    """The configured rate, else ``OTEL_TRACES_SAMPLER_ARG`` (when it is a rate), else 1."""
    if settings.sample_rate is not None:
        return settings.sample_rate
    raw = os.environ.get("OTEL_TRACES_SAMPLER_ARG")
    if raw:
        try:
            rate = float(raw)
        except ValueError:
            rate = -1.0
        if 0.0 <= rate <= 1.0:
            return rate
        log.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a rate between 0 and 1; using 1", raw)
    return 1.0


def traces_endpoint(settings: TracingSettings) -> str | None:
    """The OTLP/HTTP traces URL: the setting's (``/v1/traces`` appended to a base URL), else
    None for the exporter to read ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` itself."""
    endpoint = settings.endpoint
    if endpoint is None:
        return None
    if endpoint.rstrip("/").endswith("/v1/traces"):
        return endpoint
    return endpoint.rstrip("/") + "/v1/traces"


# Where the SDK and its exporter log a failed export: once a batch (twice a second) while a
# collector is down. Each logs once a minute here, saying how many lines it held back.
_EXPORT_LOGGERS = (
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.sdk.trace.export",
)


class _OncePerMinute(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.last = -60.0
        self.held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self.last < 60.0:
            self.held += 1
            return False
        if self.held:
            record.msg = f"{record.msg} ({self.held} similar lines in the last minute not shown)"
        self.last, self.held = now, 0
        return True


def _quiet_export_failures() -> None:
    for name in _EXPORT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OncePerMinute) for f in logger.filters):
            logger.addFilter(_OncePerMinute())


class _PrimedIds:
    """The SDK's id generator, told the trace id of a new trace this module already drew
    (and sampled by): the span then carries it, and the SDK's ratio sampler agrees."""

    def __init__(self) -> None:
        self.next_trace_id = 0

    def generate_trace_id(self) -> int:
        trace_id, self.next_trace_id = self.next_trace_id, 0
        return trace_id or _new_trace_id()

    def generate_span_id(self) -> int:
        return _new_span_id()

    def is_trace_id_random(self) -> bool:
        return True


class Tracing:
    """One process's tracer: sampling, the SDK's provider and exporter, the spans it makes.

    Build it with :meth:`start`, which returns None when tracing is off; end it with
    :meth:`shutdown`, which flushes the spans still queued."""

    def __init__(
        self,
        settings: TracingSettings,
        service: str,
        attributes: Mapping[str, str] | None = None,
        *,
        export_timeout: float = 5.0,
        schedule_delay: float = 0.5,
    ) -> None:
        from opentelemetry import trace
        from opentelemetry.context import Context
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import (
            NonRecordingSpan,
            SpanContext,
            SpanKind,
            Status,
            StatusCode,
            TraceFlags,
            TraceState,
        )

        self.rate = sample_rate(settings)
        self.bound = round(self.rate * (1 << 64))
        # The bound as 16 hex digits: a new trace id's low half, in hex, compares as its value
        # does (at rate 1, "g" is above every digit: always sampled).
        self._bound_hex = "g" if self.bound >= 1 << 64 else f"{self.bound:016x}"
        self.trust_incoming = settings.trust_incoming
        name = settings.service_name or os.environ.get("OTEL_SERVICE_NAME") or service
        self.service = name
        self.endpoint = traces_endpoint(settings)
        self._ids = _PrimedIds()
        resource = Resource.create({**(attributes or {}), "service.name": name})
        self.provider = TracerProvider(
            resource=resource,
            sampler=ParentBased(TraceIdRatioBased(self.rate)),
            id_generator=self._ids,  # type: ignore[arg-type]
        )
        exporter = OTLPSpanExporter(endpoint=self.endpoint, timeout=export_timeout)
        self.provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                schedule_delay_millis=schedule_delay * 1000,
                export_timeout_millis=export_timeout * 1000,
            )
        )
        self.tracer = self.provider.get_tracer("meshgate")
        _quiet_export_failures()
        self._trace = trace
        self._root = Context()
        self._remote = (NonRecordingSpan, SpanContext, TraceFlags, TraceState)
        self._kinds = {
            SERVER: SpanKind.SERVER,
            CLIENT: SpanKind.CLIENT,
            PRODUCER: SpanKind.PRODUCER,
            CONSUMER: SpanKind.CONSUMER,
            INTERNAL: SpanKind.INTERNAL,
        }
        self._status = (Status, StatusCode)

    @classmethod
    def start(
        cls,
        settings: TracingSettings | None,
        service: str,
        attributes: Mapping[str, str] | None = None,
    ) -> Tracing | None:
        """The process's tracer, or None when ``settings`` leave tracing off."""
        if settings is None or not settings.enabled:
            return None
        tracing = cls(settings, service, attributes)
        log.info(
            "tracing on: service %s, sampling %g of new traces, exporting to %s",
            tracing.service,
            tracing.rate,
            tracing.endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "the default",
        )
        return tracing

    # spans

    def span(self, name: str, kind: str, parent: TraceContext) -> TraceContext:
        """A span below ``parent`` (sampled): its context, span set."""
        if parent.span is not None:
            context = self._trace.set_span_in_context(parent.span, self._root)
        else:
            non_recording, span_context, flags, state = self._remote
            remote = span_context(
                parent.trace_id,
                parent.span_id,
                True,
                flags(parent.flags),
                state.from_header([parent.state]) if parent.state else None,
            )
            context = self._trace.set_span_in_context(non_recording(remote), self._root)
        span = self.tracer.start_span(name, context=context, kind=self._kinds[kind])
        own = span.get_span_context()
        return TraceContext(own.trace_id, own.span_id, int(own.trace_flags), parent.state, span)

    def _root_span(self, trace_id: int, name: str, kind: str) -> TraceContext:
        """The first span of a new trace, under the id drawn (and sampled by) already."""
        self._ids.next_trace_id = trace_id
        span = self.tracer.start_span(name, context=self._root, kind=self._kinds[kind])
        own = span.get_span_context()
        return TraceContext(own.trace_id, own.span_id, int(own.trace_flags), None, span)

    # HTTP hops (the engine's header lists)

    def http_hop(self, raw: list[tuple[bytes, bytes]], name: str, kind: str) -> Any:
        """Continue the trace of a request's headers (or start one) and rewrite them to carry
        this hop's context onwards; the SDK span when sampled, else None.

        Not sampled and with a valid ``traceparent``, the headers are left as they came; a
        missing, malformed or repeated one is replaced by a new trace's (unsampled) one."""
        fields = dict(raw)  # the common case, no trace fields, without a Python loop
        parent_value = fields.get(TRACEPARENT)
        state_value = fields.get(TRACESTATE)
        if not self.trust_incoming and (parent_value is not None or state_value is not None):
            _strip(raw)
            parent_value = state_value = None
        if parent_value is None and state_value is None:
            ids = randbytes(24).hex()
            trace_hex, span_hex = ids[:32], ids[32:]
            if trace_hex != _ZERO_TRACE_HEX and span_hex != _ZERO_SPAN_HEX:
                if ids[16:32] >= self._bound_hex:
                    raw.append((TRACEPARENT, f"00-{trace_hex}-{span_hex}-00".encode()))
                    return None
                hop = self._root_span(int(trace_hex, 16), name, kind)
                raw.append((TRACEPARENT, hop.traceparent().encode()))
                return hop.span
        seen = 0
        state_value = None
        for key, value in raw:
            if key == TRACEPARENT:
                parent_value = value
                seen += 1
            elif key == TRACESTATE:
                state_value = value if state_value is None else state_value + b"," + value
        if seen == 1 and state_value is None:
            unsampled = _TRACEPARENT_00.fullmatch(parent_value)  # type: ignore[arg-type]
            if (
                unsampled is not None
                and unsampled.group(1) != _ZERO_TRACE_ID
                and unsampled.group(2) != _ZERO_SPAN_ID
            ):
                return None
        parent = parse_traceparent(parent_value) if seen == 1 else None
        if parent is not None:
            if state_value is not None:
                parent.state = clean_tracestate(state_value)
            if not parent.flags & 1:
                if state_value is not None and (
                    parent.state is None or len(parent.state) != len(state_value)
                ):
                    _replace(raw, parent.traceparent(), parent.state)
                return None
            hop = self.span(name, kind, parent)
        else:
            trace_id = _new_trace_id()
            if (trace_id & _LOW64) >= self.bound:
                value = b"00-%032x-%016x-00" % (trace_id, _new_span_id())
                if seen or state_value is not None:
                    _strip(raw)
                raw.append((TRACEPARENT, value))
                return None
            hop = self._root_span(trace_id, name, kind)
        _replace(raw, hop.traceparent(), hop.state)
        return hop.span

    def end_http(
        self,
        span: Any,
        status: int,
        attributes: Mapping[str, Any],
        *,
        server: bool,
        error: str | None = None,
        name: str | None = None,
    ) -> None:
        """Close an HTTP span: its status code and attributes; an error status for a 5xx
        (and, on a client span, a 4xx), as the HTTP semantic conventions say."""
        if name is not None:
            span.update_name(name)
        span.set_attributes(attributes)
        if status:
            span.set_attribute("http.response.status_code", status)
        if status >= 500 or (not server and status >= 400) or (error and not status):
            if error:
                span.set_attribute("error.type", error[:200])
            status_type, code = self._status
            span.set_status(status_type(code.ERROR, error[:200] if error else None))
        span.end()

    # message hops (integration: headers as a mapping)

    def continue_from(
        self,
        headers: Mapping[str, Any],
        name: str,
        kind: str,
        local: TraceContext | None = None,
    ) -> TraceContext:
        """The context of a message that arrived: below ``local`` (a context of this process
        the message carries on), else below its ``traceparent`` header, else a new trace."""
        parent = local
        if parent is None:
            value = _header(headers, "traceparent")
            parent = parse_traceparent(value) if isinstance(value, str | bytes) else None
            if parent is not None:
                state = _header(headers, "tracestate")
                if isinstance(state, str | bytes):
                    parent.state = clean_tracestate(state)
        return self.child(parent, name, kind)

    def child(self, parent: TraceContext | None, name: str, kind: str) -> TraceContext:
        """A hop below ``parent``: a span when sampled, else the context passed on as is
        (a new unsampled trace without a parent)."""
        if parent is None:
            trace_id = _new_trace_id()
            if (trace_id & _LOW64) < self.bound:
                return self._root_span(trace_id, name, kind)
            return TraceContext(trace_id, _new_span_id(), 0)
        if parent.flags & 1:
            return self.span(name, kind, parent)
        return TraceContext(parent.trace_id, parent.span_id, parent.flags, parent.state)

    def end(self, hop: TraceContext, error: BaseException | None = None) -> None:
        """Close a hop's span, if it has one; a failure marks it as an error."""
        span = hop.span
        if span is None:
            return
        if error is not None:
            span.set_attribute("error.type", type(error).__name__)
            status_type, code = self._status
            span.set_status(status_type(code.ERROR, str(error)[:200]))
        span.end()

    # lifecycle

    def flush(self, timeout: float = 5.0) -> bool:
        """Export what is queued now; False when it did not finish within ``timeout``."""
        return bool(self.provider.force_flush(int(timeout * 1000)))

    def shutdown(self, timeout: float = 5.0) -> None:
        """Flush and stop exporting, waiting at most ``timeout`` seconds (a collector that
        is down does not hold a stopping process up)."""
        done = threading.Thread(target=self.provider.shutdown, name="tracing-shutdown", daemon=True)
        done.start()
        done.join(timeout)
        if done.is_alive():
            log.warning("tracing: spans still queued after %ss were dropped", timeout)


def inject(hop: TraceContext, headers: MutableMapping[str, Any]) -> None:
    """Put ``hop``'s ``traceparent`` (and ``tracestate``) in message headers, replacing any,
    whatever their case."""
    for key in [k for k in headers if k.lower() in ("traceparent", "tracestate")]:
        del headers[key]
    headers["traceparent"] = hop.traceparent()
    if hop.state:
        headers["tracestate"] = hop.state


def _header(headers: Mapping[str, Any], name: str) -> Any:
    value = headers.get(name)
    if value is not None:
        return value
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name:
            return value
    return None


def _strip(raw: list[tuple[bytes, bytes]]) -> None:
    raw[:] = [(k, v) for k, v in raw if k != TRACEPARENT and k != TRACESTATE]


def _replace(raw: list[tuple[bytes, bytes]], traceparent: str, state: str | None) -> None:
    _strip(raw)
    raw.append((TRACEPARENT, traceparent.encode("ascii")))
    if state:
        raw.append((TRACESTATE, state.encode("ascii")))
