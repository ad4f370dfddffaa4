"""The sidecar process itself: ``meshgate sidecar`` checks its arguments, then becomes this.

The command line's parser (typer, rich) is not worth its megabytes beside every instance:
once the arguments are checked, the process executes itself again as ``python -m
meshgate.mesh`` with them in ``MESHGATE_SIDECAR`` (JSON, in the environment rather than on
the command line, since it may hold the control plane token), and imports only the sidecar.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from meshgate.config.mesh import ConfigError, SidecarSettings, load_mesh
from meshgate.mesh._sidecar import ControlPlaneSettings, SidecarStartError, run_sidecar

ENV = "MESHGATE_SIDECAR"


def main() -> int:
    raw = os.environ.pop(ENV, None)
    if raw is None:
        print("error: start the sidecar with `meshgate sidecar`", file=sys.stderr)
        return 2
    args = json.loads(raw)
    logging.basicConfig(
        level=args.get("log_level", "INFO"),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = SidecarSettings.model_validate(args["settings"])
    config = None
    path = Path(args["config_path"]) if args.get("config_path") else None
    cp = args.get("control_plane")
    try:
        if path is not None:
            config = load_mesh(path, sidecar=args["settings"])
        return run_sidecar(
            settings,
            config=config,
            config_path=path,
            control_plane=ControlPlaneSettings(**cp) if cp else None,
            app_command=args.get("app_command") or None,
        )
    except (ConfigError, SidecarStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
