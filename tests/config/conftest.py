"""Make the source tree importable when meshgate is not installed."""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import meshgate  # noqa: F401
except ImportError:
    # The package is not installed in this interpreter; test the source tree.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
