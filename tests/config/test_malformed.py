"""Hostile and malformed input: each is a ConfigError with a clear message, quickly."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from config_cases import EXAMPLE, example

from meshgate.config import ConfigError, load_config, parse_config
from meshgate.config.loader import MAX_BYTES, MAX_DEPTH, MAX_NODES


def error_of(text: str | bytes) -> str:
    """The single error line parse_config reports for text."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "gw.yaml")
    assert len(info.value.errors) == 1, info.value.errors
    return info.value.errors[0]


def file_error(path: Path | str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert str(info.value) == f"{path}: {info.value.errors[0]}"
    return info.value.errors[0]


@contextmanager
def within(seconds: float) -> Iterator[None]:
    start = time.perf_counter()
    yield
    assert time.perf_counter() - start < seconds


def test_file_not_found(tmp_path: Path) -> None:
    assert file_error(tmp_path / "missing.yaml") == "file not found"


def test_directory(tmp_path: Path) -> None:
    assert file_error(tmp_path) == "is a directory, not a file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.yaml"
    path.write_text(EXAMPLE)
    path.chmod(0)
    assert file_error(path) == "permission denied: the file is not readable"


def test_unreadable_file_whoever_runs_the_tests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    assert file_error(tmp_path / "gw.yaml") == "permission denied: the file is not readable"


def test_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    with within(2):
        assert file_error(fifo) == "is not a regular file"


def test_symlink_loop(tmp_path: Path) -> None:
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    assert file_error(loop).startswith("cannot open: ")


def test_file_over_the_size_limit_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    with path.open("wb") as f:
        f.truncate(MAX_BYTES + 1)  # sparse: NUL bytes that parsing would reject differently
    with within(1):
        assert file_error(path) == f"too large: {MAX_BYTES + 1} bytes, the limit is 8 MiB"


def test_file_at_the_size_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "blank.yaml"
    path.write_bytes(b" " * MAX_BYTES)
    assert file_error(path) == "the configuration is empty"


def test_text_over_the_size_limit_is_refused() -> None:
    with within(1):
        assert error_of("#" * (MAX_BYTES + 1)).startswith("too large: ")
        assert error_of(b"#" * (MAX_BYTES + 1)).startswith("too large: ")
        # Counted in UTF-8 bytes, not characters.
        assert error_of("#" + "é" * (MAX_BYTES // 2)).startswith("too large: ")


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"listen: \xff\n", "not UTF-8 text: byte 0xff on line 1"),
        (b"listen: a\nproducts: \xc3(\n", "not UTF-8 text: byte 0xc3 on line 2"),
        ("listen: a\n".encode("utf-16"), "not UTF-8 text: byte 0xff on line 1"),
    ],
)
def test_not_utf8(data: bytes, error: str) -> None:
    assert error_of(data) == error


def test_utf8_byte_order_mark_is_accepted() -> None:
    assert parse_config(b"\xef\xbb\xbf" + EXAMPLE.encode()) == parse_config(EXAMPLE)
    assert parse_config("\ufeff" + EXAMPLE) == parse_config(EXAMPLE)


