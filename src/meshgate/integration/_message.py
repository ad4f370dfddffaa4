"""The exchange and its message: what travels through a route."""

from __future__ import annotations

import itertools
import json
import os
import time
from enum import StrEnum
from typing import Any

__all__ = ["Exchange", "ExchangePattern", "Message"]


# Exchange ids: this process's random prefix and a counter, 32 hex digits as a UUID's
# (uuid4 costs a getrandom call per exchange). A forked child draws its own prefix.
_ids = itertools.count()
_prefix = os.urandom(8).hex()


def _new_prefix() -> None:
    global _prefix, _ids
    _prefix, _ids = os.urandom(8).hex(), itertools.count()


os.register_at_fork(after_in_child=_new_prefix)


class ExchangePattern(StrEnum):
    """In-only: fire and forget. In-out: the caller waits for the message at the route's end."""

    IN_ONLY = "InOnly"
    IN_OUT = "InOut"


class Message:
    """Headers and a body; the body is ``bytes``, ``str`` or parsed data (dict, list...)."""

    __slots__ = ("headers", "body")

    def __init__(self, body: Any = None, headers: dict[str, Any] | None = None) -> None:
        self.body = body
        self.headers: dict[str, Any] = headers if headers is not None else {}

    def copy(self) -> Message:
        """Headers copied, body shared: steps replace a body rather than mutate it."""
        return Message(self.body, dict(self.headers))

    def body_bytes(self) -> bytes:
        """The body as bytes: text as UTF-8, parsed data as JSON, ``None`` as nothing."""
        body = self.body
        if isinstance(body, bytes):
            return body
        if isinstance(body, str):
            return body.encode()
        if body is None:
            return b""
        if isinstance(body, bytearray | memoryview):
            return bytes(body)
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

    def body_text(self) -> str:
        """The body as text; bytes are decoded as UTF-8 with replacement characters."""
        body = self.body
        if isinstance(body, str):
            return body
        return self.body_bytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"Message(body={self.body!r}, headers={self.headers!r})"


class Exchange:
    """One message's journey: its id, pattern, properties, message and failure, if any.

    ``stopped`` ends routing without an error (the ``stop`` step, a filter or a duplicate);
    ``exception`` holds the failure that the route's error handler did not handle.
    """

    __slots__ = (
        "id",
        "pattern",
        "properties",
        "message",
        "exception",
        "stopped",
        "route_id",
        "failed_step",
        "created",
    )

    def __init__(
        self,
        message: Message | None = None,
        pattern: ExchangePattern = ExchangePattern.IN_ONLY,
        *,
        properties: dict[str, Any] | None = None,
        exchange_id: str | None = None,
    ) -> None:
        self.id = exchange_id or f"{_prefix}{next(_ids):016x}"
        self.pattern = pattern
        self.properties: dict[str, Any] = properties if properties is not None else {}
        self.message = message if message is not None else Message()
        self.exception: BaseException | None = None
        self.stopped = False
        self.route_id: str | None = None
        # Where the last failure happened, as the DSL path of the step (steps[2].to).
        self.failed_step: str | None = None
        self.created = time.time()

    @property
    def body(self) -> Any:
        return self.message.body

    @body.setter
    def body(self, value: Any) -> None:
        self.message.body = value

    @property
    def headers(self) -> dict[str, Any]:
        return self.message.headers

    @property
    def failed(self) -> bool:
        return self.exception is not None

    def copy(self, *, new_id: bool = True) -> Exchange:
        """A copy for another path (multicast, split, wire tap): message and properties copied."""
        copied = Exchange(
            self.message.copy(),
            self.pattern,
            properties=dict(self.properties),
            exchange_id=None if new_id else self.id,
        )
        copied.route_id = self.route_id
        return copied

    def __repr__(self) -> str:
        return f"Exchange(id={self.id!r}, pattern={self.pattern.value}, message={self.message!r})"
