"""Outlier detection: instances that fail in a row are ejected for a while (Envoy's).

Everything is checked lazily, when a request ends or an endpoint is picked: no timers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from meshgate.config.mesh import OutlierDetection
from meshgate.mesh._endpoint import Endpoint

_GATEWAY_ERRORS = frozenset((502, 503, 504))


class Outliers:
    """Which endpoints of a cluster are ejected, and until when.

    ``consecutive_5xx`` failures in a row (a 5xx status, or an error: connect failure,
    reset, timeout), or ``consecutive_gateway_errors`` of 502/503/504 and errors, eject an
    endpoint at once for ``base_ejection_time`` times its number of ejections. The number
    goes down by one for each ``interval`` the endpoint spent healthy after its last
    ejection ended (worked out when it fails again). At most ``max_ejection_percent`` of
    the endpoints are ejected at once, but one always may be.
    """

    __slots__ = ("config", "ejected", "next_expiry", "ejections_total")

    def __init__(self, config: OutlierDetection | None) -> None:
        self.config = config
        self.ejected: list[Endpoint] = []
        # The earliest time an ejection ends: before it, nothing can change by itself.
        self.next_expiry = math.inf
        self.ejections_total = 0

    def record(
        self, endpoint: Endpoint, status: int, error: bool, now: float, population: int
    ) -> bool:
        """Count one request's outcome; True when it ejected ``endpoint``."""
        config = self.config
        if config is None or endpoint.ejected_until:
            # Outcomes of requests that were in flight when it was ejected say nothing new.
            return False
        if not error and status < 500:
            endpoint.consecutive_5xx = 0
            endpoint.consecutive_gateway_errors = 0
            return False
        endpoint.consecutive_5xx += 1
        if error or status in _GATEWAY_ERRORS:
            endpoint.consecutive_gateway_errors += 1
        else:
            endpoint.consecutive_gateway_errors = 0
        gateway_limit = config.consecutive_gateway_errors
        if endpoint.consecutive_5xx < config.consecutive_5xx and (
            gateway_limit is None or endpoint.consecutive_gateway_errors < gateway_limit
        ):
            return False
        return self._eject(endpoint, config, now, population)

    def _eject(
        self, endpoint: Endpoint, config: OutlierDetection, now: float, population: int
    ) -> bool:
        ejected = len(self.ejected)
        if ejected and 100 * (ejected + 1) > config.max_ejection_percent * population:
            # Over the cap: the counters stay up, so its next failure tries again.
            return False
        if endpoint.ejections and endpoint.released_at:
            healthy_intervals = int((now - endpoint.released_at) // config.interval)
            endpoint.ejections = max(0, endpoint.ejections - healthy_intervals)
        endpoint.ejections += 1
        endpoint.ejected_until = now + config.base_ejection_time * endpoint.ejections
        endpoint.consecutive_5xx = 0
        endpoint.consecutive_gateway_errors = 0
        self.ejected.append(endpoint)
        self.next_expiry = min(self.next_expiry, endpoint.ejected_until)
        self.ejections_total += 1
        return True

    def expire(self, now: float) -> bool:
        """End the ejections due by ``now``; True when any ended."""
        still: list[Endpoint] = []
        next_expiry = math.inf
        for endpoint in self.ejected:
            if endpoint.ejected_until <= now:
                endpoint.released_at = endpoint.ejected_until
                endpoint.ejected_until = 0.0
            else:
                still.append(endpoint)
                next_expiry = min(next_expiry, endpoint.ejected_until)
        ended = len(still) != len(self.ejected)
        self.ejected = still
        self.next_expiry = next_expiry
        return ended

    def forget(self, gone: Iterable[Endpoint]) -> None:
        """Endpoints that left the cluster no longer count against the cap."""
        leaving = set(gone)
        if any(endpoint in leaving for endpoint in self.ejected):
            self.ejected = [e for e in self.ejected if e not in leaving]
            self.next_expiry = min((e.ejected_until for e in self.ejected), default=math.inf)

    def release_all(self) -> None:
        """Outlier detection was turned off: nothing stays ejected."""
        for endpoint in self.ejected:
            endpoint.ejected_until = 0.0
            endpoint.consecutive_5xx = 0
            endpoint.consecutive_gateway_errors = 0
        self.ejected = []
        self.next_expiry = math.inf
