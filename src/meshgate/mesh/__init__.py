"""The sidecar role: a service's calls in and out, through the mesh.

It imports the engine (``meshgate.proxy``) and ``meshgate.config``, never the gateway or
the control plane (a sidecar stays small beside every instance).
"""

from meshgate.mesh._mtls import peer_identity
from meshgate.mesh._sidecar import ControlPlaneSettings, Sidecar, SidecarStartError, run_sidecar

__all__ = ["ControlPlaneSettings", "Sidecar", "SidecarStartError", "peer_identity", "run_sidecar"]
