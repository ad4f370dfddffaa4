"""Webhook calls: which URLs are accepted, how a delivery is signed, and one POST of it.

The stdlib client, in the delivery worker's threads: the control plane has no HTTP client
among its dependencies, and one POST with a deadline needs none.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import secrets
import socket
import threading
import time
import urllib.error
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = [
    "MAX_RESPONSE_BYTES",
    "Outcome",
    "check_url",
    "new_secret",
    "post",
    "signature",
]

# A receiver's answer is read this far (for the log), never whole.
MAX_RESPONSE_BYTES = 4096


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def check_url(url: str) -> str:
    """``url`` when a webhook may be sent to it; ValueError saying why not otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (user:password@); sign with the secret")
    if port == 0:
        raise ValueError("must not name port 0")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError("must not contain spaces or control characters")
    if parts.fragment:
        raise ValueError("must not have a #fragment")
    return url


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Meshgate-Signature value: HMAC-SHA256 of ``timestamp.body`` under the secret."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to: delivered when the receiver answered 2xx."""

    status_code: int | None
    error: str | None
    duration_ms: float

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def post(
    url: str,
    secret: str,
    event: str,
    delivery_id: str,
    body: bytes,
    timeout: float,
    now: float | None = None,
) -> Outcome:
    """POST one signed delivery within ``timeout`` seconds in all (a receiver that trickles
    its answer is cut off at the deadline, not waited on a read at a time); redirects are
    answers, not followed. Never raises for what the network or the receiver did."""
    timestamp = str(int(time.time() if now is None else now))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "meshgate-webhooks/1",
        "X-Meshgate-Event": event,
        "X-Meshgate-Delivery": delivery_id,
        "X-Meshgate-Timestamp": timestamp,
        "X-Meshgate-Signature": signature(secret, timestamp, body),
    }
    parts = urlsplit(url)
    connection_type = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    started = time.monotonic()
    status: int | None = None
    error: str | None = None
    connection = connection_type(parts.hostname or "", parts.port, timeout=timeout)
    expired = threading.Event()

    def cut_off() -> None:
        expired.set()
        sock = connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    deadline = threading.Timer(timeout, cut_off)
    deadline.daemon = True
    deadline.start()
    try:
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        connection.request("POST", target, body=body, headers=headers)
        response = connection.getresponse()
        status = response.status
        response.read(MAX_RESPONSE_BYTES)
        if not 200 <= status < 300:
            error = f"answered {status}"
    except (OSError, http.client.HTTPException, ValueError) as exc:
        error = _reason(exc)
    finally:
        deadline.cancel()
        connection.close()
    if expired.is_set():
        # Cut off: whatever was read by then (an EOF can pass for the end) is no answer.
        status, error = None, "timed out"
    return Outcome(status, error, round((time.monotonic() - started) * 1000, 1))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]
