"""Make the pictures in docs/images/: the drawing page and MLflow's UI on a search. Not a test.

    python docs/screenshots.py --model /path/to/model --data-dir /path/to/mnist
    python docs/screenshots.py --model /path/to/model --only page      # the page's three pictures
    python docs/screenshots.py --data-dir /path/to/mnist --only mlflow # the search and MLflow's UI

page: starts the service (`python serve_app.py`, one replica, on a free port of 127.0.0.1, with a Ray of
its own), draws a digit on the page in headless Chromium (Debian's chromium through Playwright) and
takes page-gradcam.png and page-saliency.png, then draws a K (or, if the model takes it for a digit,
uploads letters rendered with a DejaVu font until it says "not a digit") and takes page-abstain.png.
mlflow: runs `jobs/tune.py --smoke` on --data-dir with MLflow tracking into a temporary folder, starts
`mlflow ui` on its SQLite store and takes mlflow-search.png (the search's runs, with their settings and
results as columns) and mlflow-run.png (the published winner's run: metrics and tags).

Everything it starts has a Ray temp folder and token of its own, and is stopped at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")  # Debian's fonts-dejavu-core
MAX_BYTES = 200_000  # a picture larger than this is reduced to 256 colours
# A 3 as a person draws it, in canvas fractions: the top arc, the waist, the bottom arc.
THREE = [(0.3, 0.2), (0.45, 0.12), (0.62, 0.15), (0.68, 0.27), (0.6, 0.4), (0.45, 0.47), (0.62, 0.53),
         (0.7, 0.66), (0.64, 0.8), (0.47, 0.87), (0.3, 0.8)]
LETTER_K = [[(0.3, 0.15), (0.3, 0.85)], [(0.72, 0.15), (0.32, 0.52), (0.72, 0.85)]]  # drawn first, as "not a digit"
NOT_DIGITS = "AKWXMH#%&?"  # else uploaded as rendered letters, in this order, until the model abstains on one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_env(tmp: Path, ray_tmp: Path) -> dict[str, str]:
    """This environment, with a Ray of its own: a temp folder (also the marker of every process it starts),
    a token file, no cluster to join."""
    token = tmp / "auth_token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update({"RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_TOKEN_PATH": str(token), "PYTHONPATH": str(ROOT),
                "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())})
    return env


def marked(ray_tmp: Path) -> list[int]:
    """This user's processes started with ``RAY_TMPDIR=ray_tmp``: ours, and the Ray processes they started."""
    marker = f"RAY_TMPDIR={ray_tmp}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0") and int(proc.name) != os.getpid():
                found.append(int(proc.name))
        except OSError:  # gone, or another user's
            pass
    return found


