"""Load test of the served model: plain FastAPI + uvicorn (one process, no Ray) against Ray Serve with 1 and
2 model replicas, in one run.

    DIGITS_DATA_DIR=../shared/data/mnist python bench/serve_load.py --model models/ENTRY

For each server: single-image PNG requests at fixed rates (open loop: request i leaves at i/rate whatever
came back), then batched requests (multipart, --batch images each, a few clients in a closed loop), then
every MNIST test digit as a PNG through /predict against the model's offline test accuracy (Serve, 1
replica). Prints and saves bench/results/serve_load.{json,md} and serve_latency.png. The load generator
runs on the same machine, so it takes CPU from the servers: the figures are what this machine does end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS, ROOT, markdown_table, save
from fastapi import FastAPI, Request  # module level: the routes' string annotations resolve here
from fastapi.responses import JSONResponse

TARGETS = {"rate": 100, "p50_ms": 10.0, "p99_ms": 50.0, "images_per_s": 5000, "serve_vs_plain_p50": 2.0}


# --- the baseline a user would write: one process, FastAPI + uvicorn, the same predictor and parsing ---

def plain_server(model: str, port: int) -> None:
    import uvicorn

    from digits_ray.predict import Predictor, describe
    from digits_ray.serve.inputs import RequestError, parse
    from digits_ray.serve.settings import ServeSettings

    predictor = Predictor.from_artifact(model)
    settings = ServeSettings(model_dir=model)
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
        predictions = [describe(p) for p in predictor.probabilities(np.stack(parsed.images))]
        return JSONResponse({"predictions": predictions} if parsed.batch else predictions[0])

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --- load generation ---

async def wait_healthy(url: str, timeout_s: float = 180) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
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


async def timed_post(session: Any, url: str, **request: Any) -> float | None:
    """Seconds until POST /predict answered 200; None for another status or a dropped connection."""
    import aiohttp

    sent = time.perf_counter()
    try:
        async with session.post(f"{url}/predict", **request) as response:
            await response.read()
            ok = response.status == 200
    except aiohttp.ClientError:
        return None
    return time.perf_counter() - sent if ok else None


async def fixed_rate(url: str, pngs: list[bytes], rate: float, seconds: float) -> dict[str, Any]:
    """Open loop: request i is sent at start + i / rate, whether or not earlier ones came back."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(i: int) -> None:
            nonlocal errors
            latency = await timed_post(session, url, data=pngs[i % len(pngs)], headers={"Content-Type": "image/png"})
            if latency is None:
                errors += 1
            else:
                latencies.append(latency)

        total = int(rate * seconds)
        start = time.perf_counter()
        tasks = []
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return {"rate": rate, "requests": total, "errors": errors, "achieved_rps": round(len(latencies) / elapsed, 1),
            **percentiles(latencies), "latencies_ms": [round(x * 1000, 3) for x in latencies]}


async def batched(url: str, pngs: list[bytes], batch: int, clients: int, seconds: float) -> dict[str, Any]:
    """Closed loop: ``clients`` each send a multipart batch of ``batch`` PNGs, wait, send the next."""
    import aiohttp

    latencies: list[float] = []
    errors = images = 0

    def form() -> aiohttp.FormData:
        data = aiohttp.FormData()
        for i in range(batch):
            data.add_field("files", pngs[i % len(pngs)], filename=f"{i}.png", content_type="image/png")
        return data

    async with aiohttp.ClientSession() as session:
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal errors, images
            while time.perf_counter() < deadline:
                latency = await timed_post(session, url, data=form())
                if latency is None:
                    errors += 1
                    continue
                latencies.append(latency)
                images += batch

        start = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(clients)])
        elapsed = time.perf_counter() - start
    return {"batch": batch, "clients": clients, "requests": len(latencies), "errors": errors,
            "images_per_s": round(images / elapsed, 1), **percentiles(latencies)}


async def test_set_through_http(url: str, images: np.ndarray, labels: np.ndarray, batch: int) -> dict[str, Any]:
    import aiohttp

    from digits_ray.images import png_bytes

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


# --- servers ---

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_plain(model: str, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--plain-server", "--model", model, "--port", str(port)],
                            cwd=ROOT)


