"""Endpoint URIs: parsing, typed options, and clear errors on bad or hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshgate.integration import EndpointError, IntegrationContext, parse_duration, parse_uri

KNOWN = ("direct", "seda", "timer")


def test_a_uri_splits_into_scheme_path_and_options() -> None:
    uri = parse_uri("seda:orders?size=10&concurrent_consumers=2", KNOWN)
    assert (uri.scheme, uri.path) == ("seda", "orders")
    assert uri.options == (("size", "10"), ("concurrent_consumers", "2"))


def test_an_unknown_scheme_is_named_with_the_known_ones() -> None:
    with pytest.raises(EndpointError) as caught:
        parse_uri("ftp:files", KNOWN)
    assert (
        str(caught.value)
        == "unknown endpoint scheme 'ftp' in 'ftp:files' (known: direct, seda, timer)"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "must not be empty"),
        ("orders", "has no scheme: write scheme:path, e.g. direct:orders"),
        ("9p:x", "'9p' is not a scheme"),
        ("Direct:x", "'Direct' is not a scheme"),
        ("direct:a\nb", "contains control characters"),
        ("direct:a?x=1&x=2", "option 'x' is given twice"),
        ("direct:a?x", "malformed options"),
        ("direct:" + "a" * 5000, "longer than 4096 characters"),
        ("direct:a?" + "&".join(f"o{i}=1" for i in range(100)), "malformed options"),
    ],
)
def test_malformed_uris_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(EndpointError, match=message.replace("?", r"\?").replace(".", r"\.")):
        parse_uri(text, KNOWN)


def test_a_uri_that_is_not_text_is_refused() -> None:
    with pytest.raises(EndpointError, match="must be a string, got int"):
        parse_uri(5, KNOWN)  # type: ignore[arg-type]


@given(st.text(max_size=300))
def test_any_text_parses_or_raises_an_endpoint_error(text: str) -> None:
    try:
        parse_uri(text, KNOWN)
    except EndpointError:
        pass


def test_options_are_typed_and_unknown_ones_refused() -> None:
    context = IntegrationContext()
    with pytest.raises(EndpointError) as caught:
        context.endpoint("seda:q?sise=10")
    assert str(caught.value) == (
        "seda:q?sise=10: unknown option 'sise'"
        " (allowed: size, concurrent_consumers, block_when_full, timeout)"
    )
    with pytest.raises(EndpointError, match="option 'size' must be an integer"):
        context.endpoint("seda:q?size=ten")
    with pytest.raises(EndpointError, match="option 'size' must be between 1 and"):
        context.endpoint("seda:q?size=0")
    with pytest.raises(EndpointError, match="option 'period' must be a duration"):
        context.endpoint("timer:t?period=soon")
    with pytest.raises(EndpointError, match="option 'level' must be one of DEBUG, INFO"):
        context.endpoint("log:x?level=LOUD")
    with pytest.raises(EndpointError, match="give a name, e.g. direct:orders"):
        context.endpoint("direct:")


def test_durations_follow_camel_milliseconds_or_take_a_unit() -> None:
    assert parse_duration(1500) == 1.5
    assert parse_duration("1500") == 1.5
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2s") == 2.0
    assert parse_duration("1m") == 60.0
    assert parse_duration("1.5h") == 5400.0
    for bad in ("soon", "-1s", True, None, "1e400s", float("nan")):
        with pytest.raises(ValueError):
            parse_duration(bad)
