"""Data formats for ``marshal`` (data to bytes) and ``unmarshal`` (bytes to data).

Parsers refuse hostile input with a :class:`PayloadError`: XML entities and DTDs (no
billion laughs, no external entities), JSON's NaN, and nesting deeper than Python's stack.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Mapping
from typing import Any
from xml.parsers.expat import ExpatError

import xmltodict

from meshgate.integration._errors import PayloadError
from meshgate.integration._message import Message

__all__ = ["FORMAT_OPTIONS", "FORMATS", "marshal", "unmarshal"]

FORMATS = ("json", "xml", "csv")
#: The options each format takes, with their types.
FORMAT_OPTIONS: Mapping[str, Mapping[str, type]] = {
    "json": {"pretty": bool},
    "xml": {"root": str, "pretty": bool},
    "csv": {"delimiter": str, "header": bool},
}
_CONTENT_TYPES = {"json": "application/json", "xml": "application/xml", "csv": "text/csv"}


def unmarshal(message: Message, fmt: str, options: Mapping[str, Any]) -> Any:
    raw = message.body
    if raw is None:
        raise PayloadError(f"cannot unmarshal {fmt}: the body is empty")
    if not isinstance(raw, bytes | str):
        # Already data: unmarshalling twice is a route mistake worth naming.
        raise PayloadError(f"cannot unmarshal {fmt}: the body is {type(raw).__name__}, not text")
    if fmt == "json":
        return _json_loads(raw)
    if fmt == "xml":
        return _xml_loads(raw)
    return _csv_loads(raw, options)


def marshal(message: Message, fmt: str, options: Mapping[str, Any]) -> bytes:
    body = message.body
    if fmt == "json":
        try:
            indent = 2 if options.get("pretty") else None
            separators = None if indent else (",", ":")
            data = json.dumps(body, ensure_ascii=False, indent=indent, separators=separators)
        except (TypeError, ValueError, RecursionError) as exc:
            raise PayloadError(f"cannot marshal to json: {exc}") from None
        out = data.encode()
    elif fmt == "xml":
        out = _xml_dumps(body, options)
    else:
        out = _csv_dumps(body, options)
    message.headers["content-type"] = _CONTENT_TYPES[fmt]
    return out


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


# One decoder for every message: json.loads with an option builds a new one per call.
_JSON_DECODER = json.JSONDecoder(parse_constant=_not_json)


def _json_loads(raw: bytes | str) -> Any:
    try:
        if isinstance(raw, bytes):
            # utf-8-sig's decoder is written in Python: strip the BOM, decode in C.
            text = (raw[3:] if raw.startswith(codecs.BOM_UTF8) else raw).decode()
        else:
            text = raw
        return _JSON_DECODER.decode(text)
    except UnicodeDecodeError as exc:
        raise PayloadError(f"malformed JSON: not UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise PayloadError(
            f"malformed JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    except ValueError as exc:
        raise PayloadError(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise PayloadError("malformed JSON: nested too deeply") from None


def _xml_loads(raw: bytes | str) -> Any:
    try:
        # xmltodict refuses entity declarations (disable_entities defaults to true).
        return xmltodict.parse(raw, disable_entities=True)
    except ExpatError as exc:
        raise PayloadError(f"malformed XML: {exc}") from None
    except ValueError as exc:
        raise PayloadError(f"refused XML: {exc}") from None


def _xml_dumps(body: Any, options: Mapping[str, Any]) -> bytes:
    root = options.get("root")
    if root is not None:
        body = {root: body}
    if not isinstance(body, dict) or len(body) != 1:
        raise PayloadError(
            "cannot marshal to xml: the body must be a mapping with one root element"
            " (or give the root option)"
        )
    try:
        text = xmltodict.unparse(body, pretty=bool(options.get("pretty")))
    except (ValueError, TypeError, RecursionError) as exc:
        raise PayloadError(f"cannot marshal to xml: {exc}") from None
    return text.encode()


def _csv_loads(raw: bytes | str, options: Mapping[str, Any]) -> list[Any]:
    try:
        if isinstance(raw, bytes):
            # utf-8-sig's decoder is written in Python: strip the BOM, decode in C.
            text = (raw[3:] if raw.startswith(codecs.BOM_UTF8) else raw).decode()
        else:
            text = raw
    except UnicodeDecodeError as exc:
        raise PayloadError(f"malformed CSV: not UTF-8 (byte {exc.start})") from None
    delimiter = options.get("delimiter", ",")
    try:
        if options.get("header", True):
            reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
            rows: list[Any] = []
            for row in reader:
                if None in row:
                    raise PayloadError(
                        f"malformed CSV: line {reader.line_num} has more fields than the header"
                    )
                rows.append(row)
            return rows
        return list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    except csv.Error as exc:
        raise PayloadError(f"malformed CSV: {exc}") from None


def _csv_dumps(body: Any, options: Mapping[str, Any]) -> bytes:
    if not isinstance(body, list):
        raise PayloadError(f"cannot marshal to csv: the body must be a list, not {_kind(body)}")
    out = io.StringIO()
    delimiter = options.get("delimiter", ",")
    if body and all(isinstance(row, dict) for row in body):
        fields = list(dict.fromkeys(key for row in body for key in row))
        writer = csv.DictWriter(out, fields, delimiter=delimiter, lineterminator="\r\n")
        if options.get("header", True):
            writer.writeheader()
        writer.writerows(body)
    elif all(isinstance(row, list | tuple) for row in body):
        csv.writer(out, delimiter=delimiter, lineterminator="\r\n").writerows(body)
    else:
        raise PayloadError("cannot marshal to csv: rows must be all mappings or all lists")
    return out.getvalue().encode()


def _kind(value: Any) -> str:
    return type(value).__name__