def end_marked(ray_tmp: Path) -> None:
    """End what is left of what this script started (found by its marker, never by name)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = marked(ray_tmp)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while pids and marked(ray_tmp) and time.monotonic() < deadline:
            time.sleep(0.5)


@contextmanager
def started(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Run ``command`` in a session of its own; at the end Ctrl-C it, then end whatever it left behind."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait(timeout=30)
        end_marked(Path(env["RAY_TMPDIR"]))


def wait_for(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{process.args[:3]} exited ({process.returncode}) before {url} answered; log: {log}")
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(2)
    sys.exit(f"{url} did not answer 200 within {timeout_s:.0f} s; log: {log}")


def save(png: bytes, name: str) -> Path:
    """Write ``docs/images/<name>``, reduced to a palette when it is over MAX_BYTES."""
    from PIL import Image

    path = IMAGES / name
    IMAGES.mkdir(parents=True, exist_ok=True)
    if len(png) > MAX_BYTES:
        buffer = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(buffer, "PNG", optimize=True)
        png = buffer.getvalue()
    path.write_bytes(png)
    print(f"{path.relative_to(ROOT)}: {len(png) // 1024} KB")
    return path


def letter_png(text: str) -> bytes:
    """``text`` in black on a white 280x280 canvas, like something drawn on the page."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("L", (280, 280), 255)
    ImageDraw.Draw(image).text((140, 140), text, fill=0, anchor="mm", font=ImageFont.truetype(str(FONT), 200))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def predict(url: str, png: bytes) -> dict:
    request = urllib.request.Request(f"{url}/predict", data=png, headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.load(answer)


def page_pictures(model: Path, tmp: Path, ray_tmp: Path) -> None:
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "serve.log"
    command = [sys.executable, "serve_app.py", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--replicas", "1", "--address", "local", "--num-cpus", "2"]
    with started(command, own_env(tmp, ray_tmp), log) as service:
        wait_for(f"{url}/healthz", service, log, timeout_s=600)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 800, "height": 720})
            page.goto(f"{url}/")
            box = page.locator("#canvas").bounding_box()

            def draw(strokes: list[list[tuple[float, float]]]) -> None:
                with page.expect_response("**/predict?explain=gradcam"):
                    for (x, y), *rest in strokes:
                        page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
                        page.mouse.down()
                        for x, y in rest:
                            page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=6)
                        page.mouse.up()

            draw([THREE])
            page.wait_for_function("document.getElementById('digit').textContent !== '?'")
            if page.locator("#digit").text_content() != "3":
                sys.exit(f"the model read the drawn 3 as {page.locator('#digit').text_content()!r}")
            page.wait_for_function("document.getElementById('saliency').src.startsWith('data:')")
            save(page.locator("main").screenshot(), "page-gradcam.png")

            with page.expect_response("**/predict?explain=saliency"):
                page.check("input[value=saliency]")
            page.wait_for_function("document.getElementById('map-caption').textContent.startsWith('saliency')")
            save(page.locator("main").screenshot(), "page-saliency.png")

            page.click("#clear")
            page.check("input[value=gradcam]")
            draw(LETTER_K)
            page.wait_for_function("document.getElementById('digit').textContent !== '?'")
            if not page.locator("#digit.abstain").count():  # the model took the drawn K for a digit
                letter = next((c for c in NOT_DIGITS if predict(url, letter_png(c)).get("abstain")), None)
                if letter is None:
                    sys.exit(f"the model at {model} abstains on none of {NOT_DIGITS!r}: no 'not a digit' picture")
                upload = tmp / f"not-a-digit-{ord(letter)}.png"
                upload.write_bytes(letter_png(letter))
                page.click("#clear")
                with page.expect_response("**/predict?explain=gradcam"):
                    page.set_input_files("#upload", str(upload))
                page.wait_for_selector("#digit.abstain")
            save(page.locator("main").screenshot(), "page-abstain.png")
            browser.close()


def run_search(data_dir: Path, storage: Path, name: str, tmp: Path, env: dict[str, str], ray_tmp: Path) -> None:
    search = [sys.executable, "jobs/tune.py", "--smoke", "--name", name, "--data-dir", str(data_dir),
              "--storage-path", str(storage), "--registry", str(tmp / "models"), "--address", "local",
              "--num-cpus", "2"]
    log = tmp / "tune.log"
    print("running", " ".join(search), f"(log: {log})", flush=True)
    with open(log, "w") as out:
        try:
            failed = subprocess.run(search, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=3600,
                                    start_new_session=True).returncode
        finally:
            end_marked(ray_tmp)
    if failed:
        sys.exit(f"the smoke search failed; log: {log}")


