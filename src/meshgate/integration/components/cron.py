"""``cron``: fires an empty in-only exchange on a cron schedule, in a time zone.

``from: cron:nightly?schedule=0 2 * * *&timezone=Europe/Paris``. The schedule has five
fields (minute hour day-of-month month day-of-week), or six with seconds first, as
Camel's and Quartz's (``*/5 * * * * ?``), or a seventh for the year; ``@daily`` and its
kin work too. In a URI the fields are separated by spaces, written as such, as ``+`` or
as ``%20``. croniter evaluates it, in ``timezone`` (default UTC), across DST changes.

One firing at a time: a fire time that passes while the route still runs is skipped, not
queued, and the next one is the first to come after the route ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, CroniterError, croniter

from meshgate.integration._component import Component, Consumer, Endpoint, Processor
from meshgate.integration._errors import EndpointError
from meshgate.integration._message import Exchange, ExchangePattern, Message
from meshgate.integration._uri import EndpointUri, Options
from meshgate.integration.components.core import FiringConsumer

if TYPE_CHECKING:
    from meshgate.integration._context import IntegrationContext

__all__ = ["CronComponent", "CronEndpoint"]

log = logging.getLogger("meshgate.integration.cron")

#: Longest single sleep: a wall clock set forward or back is noticed within this.
_MAX_SLEEP = 30.0


class CronComponent(Component):
    def create_endpoint(self, uri: EndpointUri, context: IntegrationContext) -> Endpoint:
        return CronEndpoint(uri, context)


def _zone(uri: EndpointUri, name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise EndpointError(
            f"{uri.text}: option 'timezone' must be an IANA time zone such as UTC or"
            f" Europe/Paris, got {name!r}"
        ) from None


class CronEndpoint(Endpoint):
    """A schedule; each firing runs the route once, never two at a time."""

    def __init__(self, uri: EndpointUri, context: IntegrationContext) -> None:
        super().__init__(uri, context)
        self.name = uri.path
        if not self.name or self.name.startswith("/"):
            raise EndpointError(f"{uri.text}: give a name, e.g. cron:nightly?schedule=0 2 * * *")
        options = Options(uri)
        schedule = options.text("schedule")
        zone_name = options.text("timezone", "UTC") or "UTC"
        options.finish()
        if schedule is None or not schedule.strip():
            raise EndpointError(
                f"{uri.text}: option 'schedule' is required, e.g. schedule=0+2+*+*+*"
            )
        self.schedule = " ".join(schedule.split())
        self.timezone = _zone(uri, zone_name)
        try:
            self.next_fire(datetime.now(self.timezone))
        except CroniterBadDateError:
            raise EndpointError(
                f"{uri.text}: option 'schedule' matches no date in the next 50 years"
            ) from None
        except (CroniterError, ValueError, KeyError) as exc:
            hint = " (separate the fields with spaces, '+' or %20)" if "_" in schedule else ""
            raise EndpointError(
                f"{uri.text}: option 'schedule' is not a cron expression: {exc}{hint}"
            ) from None

    def next_fire(self, after: datetime) -> datetime:
        """The first fire time strictly after ``after``, in the endpoint's time zone."""
        fields = len(self.schedule.split())
        iterator = croniter(
            self.schedule,
            after.astimezone(self.timezone),
            second_at_beginning=fields >= 6,
            max_years_between_matches=50,
        )
        fire: datetime = iterator.get_next(datetime)
        return fire

    def create_consumer(self, processor: Processor) -> Consumer:
        return _CronConsumer(self, processor)


class _CronConsumer(FiringConsumer):
    endpoint: CronEndpoint

    async def _run(self) -> None:
        endpoint = self.endpoint
        zone = endpoint.timezone
        scheduled = endpoint.next_fire(datetime.now(zone))
        while True:
            # Short sleeps against the wall clock, which the schedule is written in.
            while (remaining := scheduled.timestamp() - time.time()) > 0:
                await asyncio.sleep(min(remaining, _MAX_SLEEP))
            fired = datetime.now(zone)
            exchange = Exchange(
                Message(
                    None,
                    {"fire_time": fired.isoformat(), "scheduled_time": scheduled.isoformat()},
                ),
                ExchangePattern.IN_ONLY,
            )
            exchange.properties["cron_name"] = endpoint.name
            await self.fire(exchange)
            following = endpoint.next_fire(scheduled)
            now = datetime.now(zone)
            if following <= now:
                skipped_until = following
                following = endpoint.next_fire(now)
                log.warning(
                    "%s: the route ran past the next fire time (%s); firings until %s skipped",
                    endpoint.uri.text,
                    skipped_until.isoformat(),
                    now.isoformat(),
                )
            scheduled = following