def run_server(name: str, url: str, pngs: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    asyncio.run(wait_healthy(url))
    asyncio.run(fixed_rate(url, pngs, 20, 3))  # warm up: connections, traced functions
    result: dict[str, Any] = {"server": name, "rates": [], "batched": None}
    for rate in args.rates:
        row = asyncio.run(fixed_rate(url, pngs, rate, args.seconds))
        result["rates"].append(row)
        print(f"{name:>22}  {rate:5.0f} req/s  p50 {row['p50_ms']:7.2f} ms  p95 {row['p95_ms']:7.2f}  "
              f"p99 {row['p99_ms']:7.2f}  errors {row['errors']}  achieved {row['achieved_rps']}", flush=True)
    row = asyncio.run(batched(url, pngs, args.batch, args.clients, args.seconds))
    result["batched"] = row
    print(f"{name:>22}  batches of {args.batch} x {args.clients} clients: {row['images_per_s']:.0f} images/s  "
          f"p50 {row['p50_ms']} ms  errors {row['errors']}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: $DIGITS_MODEL, else the registry's best)")
    parser.add_argument("--rates", type=float, nargs="+", default=[50, 100, 200])
    parser.add_argument("--seconds", type=float, default=15, help="per rate and for the batched load")
    parser.add_argument("--batch", type=int, default=256, help="images per batched request")
    parser.add_argument("--clients", type=int, default=4, help="concurrent batched clients")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--accuracy-images", type=int, default=10000, help="MNIST test digits sent as PNG (0: skip)")
    parser.add_argument("--tag", default="serve_load", help="results file name")
    parser.add_argument("--plain-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from digits_ray.registry import model_to_serve

    model = str(model_to_serve(args.model))
    if args.plain_server:
        plain_server(model, args.port)
        return 0

    from digits_ray.data.mnist import load_split
    from digits_ray.images import png_bytes

    test = load_split("test")
    pngs = [png_bytes(image) for image in test.images[:2000]]
    results = []

    port = free_port()
    plain = start_plain(model, port)
    try:
        results.append(run_server("FastAPI+uvicorn (no Ray)", f"http://127.0.0.1:{port}", pngs, args))
    finally:
        plain.terminate()
        plain.wait(timeout=30)

    import ray
    from ray import serve

    from digits_ray.ray_backend import runtime_env
    from digits_ray.serve.app import build_app
    from digits_ray.serve.settings import ServeSettings

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, runtime_env=runtime_env())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    accuracy = None
    try:
        for replicas in args.replicas:
            serve.run(build_app(ServeSettings(model_dir=model), model_replicas=replicas), name="digits",
                      route_prefix="/")
            results.append(run_server(f"Ray Serve, {replicas} replica{'s' if replicas > 1 else ''}", url, pngs, args))
            if accuracy is None and args.accuracy_images:
                n = min(args.accuracy_images, len(test))
                accuracy = asyncio.run(test_set_through_http(url, test.images[:n], test.labels[:n], 256))
                from digits_ray.predict import Predictor

                offline = Predictor.from_artifact(model).probabilities(test.images[:n]).argmax(axis=1)
                accuracy["offline_accuracy"] = float((offline == test.labels[:n]).mean())
                print(f"MNIST test digits as PNG through /predict: {accuracy['accuracy']:.4%} "
                      f"(offline {accuracy['offline_accuracy']:.4%}, {n} images)", flush=True)
            serve.delete("digits")
    finally:
        serve.shutdown()
        ray.shutdown()
    report(results, accuracy, model, args)
    return 0


def report(results: list[dict[str, Any]], accuracy: dict[str, Any] | None, model: str,
           args: argparse.Namespace) -> None:
    from digits_ray import artifact

    metadata = artifact.read_metadata(model)
    rows = [{"server": r["server"], "rate": f"{row['rate']:.0f}", "achieved": row["achieved_rps"],
             "p50": row["p50_ms"], "p95": row["p95_ms"], "p99": row["p99_ms"], "errors": row["errors"]}
            for r in results for row in r["rates"]]
    batch_rows = [{"server": r["server"], "images_per_s": f"{r['batched']['images_per_s']:.0f}",
                   "p50": r["batched"]["p50_ms"], "p99": r["batched"]["p99_ms"], "errors": r["batched"]["errors"]}
                  for r in results]
    def p50_at_target(result: dict[str, Any]) -> float:
        return next(row["p50_ms"] for row in result["rates"] if row["rate"] == TARGETS["rate"])

    ratios = ({r["server"]: round(p50_at_target(r) / p50_at_target(results[0]), 2) for r in results[1:]}
              if TARGETS["rate"] in args.rates else {})
    lines = [
        f"# Serving load test: `{metadata['model']}` ({Path(model).name})",
        "",
        f"Single PNG image per request at fixed rates ({args.seconds:.0f} s each, open loop), latency in ms:",
        "",
        markdown_table(rows, [("server", "server"), ("rate", "req/s sent"), ("achieved", "req/s answered"),
                              ("p50", "p50"), ("p95", "p95"), ("p99", "p99"), ("errors", "errors")]),
        "",
        f"Batched: {args.clients} clients, {args.batch} PNG images per multipart request ({args.seconds:.0f} s):",
        "",
        markdown_table(batch_rows, [("server", "server"), ("images_per_s", "images/s"), ("p50", "p50 ms"),
                                    ("p99", "p99 ms"), ("errors", "errors")]),
        "",
        f"p50 at {TARGETS['rate']} req/s relative to plain FastAPI: "
        + ", ".join(f"{k} {v}x" for k, v in ratios.items()),
    ]
    if accuracy:
        lines += ["", f"MNIST test digits sent as PNG through `/predict`: {accuracy['accuracy']:.2%} "
                      f"({accuracy['images']} images); the same model offline: {accuracy['offline_accuracy']:.2%}."]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    partial = RESULTS / f".{args.tag}.md.tmp"
    partial.write_text(text)
    os.replace(partial, RESULTS / f"{args.tag}.md")
    print(text)
    plot(results, RESULTS / f"{args.tag}_latency.png")
    save(args.tag, {"model": model, "model_name": metadata["model"], "targets": TARGETS, "results": results,
                    "serve_vs_plain_p50": ratios, "accuracy": accuracy,
                    "medians_ms": {r["server"]: {f"{row['rate']:.0f}": row["p50_ms"] for row in r["rates"]}
                                   for r in results}})


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        rates = [row["rate"] for row in r["rates"]]
        axes[0].plot(rates, [row["p50_ms"] for row in r["rates"]], "o-", label=f"{r['server']} p50")
        axes[0].plot(rates, [row["p99_ms"] for row in r["rates"]], "x--", label=f"{r['server']} p99")
        middle = r["rates"][len(r["rates"]) // 2]
        ms = np.sort(middle["latencies_ms"])
        axes[1].plot(ms, np.arange(1, len(ms) + 1) / len(ms), label=f"{r['server']} @ {middle['rate']:.0f} req/s")
    axes[0].set(xlabel="requests/s sent", ylabel="latency (ms)", yscale="log", title="Single-image latency")
    axes[1].set(xlabel="latency (ms)", ylabel="fraction of requests", xscale="log", title="Latency CDF")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