def mlflow_pictures(data_dir: Path | None, tmp: Path, ray_tmp: Path, kept: Path | None = None) -> None:
    from playwright.sync_api import sync_playwright

    storage, name = (kept or tmp) / "ray_results", "smoke"
    env = own_env(tmp, ray_tmp)
    if kept is None:
        run_search(data_dir, storage, name, tmp, env, ray_tmp)
    store = storage / "mlflow.db"  # the default store beside Ray's storage (docs/tuning.md)
    if not store.exists():
        sys.exit(f"no {store}: is the `track` extra installed? (the search's log: {tmp / 'tune.log'})")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "mlflow.log"
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{store}",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with started(command, env, log) as ui:
        wait_for(f"{url}/health", ui, log, timeout_s=300)
        query = urllib.parse.urlencode({"experiment_name": f"digits-ray/{name}"})
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?{query}", timeout=30) as answer:
            experiment = json.load(answer)["experiment"]["experiment_id"]

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(f"{url}/#/experiments/{experiment}/runs")
            page.wait_for_selector("text=trial_", timeout=60_000)
            if page.get_by_text("Model training", exact=True).count():  # MLflow 3: the classic view, not GenAI's
                page.get_by_text("Model training", exact=True).click()
            if page.locator("button[aria-label='Close']").count():  # MLflow 3's assistant panel
                page.locator("button[aria-label='Close']").click()
            # The runs table: the trials' search settings and what each reached, the winner's test accuracy.
            page.get_by_role("button", name="Columns").click()
            tree = page.locator(".du-bois-light-tree-title")
            tree.filter(has_text=re.compile(r"^Metrics [(]")).wait_for()
            for column in ("Dataset", "Source", "Models", "best_val_accuracy", "test_accuracy", "model",
                           "log2_batch_size", "learning_rate", "augment"):
                title = tree.filter(has_text=re.compile(f"^{column}$"))
                for group in ("Metrics", "Parameters"):  # a group of the column tree may start closed
                    closed = page.locator(".du-bois-light-tree-treenode-switcher-close",
                                          has=tree.filter(has_text=re.compile(f"^{group} [(]")))
                    if not title.count() and closed.count():
                        closed.first.locator(".du-bois-light-tree-switcher").click()
                        page.wait_for_timeout(500)
                title.first.click()
                page.wait_for_timeout(300)
            page.keyboard.press("Escape")
            page.wait_for_timeout(2000)  # the table's columns settle
            save(page.screenshot(clip={"x": 0, "y": 0, "width": 1440, "height": 400}), "mlflow-search.png")

            page.set_viewport_size({"width": 1280, "height": 900})
            page.get_by_text("winner", exact=False).first.click()  # the published winner's run
            page.wait_for_selector("text=test_accuracy", timeout=60_000)
            page.wait_for_timeout(2000)
            save(page.screenshot(clip={"x": 190, "y": 0, "width": 1090, "height": 820}), "mlflow-run.png")
            browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model folder (artifact) with an abstain rule, for the page")
    parser.add_argument("--data-dir", type=Path, help="full MNIST, for the smoke search behind the MLflow pictures")
    parser.add_argument("--only", choices=("page", "mlflow"), help="make one group of pictures")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, store, registry)")
    parser.add_argument("--kept", type=Path, metavar="FOLDER",
                        help="the folder an earlier --keep run kept: take the MLflow pictures of its search")
    args = parser.parse_args()
    if not CHROMIUM:
        parser.error("needs Debian's chromium (apt-get install chromium)")
    if args.only != "mlflow" and not (args.model and (args.model / "metadata.json").is_file()):
        parser.error("--model must name a model folder (one with metadata.json)")
    if args.only != "page" and not args.kept and not (args.data_dir and args.data_dir.is_dir()):
        parser.error("--data-dir must name the MNIST folder")
    if args.kept and not (args.kept / "ray_results" / "mlflow.db").is_file():
        parser.error(f"--kept {args.kept} holds no ray_results/mlflow.db from an earlier --keep run")
    tmp = Path(tempfile.mkdtemp(prefix="digits-ray-screenshots-"))
    ray_tmp = Path(tempfile.mkdtemp(prefix="shot-", dir="/tmp"))  # short: Ray's socket paths are limited
    print(f"logs in {tmp}", flush=True)
    try:
        if args.only != "mlflow":
            page_pictures(args.model.resolve(), tmp, ray_tmp)
        if args.only != "page":
            mlflow_pictures(args.data_dir and args.data_dir.resolve(), tmp, ray_tmp,
                            args.kept and args.kept.resolve())
    finally:
        end_marked(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
