"""Usage of the requests a gateway serves, summed per minute for the control plane's reports.

Three sums, as ``meshgate.config.usage`` defines a batch: metric usage per (product,
application, metric, minute) of the requests the limits let through (the same moment the
limit counters count them); responses per (product, application, status, reason, minute) of
every response, the gateway's own refusals included; and a latency histogram per (product,
minute). The minute is the request's start.

Where the sums live is the counter backend's choice: in this process with in-memory counters
(:class:`LocalTally`, swapped out into batches every interval: a SIGKILL loses at most one
interval), in Redis with Redis counters (:class:`RedisTally`: the usage rides in the limit
check's script, responses are posted before the response is written, so a SIGKILL loses
nothing counted; see ``_usage_redis`` for how the minutes are collected).

The request path does a dict increment or two: no work here may grow with anything but the
number of metrics a request counts.
"""

from __future__ import annotations

import asyncio
import json
import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import Any

from meshgate.config.usage import LATENCY_BOUNDS_MS, reason_of
from meshgate.limits import Metered, RedisCounters

__all__ = [
    "BATCH_ROWS",
    "LATENCY_BUCKETS",
    "LocalTally",
    "MinuteClock",
    "RedisTally",
    "Rows",
    "Tally",
    "batch_bodies",
    "rows_from_fields",
]

LATENCY_BUCKETS = len(LATENCY_BOUNDS_MS) + 1
# Rows per batch: well below MAX_BATCH_ROWS, so that one batch stays a few megabytes.
BATCH_ROWS = 50_000
_FIELD_CACHE = 65536
# Latency sums go to Redis this often: a histogram of thousands of exchanges in a few
# commands, not a few commands per event-loop iteration.
LATENCY_POST_SECONDS = 0.1


