"""Where a replica's CPU goes per request: py-spy samples every Serve replica while single PNGs arrive at a
fixed rate, and the frames that hold the most samples are listed (inclusive: a frame counts once per
sample it appears in).

    pip install py-spy      # a profiler, not a dependency of the project
    DIGITS_DATA_DIR=../shared/data/mnist python bench/serve_profile.py --model artifacts/bench/cnn_deep

Only samples that hold the GIL count (py-spy --gil): the Python work per request. TensorFlow's kernels
release the GIL, so the forward pass itself shows only by its Python side.
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

# What a sample is spent on: the first of these found walking the stack up from the leaf.
CATEGORIES = [
    ("the model (TensorFlow forward pass)", ("tensorflow/",)),
    ("decoding and framing images", ("digits_ray/inference/images.py", "PIL/")),
    ("request parsing and limits (ours)", ("digits_ray/serve/inputs.py",)),
    ("answers as JSON", ("json/", "JSONResponse", "render (starlette")),
    ("metrics (ours and Serve's)", ("ray/util/metrics", "digits_ray/serve/metrics.py", "metrics_utils", "telemetry")),
    ("our handler and batching", ("digits_ray/",)),
    ("FastAPI / Starlette routing", ("fastapi/", "starlette/")),
    ("HTTP server (uvicorn)", ("uvicorn/", "httptools", "h11")),
    ("Serve's replica machinery", ("ray/serve/",)),
    ("Ray core worker", ("ray/",)),
]


def category(stack: list[str]) -> str:
    for frame in reversed(stack):
        for name, needles in CATEGORIES:
            if any(n in frame for n in needles):
                return name
    return "other"


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


def breakdown(raw: str) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]]]:
    """py-spy's raw (collapsed) stacks -> total samples, samples by category, and the busiest leaf frames."""
    by_category: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack:
            continue
        frames, n = stack.split(";"), int(samples)
        total += n
        by_category[category(frames)] += n
        leaves[frames[-1]] += n
    share = lambda n: f"{n / max(total, 1):.1%}"  # noqa: E731
    return (total, [{"what": c, "share": share(n)} for c, n in by_category.most_common()],
            [{"frame": f[:110], "share": share(n)} for f, n in leaves.most_common(15)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=12, help="sampling time (the load runs 4 s longer)")
    args = parser.parse_args()
    if not shutil.which("py-spy"):
        parser.exit(2, "error: py-spy is not installed (pip install py-spy)\n")

    from digits_ray.data.mnist import load_split
    from digits_ray.inference.images import png_bytes
    from digits_ray.models.registry import model_to_serve

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
                                   "--gil", "-f", "raw", "-o", str(out / f"{pid}.txt")], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for pid in pids]
        time.sleep(1)
        load = asyncio.run(fixed_rate(url, pngs, args.rate, args.seconds + 3))
        for spy in spies:
            spy.wait(timeout=60)
    finally:
        stop_server(server)
    raw = "\n".join((out / f"{pid}.txt").read_text() for pid in pids if (out / f"{pid}.txt").is_file())
    total, categories, leaves = breakdown(raw)
    text = "\n".join([
        f"# Where a replica's time goes at {args.rate:.0f} single-PNG requests/s",
        "",
        f"`{' '.join(['python', *sys.argv])}`: py-spy at 100 Hz on {len(pids)} replicas for "
        f"{args.seconds:.0f} s, {total} samples holding the GIL (the Python work). "
        f"Load: {load['ok_per_s']} answers/s, p50 {load['p50_ms']} ms, "
        f"p99 {load['p99_ms']} ms.",
        "",
        "Samples by what they were spent on (the first match walking up from the sampled frame):",
        "",
        markdown_table(categories, [("what", "spent on"), ("share", "share of samples")]),
        "",
        "The sampled frames seen most:",
        "",
        markdown_table(leaves, [("frame", "frame"), ("share", "share of samples")]),
    ]) + "\n"
    save_text("serve_profile.md", text)
    save("serve_profile", {"rate": args.rate, "replicas": len(pids), "samples": total, "categories": categories,
                           "leaves": leaves, "load": {k: v for k, v in load.items() if k != "latencies_ms"}})
    print(text)
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
