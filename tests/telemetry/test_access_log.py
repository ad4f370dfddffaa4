"""The access log writes whole lines: several processes on one pipe never mix within a line."""

from __future__ import annotations

import json
import multiprocessing
import os

from meshgate.telemetry.access_log import AccessLog


def _worker(fd: int, worker: int, lines: int) -> None:
    log = AccessLog(fd, max_pending=37)
    for i in range(lines):
        # Lines of varying length, some near the atomic size, to cross chunk edges.
        pad = "x" * ((i * 97) % 1500)
        log.write(json.dumps({"worker": worker, "i": i, "pad": pad}) + "\n")
    log.flush()


def test_four_processes_on_one_pipe_never_interleave_within_a_line() -> None:
    read_fd, write_fd = os.pipe()
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_worker, args=(write_fd, w, 2000)) for w in range(4)]
    for p in workers:
        p.start()
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 1 << 16):
        data += chunk
    os.close(read_fd)
    for p in workers:
        p.join()
        assert p.exitcode == 0
    lines = data.decode().splitlines()
    assert len(lines) == 8000
    seen = {(doc["worker"], doc["i"]) for doc in map(json.loads, lines)}
    assert len(seen) == 8000


def test_lines_wait_for_a_flush_or_a_full_batch(tmp_path) -> None:
    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        log = AccessLog(fd, max_pending=3)
        log.write('{"a": 1}\n')
        log.write('{"a": 2}\n')
        assert path.read_text() == ""
        log.write('{"a": 3}\n')
        assert path.read_text().count("\n") == 3
        log.write('{"a": 4}\n')
        log.flush()
        assert [json.loads(x)["a"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]
    finally:
        os.close(fd)


def test_a_broken_log_pipe_drops_lines_instead_of_raising() -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    log = AccessLog(write_fd)
    log.write("{}\n")
    log.write("{}\n")
    log.flush()  # EPIPE: counted, not raised (SIGPIPE is ignored by Python)
    assert log.dropped == 2
    os.close(write_fd)
