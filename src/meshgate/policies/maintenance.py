"""Answer every request with a maintenance notice (APIcast ``maintenance_mode``).

Runs in the rewrite phase, so no credential is needed and no usage is counted. The
answer is ``application/problem+json`` with ``message`` as its detail, and a
``Retry-After`` field when ``retry_after`` is set.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import ClassVar

from pydantic import Field

from meshgate.policies._base import Policy, PolicyConfig
from meshgate.proxy import Exchange, Response, problem

__all__ = ["MaintenanceConfig", "MaintenancePolicy"]


class MaintenanceConfig(PolicyConfig):
    status: int = Field(503, ge=400, le=599, description="Status of the answer.")
    message: str = Field(
        "The service is down for maintenance.", max_length=4096, description="Shown as detail."
    )
    retry_after: int | None = Field(
        None, ge=0, description="Seconds after which clients may retry (Retry-After)."
    )


class MaintenancePolicy(Policy):
    """Answer locally with ``status`` and ``message`` instead of forwarding."""

    name: ClassVar[str] = "maintenance"
    Config: ClassVar[type[PolicyConfig]] = MaintenanceConfig

    def __init__(self, config: MaintenanceConfig) -> None:
        super().__init__(config)
        self._status = config.status
        try:
            self._title = HTTPStatus(config.status).phrase
        except ValueError:
            self._title = "Maintenance"
        self._message = config.message
        self._retry_after = None if config.retry_after is None else str(config.retry_after)

    def rewrite(self, exchange: Exchange) -> Response | None:
        # A fresh answer each time: later response phases edit its headers.
        answer = problem(self._status, self._title, self._message)
        if self._retry_after is not None:
            answer.headers.set("retry-after", self._retry_after)
        return answer
