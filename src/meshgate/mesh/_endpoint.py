"""One instance of a service as its cluster sees it: its settings and its live state."""

from __future__ import annotations

import math
from array import array
from typing import Any

from meshgate.config.mesh import Instance

# Seconds: Finagle's and Linkerd's peak-EWMA time constant.
DECAY = 10.0
# Linkerd's default RTT: the estimate of an instance before anything is known of any.
DEFAULT_LATENCY = 0.03


class Endpoint:
    """An instance of a service with the state its cluster keeps while it stays.

    ``key`` (address, port) is its identity: labels, version, zone and weight may change
    under it. ``pool`` is what the cluster's pool factory made of it, on its first pick.
    """

    __slots__ = (
        "info",
        "key",
        "pool",
        "active",
        "ewma",
        "ewma_at",
        "ejected_until",
        "ejections",
        "released_at",
        "consecutive_5xx",
        "consecutive_gateway_errors",
        "ring_points",
    )

    def __init__(self, info: Instance, latency: float, now: float) -> None:
        self.info = info
        self.key: tuple[str, int] = (info.address, info.port)
        self.pool: Any = None
        self.active = 0
        # Peak-EWMA latency in seconds, as it stood at ``ewma_at``.
        self.ewma = latency
        self.ewma_at = now
        self.ejected_until = 0.0
        self.ejections = 0
        # When its last ejection ended (0: never ejected): the ejection count decays from then.
        self.released_at = 0.0
        self.consecutive_5xx = 0
        self.consecutive_gateway_errors = 0
        # Its points on a hash ring, made when a ring first needs them.
        self.ring_points: array[float] | None = None

    def __repr__(self) -> str:
        return f"<Endpoint {self.key[0]}:{self.key[1]} active={self.active}>"

    def latency(self, now: float) -> float:
        """The estimate at ``now``: it decays toward 0 while no answer comes, so an idle
        instance is tried again (Finagle's peak EWMA)."""
        return self.ewma * math.exp(min(0.0, self.ewma_at - now) / DECAY)

    def observe(self, seconds: float, now: float) -> None:
        """An answer took ``seconds``: a slower one than the estimate is taken at once (the
        peak), a faster one is blended in by the time since the last observation."""
        decay = math.exp(min(0.0, self.ewma_at - now) / DECAY)
        current = self.ewma * decay
        self.ewma = seconds if seconds > current else current + seconds * (1.0 - decay)
        self.ewma_at = now
