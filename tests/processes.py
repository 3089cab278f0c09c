"""Processes a test starts, found again by a marker in their environment, and stopped: only those.

Ray's raylet, GCS and every worker inherit the environment of the process that started them, so a
unique ``DIGITS_TEST_RUN`` value finds all of them (``ray stop`` would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
import uuid
from pathlib import Path

MARKER = "DIGITS_TEST_RUN"


def marked_env(**extra: str) -> tuple[dict[str, str], str]:
    """This environment plus a fresh marker and a short RAY_TMPDIR (Ray's socket paths must be short)."""
    marker = uuid.uuid4().hex
    tmp = tempfile.mkdtemp(prefix="dr-", dir="/tmp")
    return {**os.environ, MARKER: marker, "RAY_TMPDIR": tmp, **extra}, marker


def marked_pids(marker: str) -> set[int]:
    needle = f"{MARKER}={marker}".encode()
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if needle in (proc / "environ").read_bytes():
                    pids.add(int(proc.name))
            except OSError:
                continue
    return pids


def stop_marked(marker: str, ray_tmpdir: str | None = None, grace_s: float = 30) -> None:
    """Wait up to ``grace_s`` for the marked processes to exit by themselves, then SIGKILL the rest;
    then remove their Ray temp folder, when given."""
    deadline = time.monotonic() + grace_s
    while marked_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in marked_pids(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if ray_tmpdir:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def session_pids(leaders) -> set[int]:
    """Live processes in the sessions that these PIDs opened (``setsid``), the leaders included.

    They include what ``marked_pids`` cannot see: Ray's agents and dashboard modules write their process
    title over their environment. A session ID is not reused while a process still holds it.
    """
    wanted = {int(pid) for pid in leaders}
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2:].split()[:4]
            if state != "Z" and int(session) in wanted:
                pids.add(int(proc.name))
    return pids
