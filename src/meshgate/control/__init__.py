"""The control plane: the management model in SQL, its admin API, and the snapshots it
compiles for gateways."""

from meshgate.control._plane import ControlPlane, ControlSettings
from meshgate.control._registry import RegistrySettings
from meshgate.control.app import create_app

__all__ = ["ControlPlane", "ControlSettings", "RegistrySettings", "create_app"]
