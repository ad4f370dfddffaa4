"""Trace Context parsing with hostile input, the sampling decision, and the headers a hop
passes on, exported to a real OTLP/HTTP receiver."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from otlp_receiver import OtlpReceiver

from meshgate.config.tracing import TracingSettings
from meshgate.telemetry.tracing import (
    MAX_TRACESTATE,
    SERVER,
    Tracing,
    clean_tracestate,
    parse_traceparent,
)

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_a_valid_traceparent_is_read() -> None:
    ctx = parse_traceparent(VALID)
    assert ctx is not None
    assert ctx.trace_id == int(TRACE, 16) and ctx.span_id == 0x00F067AA0BA902B7
    assert ctx.sampled and ctx.traceparent() == VALID
    assert parse_traceparent(VALID.encode()) is not None
    unsampled = parse_traceparent(VALID[:-2] + "00")
    assert unsampled is not None and not unsampled.sampled


@pytest.mark.parametrize(
    "value",
    [
        "",
        "00",
        VALID.upper(),  # hex is lowercase only
        VALID + "-",  # version 00 is exactly 55 characters
        VALID + "x",
        " " + VALID,
        "ff" + VALID[2:],  # version ff is invalid
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",  # all-zero trace id
        f"00-{TRACE}-0000000000000000-01",  # all-zero span id
        f"00_{TRACE}-00f067aa0ba902b7-01",
        f"00-{TRACE[:-1]}g-00f067aa0ba902b7-01",
        f"00-{TRACE}-00f067aa0ba902b7-1",
        "0" + VALID,
        "01" + VALID[2:] + "x",  # a later version needs '-' after the 55th character
        "01" + VALID[2:] + "-" + "a" * 600,  # bounded even for later versions
        "00-\u0664bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # non-ASCII digit
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0\xff",
        b"\x00" * 55,
        b"a" * 100_000,
    ],
)
def test_a_malformed_traceparent_is_refused(value: str | bytes) -> None:
    assert parse_traceparent(value) is None


def test_a_later_version_keeps_only_the_sampled_flag() -> None:
    ctx = parse_traceparent("cc" + VALID[2:-2] + "09-what-follows")
    assert ctx is not None and ctx.flags == 1


@given(st.binary(max_size=200) | st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_no_input_breaks_the_parsers(value: bytes | str) -> None:
    ctx = parse_traceparent(value)
    if ctx is not None:
        # Whatever is accepted is passed on in canonical form, which reads back the same.
        again = parse_traceparent(ctx.traceparent())
        assert again is not None and again.trace_id == ctx.trace_id
    state = clean_tracestate(value)
    assert state is None or (len(state) <= MAX_TRACESTATE and "\n" not in state)


def test_tracestate_is_checked_and_bounded() -> None:
    assert clean_tracestate("rojo=00f067aa0ba902b7 , congo=t61rcWkgMzE") == (
        "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    )
    assert clean_tracestate("tenant@vendor=x") == "tenant@vendor=x"
    for bad in ("a=1,a=2", "A=1", "a", "=1", "a=1\n", "a=x=y,", "a= "):
        assert clean_tracestate(bad) is None, bad
    assert clean_tracestate(",".join(f"k{i}=v" for i in range(33))) is None
    assert clean_tracestate("a=" + "b" * 10_000) is None
    # Over 512 characters: members over 128 characters go first, then the last ones.
    big = ",".join([f"k{i}={'v' * 60}" for i in range(8)] + ["long=" + "x" * 200])
    cleaned = clean_tracestate(big)
    assert cleaned is not None and len(cleaned) <= MAX_TRACESTATE
    assert "long=" not in cleaned and cleaned.startswith("k0=")
    many = ",".join(f"k{i}={'v' * 60}" for i in range(12))
    cleaned = clean_tracestate(many)
    assert cleaned is not None and cleaned.startswith("k0=") and "k11=" not in cleaned


def _tracing(endpoint: str, rate: float) -> Tracing:
    return Tracing(
        TracingSettings(enabled=True, endpoint=endpoint, sample_rate=rate),
        "unit",
        schedule_delay=0.05,
    )


def _field(raw: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in raw if k == name]


def test_a_hop_continues_starts_or_replaces_the_trace() -> None:
    with OtlpReceiver() as receiver:
        tracing = _tracing(receiver.endpoint, 1.0)
        # A sampled caller: a span below it, its id passed on, tracestate kept.
        raw = [(b"traceparent", VALID.encode()), (b"tracestate", b"rojo=1")]
        span = tracing.http_hop(raw, "GET", SERVER)
        assert span is not None
        sent = parse_traceparent(_field(raw, b"traceparent")[0])
        assert sent is not None and f"{sent.trace_id:032x}" == TRACE and sent.sampled
        assert sent.span_id == span.get_span_context().span_id
        assert _field(raw, b"tracestate") == [b"rojo=1"]
        span.end()
        # Malformed, or repeated: a new trace, the bad fields gone.
        for bad in (
            [(b"traceparent", VALID.upper().encode()), (b"tracestate", b"x=1")],
            [(b"traceparent", VALID.encode()), (b"traceparent", VALID.encode())],
        ):
            span = tracing.http_hop(bad, "GET", SERVER)
            assert span is not None
            fields = _field(bad, b"traceparent")
            assert len(fields) == 1 and TRACE.encode() not in fields[0]
            assert _field(bad, b"tracestate") == []
            span.end()
        spans = receiver.wait_for(3)
        first = spans[0]
        assert first.trace_id == TRACE and first.parent_id == "00f067aa0ba902b7"
        assert {s.parent_id for s in spans[1:]} == {""}  # roots of new traces
        tracing.shutdown()


def test_rate_zero_exports_nothing_but_still_propagates() -> None:
    with OtlpReceiver() as receiver:
        tracing = _tracing(receiver.endpoint, 0.0)
        raw: list[tuple[bytes, bytes]] = [(b"host", b"x")]
        assert tracing.http_hop(raw, "GET", SERVER) is None
        started = parse_traceparent(_field(raw, b"traceparent")[0])
        assert started is not None and not started.sampled
        # An unsampled caller's context goes on as it came.
        unsampled = VALID[:-2] + "00"
        raw = [(b"traceparent", unsampled.encode()), (b"tracestate", b"a=1")]
        assert tracing.http_hop(raw, "GET", SERVER) is None
        assert _field(raw, b"traceparent") == [unsampled.encode()]
        assert _field(raw, b"tracestate") == [b"a=1"]
        # Not passed on when malformed, sampled or not: a new trace replaces it.
        for bad in (
            "00-" + "0" * 32 + "-b7ad6b7169203331-00",
            f"00-{TRACE}-0000000000000000-00",
            VALID[:-2].upper() + "00",
            VALID[:-2] + "00 ",
        ):
            raw = [(b"traceparent", bad.encode())]
            assert tracing.http_hop(raw, "GET", SERVER) is None
            fields = _field(raw, b"traceparent")
            assert len(fields) == 1 and fields[0] != bad.encode(), bad
            assert parse_traceparent(fields[0]) is not None
        # ParentBased: a sampled caller is followed whatever the rate.
        raw = [(b"traceparent", VALID.encode())]
        span = tracing.http_hop(raw, "GET", SERVER)
        assert span is not None
        span.end()
        tracing.flush()
        time.sleep(0.2)
        assert [s.trace_id for s in receiver.spans] == [TRACE]
        tracing.shutdown()


def test_the_ratio_decision_matches_the_sdk() -> None:
    with OtlpReceiver() as receiver:
        tracing = _tracing(receiver.endpoint, 0.25)
        sampled = 0
        for _ in range(4000):
            raw: list[tuple[bytes, bytes]] = []
            span = tracing.http_hop(raw, "GET", SERVER)
            ctx = parse_traceparent(_field(raw, b"traceparent")[0])
            assert ctx is not None
            # What went on says sampled exactly when a recording span was made.
            assert ctx.sampled == (span is not None)
            if span is not None:
                assert span.is_recording()
                sampled += 1
                span.end()
        assert 800 < sampled < 1200
        tracing.shutdown()


def test_tracing_settings_refuse_bad_values_with_one_line_each() -> None:
    from meshgate.config.tracing import with_flags

    with pytest.raises(ValueError) as caught:
        with_flags(TracingSettings(enabled=True), {"endpoint": "ftp://x", "sample_rate": 2})
    assert str(caught.value) == (
        "tracing.endpoint: must be an http:// or https:// URL without spaces; "
        "tracing.sample_rate: Input should be less than or equal to 1"
    )
    for bad in ({"endpoint": "http://a b"}, {"service_name": "a b"}, {"enabled": "maybe"}):
        with pytest.raises(ValueError):
            with_flags(None, bad)
    merged = with_flags(TracingSettings(sample_rate=0.5), {"enabled": True})
    assert merged.enabled and merged.sample_rate == 0.5


@pytest.mark.parametrize(
    "command",
    [
        ["gateway", "--config", "{config}", "--tracing-endpoint", "ftp://collector"],
        ["gateway", "--config", "{config}", "--trace-sample-rate", "1.5"],
        ["integration", "run", "{routes}", "--tracing-endpoint", "collector:4318"],
        ["sidecar", "--service", "a", "--app-port", "9", "--config", "{mesh}"]
        + ["--tracing-endpoint", "http://c:4318 x"],
    ],
)
def test_a_bad_tracing_flag_is_one_clear_error(tmp_path: Path, command: list[str]) -> None:
    files = {
        "config": ("gw.yaml", "listen: 127.0.0.1:0\nadmin_listen: null\nproducts: []\n"),
        "routes": ("routes.yaml", "routes: [{id: a, from: 'timer:t', steps: [{stop: {}}]}]\n"),
        "mesh": ("mesh.yaml", "services: []\n"),
    }
    args = []
    for arg in command:
        if arg.startswith("{"):
            name, text = files[arg.strip("{}")]
            (tmp_path / name).write_text(text)
            arg = str(tmp_path / name)
        args.append(arg)
    done = subprocess.run(
        [sys.executable, "-m", "meshgate", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "tracing" in done.stderr.lower() or "trace-sample-rate" in done.stderr, done.stderr


def test_a_collector_that_is_down_is_logged_once_a_minute_not_per_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"  # nothing listens
    tracing = Tracing(
        TracingSettings(enabled=True, endpoint=endpoint, sample_rate=1.0),
        "unit",
        export_timeout=0.3,
        schedule_delay=0.05,
    )
    with caplog.at_level(logging.WARNING, logger="opentelemetry"):
        for _ in range(6):
            span = tracing.http_hop([], "GET", SERVER)
            assert span is not None
            span.end()
            tracing.flush(1.0)
    tracing.shutdown(1.0)
    lines = [r for r in caplog.records if r.name.startswith("opentelemetry")]
    # One line per logger that reports it, not one per failed batch.
    assert 1 <= len(lines) <= len({r.name for r in lines}) <= 3, [r.getMessage() for r in lines]


def test_an_edge_that_trusts_no_caller_starts_every_trace_itself() -> None:
    with OtlpReceiver() as receiver:
        tracing = Tracing(
            TracingSettings(
                enabled=True, endpoint=receiver.endpoint, sample_rate=0.0, trust_incoming=False
            ),
            "edge",
        )
        # A client asking for sampling (and passing state) gets neither.
        raw = [(b"traceparent", VALID.encode()), (b"tracestate", b"a=1")]
        assert tracing.http_hop(raw, "GET", SERVER) is None
        sent = parse_traceparent(_field(raw, b"traceparent")[0])
        assert sent is not None and not sent.sampled
        assert f"{sent.trace_id:032x}" != TRACE and _field(raw, b"tracestate") == []
        tracing.shutdown()
