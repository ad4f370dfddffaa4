"""``mqtt``: MQTT topics through aiomqtt (MQTT 5), QoS 1 acknowledged after the route.

``from: mqtt:sensors/+/temperature`` subscribes in a persistent session (a fixed client
id, ``clean_session=false``) with manual acknowledgement: the PUBACK of a QoS 1 message
is sent only once its route completed or its dead letter channel took it. MQTT has no
negative acknowledgement and a broker resends an unacknowledged message only when the
session reconnects; so a failed route ends the connection and the consumer reconnects
after ``reconnect_delay``, and the broker redelivers; so it does to a runtime that died
mid-route, when it reconnects within ``session_expiry``. Messages are processed one at a
time, in order. ``to: mqtt:orders/created`` publishes with ``qos`` (1: the broker's
PUBACK before this returns). Headers travel as MQTT 5 user properties. The broker is the
``broker_url`` option, else the context's ``mqtt_url`` setting.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from meshgate.integration._component import Component, Consumer, Endpoint, Processor, Producer
from meshgate.integration._errors import EndpointError, IntegrationError
from meshgate.integration._message import Exchange, ExchangePattern, Message
from meshgate.integration._uri import EndpointUri, Options

if TYPE_CHECKING:
    from meshgate.integration._context import IntegrationContext

__all__ = ["MqttComponent"]

DEFAULT_URL = "mqtt://127.0.0.1:1883"
log = logging.getLogger("meshgate.integration.mqtt")
_INTERNAL = ("http_", "amqp_", "mqtt_")


class MqttComponent(Component):
    def create_endpoint(self, uri: EndpointUri, context: IntegrationContext) -> Endpoint:
        return _MqttEndpoint(uri, context)


class _MqttEndpoint(Endpoint):
    def __init__(self, uri: EndpointUri, context: IntegrationContext) -> None:
        super().__init__(uri, context)
        self.topic = uri.path
        if not _valid_topic(self.topic):
            raise EndpointError(f"{uri.text}: write mqtt:TOPIC, e.g. mqtt:sensors/+/temperature")
        options = Options(uri)
        self.broker_url = options.text("broker_url")
        self.qos = options.integer("qos", 1, minimum=0, maximum=2)
        default_id = "meshgate-" + socket.gethostname() + "-" + re.sub(r"[^\w-]", "_", self.topic)
        self.client_id = options.text("client_id") or default_id
        self.clean_session = options.boolean("clean_session", False)
        self.session_expiry = options.duration("session_expiry", 3600.0)
        self.reconnect_delay = options.duration("reconnect_delay", 1.0)
        self.retain = options.boolean("retain", False)
        options.finish()

    @property
    def url(self) -> str:
        return self.broker_url or str(self.context.settings.get("mqtt_url", DEFAULT_URL))

    def client(self, identifier: str | None, persistent: bool) -> Any:
        """An aiomqtt client of the broker, not yet connected."""
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
            raise EndpointError(f"{self.uri.text}: the broker URL must be mqtt://host:port")
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = int(self.session_expiry) if persistent else 0
        return aiomqtt.Client(
            parts.hostname,
            parts.port or 1883,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            identifier=identifier,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=not persistent,
            properties=properties,
            timeout=10,
        )

    async def connect(self, client: Any) -> None:
        try:
            await client.__aenter__()
        except Exception as exc:
            shown = self.url.split("@")[-1]
            raise IntegrationError(f"mqtt: cannot connect to {shown}: {exc}") from None

    def create_consumer(self, processor: Processor) -> Consumer:
        return _MqttConsumer(self, processor)

    def create_producer(self) -> Producer:
        if "+" in self.topic or "#" in self.topic:
            raise EndpointError(f"{self.uri.text}: cannot publish to a wildcard topic")
        return _MqttProducer(self)


def _valid_topic(topic: str) -> bool:
    """A topic filter: ``+`` stands for a whole level, ``#`` for the last one only."""
    levels = topic.split("/")
    wild = [level for level in levels if "+" in level or "#" in level]
    return bool(topic) and all(level in ("+", "#") for level in wild) and "#" not in levels[:-1]


