"""meshgate: API management, service mesh and enterprise integration in one platform."""

__version__ = "0.1.0"
