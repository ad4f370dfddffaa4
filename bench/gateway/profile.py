#!/usr/bin/env python3
"""Profile meshgate under the benchmark's load: where its CPU goes per request.

Starts the nginx upstream (core 0) and meshgate (core 1) exactly as ``run.py`` does,
saturates meshgate with wrk, and while wrk runs either samples meshgate with py-spy (a
flame graph plus collapsed stacks, summarized here by function and by module) or runs
it under pyinstrument (a call tree). See README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from run import (
    KEY,
    LOAD_CORE,
    PATH,
    PROXY_CORE,
    REDIS_URL,
    UPSTREAM_BODY,
    BenchError,
    Server,
    delete_keys,
    free_port,
    meshgate_config,
    preflight,
    progress,
    servers,
    start_meshgate,
    start_nginx,
    verify,
    wait_ready,
)


def _frame_function(frame: str) -> str:
    """``name (path/to/file.py)`` -> ``name (file.py)``; native frames as they are."""
    name, _, where = frame.partition(" (")
    if not where:
        return frame
    path = where.rstrip(")")
    for marker in ("site-packages/", "src/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


def _module(frame: str) -> str:
    """The package a frame belongs to, for the per-area summary."""
    function = _frame_function(frame)
    where = function.partition(" (")[2].rstrip(")")
    if where.startswith("meshgate/"):
        return "/".join(where.split("/")[:2]).removesuffix(".py")
    if not where:
        return "native: " + function.split("::")[0][:40]
    return where.split("/")[0].removesuffix(".py")


def summarize(raw: Path, top: int) -> str:
    """Markdown tables of a py-spy collapsed-stack file: self and inclusive samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        own[_frame_function(frames[-1])] += n
        modules[_module(frames[-1])] += n
        for function in {_frame_function(f) for f in frames}:
            inclusive[function] += n
    if not total:
        return "no samples"

    def table(title: str, counts: Counter[str], limit: int) -> list[str]:
        rows = [f"| {title} | samples | % |", "| --- | ---: | ---: |"]
        rows += [f"| `{k}` | {v} | {100 * v / total:.1f} |" for k, v in counts.most_common(limit)]
        return rows

    out = [f"{total} samples (non-idle)", ""]
    out += table("self time, by module", modules, 20) + [""]
    out += table("self time, by function", own, top) + [""]
    out += table("inclusive time, by function", inclusive, top)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("memory", "redis"), default="memory")
    parser.add_argument("--duration", type=float, default=10, help="seconds of sampling")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--tool", choices=("py-spy", "pyinstrument"), default="py-spy")
    parser.add_argument("--native", action="store_true", help="py-spy: include C frames")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--svg", type=Path, default=Path("/tmp/meshgate-profile.svg"))
    parser.add_argument("--raw", type=Path, default=Path("/tmp/meshgate-profile.txt"))
    parser.add_argument(
        "--pyinstrument-out", type=Path, default=Path("/tmp/meshgate-pyinstrument.txt")
    )
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, and Ctrl-C works even where SIGINT was ignored (a
    # background job), so the servers are always stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        preflight()
        if args.tool == "py-spy" and shutil.which("py-spy") is None:
            raise BenchError("py-spy is not installed: pip install py-spy")
        if args.tool == "pyinstrument" and shutil.which("pyinstrument") is None:
            raise BenchError("pyinstrument is not installed: pip install pyinstrument")
        print(profile(args))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def profile(args: argparse.Namespace) -> str:
    workdir = Path(tempfile.mkdtemp(prefix="meshgate-profile-"))
    workdir.chmod(0o755)
    key_prefix = f"meshgate-profile-{os.getpid()}-{int(time.time())}"
    try:
        with servers() as track:
            up_port = free_port()
            upstream = track(
                start_nginx("upstream", UPSTREAM_BODY.format(port=up_port), LOAD_CORE, workdir)
            )
            wait_ready(upstream, up_port)
            port = free_port()
            limits = (
                "{backend: memory}"
                if args.backend == "memory"
                else f"{{backend: redis, redis_url: '{REDIS_URL}', key_prefix: {key_prefix}}}"
            )
            config = meshgate_config(workdir, f"meshgate-{args.backend}", port, up_port, limits)
            if args.tool == "pyinstrument":
                out = args.pyinstrument_out
                command = [
                    sys.executable, "-m", "pyinstrument", "-r", "text", "-o", str(out),
                    "-m", "meshgate", "gateway", "--config", str(config),
                    "--log-level", "WARNING",
                ]  # fmt: skip
                gateway = track(Server("meshgate", command, PROXY_CORE, workdir))
            else:
                gateway = track(start_meshgate("meshgate", config, PROXY_CORE, workdir))
            wait_ready(gateway, port)
            verify("meshgate", port, checks_key=True)
            load_seconds = 2 + args.duration * (2 if args.tool == "py-spy" else 1) + 2
            progress(f"wrk -c{args.connections} for {load_seconds:g} s on meshgate-{args.backend}")
            load = subprocess.Popen(
                ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{args.connections}"]
                + [f"-d{load_seconds:g}s", "-H", f"X-API-Key: {KEY}"]
                + [f"http://127.0.0.1:{port}{PATH}"],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                time.sleep(2)
                if args.tool == "pyinstrument":
                    load.wait()
                    gateway.stop()  # SIGTERM: pyinstrument writes its report on exit
                    summary = f"pyinstrument report: {args.pyinstrument_out}"
                else:
                    summary = _py_spy(args, gateway.pid)
                wrk_out = load.communicate()[0]
            finally:
                if load.poll() is None:
                    load.kill()
                    load.wait()
    finally:
        if args.backend == "redis":
            try:
                delete_keys(key_prefix)
            except Exception as exc:  # cleanup must not hide the run's own error
                progress(f"could not delete Redis keys under {key_prefix}: {exc}")
        shutil.rmtree(workdir, ignore_errors=True)
    rps = next((line for line in wrk_out.splitlines() if line.startswith("Requests/sec")), "")
    return f"meshgate-{args.backend} under load ({rps.strip()}, sampler included)\n\n{summary}"


def _py_spy(args: argparse.Namespace, pid: int) -> str:
    common = ["--pid", str(pid), "--duration", f"{args.duration:g}", "--rate", str(args.rate)]
    if args.native:
        common.append("--native")
    progress(f"py-spy record -> {args.svg}")
    subprocess.run(
        ["py-spy", "record", "-o", str(args.svg), *common], check=True, capture_output=True
    )
    progress(f"py-spy record --format raw -> {args.raw}")
    subprocess.run(
        ["py-spy", "record", "--format", "raw", "--nolineno", "-o", str(args.raw), *common],
        check=True,
        capture_output=True,
    )
    return summarize(args.raw, args.top)


if __name__ == "__main__":
    sys.exit(main())
