"""The mqtt connector against a real Mosquitto: QoS 1, PUBACK only after the route."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from harness import service_url, unavailable
from integration_kit import (
    dead_lettered_once,
    killed_mid_route_then_restarted,
    redelivered_after_one_failure,
    run_routes,
)

from meshgate.integration import IntegrationContext, from_
from meshgate.integration._errors import EndpointError
from meshgate.integration.testing import mock_endpoint

#: Sessions of the tests' consumers outlive them by this much only.
SESSION = "session_expiry=10s&reconnect_delay=100ms"


@pytest.fixture(scope="session")
def mqtt_url() -> str:
    """Mosquitto (MESHGATE_MQTT_URL); skipped with the reason when it does not answer."""
    import aiomqtt

    url = service_url("MQTT", "mqtt://127.0.0.1:1883")
    parts = urlsplit(url)

    async def probe() -> None:
        async with aiomqtt.Client(parts.hostname or "", parts.port or 1883, timeout=3):
            pass

    try:
        asyncio.run(probe())
    except Exception as error:
        unavailable(f"MQTT broker not reachable at {url}: {error!r}")
    return url


@pytest.fixture
def topic() -> str:
    return f"meshgate-test/{uuid.uuid4().hex[:10]}"


def test_a_route_consumes_transforms_and_publishes(mqtt_url: str, topic: str) -> None:
    routes = [
        from_("direct:in", id="publish").to(f"mqtt:{topic}/in").build(),
        from_(f"mqtt:{topic}/in?{SESSION}", id="transform")
        .unmarshal("json")
        .transform(template='{"total": {{ body.total * 2 }}}')
        .to(f"mqtt:{topic}/out")
        .build(),
        from_(f"mqtt:{topic}/+?{SESSION}&client_id={topic}-out", id="out").to("mock:all").build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        await context.send("direct:in", {"total": 21}, {"tenant": "acme"})
        received = await mock_endpoint(context, "mock:all").wait_for(2)
        by_topic = {message.headers["mqtt_topic"]: message for message in received}
        out = by_topic[f"{topic}/out"]
        assert out.body == b'{"total": 42}'
        assert out.headers["tenant"] == "acme"
        assert out.headers["content-type"] == "application/json"
        assert out.headers["mqtt_qos"] == 1
        assert json.loads(by_topic[f"{topic}/in"].body) == {"total": 21}

    run_routes(routes, scenario, settings={"mqtt_url": mqtt_url})


def test_a_failed_route_is_redelivered_when_the_session_reconnects(
    mqtt_url: str, topic: str
) -> None:
    received = redelivered_after_one_failure(
        f"mqtt:{topic}", f"mqtt:{topic}?{SESSION}", {"mqtt_url": mqtt_url}
    )
    assert received.properties["redelivered"] is True


def test_the_dead_letter_channel_ends_redelivery(mqtt_url: str, topic: str) -> None:
    dead_lettered_once(
        f"mqtt:{topic}/in",
        f"mqtt:{topic}/in?{SESSION}",
        f"mqtt:{topic}/dead",
        f"mqtt:{topic}/dead?{SESSION}",
        {"mqtt_url": mqtt_url},
    )


def test_stopping_drains_the_exchange_in_flight_and_acknowledges_it(
    mqtt_url: str, topic: str
) -> None:
    source = f"mqtt:{topic}?{SESSION}"

    async def main() -> None:
        context = IntegrationContext(settings={"mqtt_url": mqtt_url})
        context.add_routes([from_(source, id="slow").delay("300ms").to("mock:out").build()])
        await context.start()
        await context.send(f"mqtt:{topic}", b"m")
        await asyncio.sleep(0.15)
        await context.stop(grace=5.0)
        assert mock_endpoint(context, "mock:out").bodies == [b"m"]

        again = IntegrationContext(settings={"mqtt_url": mqtt_url})
        again.add_routes([from_(source, id="again").to("mock:again").build()])
        await again.start()
        await asyncio.sleep(0.5)  # the same session: an unacknowledged message would come back
        await again.stop()
        assert mock_endpoint(again, "mock:again").received == []

    asyncio.run(asyncio.wait_for(main(), 30))


def test_bad_uris_are_clear_errors(mqtt_url: str) -> None:
    context = IntegrationContext(settings={"mqtt_url": mqtt_url})
    with pytest.raises(EndpointError, match="unknown option 'prefetch'"):
        context.endpoint("mqtt:orders?prefetch=3")
    with pytest.raises(EndpointError, match="option 'qos' must be between 0 and 2"):
        context.endpoint("mqtt:orders?qos=3")
    with pytest.raises(EndpointError, match="write mqtt:TOPIC"):
        context.endpoint("mqtt:orders/#/all")
    with pytest.raises(EndpointError, match="wildcard"):
        context.endpoint("mqtt:orders/+").create_producer()


def test_a_runtime_killed_mid_route_loses_nothing(
    mqtt_url: str, topic: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "runtime.log"
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        f"""
routes:
  - id: slow
    from: "mqtt:{topic}?{SESSION}&broker_url={mqtt_url}"
    steps:
      - delay: 300ms
      - log: "done {{{{ body }}}}"
"""
    )

    killed_mid_route_then_restarted(routes, log_path, f"mqtt:{topic}", {"mqtt_url": mqtt_url})
    assert log_path.read_text().count("done precious") == 1
