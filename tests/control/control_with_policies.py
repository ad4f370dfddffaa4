"""Run a control plane that knows the gateways' policies, as ``meshgate control`` should:
``python control_with_policies.py DATABASE_URL HOST:PORT TOKEN``."""

from __future__ import annotations

import logging
import sys

from meshgate.control import ControlSettings
from meshgate.control._runner import run_control
from meshgate.policies import schemas

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    url, listen, token = sys.argv[1:4]
    run_control(
        ControlSettings(
            database_url=url, listen=listen, admin_token=token, policy_schemas=schemas()
        )
    )
