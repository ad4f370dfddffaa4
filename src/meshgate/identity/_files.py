"""A workload identity read from PEM files."""

from __future__ import annotations

from pathlib import Path

from meshgate.identity._material import Identity, IdentityError, Material

__all__ = ["load_identity"]


def load_identity(cert: str, key: str, bundle: str) -> Identity:
    """The identity in these files; :class:`IdentityError` saying which file is wrong."""
    data = []
    for what, path in (("certificate", cert), ("key", key), ("trust bundle", bundle)):
        try:
            data.append(Path(path).read_bytes())
        except OSError as exc:
            raise IdentityError(
                f"cannot read the identity's {what} {path}: {exc.strerror}"
            ) from None
    try:
        return Identity(Material.from_pem(*data))
    except IdentityError as exc:
        raise IdentityError(f"{cert}: {exc}") from None
