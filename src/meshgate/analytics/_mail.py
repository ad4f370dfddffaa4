"""Alert e-mail through an SMTP server: its settings from one URL, and one message sent.

``smtp://user:password@host:port?from=alerts@example.com&starttls=1`` (``smtps://`` for TLS
from the first byte). Sent with the stdlib in the delivery worker's threads.
"""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["SmtpSettings", "send"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    sender: str
    starttls: bool = False
    tls: bool = False
    user: str | None = None
    password: str | None = None

    @classmethod
    def from_url(cls, url: str) -> SmtpSettings:
        """Parse ``smtp://`` or ``smtps://``; ValueError naming what is wrong."""
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps"):
            raise ValueError("the SMTP URL must start with smtp:// or smtps://")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("the SMTP URL's port is not a number from 1 to 65535") from None
        if not parts.hostname:
            raise ValueError("the SMTP URL must name a host")
        query = parse_qs(parts.query)
        sender = query.get("from", [""])[0]
        if "@" not in sender:
            raise ValueError("the SMTP URL must give the sender: ?from=alerts@example.com")
        starttls = query.get("starttls", ["0"])[0].lower()
        if starttls not in _TRUE + _FALSE:
            raise ValueError("starttls in the SMTP URL is 1 or 0")
        tls = parts.scheme == "smtps"
        return cls(
            host=parts.hostname,
            port=port or (465 if tls else 25),
            sender=sender,
            starttls=starttls in _TRUE,
            tls=tls,
            user=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


def send(settings: SmtpSettings, to: str, subject: str, text: str, timeout: float) -> None:
    """Send one plain-text message; raises OSError or smtplib.SMTPException on failure."""
    # Headers unfolded up to SMTP's line limit: the stdlib's folding of a long subject
    # starts it on a line of its own, and readers then show it with a leading space.
    message = EmailMessage(policy=policy.SMTP.clone(max_line_length=998))
    message["From"] = settings.sender
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = make_msgid(domain=settings.sender.rpartition("@")[2] or None)
    message.set_content(text)
    context = ssl.create_default_context()
    client: smtplib.SMTP
    if settings.tls:
        client = smtplib.SMTP_SSL(settings.host, settings.port, timeout=timeout, context=context)
    else:
        client = smtplib.SMTP(settings.host, settings.port, timeout=timeout)
    with client:
        if settings.starttls:
            client.starttls(context=context)
        if settings.user is not None:
            client.login(settings.user, settings.password or "")
        client.send_message(message)
