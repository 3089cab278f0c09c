"""Load test of the served model: plain FastAPI + uvicorn (one process, no Ray) against the ways Ray Serve
can carry the same requests, each on the port users call, in one run.

    DIGITS_DATA_DIR=../shared/data/mnist python bench/serve_load.py --model artifacts/bench/cnn_deep

Servers (each its own local Ray, started with that variant's Serve switches, since Serve reads them once
when Ray starts; --variants picks some):
    plain           FastAPI + uvicorn, the same predictor and request parsing, no Ray
    split-proxy     two deployments (ingress -> batching model), Serve's Python proxy: the layout before
    split-haproxy   the same two deployments behind HAProxy, gRPC between them
    one-proxy       one deployment (ingress and batching model together), Serve's Python proxy
    one-throughput  the same with Ray's throughput-optimized bundle (RAY_SERVE_THROUGHPUT_OPTIMIZED=1)
    one-haproxy-1   one deployment behind HAProxy, one replica
    one-haproxy-auto  the same, autoscaled from 1 to 2 replicas (serve_app.py --autoscale 1-2)
    one-haproxy     one deployment behind HAProxy, two replicas: what serve_app.py runs

For each: single-image PNG requests at fixed rates (open loop: request i leaves at i/rate whatever came
back), then 4 clients sending 256-image multipart batches in a closed loop. For the last variant (the
default) also: its capacity (closed loop), floods at 1x, 2x and 4x that capacity with the answers
afterwards and the CPU each part of the server used, and every MNIST test digit as a PNG against the
model's offline accuracy. The load generators share the machine's cores, and the CPU they used is
reported per row: aiohttp (asyncio) for the fixed rates, Debian's compiled ``wrk`` for capacity and floods
(apt-get install wrk; bench/open_loop.lua spreads its requests like an open loop). Prints and saves
bench/results/serve_load.{json,md} and serve_load_latency.png; the previous run's figures are quoted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS, ROOT, markdown_table, save, save_text
from fastapi import FastAPI, Request  # module level: the routes' string annotations resolve here
from fastapi.responses import JSONResponse

TARGETS = {"rates": [100, 200], "p50_vs_plain": 2.0, "p99_ms": 50.0, "images_per_s": 5000,
           "flood_p99_s": 2.0, "flood_ok_share": 0.8, "recovery_s": 1.0}
VARIANTS = {  # name: (layout, ingress, replicas or (min, max) autoscaled, extra Serve switches)
    "plain": (None, None, 1, {}),
    "split-proxy": ("split", "proxy", 1, {}),
    "split-haproxy": ("split", "haproxy", 1, {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}),
    "one-proxy": ("one", "proxy", 2, {}),
    "one-throughput": ("one", "proxy", 2, {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}),
    "one-haproxy-1": ("one", "haproxy", 1, {}),
    "one-haproxy-auto": ("one", "haproxy", (1, 2), {}),  # replicas (min, max): autoscaled
    "one-haproxy": ("one", "haproxy", 2, {}),
}


# --- the servers ---

def plain_server(model: str, port: int) -> None:
    """The baseline a user would write: one process, FastAPI + uvicorn, the same predictor and parsing."""
    import uvicorn

    from digits_ray.inference.predictor import Predictor
    from digits_ray.serve.inputs import RequestError, parse
    from digits_ray.serve.settings import ServeSettings

    predictor = Predictor.from_artifact(model)
    settings = ServeSettings()
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        try:
            parsed = await parse(request.headers, request.stream(), settings)
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        predictions = predictor.predict(np.stack(parsed.images))
        return JSONResponse({"predictions": predictions} if parsed.batch else predictions[0])

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def serve_server(variant: str, model: str, port: int) -> None:
    """One Serve variant on a local Ray of its own, until SIGTERM."""
    import ray
    from ray import serve

    from digits_ray.data.ray_backend import runtime_env
    from digits_ray.serve.service import build_app
    from digits_ray.serve.settings import ModelChoice, Scaling, ServeSettings

    layout, _, replicas, _ = VARIANTS[variant]
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env=runtime_env())
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    from _split_app import split_app

    app = (split_app(model) if layout == "split" else
           build_app(ServeSettings(scaling=Scaling(autoscale=replicas) if isinstance(replicas, tuple)
                                   else Scaling(replicas=replicas)), ModelChoice(model=model)))
    serve.run(app, name="digits", route_prefix="/")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(variant: str, model: str, port: int) -> subprocess.Popen:
    """The variant's server in a subprocess whose environment has that variant's Serve switches."""
    from digits_ray.serve.settings import ray_start_env

    _, ingress, _, extra = VARIANTS[variant]
    env = dict(os.environ)
    if ingress is not None:
        env.update({**ray_start_env(ingress), **extra, "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
                    "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
                    "RAY_TMPDIR": tempfile.mkdtemp(prefix="dr-bench-", dir="/tmp")})
    return subprocess.Popen([sys.executable, __file__, "--server", variant, "--model", model, "--port", str(port)],
                            cwd=ROOT, env=env, start_new_session=True)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --- load generation ---

async def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} before it answered")
            try:
                async with session.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(1)
    raise TimeoutError(f"{url} did not become healthy in {timeout_s} s")


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    if not latencies_s:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan")}
    ms = np.array(latencies_s) * 1000
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 95, 99)}


async def timed_post(session: Any, url: str, **request: Any) -> tuple[int | None, float]:
    """(status, seconds) of POST /predict; status None for a time-out or a dropped connection."""
    import aiohttp

    sent = time.perf_counter()
    try:
        async with session.post(f"{url}/predict", **request) as response:
            await response.read()
            status = response.status
    except (TimeoutError, aiohttp.ClientError):
        status = None
    return status, time.perf_counter() - sent


def client_cpu(fn: Any) -> Any:
    """Run ``fn`` and add the share of a core this process (the load generator) used meanwhile."""
    cpu, wall = time.process_time(), time.perf_counter()
    row = fn()
    row["client_cpu_cores"] = round((time.process_time() - cpu) / (time.perf_counter() - wall), 2)
    return row


async def fixed_rate(url: str, pngs: list[bytes], rate: float, seconds: float) -> dict[str, Any]:
    """Open loop: request i is sent at start + i / rate, whether or not earlier ones came back."""
    import aiohttp

    answers: list[tuple[int | None, float]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def one(i: int) -> None:
            answers.append(await timed_post(session, url, data=pngs[i % len(pngs)],
                                            headers={"Content-Type": "image/png"}))

        total = int(rate * seconds)
        start = time.perf_counter()
        tasks = []
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        sending = time.perf_counter() - start  # longer than ``seconds`` when the generator fell behind
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    ok = [s for status, s in answers if status == 200]
    statuses = [status for status, _ in answers]
    return {"rate": rate, "sent_per_s": round(total / sending, 1), "requests": total, "ok": len(ok),
            "busy": statuses.count(503) + statuses.count(429),
            "failed": sum(s not in (200, 503, 429) for s in statuses), "timeouts": statuses.count(None),
            "ok_per_s": round(len(ok) / elapsed, 1), **percentiles(ok),
            "p99_all_ms": percentiles([s for _, s in answers])["p99_ms"],
            "latencies_ms": [round(x * 1000, 3) for x in ok]}


async def closed_loop(url: str, bodies: Any, clients: int, seconds: float, images_each: int) -> dict[str, Any]:
    """``clients`` each send a request, wait for the answer, send the next; ``bodies()`` makes a request."""
    import aiohttp

    latencies: list[float] = []
    failed = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal failed
            while time.perf_counter() < deadline:
                status, latency = await timed_post(session, url, **bodies())
                if status == 200:
                    latencies.append(latency)
                else:
                    failed += 1

        start = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(clients)])
        elapsed = time.perf_counter() - start
    return {"clients": clients, "requests": len(latencies), "failed": failed,
            "per_s": round(len(latencies) / elapsed, 1),
            "images_per_s": round(len(latencies) * images_each / elapsed, 1),
            **percentiles(latencies)}


def batch_form(pngs: list[bytes], batch: int) -> Any:
    import aiohttp

    def form() -> dict[str, Any]:
        data = aiohttp.FormData()
        for i in range(batch):
            data.add_field("files", pngs[i % len(pngs)], filename=f"{i}.png", content_type="image/png")
        return {"data": data}
    return form


async def test_set_through_http(url: str, images: np.ndarray, labels: np.ndarray, batch: int) -> dict[str, Any]:
    import aiohttp

    from digits_ray.inference.images import png_bytes

    digits: list[int] = []
    async with aiohttp.ClientSession() as session:
        for start in range(0, len(images), batch):
            data = aiohttp.FormData()
            for i, image in enumerate(images[start: start + batch], start):
                data.add_field("files", png_bytes(image), filename=f"{i}.png", content_type="image/png")
            async with session.post(f"{url}/predict", data=data) as response:
                body = await response.json()
                digits += [p["digit"] for p in body["predictions"]]
    return {"images": len(digits), "accuracy": float((np.array(digits) == labels).mean())}


# --- one variant ---

def measure(variant: str, url: str, pngs: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    asyncio.run(fixed_rate(url, pngs, 20, 3))  # warm up: connections, traced functions
    result: dict[str, Any] = {"variant": variant, "rates": []}
    for rate in args.rates:
        row = client_cpu(lambda rate=rate: asyncio.run(fixed_rate(url, pngs, rate, args.seconds)))
        result["rates"].append(row)
        print(f"{variant:>15}  {rate:5.0f} req/s  p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f}  "
              f"ok/s {row['ok_per_s']:6.1f}  busy {row['busy']}  failed {row['failed']}  timeouts {row['timeouts']}"
              f"  client {row['client_cpu_cores']} cores", flush=True)
    row = client_cpu(lambda: asyncio.run(closed_loop(url, batch_form(pngs, args.batch), args.clients,
                                                     args.seconds, args.batch)))
    result["batched"] = row
    print(f"{variant:>15}  batches of {args.batch} x {args.clients} clients: {row['images_per_s']:.0f} images/s  "
          f"p50 {row['p50_ms']} ms  failed {row['failed']}", flush=True)
    return result


def session_cpu(session: int) -> dict[str, float]:
    """CPU seconds so far of the server's processes (its own session), by kind of process."""
    kinds = {"haproxy": "HAProxy", "ray::ServeReplica": "replicas", "ray::HAProxyManager": "HAProxy manager"}
    totals: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) != session:
            continue
        kind = next((v for k, v in kinds.items() if cmdline.startswith(k) or Path(cmdline).name == k), "rest of Ray")
        totals[kind] = totals.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return totals