@pytest.mark.parametrize("text", ["", "   \n\n\t", "# only a comment\n", "---\n", b"", b"\n"])
def test_empty(text: str | bytes) -> None:
    assert error_of(text) == "the configuration is empty"


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("- listen: a\n", "a list"),
        ("just text\n", "a string"),
        ("8080\n", "a number"),
        ("true\n", "a boolean"),
        ("2024-01-01\n", "a date"),
        ("[]", "a list"),
    ],
)
def test_top_level_not_a_mapping(text: str, kind: str) -> None:
    assert error_of(text) == f"top level: must be a mapping, got {kind}"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("listen: a: b\n", "line 1, column 10: mapping values are not allowed here"),
        (
            "listen: [1, 2\nproducts: x\n",
            "line 2, column 9: expected ',' or ']', but got ':' "
            "(while parsing a flow sequence at line 1, column 9)",
        ),
        (
            "products:\n\t- name: x\n",
            "line 2, column 1: found character '\\t' that cannot start any token "
            "(while scanning for the next token)",
        ),
        (
            "listen: 'open\n",
            "line 2, column 1: found unexpected end of stream "
            "(while scanning a quoted scalar at line 1, column 9)",
        ),
        (
            "limits:\n  backend: memory\n bogus: 1\n",
            "line 3, column 2: expected <block end>, but found '<block mapping start>' "
            "(while parsing a block mapping at line 1, column 1)",
        ),
        (
            "a: 1\n---\nb: 2\n",
            "line 2, column 1: but found another document "
            "(expected a single document in the stream at line 1, column 1)",
        ),
        ("listen: *nowhere\n", "line 1, column 9: found undefined alias 'nowhere'"),
        ("listen: a\x00b\n", "line 1, column 10: character U+0000 is not allowed in YAML"),
        ("listen: a\x1bb\n", "line 1, column 10: character U+001B is not allowed in YAML"),
    ],
)
def test_yaml_syntax_errors_give_line_and_column(text: str, error: str) -> None:
    assert error_of(text) == error


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "listen: a\nadmin_listen: b\nlisten: c\n",
            "line 3, column 1: duplicate key 'listen' (first on line 1)",
        ),
        (
            "limits:\n  backend: memory\n  'backend': redis\n",
            "line 3, column 3: duplicate key 'backend' (first on line 2)",
        ),
        ("{listen: a, listen: a}", "line 1, column 13: duplicate key 'listen' (first on line 1)"),
        (
            EXAMPLE.replace("    backend: http", "    name: again\n    backend: http"),
            "line 9, column 5: duplicate key 'name' (first on line 6)",
        ),
    ],
)
def test_duplicate_keys_are_refused(text: str, error: str) -> None:
    assert error_of(text) == error


def test_merge_keys_may_be_overridden_without_a_duplicate_error() -> None:
    text = "limits:\n  <<: {backend: memory, key_prefix: a}\n  key_prefix: b\n"
    config = parse_config(text)
    assert (config.limits.backend, config.limits.key_prefix) == ("memory", "b")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("yes: 1\n", "line 1, column 1: key 'yes' is not a string; put it in quotes"),
        ("listen: a\n8080: b\n", "line 2, column 1: key '8080' is not a string; put it in quotes"),
        ("~: a\n", "line 1, column 1: key '~' is not a string; put it in quotes"),
        ("? [a]\n: 1\n", "line 1, column 3: keys must be strings, not lists or mappings"),
        ("{[a]: 1}", "line 1, column 2: keys must be strings, not lists or mappings"),
        ("limits:\n  <<: {1: a}\n", "line 2, column 8: key '1' is not a string; put it in quotes"),
    ],
)
def test_keys_must_be_strings(text: str, error: str) -> None:
    assert error_of(text) == error


def test_quoted_keys_that_look_like_other_types_are_strings() -> None:
    text = "limits:\n  'backend': memory\n'access_log': false\n"
    assert parse_config(text).access_log is False


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "listen: !!python/object/apply:os.system ['touch {marker}']\n",
            "line 1, column 9: YAML tag '!!python/object/apply:os.system' is not allowed",
        ),
        (
            "!!python/object/new:os.system ['touch {marker}']\n",
            "line 1, column 1: YAML tag '!!python/object/new:os.system' is not allowed",
        ),
        (
            "listen: !!python/name:os.system\n",
            "line 1, column 9: YAML tag '!!python/name:os.system' is not allowed",
        ),
        ("listen: !Ref other\n", "line 1, column 9: YAML tag '!Ref' is not allowed"),
    ],
)
def test_python_and_custom_tags_are_refused(tmp_path: Path, text: str, error: str) -> None:
    marker = tmp_path / "ran"
    assert error_of(text.format(marker=marker)) == error
    assert not marker.exists()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "listen: 2024-13-45\n",
            "line 1, column 9: invalid !!timestamp value: month must be in 1..12",
        ),
        (
            "limits: {redis_timeout: !!float x}\n",
            "line 1, column 25: invalid !!float value: could not convert string to float: 'x'",
        ),
    ],
)
def test_values_yaml_cannot_build_are_errors_with_a_line(text: str, error: str) -> None:
    assert error_of(text) == error


def test_huge_integer_is_an_error() -> None:
    error = error_of("upstream_keepalive: " + "9" * 5000 + "\n")
    assert error.startswith("line 1, column 21: invalid !!int value: ")


