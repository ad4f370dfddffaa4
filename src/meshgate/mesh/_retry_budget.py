"""Linkerd's retry budget: retries may add only a share of the load, plus a small floor."""

from __future__ import annotations

import time
from collections.abc import Callable

from meshgate.config import mesh

# The window is kept as this many slices of ttl: counts leave it a slice at a time.
_SLICES = 10


class RetryBudget:
    """A retry is allowed while, within the last ``ttl`` seconds (to a tenth of it),
    retries stay at or under ``percent`` % of the original requests plus
    ``min_retries_per_second * ttl``.

    Bounding retries by the traffic keeps a failing service from being hit by its callers'
    retries on top of their requests (a retry storm); the floor lets low-traffic callers
    retry at all.
    """

    __slots__ = (
        "exhausted",
        "_clock",
        "_ratio",
        "_reserve",
        "_slice",
        "_current",
        "_requests",
        "_retries",
        "_total_requests",
        "_total_retries",
    )

    def __init__(self, policy: mesh.RetryBudget, clock: Callable[[], float] = time.monotonic):
        self.exhausted = 0
        self._clock = clock
        self._ratio = policy.percent / 100
        self._reserve = policy.min_retries_per_second * policy.ttl
        self._slice = policy.ttl / _SLICES
        self._current = int(clock() / self._slice)
        self._requests = [0] * _SLICES
        self._retries = [0] * _SLICES
        self._total_requests = 0
        self._total_retries = 0

    def request(self) -> None:
        """Count one original request."""
        i = self._advance()
        self._requests[i] += 1
        self._total_requests += 1

    def try_retry(self) -> bool:
        """True, and the retry counted, when the budget allows one more; else False."""
        i = self._advance()
        if self._total_retries + 1 > self._ratio * self._total_requests + self._reserve:
            self.exhausted += 1
            return False
        self._retries[i] += 1
        self._total_retries += 1
        return True

    def _advance(self) -> int:
        """Drop the slices that left the window; the current slice's index."""
        now = int(self._clock() / self._slice)
        if now > self._current:
            for step in range(1, min(now - self._current, _SLICES) + 1):
                i = (self._current + step) % _SLICES
                self._total_requests -= self._requests[i]
                self._total_retries -= self._retries[i]
                self._requests[i] = 0
                self._retries[i] = 0
            self._current = now
        return self._current % _SLICES
