"""Where a replica's CPU goes per request: py-spy samples every Serve replica while single PNGs arrive at a
fixed rate, and the frames that hold the most samples are listed (inclusive: a frame counts once per
sample it appears in).

    pip install py-spy      # a profiler, not a dependency of the project
    DIGITS_DATA_DIR=../shared/data/mnist python bench/serve_profile.py --model artifacts/bench/cnn_deep

Serves the default variant of serve_load.py (one deployment, two replicas, HAProxy) on a local Ray of its
own. Prints and saves bench/results/serve_profile.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import markdown_table, save, save_text
from serve_load import fixed_rate, free_port, start_server, stop_server, wait_healthy

IDLE = ("epoll_wait", "select (selectors.py", "_run_once (asyncio", "wait (threading.py")


def replica_pids(session: int) -> list[int]:
    """Serve replicas among the processes of the server's own session (it was started with setsid)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[3]) == session and cmdline.startswith(b"ray::ServeReplica"):
                pids.append(int(proc.name))
    return sorted(pids)


def top_frames(raw: str, count: int) -> tuple[int, list[dict[str, Any]]]:
    """py-spy's raw (collapsed) stacks -> total samples and the frames present in the most samples."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack:
            continue
        n = int(samples)
        total += n
        for frame in set(stack.split(";")):
            inclusive[frame] += n
    rows = [{"frame": frame[:110], "share": f"{n / total:.1%}"} for frame, n in inclusive.most_common(count)]
    return total, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=12, help="sampling time (the load runs 4 s longer)")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    if not shutil.which("py-spy"):
        parser.exit(2, "error: py-spy is not installed (pip install py-spy)\n")

    from digits_ray.data.mnist import load_split
    from digits_ray.images import png_bytes
    from digits_ray.registry import model_to_serve

    model = str(model_to_serve(args.model))
    pngs = [png_bytes(image) for image in load_split("test").images[:2000]]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server("one-haproxy", model, port)
    out = Path(tempfile.mkdtemp(prefix="serve-profile-"))
    try:
        asyncio.run(wait_healthy(url, server))
        asyncio.run(fixed_rate(url, pngs, 50, 3))
        pids = replica_pids(server.pid)
        spies = [subprocess.Popen(["py-spy", "record", "-p", str(pid), "-d", str(int(args.seconds)), "-r", "100",
                                   "-f", "raw", "-o", str(out / f"{pid}.txt")], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for pid in pids]
        time.sleep(1)
        load = asyncio.run(fixed_rate(url, pngs, args.rate, args.seconds + 3))
        for spy in spies:
            spy.wait(timeout=60)
    finally:
        stop_server(server)
    raw = "\n".join((out / f"{pid}.txt").read_text() for pid in pids if (out / f"{pid}.txt").is_file())
    total, rows = top_frames(raw, args.top)
    idle = sum(int(line.rpartition(" ")[2]) for line in raw.splitlines() if any(w in line for w in IDLE))
    text = "\n".join([
        f"# Where a replica's time goes at {args.rate:.0f} single-PNG requests/s",
        "",
        f"`{' '.join(['python', *sys.argv])}`: py-spy at 100 Hz on {len(pids)} replicas for {args.seconds:.0f} s; "
        f"{total} samples, {idle / max(total, 1):.0%} of them waiting (event loop or thread idle). Load: "
        f"{load['ok_per_s']} answers/s, p50 {load['p50_ms']} ms, p99 {load['p99_ms']} ms.",
        "",
        "Frames by the share of samples they appear in (inclusive):",
        "",
        markdown_table(rows, [("frame", "frame"), ("share", "share of samples")]),
    ]) + "\n"
    save_text("serve_profile.md", text)
    save("serve_profile", {"rate": args.rate, "replicas": len(pids), "samples": total, "idle_samples": idle,
                           "load": {k: v for k, v in load.items() if k != "latencies_ms"}, "frames": rows})
    print(text)
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