class MinuteClock:
    """The wall-clock minute of a ``time.perf_counter()`` instant (the engine stamps requests
    with it), without reading the wall clock per request."""

    __slots__ = ("offset", "_low", "_high", "_minute")

    def __init__(self) -> None:
        self.offset = 0.0
        self._low = self._high = 0.0
        self._minute = 0
        self.adjust()

    def adjust(self) -> None:
        """Follow the wall clock again (NTP may slew it): called every report interval."""
        self.offset = time.time() - time.perf_counter()
        self._low = self._high = 0.0

    def minute(self, start: float) -> int:
        if self._low <= start < self._high:
            return self._minute
        wall = start + self.offset
        minute = int(wall // 60) * 60
        if self._high <= start:  # the current minute, not an old request's
            self._minute = minute
            self._low = minute - self.offset
            self._high = self._low + 60
        return minute


# (minute, product, application, metric) -> value
UsageSums = dict[tuple[int, str, str, str], int]
# (minute, product, application, status, forwarded) -> count
ResponseSums = dict[tuple[int, str, str, int, bool], int]
# (minute, product) -> counts per latency bucket, then the milliseconds summed
LatencySums = dict[tuple[int, str], list[float]]


class Rows:
    """The rows of one or more batches, as the batch format lists them."""

    __slots__ = ("usage", "responses", "latency")

    def __init__(self) -> None:
        self.usage: list[list[Any]] = []
        self.responses: list[list[Any]] = []
        self.latency: list[list[Any]] = []

    def __len__(self) -> int:
        return len(self.usage) + len(self.responses) + len(self.latency)

    def sort(self) -> None:
        """A stable order, so that the same sums always make the same batches."""
        self.usage.sort()
        self.responses.sort()
        self.latency.sort(key=lambda row: (row[0], row[1]))


def batch_bodies(rows: Rows, batch_id: Any) -> list[tuple[str, bytes]]:
    """``rows`` as batches of at most BATCH_ROWS rows: (id, JSON body) each; ``batch_id(i)``
    names the i-th."""
    out: list[tuple[str, bytes]] = []
    kinds = (("usage", rows.usage), ("responses", rows.responses), ("latency", rows.latency))
    current: dict[str, list[list[Any]]] = {"usage": [], "responses": [], "latency": []}
    size = 0

    def emit() -> None:
        nonlocal current, size
        ident = batch_id(len(out))
        body = json.dumps({"id": ident, **current}, separators=(",", ":")).encode()
        out.append((ident, body))
        current = {"usage": [], "responses": [], "latency": []}
        size = 0

    for kind, listed in kinds:
        for row in listed:
            current[kind].append(row)
            size += 1
            if size >= BATCH_ROWS:
                emit()
    if size:
        emit()
    return out


class Tally:
    """What the gateway calls on every request; see the module's note."""

    __slots__ = ("clock",)
    # Whether ``metered`` counts the request's response as a presumed 200 (see RedisTally).
    presumes = False

    def __init__(self) -> None:
        self.clock = MinuteClock()

    def count(self, product: str, app: str, deltas: Mapping[str, int], start: float) -> None:
        """A request the limits let through (or that had none) counts ``deltas``."""
        raise NotImplementedError

    def metered(
        self, product: str, app: str, deltas: Mapping[str, int], start: float
    ) -> Metered | None:
        """``deltas`` for a counter backend that keeps usage; None when it does not."""
        return None

    def respond(
        self,
        product: str,
        app: str,
        status: int,
        forwarded: bool,
        start: float,
        presumed: bool = False,
    ) -> None:
        """A response head is about to be written; ``presumed``: ``metered`` counted it as a
        forwarded 200 already."""
        raise NotImplementedError

    def unanswered(self, product: str, app: str, start: float) -> None:
        """A request whose response was presumed ended with none written."""

    def flush(self) -> None:
        """Write out what waits for a timer (the process is stopping)."""

    def complete(self, product: str, duration: float, start: float) -> None:
        """An exchange ended after ``duration`` seconds."""
        raise NotImplementedError


class LocalTally(Tally):
    """Sums in this process, swapped out by the reporter every interval."""

    __slots__ = ("usage", "responses", "latency")

    def __init__(self) -> None:
        super().__init__()
        self.usage: UsageSums = {}
        self.responses: ResponseSums = {}
        self.latency: LatencySums = {}

    def count(self, product: str, app: str, deltas: Mapping[str, int], start: float) -> None:
        minute = self.clock.minute(start)
        usage = self.usage
        for metric, increment in deltas.items():
            if increment:
                key = (minute, product, app, metric)
                usage[key] = usage.get(key, 0) + increment

    def respond(
        self,
        product: str,
        app: str,
        status: int,
        forwarded: bool,
        start: float,
        presumed: bool = False,
    ) -> None:
        key = (self.clock.minute(start), product, app, status, forwarded)
        responses = self.responses
        responses[key] = responses.get(key, 0) + 1

    def complete(self, product: str, duration: float, start: float) -> None:
        key = (self.clock.minute(start), product)
        histogram = self.latency.get(key)
        if histogram is None:
            histogram = self.latency[key] = [0] * (LATENCY_BUCKETS + 1)
        milliseconds = duration * 1000.0
        histogram[bisect_left(LATENCY_BOUNDS_MS, milliseconds)] += 1
        histogram[LATENCY_BUCKETS] += milliseconds

    def swap(self) -> Rows:
        """Everything summed since the last swap, as rows; the sums start again from zero."""
        usage, responses, latency = self.usage, self.responses, self.latency
        self.usage, self.responses, self.latency = {}, {}, {}
        self.clock.adjust()
        rows = Rows()
        rows.usage = [
            [product, app, metric, minute, value]
            for (minute, product, app, metric), value in usage.items()
        ]
        rows.responses = [
            [product, app, status, reason_of(status, forwarded), minute, count]
            for (minute, product, app, status, forwarded), count in responses.items()
        ]
        rows.latency = [
            [product, minute, [int(n) for n in counts[:LATENCY_BUCKETS]], counts[LATENCY_BUCKETS]]
            for (minute, product), counts in latency.items()
        ]
        return rows


def _field(*parts: object) -> str:
    return json.dumps(parts, separators=(",", ":"))


class RedisTally(Tally):
    """Sums in Redis, beside the limit counters (see the module's note).

    Hash fields are JSON arrays: ``["u", product, app, metric]`` (usage), ``["r", product,
    app, status, forwarded]`` (responses), ``["l", product, bucket]`` and ``["s", product]``
    (latency counts and microseconds summed). Latency is posted every LATENCY_POST_SECONDS:
    a kill loses the latency of the last tenth of a second's exchanges, never a count.

    A request let through is presumed to be answered 200 by its backend: that response is
    counted with its usage (in the check script, or in the posted usage), so the common
    response costs no write of its own. Any other answer is written as a correction (-1 on
    the presumed 200, +1 on what it was) before the response goes to the client; a request
    that ends unanswered takes its presumption back. A correction may reach the control plane
    in the batch after its presumption: a 200 count is one too high for an interval.
    """

    presumes = True

    __slots__ = (
        "counters",
        "_usage_fields",
        "_response_fields",
        "_responses",
        "_latency",
        "_latency_fields",
    )

    def __init__(self, counters: RedisCounters) -> None:
        super().__init__()
        self.counters = counters
        self._usage_fields: dict[tuple[str, str, str], str] = {}
        self._response_fields: dict[tuple[str, str, int, bool], str] = {}
        # (product, app, status, forwarded) -> the minute and its encoded HINCRBY
        self._responses: dict[tuple[str, str, int, bool], tuple[int, bytes]] = {}
        self._latency: LatencySums = {}
        self._latency_fields: dict[tuple[str, int], str] = {}

    def metered(
        self, product: str, app: str, deltas: Mapping[str, int], start: float
    ) -> Metered | None:
        fields = self._usage_fields
        pairs = []
        for metric, increment in deltas.items():
            if increment:
                key = (product, app, metric)
                field = fields.get(key)
                if field is None:
                    if len(fields) >= _FIELD_CACHE:
                        fields.clear()
                    field = fields[key] = _field("u", product, app, metric)
                pairs.append((field, increment))
        minute = self.clock.minute(start)
        pairs.append((self._presumed_field(product, app), 1))
        return minute, pairs

    def _presumed_field(self, product: str, app: str) -> str:
        key = (product, app, 200, True)
        cached = self._response_fields.get(key)
        if cached is None:
            if len(self._response_fields) >= _FIELD_CACHE:
                self._response_fields.clear()
            cached = self._response_fields[key] = _field("r", product, app, 200, True)
        return cached

    def count(self, product: str, app: str, deltas: Mapping[str, int], start: float) -> None:
        metered = self.metered(product, app, deltas, start)
        if metered is not None:
            self.counters.post_usage(metered)

    def respond(
        self,
        product: str,
        app: str,
        status: int,
        forwarded: bool,
        start: float,
        presumed: bool = False,
    ) -> None:
        if presumed:
            if status == 200 and forwarded:
                return
            self._post_response(product, app, 200, True, start, -1, now=False)
        # Written now: on its way to Redis before the response is on its way to the client.
        self._post_response(product, app, status, forwarded, start, 1, now=True)

    def unanswered(self, product: str, app: str, start: float) -> None:
        self._post_response(product, app, 200, True, start, -1, now=False)

    def _post_response(
        self,
        product: str,
        app: str,
        status: int,
        forwarded: bool,
        start: float,
        increment: int,
        now: bool,
    ) -> None:
        if increment != 1:
            field = _field("r", product, app, status, forwarded)
            minute = self.clock.minute(start)
            self.counters.post(self.counters.usage_command(minute, field, increment), now=now)
            return
        minute = self.clock.minute(start)
        key = (product, app, status, forwarded)
        cached = self._responses.get(key)
        if cached is None or cached[0] != minute:
            if len(self._responses) >= _FIELD_CACHE:
                self._responses.clear()
            field = _field("r", product, app, status, forwarded)
            cached = self._responses[key] = (
                minute,
                self.counters.usage_command(minute, field, 1),
            )
        self.counters.post(cached[1], now=now)

    def complete(self, product: str, duration: float, start: float) -> None:
        latency = self._latency
        if not latency:
            asyncio.get_running_loop().call_later(LATENCY_POST_SECONDS, self._post_latency)
        key = (self.clock.minute(start), product)
        histogram = latency.get(key)
        if histogram is None:
            histogram = latency[key] = [0] * (LATENCY_BUCKETS + 1)
        histogram[bisect_left(LATENCY_BOUNDS_MS, duration * 1000.0)] += 1
        histogram[LATENCY_BUCKETS] += duration * 1_000_000.0

    def flush(self) -> None:
        self._post_latency()

    def _post_latency(self) -> None:
        latency, self._latency = self._latency, {}
        fields = self._latency_fields
        for (minute, product), histogram in latency.items():
            pairs = []
            for bucket in range(LATENCY_BUCKETS):
                count = int(histogram[bucket])
                if count:
                    field = fields.get((product, bucket))
                    if field is None:
                        if len(fields) >= _FIELD_CACHE:
                            fields.clear()
                        field = fields[(product, bucket)] = _field("l", product, bucket)
                    pairs.append((field, count))
            micros = round(histogram[LATENCY_BUCKETS])
            if micros:
                pairs.append((_field("s", product), micros))
            self.counters.post_usage((minute, pairs))


def rows_from_fields(minute: int, fields: Iterable[tuple[bytes | str, bytes | str]]) -> Rows:
    """The rows of one minute's usage hash (see :class:`RedisTally`); a field this version
    cannot read (none that it writes) is skipped."""
    rows = Rows()
    latency: dict[str, list[Any]] = {}
    responses: dict[tuple[str, str, int, str], int] = {}
    for raw_field, raw_value in fields:
        try:
            field = json.loads(raw_field)
            value = int(raw_value)
            kind = field[0]
            # A response count may be negative: corrections of presumed 200s whose
            # presumptions went in an earlier batch.
            if value == 0 or (value < 0 and kind != "r"):
                continue
            if kind == "u" and len(field) == 4:
                rows.usage.append([str(field[1]), str(field[2]), str(field[3]), minute, value])
            elif kind == "r" and len(field) == 5:
                status = int(field[3])
                key = (str(field[1]), str(field[2]), status, reason_of(status, bool(field[4])))
                responses[key] = responses.get(key, 0) + value
            elif kind in ("l", "s"):
                product = str(field[1])
                histogram = latency.get(product)
                if histogram is None:
                    histogram = latency[product] = [product, minute, [0] * LATENCY_BUCKETS, 0.0]
                if kind == "s":
                    histogram[3] = value / 1000.0
                elif 0 <= int(field[2]) < LATENCY_BUCKETS:
                    histogram[2][int(field[2])] += value
        except (ValueError, TypeError, IndexError, KeyError):
            continue
    rows.responses = [
        [*key[:3], key[3], minute, count] for key, count in responses.items() if count
    ]
    rows.latency = list(latency.values())
    rows.sort()
    return rows