class _MqttConsumer(Consumer):
    endpoint: _MqttEndpoint

    def __init__(self, endpoint: Endpoint, processor: Processor) -> None:
        super().__init__(endpoint, processor)
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None
        self._idle = False
        self._stopping = False
        self._duplicates: dict[int, bool] = {}

    async def start(self) -> None:
        self._stopping = False
        await self._connect()
        self._task = asyncio.create_task(self._run(), name=f"mqtt consumer {self.endpoint.uri}")

    async def _connect(self) -> None:
        endpoint = self.endpoint
        client = endpoint.client(endpoint.client_id, persistent=not endpoint.clean_session)
        # aiomqtt has no manual acknowledgement of its own: paho's, under it, sends PUBACK.
        client._client.manual_ack_set(True)
        # Nor does it keep the DUP flag (a resend of an unacknowledged message): noted here.
        self._duplicates.clear()
        queue_message = client._client.on_message

        def on_message(paho: Any, userdata: Any, message: Any) -> None:
            if message.qos > 0:
                self._duplicates[message.mid] = bool(message.dup)
            queue_message(paho, userdata, message)

        client._client.on_message = on_message
        await endpoint.connect(client)
        self._client = client
        await client.subscribe(endpoint.topic, qos=endpoint.qos)

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.__aexit__(None, None, None)
            except Exception as exc:
                log.debug("%s: disconnect failed: %s", self.endpoint.uri.text, exc)

    async def _run(self) -> None:
        endpoint = self.endpoint
        while not self._stopping:
            if self._client is None:
                try:
                    await self._connect()
                except Exception as exc:
                    log.warning("%s: %s; retrying", endpoint.uri.text, exc)
                    await self._disconnect()
                    self._idle = True
                    try:
                        await asyncio.sleep(endpoint.reconnect_delay)
                    finally:
                        self._idle = False
                    continue
            try:
                self._idle = True
                try:
                    incoming = await anext(aiter(self._client.messages))
                finally:
                    self._idle = False
                acknowledged = await self._deliver(incoming)
            except Exception as exc:
                log.warning("%s: connection lost (%s); reconnecting", endpoint.uri.text, exc)
                acknowledged = False
            if not acknowledged:
                # The broker resends what this session left unacknowledged when it reconnects.
                await self._disconnect()
                if not self._stopping:
                    self._idle = True
                    try:
                        await asyncio.sleep(endpoint.reconnect_delay)
                    finally:
                        self._idle = False

    async def _deliver(self, incoming: Any) -> bool:
        exchange = _exchange_of(incoming)
        exchange.properties["redelivered"] = self._duplicates.pop(incoming.mid, False)
        try:
            await self.processor(exchange)
        except Exception as exc:
            exchange.exception = exc
        if exchange.exception is not None:
            log.warning(
                "%s: message on %s failed (%s); redelivered when the session reconnects",
                self.endpoint.uri.text,
                incoming.topic,
                exchange.exception,
            )
            return False
        if incoming.qos > 0:
            self._client._client.ack(incoming.mid, incoming.qos)
        return True

    async def stop(self) -> None:
        self._stopping = True
        try:
            if self._task is not None:
                if self._idle:
                    self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        finally:
            # Cancelled (the drain deadline), the message in flight stays unacknowledged:
            # the broker resends it when the session reconnects.
            self._task = None
            await self._disconnect()


def _exchange_of(incoming: Any) -> Exchange:
    headers: dict[str, Any] = {}
    properties = incoming.properties
    for name, value in getattr(properties, "UserProperty", None) or ():
        headers[name] = value
    content_type = getattr(properties, "ContentType", None)
    if content_type:
        headers["content-type"] = content_type
    headers["mqtt_topic"] = str(incoming.topic)
    headers["mqtt_qos"] = incoming.qos
    headers["mqtt_retain"] = bool(incoming.retain)
    return Exchange(Message(incoming.payload, headers), ExchangePattern.IN_ONLY)


class _MqttProducer(Producer):
    endpoint: _MqttEndpoint

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__(endpoint)
        self._client: Any = None

    async def start(self) -> None:
        client = self.endpoint.client(None, persistent=False)
        await self.endpoint.connect(client)
        self._client = client

    async def process(self, exchange: Exchange) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        if self._client is None:
            raise IntegrationError(f"{self.endpoint.uri.text}: the producer is not started")
        message = exchange.message
        properties = Properties(PacketTypes.PUBLISH)
        user: list[tuple[str, str]] = []
        for name, value in message.headers.items():
            if name.lower().startswith(_INTERNAL) or name.lower() == "content-type":
                continue
            if isinstance(value, str | int | float | bool):
                user.append((name, str(value)))
        if user:
            properties.UserProperty = user
        content_type = message.headers.get("content-type")
        if content_type is None and not isinstance(message.body, bytes | str | None):
            content_type = "application/json"
        if content_type is not None:
            properties.ContentType = str(content_type)
        endpoint = self.endpoint
        # With QoS 1 or 2 this returns once the broker acknowledged the message.
        await self._client.publish(
            endpoint.topic,
            message.body_bytes(),
            qos=endpoint.qos,
            retain=endpoint.retain,
            properties=properties,
        )

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.__aexit__(None, None, None)
