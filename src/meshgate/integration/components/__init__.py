"""The connectors: one module per scheme family, registered by scheme."""

from __future__ import annotations

from meshgate.integration._component import Component

__all__ = ["default_components"]


def default_components() -> dict[str, Component]:
    """Every built-in component by scheme. Broker clients are imported when first used."""
    from meshgate.integration.components.amqp import AmqpComponent
    from meshgate.integration.components.core import (
        DirectComponent,
        LogComponent,
        SedaComponent,
        TimerComponent,
    )
    from meshgate.integration.components.cron import CronComponent
    from meshgate.integration.components.file import FileComponent
    from meshgate.integration.components.http import HttpComponent
    from meshgate.integration.components.kafka import KafkaComponent
    from meshgate.integration.components.mock import MockComponent
    from meshgate.integration.components.mqtt import MqttComponent
    from meshgate.integration.components.nats import NatsComponent
    from meshgate.integration.components.redis_streams import RedisStreamsComponent
    from meshgate.integration.components.sql import SqlComponent

    components: dict[str, Component] = {
        "direct": DirectComponent(),
        "seda": SedaComponent(),
        "timer": TimerComponent(),
        "log": LogComponent(),
        "mock": MockComponent(),
        "http": HttpComponent(),
        "amqp": AmqpComponent(),
        "nats": NatsComponent(),
        "redis": RedisStreamsComponent(),
        "mqtt": MqttComponent(),
        "kafka": KafkaComponent(),
        "file": FileComponent(),
        "cron": CronComponent(),
        "sql": SqlComponent(),
    }
    return components
