"""A workload's identity on the data plane: its X.509-SVID, private key and trust bundle.

Shared by the sidecar (mTLS between sidecars, consumer tokens checked) and the edge gateway
(its calls into the mesh authenticated, consumer tokens signed). Imports the engine and
``config`` only, never a role or the control plane.

- :class:`Material` is one issued identity: the certificate chain (leaf first), the private
  key and the trust bundle (one or more roots: two while a root replaces another).
- :class:`Identity` holds the current material and hands out TLS contexts made from it; a
  renewal or a new bundle swaps them for new connections (open ones keep theirs) and tells
  every listener.
- :func:`peer_id` reads the SPIFFE ID a verified peer certificate names.
- :class:`IdentityClient` obtains the identity from the control plane's CA (a bootstrap
  token, then renewals at half life) and follows the trust bundle.
"""

from meshgate.identity._client import IdentityClient, IdentityRefused
from meshgate.identity._files import load_identity
from meshgate.identity._material import Identity, IdentityError, Material, peer_id

__all__ = [
    "Identity",
    "IdentityClient",
    "IdentityError",
    "IdentityRefused",
    "Material",
    "load_identity",
    "peer_id",
]
