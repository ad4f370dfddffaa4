"""Mapping rules: which metrics a request counts against (APIcast semantics).

Rules are evaluated in order. A rule matches when its method is the request's (or
``ANY``), its path pattern matches the route-relative path, and its required query
parameters are present. Every matching rule adds its increment to its metric and to all
of that metric's ancestors; a ``last`` rule ends the evaluation. With the product's
``case_insensitive_rules`` the path patterns ignore ASCII case (query requirements do not),
so that an upstream that ignores case cannot be reached past a rule by ``/ADMIN``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple
from urllib.parse import parse_qsl, unquote, unquote_plus

from meshgate.config.model import MappingRule, Product

__all__ = ["MappingRules"]

_WILDCARD = re.compile(r"\{[^{}/]*\}")


class _Rule(NamedTuple):
    match_path: Callable[[str], re.Match[str] | None]
    query: tuple[tuple[str, str | None], ...] | None
    usage: tuple[tuple[str, int], ...]
    last: bool


class MappingRules:
    """A product's mapping rules, compiled once; :meth:`match` runs on every request."""

    __slots__ = ("_by_method", "_any_only")

    def __init__(self, product: Product) -> None:
        parents = {m.name: m.parent for m in product.metrics}
        lineage: dict[str, tuple[str, ...]] = {}
        for name in parents:
            chain: list[str] = []
            cur: str | None = name
            while cur is not None:
                chain.append(cur)
                cur = parents.get(cur)
            lineage[name] = tuple(chain)

        flags = re.IGNORECASE | re.ASCII if product.case_insensitive_rules else 0
        compiled = [
            (r.method, _compile(r, lineage[r.metric], flags)) for r in product.mapping_rules
        ]
        methods = {m for m, _ in compiled if m != "ANY"}
        self._by_method: dict[str, tuple[_Rule, ...]] = {
            method: tuple(rule for m, rule in compiled if m in ("ANY", method))
            for method in methods
        }
        self._any_only = tuple(rule for m, rule in compiled if m == "ANY")

    def match(self, method: str, path: str, query: str) -> dict[str, int] | None:
        """Metric -> total increment for this request, or None when no rule matches.

        ``path`` is decoded, normalized and relative to the product prefix; ``query`` is
        the raw query string without ``?``. A matched metric appears even with increment 0.
        """
        totals: dict[str, int] | None = None
        params: dict[str, str] | None = None
        for match_path, required, usage, last in self._by_method.get(method, self._any_only):
            if match_path(path) is None:
                continue
            if required is not None:
                if params is None:
                    # APIcast compares a repeated parameter's last value; dict() keeps it.
                    params = dict(parse_qsl(query, keep_blank_values=True))
                if not _query_satisfied(required, params):
                    continue
            if totals is None:
                totals = {}
            for metric, increment in usage:
                totals[metric] = totals.get(metric, 0) + increment
            if last:
                break
        return totals


def _query_satisfied(required: tuple[tuple[str, str | None], ...], params: dict[str, str]) -> bool:
    for name, value in required:
        if value is None:
            if name not in params:
                return False
        elif params.get(name) != value:
            return False
    return True


def _compile(rule: MappingRule, lineage: tuple[str, ...], flags: int) -> _Rule:
    pattern = rule.pattern
    exact = pattern.endswith("$")
    if exact:
        pattern = pattern[:-1]
    path, _, query = pattern.partition("?")
    if path.endswith("$"):
        exact, path = True, path[:-1]
    return _Rule(
        match_path=_path_regex(path, exact, flags).match,
        query=_query_requirements(query) if query else None,
        usage=tuple((metric, rule.increment) for metric in lineage),
        last=rule.last,
    )


def _path_regex(path: str, exact: bool, flags: int) -> re.Pattern[str]:
    """One anchored regex for a path pattern, linear-time on any input.

    A wildcard is one non-empty run of non-``/`` characters. Ambiguity only arises
    between several wildcards in one segment (``{a}.{b}.json``); there the earliest
    occurrence of the separating literal is always a valid choice, so it is taken
    atomically and the regex never backtracks into an earlier wildcard.
    """
    literals = [unquote(part) for part in _WILDCARD.split(path)]
    out = [re.escape(literals[0])]
    i = 1
    while i < len(literals):
        run = 1
        while literals[i] == "" and i + 1 < len(literals):
            run, i = run + 1, i + 1  # adjacent wildcards: one run of at least `run` chars
        chars = "[^/]+" if run == 1 else f"[^/]{{{run},}}"
        literal = literals[i]
        in_segment = literal.partition("/")[0]
        if not in_segment:
            out.append(chars + "+")  # possessive: the wildcard ends at the segment's end
            out.append(re.escape(literal))
        elif i + 1 < len(literals) and "/" not in literal:
            out.append(f"(?>{chars}?{re.escape(in_segment)})")
        else:
            # The literal closes the segment, so only one split point can succeed.
            out.append(chars + re.escape(literal))
        i += 1
    if exact:
        out.append(r"\Z")
    elif not path.endswith("/"):
        out.append(r"(?=/|\Z)")
    return re.compile("".join(out), flags)


def _query_requirements(query: str) -> tuple[tuple[str, str | None], ...]:
    """``q={q}&type=full`` -> ``(("q", None), ("type", "full"))``; None means any value."""
    required = []
    for item in query.split("&"):
        if not item:
            continue
        name, has_value, value = item.partition("=")
        any_value = not has_value or _WILDCARD.fullmatch(value) is not None
        required.append((unquote_plus(name), None if any_value else unquote_plus(value)))
    return tuple(required)