def wrk(url: str, body: Path, seconds: float, connections: int, rate: float | None) -> dict[str, Any]:
    """Debian's compiled ``wrk`` at Ray workers' niceness (15), so it takes no priority over the service:
    ``connections`` connections sending single PNGs, at ``rate`` requests/s in all (bench/open_loop.lua spreads
    them like an open loop), or (None) each as fast as answers come, a closed loop. Returns statuses, the latency
    of all answers and the CPU it used."""
    import re
    import resource

    env = {**os.environ, "BODY": str(body), "MEAN_MS": f"{1000 * connections / rate:g}" if rate else "0"}
    command = ["nice", "-n", "15", "wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds:g}s", "--latency",
               "-s", str(Path(__file__).with_name("open_loop.lua")), f"{url}/predict"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)

    def number(pattern: str, default: float = 0.0) -> float:
        found = re.search(pattern, out)
        return float(found.group(1)) if found else default

    def ms(label: str) -> float:
        found = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return round(float(found.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[found.group(2)], 2) if found else nan

    nan = float("nan")
    total, span = number(r"(\d+) requests in"), number(r"requests in ([\d.]+)s", seconds)
    refused = number(r"Non-2xx or 3xx responses: (\d+)")
    errors = sum(number(rf"{kind} (\d+)") for kind in ("connect", "read", "write", "timeout"))
    return {"sent": int(total), "sent_per_s": round(total / span, 1), "ok": int(total - refused),
            "ok_per_s": round((total - refused) / span, 1), "busy": int(refused), "failed": int(errors),
            "p50_all_ms": ms("50"), "p99_all_ms": ms("99"),
            "client_cpu_cores": round((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / span, 2)}


def overload(url: str, pngs: list[bytes], session: int, replicas: int, args: argparse.Namespace) -> dict[str, Any]:
    """Capacity (closed loop), then floods at multiples of it, each followed by a few normal requests; the CPU
    each part of the server used meanwhile."""
    from digits_ray.serve.settings import HAPROXY_REPLICA_MAXCONN

    body = Path(tempfile.mkstemp(suffix=".png")[1])
    body.write_bytes(pngs[0])
    connections = replicas * HAPROXY_REPLICA_MAXCONN  # every replica's slots busy, none queued
    capacity = wrk(url, body, args.seconds, connections, None)
    print(f"{'capacity':>15}  {capacity['ok_per_s']} answers/s with {connections} connections, p50 "
          f"{capacity['p50_all_ms']} ms, generator {capacity['client_cpu_cores']} cores", flush=True)
    rows = []
    for factor in args.floods:
        rate = factor * capacity["ok_per_s"]
        cpu = session_cpu(session)
        row = wrk(url, body, args.seconds, max(1, round(rate)), rate)  # about one request/s per connection
        used = session_cpu(session)
        row["server_cpu_cores"] = {k: round((used[k] - cpu.get(k, 0.0)) / args.seconds, 2) for k in used}
        after = asyncio.run(fixed_rate(url, pngs, 5, 3))  # right after the flood
        row.update(factor=factor, rate=rate, after_p99_ms=after["p99_ms"], after_ok=after["ok"],
                   after_requests=after["requests"])
        rows.append(row)
        print(f"{f'{factor}x flood':>15}  {rate:6.0f} req/s asked, {row['sent_per_s']:.0f} sent  ok/s "
              f"{row['ok_per_s']:6.1f}  503s {row['busy']}  failed {row['failed']}  p99 of all {row['p99_all_ms']} ms"
              f"  after: {after['ok']}/{after['requests']} ok, p99 {after['p99_ms']} ms  generator "
              f"{row['client_cpu_cores']} cores  server {row['server_cpu_cores']}", flush=True)
    body.unlink()
    return {"capacity": capacity, "capacity_connections": connections, "floods": rows}


# --- report ---

def previous_run() -> dict[str, Any] | None:
    """The figures of the committed results (git HEAD), to quote beside the new ones."""
    shown = subprocess.run(["git", "show", "HEAD:bench/results/serve_load.json"], cwd=ROOT, capture_output=True,
                           text=True)
    if shown.returncode != 0:
        return None
    old = json.loads(shown.stdout)
    rows = []
    for r in old.get("results", []):
        name = r.get("server") or r.get("variant")
        for row in r["rates"]:
            rows.append({"server": name, "rate": row["rate"], "p50": row["p50_ms"], "p99": row["p99_ms"],
                         "answered": row.get("achieved_rps", row.get("ok_per_s"))})
        rows.append({"server": name, "rate": "batched", "answered": f"{r['batched']['images_per_s']:.0f} images/s"})
    return {"finished": old.get("finished"), "command": old.get("command"), "rows": rows}


def report(results: list[dict[str, Any]], flood: dict[str, Any] | None, accuracy: dict[str, Any] | None,
           previous: dict[str, Any] | None, model: str, args: argparse.Namespace) -> None:
    from digits_ray.models import artifact

    metadata = artifact.read_metadata(model)
    plain = next((r for r in results if r["variant"] == "plain"), None)
    rows, ratios = [], {}
    for r in results:
        for row in r["rates"]:
            base = next((p for p in plain["rates"] if p["rate"] == row["rate"]), None) if plain else None
            ratio = round(row["p50_ms"] / base["p50_ms"], 2) if base and r is not plain else None
            ratios.setdefault(r["variant"], {})[f"{row['rate']:.0f}"] = ratio
            rows.append({"variant": r["variant"], "rate": f"{row['rate']:.0f}", "ok_per_s": row["ok_per_s"],
                         "p50": row["p50_ms"], "p99": row["p99_ms"], "ratio": ratio if ratio is not None else "",
                         "busy": row["busy"], "failed": row["failed"] + row["timeouts"],
                         "cpu": row["client_cpu_cores"]})
    batch_rows = [{"variant": r["variant"], "images_per_s": f"{r['batched']['images_per_s']:.0f}",
                   "p50": r["batched"]["p50_ms"], "p99": r["batched"]["p99_ms"], "failed": r["batched"]["failed"],
                   "cpu": r["batched"]["client_cpu_cores"]} for r in results]
    lines = [
        f"# Serving load test: `{metadata['model']}` ({Path(model).name})",
        "",
        f"`{' '.join(['python', *sys.argv])}` on {os.cpu_count()} cores, load generator included.",
        "",
        f"Single PNG image per request at fixed rates ({args.seconds:.0f} s each, open loop), on the port users call; "
        "latency of the 200 answers in ms; `x plain`: p50 relative to plain FastAPI at the same rate:",
        "",
        markdown_table(rows, [("variant", "variant"), ("rate", "req/s sent"), ("ok_per_s", "200s/s"),
                              ("p50", "p50"), ("p99", "p99"), ("ratio", "x plain"), ("busy", "503s"),
                              ("failed", "failed"), ("cpu", "client cores")]),
        "",
        f"Batched: {args.clients} clients, {args.batch} PNG images per multipart request ({args.seconds:.0f} s):",
        "",
        markdown_table(batch_rows, [("variant", "variant"), ("images_per_s", "images/s"), ("p50", "p50 ms"),
                                    ("p99", "p99 ms"), ("failed", "failed"), ("cpu", "client cores")]),
    ]
    if flood:
        cap = flood["capacity"]
        flood_rows = [{"factor": f"{row['factor']}x", "sent": f"{row['rate']:.0f} ({row['sent_per_s']:.0f})",
                       "ok_per_s": row["ok_per_s"], "share": f"{row['ok_per_s'] / cap['ok_per_s']:.0%}",
                       "busy": row["busy"], "failed": row["failed"], "p99_all": row["p99_all_ms"],
                       "after": f"{row['after_ok']}/{row['after_requests']}, p99 {row['after_p99_ms']} ms",
                       "cpu": row["client_cpu_cores"],
                       "server": ", ".join(f"{k} {v}" for k, v in sorted(row["server_cpu_cores"].items()))}
                      for row in flood["floods"]]
        lines += ["", f"Overload, `{results[-1]['variant']}`, with `wrk` (Debian's, compiled; at Ray workers' "
                      f"niceness): capacity {cap['ok_per_s']} answers/s ({flood['capacity_connections']} connections "
                      f"in a closed loop, p50 {cap['p50_all_ms']} ms, generator {cap['client_cpu_cores']} cores); "
                      f"then {args.seconds:.0f} s at multiples of it (bench/open_loop.lua: about one request/s "
                      f"per connection, spread like an open loop), and 3 s at 5 req/s right after. CPU in cores:",
                  "",
                  markdown_table(flood_rows, [("factor", "load"), ("sent", "req/s asked (sent)"),
                                              ("ok_per_s", "200s/s"), ("share", "200s / capacity"),
                                              ("busy", "503s"), ("failed", "failed"), ("p99_all", "p99 of all ms"),
                                              ("after", "after: ok, p99"), ("cpu", "generator"),
                                              ("server", "server")])]
    if accuracy:
        lines += ["", f"MNIST test digits sent as PNG through `/predict`: {accuracy['accuracy']:.2%} "
                      f"({accuracy['images']} images); the same model offline: {accuracy['offline_accuracy']:.2%}."]
    if previous:
        lines += ["", f"Previous run ({previous['finished']}, `{previous['command']}`):", "",
                  markdown_table(previous["rows"], [("server", "server"), ("rate", "req/s sent"),
                                                    ("answered", "answered"), ("p50", "p50"), ("p99", "p99")])]
    text = "\n".join(lines) + "\n"
    save_text(f"{args.tag}.md", text)
    print(text)
    plot(results, RESULTS / f"{args.tag}_latency.png")
    save(args.tag, {"model": model, "model_name": metadata["model"], "targets": TARGETS, "results": results,
                    "p50_vs_plain": ratios, "overload": flood, "accuracy": accuracy, "previous": previous})


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        rates = [row["rate"] for row in r["rates"]]
        line, = axes[0].plot(rates, [row["p50_ms"] for row in r["rates"]], "o-", label=f"{r['variant']} p50")
        axes[0].plot(rates, [row["p99_ms"] for row in r["rates"]], "x--", color=line.get_color(),
                     label=f"{r['variant']} p99")
        top = r["rates"][-1]
        ms = np.sort(top["latencies_ms"])
        if len(ms):
            axes[1].plot(ms, np.arange(1, len(ms) + 1) / len(ms), label=f"{r['variant']} @ {top['rate']:.0f} req/s")
    axes[0].set(xlabel="requests/s sent", ylabel="latency of 200s (ms)", yscale="log", title="Single-image latency")
    axes[1].set(xlabel="latency (ms)", ylabel="fraction of 200 answers", xscale="log", title="Latency CDF, top rate")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: $DIGITS_MODEL, else the registry's)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="servers to measure, in this order; the last also gets the floods and accuracy")
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 200])
    parser.add_argument("--floods", type=float, nargs="*", default=[1, 2, 4],
                        help="multiples of capacity (none: no capacity or floods)")
    parser.add_argument("--seconds", type=float, default=10, help="per rate, batched load and flood")
    parser.add_argument("--batch", type=int, default=256, help="images per batched request")
    parser.add_argument("--clients", type=int, default=4, help="concurrent batched clients")
    parser.add_argument("--accuracy-images", type=int, default=10000, help="MNIST test digits sent as PNG (0: skip)")
    parser.add_argument("--tag", default="serve_load", help="results file name")
    parser.add_argument("--server", choices=list(VARIANTS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.server is None and args.floods and not shutil.which("wrk"):
        parser.exit(2, "error: the floods use Debian's `wrk` load generator: apt-get install wrk (or --floods)\n")

    from digits_ray.models.registry import model_to_serve

    model = str(model_to_serve(args.model))
    if args.server == "plain":
        plain_server(model, args.port)
        return 0
    if args.server:
        serve_server(args.server, model, args.port)
        return 0

    from digits_ray.data.mnist import load_split
    from digits_ray.inference.images import png_bytes
    test = load_split("test")
    pngs = [png_bytes(image) for image in test.images[:2000]]
    previous = previous_run() if args.tag == "serve_load" else None
    results, flood, accuracy = [], None, None
    for variant in args.variants:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(variant, model, port)
        try:
            asyncio.run(wait_healthy(url, proc))
            results.append(measure(variant, url, pngs, args))
            if variant == args.variants[-1] and variant != "plain" and args.floods:
                replicas = VARIANTS[variant][2]
                flood = overload(url, pngs, proc.pid, max(replicas) if isinstance(replicas, tuple) else replicas, args)
                if args.accuracy_images:
                    n = min(args.accuracy_images, len(test))
                    accuracy = asyncio.run(test_set_through_http(url, test.images[:n], test.labels[:n], 256))
                    from digits_ray.inference.predictor import Predictor

                    offline = Predictor.from_artifact(model).probabilities(test.images[:n]).argmax(axis=1)
                    accuracy["offline_accuracy"] = float((offline == test.labels[:n]).mean())
                    print(f"MNIST test digits as PNG through /predict: {accuracy['accuracy']:.4%} "
                          f"(offline {accuracy['offline_accuracy']:.4%}, {n} images)", flush=True)
        finally:
            stop_server(proc)
    report(results, flood, accuracy, previous, model, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
