"""Endpoint URIs, ``scheme:path?options``, and the typed reading of their options."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from meshgate.integration._errors import EndpointError

__all__ = ["EndpointUri", "Options", "parse_duration", "parse_uri"]

MAX_URI_LENGTH = 4096
MAX_OPTIONS = 64
_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]*")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {None: 0.001, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class EndpointUri:
    """A parsed endpoint URI. ``options`` keeps the query's pairs in order."""

    text: str
    scheme: str
    path: str
    options: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return self.text


def parse_uri(text: str, known_schemes: Collection[str] | None = None) -> EndpointUri:
    """Split ``scheme:path?options``; with ``known_schemes``, an unknown scheme is an error."""
    if not isinstance(text, str):
        raise EndpointError(f"an endpoint URI must be a string, got {type(text).__name__}")
    shown = text if len(text) <= 80 else text[:77] + "..."
    if not text.strip():
        raise EndpointError("an endpoint URI must not be empty")
    if len(text) > MAX_URI_LENGTH:
        raise EndpointError(f"endpoint URI {shown!r} is longer than {MAX_URI_LENGTH} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise EndpointError(f"endpoint URI {shown!r} contains control characters")
    scheme, colon, rest = text.partition(":")
    if not colon:
        raise EndpointError(
            f"endpoint URI {shown!r} has no scheme: write scheme:path, e.g. direct:orders"
        )
    if not _SCHEME.fullmatch(scheme):
        raise EndpointError(
            f"endpoint URI {shown!r}: {scheme!r} is not a scheme"
            " (lowercase letters, digits, '+', '.', '-', starting with a letter)"
        )
    if known_schemes is not None and scheme not in known_schemes:
        known = ", ".join(sorted(known_schemes))
        raise EndpointError(f"unknown endpoint scheme {scheme!r} in {shown!r} (known: {known})")
    path, _, query = rest.partition("?")
    options: list[tuple[str, str]] = []
    if query:
        try:
            pairs = parse_qsl(
                query, keep_blank_values=True, strict_parsing=True, max_num_fields=MAX_OPTIONS
            )
        except ValueError as exc:
            raise EndpointError(f"endpoint URI {shown!r}: malformed options: {exc}") from None
        seen: set[str] = set()
        for name, value in pairs:
            if name in seen:
                raise EndpointError(f"endpoint URI {shown!r}: option {name!r} is given twice")
            seen.add(name)
            options.append((name, value))
    return EndpointUri(text, scheme, path, tuple(options))


def parse_duration(value: object, what: str = "duration") -> float:
    """Seconds from Camel's convention: a number of milliseconds, or ``"500ms"``, ``"2s"``..."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: must be a duration such as 500 (ms), '500ms', '2s' or '1m'")
    if isinstance(value, int | float):
        seconds = float(value) / 1000.0
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError(f"{what}: must be a duration such as 500 (ms), '500ms', '2s' or '1m'")
    if not 0.0 <= seconds <= 366 * 86400.0 or seconds != seconds:
        raise ValueError(f"{what}: must be between 0 and a year")
    return seconds


class Options:
    """Typed access to an endpoint's options; ``finish`` refuses the ones nobody asked for."""

    def __init__(self, uri: EndpointUri) -> None:
        self.uri = uri
        self._values = dict(uri.options)
        self._asked: list[str] = []

    def _raw(self, name: str) -> str | None:
        self._asked.append(name)
        return self._values.get(name)

    def _error(self, name: str, expected: str) -> EndpointError:
        return EndpointError(f"{self.uri.text}: option {name!r} must be {expected}")

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self._raw(name)
        return default if value is None else value

    def integer(self, name: str, default: int, minimum: int = 0, maximum: int = 2**31) -> int:
        value = self._raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise self._error(name, "an integer") from None
        if not minimum <= number <= maximum:
            raise self._error(name, f"between {minimum} and {maximum}")
        return number

    def duration(self, name: str, default: float) -> float:
        """Seconds; the option is written in milliseconds or with a unit (``2s``)."""
        value = self._raw(name)
        if value is None:
            return default
        try:
            return parse_duration(value if not value.isdigit() else int(value), name)
        except ValueError:
            raise self._error(name, "a duration such as 500 (ms), 500ms, 2s or 1m") from None

    def boolean(self, name: str, default: bool) -> bool:
        value = self._raw(name)
        if value is None:
            return default
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise self._error(name, "true or false")

    def choice(self, name: str, choices: Iterable[str], default: str) -> str:
        allowed = list(choices)
        value = self._raw(name)
        if value is None:
            return default
        if value not in allowed:
            raise self._error(name, "one of " + ", ".join(allowed))
        return value

    def remaining(self) -> dict[str, str]:
        """The options not asked for, for endpoints that pass them on (HTTP query)."""
        return {k: v for k, v in self._values.items() if k not in self._asked}

    def finish(self) -> None:
        unknown = [name for name in self._values if name not in self._asked]
        if unknown:
            allowed = ", ".join(dict.fromkeys(self._asked)) or "none"
            raise EndpointError(
                f"{self.uri.text}: unknown option {unknown[0]!r} (allowed: {allowed})"
            )
