"""Ray clusters made by cluster/*.sh as docs/cluster.md shows, for tests: each with this test's marker and
state folder, stopped afterwards (stop-local.sh, then whatever is left of its sessions and marker).

The nodes of these clusters lack the project: a `digits_ray` that refuses to import comes first on
their PYTHONPATH, so every process of a job must import the copy that `--working-dir` shipped.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.processes import marked_env, marked_pids, session_pids, stop_marked

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # a Ray Train run's persisted checkpoint state


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, every_s: float = 1.0) -> Any:
    """``check()``'s first truthy result, polled every ``every_s``; a test failure naming ``what`` after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)


def env_pids(entry: str) -> set[int]:
    """Processes whose environment holds ``entry`` (NAME=value) as read from /proc."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if entry.encode() in (proc / "environ").read_bytes().split(b"\0"):
                    pids.add(int(proc.name))
            except OSError:
                continue
    return pids


def listening_sockets(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket these processes listen on, from /proc."""
    owner = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    owner[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owner:  # 0A: LISTEN
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # words are little-endian
                found.append((socket.inet_ntop(family, raw), int(port, 16), owner[fields[9]]))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


class LocalCluster:
    """The scripts of cluster/, run as a user would, with this test's marker and state folder."""

    def __init__(self, env: dict[str, str], marker: str):
        self.env, self.marker = env, marker
        self.dir = Path(env["DIGITS_CLUSTER_DIR"])
        self.leaders: set[int] = set()  # every node's `ray start --block` (the leader of its session)

    def script(self, name: str, *args: str, timeout: float = 180, check: bool = True, **env: str):
        done = subprocess.run([str(CLUSTER / name), *args], env={**self.env, **env}, capture_output=True,
                              text=True, timeout=timeout)
        self.leaders |= {int(p.read_text()) for p in self.dir.glob("nodes/*.pid")}
        if check:
            assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
        return done

    def state(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in (self.dir / "cluster").read_text().splitlines())

    def ray(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(["ray", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"ray {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def listed(self, kind: str, *filters: str) -> list[dict[str, Any]]:
        flags = [arg for f in filters for arg in ("--filter", f)]
        listed = self.ray("list", kind, "--address", self.state()["DASHBOARD_URL"], "--format", "json",
                          "--detail", "--limit", "1000", *flags)
        return [] if listed.startswith("No resource") else json.loads(listed)

    def node_names(self) -> dict[str, str]:
        return {n["node_id"]: n["node_name"] for n in self.listed("nodes")}

    def submit(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["ray", "job", "submit", "--address", self.state()["DASHBOARD_URL"], *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def processes(self) -> set[int]:
        return session_pids(self.leaders) | marked_pids(self.marker)

    def kill_leftovers(self) -> None:
        """SIGKILL whatever of this cluster is still running (its nodes' sessions, its marker)."""
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@contextmanager
def local_cluster(folder: Path, **env: str) -> Iterator[LocalCluster]:
    """A state folder and environment for cluster/*.sh (``env`` overrides, e.g. NUM_CPUS); afterwards
    stop-local.sh, then anything of this cluster's left (its nodes' sessions, its marker) gets SIGKILL
    and its folders go."""
    shadow = folder / "not-installed"
    (shadow / "digits_ray").mkdir(parents=True)
    (shadow / "digits_ray" / "__init__.py").write_text(
        "raise ImportError('digits_ray is not installed on this node: ship it with --working-dir')\n")
    base, marker = marked_env(**{"RAY_AUTH_MODE": "token", "PYTHONPATH": str(shadow), "NUM_CPUS": "1", **env})
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "DIGITS_DATA_DIR"):  # they would point elsewhere
        base.pop(name, None)
    base["DIGITS_CLUSTER_DIR"] = base["RAY_TMPDIR"]  # short: Ray's socket paths live under it
    cluster = LocalCluster(base, marker)
    try:
        yield cluster
    finally:
        try:
            cluster.script("stop-local.sh", timeout=120, check=False)
        except subprocess.TimeoutExpired:
            pass
        cluster.kill_leftovers()
        stop_marked(marker, base["RAY_TMPDIR"], grace_s=10)
