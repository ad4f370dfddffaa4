"""The mesh benchmark's processes: HAProxy and meshgate sidecars configured as a pair of
sidecars would be, and what each of them costs (CPU ticks, resident memory)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.gateway.run import BenchError, Server, free_port, get

# A frontend on a local port and one backend, kept alive and reused across clients, one
# thread, no logging: what the peer of one meshgate sidecar listener does.
HAPROXY_CONFIG = """\
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 300s
frontend listener
  bind 127.0.0.1:{port}
  default_backend target
backend target
  server target 127.0.0.1:{target}
"""


def start_haproxy(name: str, port: int, target: int, core: str, workdir: Path) -> Server:
    """``haproxy -db`` (foreground, one process) from ``port`` to ``target`` on loopback."""
    conf = workdir / f"{name}.cfg"
    conf.write_text(HAPROXY_CONFIG.format(port=port, target=target))
    return Server(name, ["haproxy", "-db", "-f", str(conf)], core, workdir)


class Sidecar:
    """A ``meshgate sidecar --config FILE`` process and its listeners."""

    def __init__(
        self,
        name: str,
        settings: dict[str, Any],
        services: list[dict[str, Any]],
        core: str,
        workdir: Path,
        extra: list[str] | None = None,
    ) -> None:
        self.admin = free_port()
        self.inbound = free_port()
        sidecar = {
            "inbound": f"127.0.0.1:{self.inbound}",
            "outbound": None,
            "admin": f"127.0.0.1:{self.admin}",
            "access_log": False,
            "drain_seconds": 0,
            **settings,
        }
        self.config = workdir / f"{name}.yaml"
        # JSON is YAML: the file is what a user would write, in one line.
        self.config.write_text(json.dumps({"sidecar": sidecar, "services": services}) + "\n")
        args = [sys.executable, "-m", "meshgate", "sidecar", "--config", str(self.config)]
        self.server = Server(name, [*args, "--log-level", "WARNING", *(extra or [])], core, workdir)

    def admin_get(self, path: str) -> Any:
        status, body = get(self.admin, None, timeout=2.0, path=path)
        if status != 200:
            raise BenchError(f"{self.server.name}: GET {path} on its admin port answered {status}")
        return json.loads(body)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until /readyz answers 200: listening, and its app answers."""
        deadline = time.monotonic() + timeout
        while True:
            self.server.check_alive()
            try:
                if get(self.admin, None, timeout=1.0, path="/readyz")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.server.name} is not ready after {timeout}s; its log:\n"
                    f"{self.server.log_tail()}"
                )
            time.sleep(0.05)

    def endpoints(self, service: str) -> list[str]:
        """The instances of ``service`` this sidecar would send requests to now."""
        clusters = self.admin_get("/clusters")
        return [e["address"] for e in clusters.get(service, [])]


def rss_mb(server: Server) -> tuple[float, float]:
    """VmRSS and VmHWM (the peak) of the server and its children, in MB (10^6 bytes)."""
    rss = peak = 0
    for pid in server.pids():
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(("VmRSS:", "VmHWM:")):
                        kib = int(line.split()[1])
                        if line.startswith("VmRSS:"):
                            rss += kib
                        else:
                            peak += kib
        except OSError:
            continue
    return rss * 1024 / 1e6, peak * 1024 / 1e6
