"""Rewrite the route path with regular expressions (APIcast ``url_rewriting``).

Commands run in order on ``exchange.route_path`` (the path after the product's prefix,
without the query, which is kept as is). Each replaces the first match (``re.sub`` with
``count=1``, APIcast's ``sub``), or every match with ``global: true`` (``gsub``). The
replacement uses Python syntax: ``\\1`` or ``\\g<name>`` for groups. ``break: true``
stops after a command that matched; ``methods`` limits a command to those methods. A
result that does not start with ``/`` gets one. Runs in the rewrite phase, so mapping
rules and usage see the rewritten path.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from meshgate.policies._base import Policy, PolicyConfig
from meshgate.proxy import Exchange, Response

__all__ = ["RewriteCommand", "UrlRewriteConfig", "UrlRewritePolicy"]

_NOT_IN_A_PATH = re.compile(r"[^\x21-\x7e]")

Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"]


class RewriteCommand(PolicyConfig):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    regex: str = Field(min_length=1, description="Python regular expression, searched in the path.")
    replace: str = Field(
        description=r"Replacement; \1 or \g<name> insert groups.",
        json_schema_extra={"pattern": r"^[\x21-\x7e]*$"},
    )
    break_: bool = Field(False, alias="break", description="Stop after this command if it matched.")
    global_: bool = Field(
        False, alias="global", description="Replace every match, not only the first."
    )
    methods: list[Method] | None = Field(
        None, min_length=1, description="Apply only to these methods; unset means all."
    )

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _replacement(self) -> RewriteCommand:
        regex = re.compile(self.regex)
        # The same groups, each matching nothing: what the replacement itself puts in a path.
        names = {index: name for name, index in regex.groupindex.items()}
        groups = "".join(
            f"(?P<{names[i]}>)" if i in names else "()" for i in range(1, regex.groups + 1)
        )
        try:
            literal = re.compile(groups).sub(self.replace, "", count=1)
        except (re.error, IndexError) as exc:
            raise ValueError(f"invalid replacement {self.replace!r}: {exc}") from None
        if _NOT_IN_A_PATH.search(literal):
            # Written into the upstream request line: a space or CR/LF would split it.
            raise ValueError(
                f"invalid replacement {self.replace!r}: it puts spaces, control characters "
                "or non-ASCII characters in the path (percent-encode them)"
            )
        return self


class UrlRewriteConfig(PolicyConfig):
    commands: list[RewriteCommand] = Field(min_length=1, description="Applied in order.")


class UrlRewritePolicy(Policy):
    """Rewrite ``exchange.route_path`` before authentication and mapping rules."""

    name: ClassVar[str] = "url_rewrite"
    Config: ClassVar[type[PolicyConfig]] = UrlRewriteConfig

    def __init__(self, config: UrlRewriteConfig) -> None:
        super().__init__(config)
        self._commands = tuple(
            (
                re.compile(c.regex),
                c.replace,
                0 if c.global_ else 1,
                c.break_,
                None if c.methods is None else frozenset(c.methods),
            )
            for c in config.commands
        )

    def rewrite(self, exchange: Exchange) -> Response | None:
        method = exchange.request.method
        path = exchange.route_path
        for pattern, replace, count, stop, methods in self._commands:
            if methods is not None and method not in methods:
                continue
            path, matched = pattern.subn(replace, path, count=count)
            if matched and stop:
                break
        if not path.startswith("/"):
            path = "/" + path
        exchange.route_path = path
        return None
