"""The gateway's tests reach the mesh's helpers: a gateway in front of a sidecar."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "mesh"))