def test_billion_laughs_is_refused_quickly() -> None:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, 9):
        name, prev = chr(ord("a") + level), chr(ord("a") + level - 1)
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    with within(1):
        error = error_of("\n".join(lines) + "\n")
    assert error == f"line 7, column 4: more than {MAX_NODES} values once aliases are expanded"


def test_aliases_within_the_limits_are_allowed() -> None:
    text = """
products:
  - name: a
    backend: http://127.0.0.1:9001
    auth: &auth {type: api_key, header: X-Key}
    plans: &plans
      - name: basic
        limits: [{metric: hits, period: day, value: 10}]
  - name: b
    backend: http://127.0.0.1:9002
    auth: *auth
    plans: *plans
"""
    a, b = parse_config(text).products
    assert (a.auth, a.plans) == (b.auth, b.plans)


def test_recursive_alias_is_refused() -> None:
    assert error_of("a: &x [*x]\n") == "line 1, column 4: an alias refers to its own ancestor"
    assert error_of("a: &x {b: *x}\n") == "line 1, column 4: an alias refers to its own ancestor"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        # The error points at the first node past the limit.
        ("[" * 100_000, f"line 1, column {MAX_DEPTH + 1}: "),
        ("{a: " * 100_000, f"line 1, column {4 * (MAX_DEPTH - 1) + 2}: "),
        ("- " * 10_000 + "x\n", f"line 1, column {2 * MAX_DEPTH + 1}: "),
        ("".join("  " * i + f"k{i}:\n" for i in range(500)), f"line {MAX_DEPTH}, column 127: "),
    ],
    ids=["flow lists", "flow mappings", "block lists", "block mappings"],
)
def test_deep_nesting_is_refused_quickly(text: str, error: str) -> None:
    with within(2):
        assert error_of(text) == f"{error}nested deeper than {MAX_DEPTH} levels"


def test_nesting_through_aliases_is_refused() -> None:
    deep = "[" * 40 + "]" * 40
    text = f"a: &a {deep}\nb: {'[' * 30}*a{']' * 30}\n"
    error = error_of(text)
    assert error.endswith(f"nested deeper than {MAX_DEPTH} levels once aliases are expanded")


def test_nesting_at_the_limit_is_fine() -> None:
    # The top-level mapping is one level; a list nested to the limit under it.
    text = "listen: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n"
    assert error_of(text) == "listen: must be a string"


def test_json_and_yaml_agree_on_the_nesting_limit() -> None:
    def nested(levels: int) -> str:
        return '{"listen": ' + "[" * levels + "]" * levels + "}"

    assert error_of(nested(MAX_DEPTH - 1)) == "listen: must be a string"
    assert error_of(nested(MAX_DEPTH)) == (
        f"line 1, column {11 + MAX_DEPTH}: nested deeper than {MAX_DEPTH} levels"
    )


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            '{"listen": "a", "listen": "b"}',
            "line 1, column 17: duplicate key 'listen' (first on line 1)",
        ),
        (
            '{"limits": {"backend": "memory",\n "backend": "redis"}}',
            "line 2, column 2: duplicate key 'backend' (first on line 1)",
        ),
        (
            '{"listen": "a"\n',
            "line 2, column 1: expected ',' or '}', but got '<stream end>' "
            "(while parsing a flow mapping at line 1, column 1)",
        ),
        ('{"timeouts": {"client_body": NaN}}', "timeouts.client_body: must be a number"),
        ('{"timeouts": {"client_body": Infinity}}', "timeouts.client_body: must be a number"),
        ('{"timeouts": {"client_body": 1e999}}', "timeouts.client_body: must be a finite number"),
    ],
)
def test_json_problems_are_reported_like_yaml_ones(text: str, error: str) -> None:
    assert error_of(text) == error


def test_json_escapes_that_yaml_lacks() -> None:
    assert parse_config('{"limits": {"key_prefix": "a\\/b"}}').limits.key_prefix == "a/b"


def test_large_json_snapshot_loads_quickly() -> None:
    data = example()
    data["products"] = [dict(data["products"][0], name=f"p{i}") for i in range(2000)]
    with within(3):
        assert len(parse_config(json.dumps(data)).products) == 2000
