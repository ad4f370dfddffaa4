"""The limit periods' calendar windows, kept in ``config`` (the control plane reads them too)."""

from meshgate.config.periods import PERIODS as PERIODS
from meshgate.config.periods import window as window

__all__ = ["PERIODS", "window"]
