"""Properties: garbage only ever raises ConfigError, and valid configurations round-trip."""

from __future__ import annotations

import json
import re
import string
from typing import Any

import yaml
from config_cases import EXAMPLE, POLICIES, example
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshgate.config import PERIODS, Config, ConfigError, parse_config
from meshgate.config.loader import _EXPONENT_FLOAT

# A path and a message, or a message about the whole document; one line either way.
LINE = re.compile(r"^[^\n]*[^\s]$")

YAML_PIECES = [
    "\n", "  ", "- ", ": ", "? ", "{", "}", "[", "]", ",", "'", '"', "#", "&a ", "*a", "&b ",
    "*b", "<<: ", "!!str ", "!!int ", "!!float ", "!!binary ", "!!timestamp ", "!!set ",
    "!!omap ", "!!python/object:os.system ", "!x ", "%YAML 1.1\n", "---\n", "...\n", "|\n",
    ">-\n", "\t", "\\", "~", "null", "yes", "no", "on", ".inf", ".nan", "0x1F", "0o17", "1e3",
    "2024-01-01", "2024-13-45", "12:30:00", "1:20", "products", "listen", "name", "auth",
    "type", "api_key", "plans", "limits", "period", "value", "policies", "cors", "\u00e9",
    "\ufeff", "\x00", "\x85", "\u2028",
]  # fmt: skip

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


def assert_only_config_errors(text: str | bytes, **kwargs: Any) -> None:
    try:
        parse_config(text, **kwargs)
    except ConfigError as exc:
        assert exc.errors
        for line in exc.errors:
            assert LINE.match(line), line
        assert str(exc)


@given(st.text())
def test_random_text(text: str) -> None:
    assert_only_config_errors(text)


@given(st.binary())
def test_random_bytes(data: bytes) -> None:
    assert_only_config_errors(data)


@settings(max_examples=500)
@given(st.lists(st.sampled_from(YAML_PIECES) | st.text(string.printable, max_size=3)))
def test_yaml_shaped_garbage(pieces: list[str]) -> None:
    assert_only_config_errors("".join(pieces), policy_schemas=POLICIES)


@settings(max_examples=500)
@given(st.lists(st.sampled_from(YAML_PIECES), max_size=30), st.integers(0, len(EXAMPLE)))
def test_example_with_garbage_spliced_in(pieces: list[str], at: int) -> None:
    assert_only_config_errors(EXAMPLE[:at] + "".join(pieces) + EXAMPLE[at:])


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


EXAMPLE_PATHS = _paths(example())[1:]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(EXAMPLE_PATHS), JSON_VALUES), min_size=1, max_size=4))
def test_example_with_values_replaced(changes: list[tuple[tuple[Any, ...], Any]]) -> None:
    data = example()
    for path, value in changes:
        target = data
        try:
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed this path
    assert_only_config_errors(json.dumps(data), policy_schemas=POLICIES)
    assert_only_config_errors(yaml.safe_dump(data))


NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
PRINTABLE = st.text(
    string.ascii_letters + string.digits + " -_./:'\"#{}[]&*!|>%@`", min_size=1, max_size=12
)
# What a header name (an RFC 9110 token) and a host name may hold: no spaces or quotes.
TOKENS = st.text(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~", min_size=1, max_size=12)
HOSTS = st.text(string.ascii_letters + string.digits + "-_.*[]:é", min_size=1, max_size=12)


@st.composite
def products(draw: st.DrawFn, name: str) -> dict[str, Any]:
    metrics = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    plans = draw(st.lists(NAMES, max_size=3, unique=True))
    periods = st.lists(st.sampled_from(PERIODS), max_size=3, unique=True)
    plan_list = [
        {
            "name": plan,
            "limits": [
                {
                    "metric": draw(st.sampled_from(metrics)),
                    "period": period,
                    "value": draw(st.integers(0, 10**9)),
                }
                for period in draw(periods)
            ],
        }
        for plan in plans
    ]
    # One limit per (metric, period) within a plan.
    for plan in plan_list:
        seen: set[tuple[str, str]] = set()
        plan["limits"] = [
            lim
            for lim in plan["limits"]
            if (k := (lim["metric"], lim["period"])) not in seen and not seen.add(k)
        ]
    keys = iter(draw(st.lists(PRINTABLE, min_size=8, max_size=8, unique=True)))
    apps = [
        {
            "id": app,
            "plan": draw(st.sampled_from(plans)),
            "keys": [next(keys)],
            "state": draw(st.sampled_from(["live", "suspended"])),
        }
        for app in (draw(st.lists(NAMES, max_size=3, unique=True)) if plans else [])
    ]
    auth = draw(
        st.sampled_from(
            [
                {"type": "api_key", "header": draw(TOKENS)},
                {"type": "app_id_key", "app_id_query": None},
                {
                    "type": "jwt",
                    "audience": [draw(PRINTABLE)],
                    "keys": [{"secret": draw(PRINTABLE)}],
                    "leeway_seconds": draw(st.floats(0, 300)),
                },
                {"type": "none", "default_application": apps[0]["id"]}
                if apps
                else {"type": "api_key"},
            ]
        )
    )
    return {
        "name": name,
        "hosts": draw(st.lists(HOSTS, max_size=3)),
        "path_prefix": "/" + draw(NAMES),
        "backend": f"http://127.0.0.1:{draw(st.integers(1, 65535))}",
        "auth": auth,
        "metrics": [{"name": m, "description": draw(PRINTABLE)} for m in metrics],
        "mapping_rules": [
            {
                "method": draw(st.sampled_from(["GET", "ANY"])),
                "pattern": "/" + draw(PRINTABLE),
                "metric": draw(st.sampled_from(metrics)),
            }
        ],
        "plans": plan_list,
        "policies": [{"cors": {"allow_origins": [draw(PRINTABLE)]}}],
        "applications": apps,
        "upstream_response_timeout": draw(st.none() | st.floats(0.001, 3600)),
    }


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(NAMES, max_size=3, unique=True))
    return {
        "listen": f"0.0.0.0:{draw(st.integers(0, 65535))}",
        "admin_listen": draw(st.none() | st.just("[::1]:9000")),
        "access_log": draw(st.booleans()),
        "limits": {
            "backend": draw(st.sampled_from(["memory", "redis"])),
            "key_prefix": draw(PRINTABLE),
        },
        "products": [draw(products(name)) for name in names],
    }


class _Dumper(yaml.SafeDumper):
    """Quotes strings such as 1e5, which the loader (like YAML 1.2 and JSON) reads as numbers."""


_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def _round_trips(config: Config) -> None:
    dumped = config.model_dump(mode="json")
    assert parse_config(json.dumps(dumped)) == config
    assert parse_config(config.model_dump_json()) == config
    assert parse_config(yaml.dump(dumped, Dumper=_Dumper, allow_unicode=True)) == config
    assert parse_config(json.dumps(dumped), policy_schemas=POLICIES) == config


def test_example_round_trips() -> None:
    _round_trips(parse_config(EXAMPLE))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_valid_configurations_round_trip(data: dict[str, Any]) -> None:
    config = parse_config(json.dumps(data), policy_schemas=POLICIES)
    _round_trips(config)
