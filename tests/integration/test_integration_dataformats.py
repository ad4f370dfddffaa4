"""marshal / unmarshal: json, xml and csv, and refusing malformed and hostile payloads."""

from __future__ import annotations

import pytest

from meshgate.integration import Message, PayloadError
from meshgate.integration._dataformats import marshal, unmarshal


def load(body: object, fmt: str, **options: object) -> object:
    return unmarshal(Message(body), fmt, options)


def dump(body: object, fmt: str, **options: object) -> bytes:
    return marshal(Message(body), fmt, options)


def test_json_round_trip_and_content_type() -> None:
    message = Message({"id": "é", "n": [1, 2]})
    data = marshal(message, "json", {})
    assert data == '{"id":"é","n":[1,2]}'.encode()
    assert message.headers["content-type"] == "application/json"
    assert load(data, "json") == {"id": "é", "n": [1, 2]}
    assert load("\ufeff[1]".encode(), "json") == [1]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"id": 1', "malformed JSON: Expecting ',' delimiter at line 1, column 9"),
        (b"NaN", "malformed JSON: NaN is not JSON"),
        (b"\xff\xfe", "malformed JSON: not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "malformed JSON: nested too deeply"),
        (b"", "malformed JSON: Expecting value"),
    ],
)
def test_malformed_json_is_a_payload_error(raw: bytes, message: str) -> None:
    with pytest.raises(PayloadError) as caught:
        load(raw, "json")
    assert str(caught.value).startswith(message)


def test_unmarshalling_data_twice_names_the_mistake() -> None:
    with pytest.raises(PayloadError, match="the body is dict, not text"):
        load({"a": 1}, "json")
    with pytest.raises(PayloadError, match="the body is empty"):
        load(None, "json")


def test_xml_round_trip() -> None:
    data = dump({"order": {"id": "1", "item": ["a", "b"]}}, "xml")
    assert b"<order><id>1</id><item>a</item><item>b</item></order>" in data
    assert load(data, "xml") == {"order": {"id": "1", "item": ["a", "b"]}}
    assert b"<list><x>1</x></list>" in dump({"x": "1"}, "xml", root="list")


def test_xml_bombs_and_external_entities_are_refused() -> None:
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]>'
        b"<l>&c;</l>"
    )
    with pytest.raises(PayloadError, match="refused XML: entities are disabled"):
        load(bomb, "xml")
    xxe = b'<!DOCTYPE f [<!ENTITY x SYSTEM "file:///etc/passwd">]><f>&x;</f>'
    with pytest.raises(PayloadError, match="refused XML"):
        load(xxe, "xml")


def test_malformed_xml_is_a_payload_error() -> None:
    with pytest.raises(PayloadError, match="malformed XML: mismatched tag"):
        load(b"<a><b></a>", "xml")
    with pytest.raises(PayloadError, match="cannot marshal to xml: the body must be a mapping"):
        dump([1, 2], "xml")


def test_csv_with_and_without_header() -> None:
    text = "id;name\r\n1;a\r\n2;b\r\n"
    assert load(text, "csv", delimiter=";") == [{"id": "1", "name": "a"}, {"id": "2", "name": "b"}]
    assert load(text, "csv", delimiter=";", header=False)[0] == ["id", "name"]
    rows = [{"id": 1, "name": "a"}, {"id": 2, "name": "b,c"}]
    assert dump(rows, "csv") == b'id,name\r\n1,a\r\n2,"b,c"\r\n'
    assert dump([[1, 2], [3, 4]], "csv") == b"1,2\r\n3,4\r\n"


def test_malformed_csv_is_a_payload_error() -> None:
    with pytest.raises(PayloadError, match="line 3 has more fields than the header"):
        load("a,b\r\n1,2\r\n1,2,3\r\n", "csv")
    with pytest.raises(PayloadError, match="malformed CSV: field larger than field limit"):
        load("a\r\n" + "x" * 200_000, "csv")
    with pytest.raises(PayloadError, match="the body must be a list"):
        dump({"a": 1}, "csv")
    with pytest.raises(PayloadError, match="rows must be all mappings or all lists"):
        dump([{"a": 1}, [1]], "csv")
