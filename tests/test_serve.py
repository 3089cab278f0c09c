"""The Serve application over real HTTP: every input form, every kind of bad input (the server keeps serving),
the bearer token, MNIST digits sent as PNG files, and the drawing page driven in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import math
import shutil

import numpy as np
import pytest
import requests
from PIL import Image

from digits_ray.data.mnist import load_split
from digits_ray.inference.images import png_bytes
from digits_ray.inference.predictor import Predictor
from digits_ray.models import artifact
from tests.processes import free_ports
from tests.test_images import animated_gif, png_declaring

pytestmark = pytest.mark.slow
TOKEN = "test-token-7f3a"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(ray_local, digit_model):
    """Two applications on one Serve instance with its own port: open (the default two replicas), and
    behind a bearer token (one replica)."""
    from ray import serve

    from digits_ray.serve.service import build_app
    from digits_ray.serve.settings import ModelChoice, Scaling, ServeSettings, token_digest

    port = free_ports(1)[0]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    choice = ModelChoice(model=str(digit_model))
    try:
        serve.run(build_app(ServeSettings(), choice), name="digits", route_prefix="/")
        serve.run(build_app(ServeSettings(token_sha256=token_digest(TOKEN), scaling=Scaling(replicas=1)), choice),
                  name="digits-auth", route_prefix="/auth")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def digits(small_mnist):
    return load_split("test", small_mnist)


def png_image(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def test_every_input_form_gets_the_same_answer(server, digits, digit_model):
    image, expected = digits.images[0], Predictor.from_artifact(digit_model).predict(digits.images[:2])
    png = png_bytes(image)
    answers = [
        requests.post(f"{server}/predict", data=png, headers={"Content-Type": "image/png"}),
        requests.post(f"{server}/predict", data=png, headers={"Content-Type": "application/octet-stream"}),
        requests.post(f"{server}/predict", files={"file": ("seven.png", png, "image/png")}),
        requests.post(f"{server}/predict", json={"pixels": image.tolist()}),
    ]
    for response in answers:
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["digit"] == expected[0]["digit"] and len(body["probabilities"]) == 10
        assert body["probabilities"] == pytest.approx(expected[0]["probabilities"], abs=1e-5)
        assert [t["digit"] for t in body["top3"]] == [t["digit"] for t in expected[0]["top3"]]
        assert body["model"] == {"name": "cnn_bn", "version": digit_model.name}
    batch = [
        requests.post(f"{server}/predict", json={"images": [i.tolist() for i in digits.images[:2]]}),
        requests.post(f"{server}/predict", files=[("files", (f"{i}.png", png_bytes(im), "image/png"))
                                                  for i, im in enumerate(digits.images[:2])]),
    ]
    for response in batch:
        assert response.status_code == 200, response.text
        assert [p["digit"] for p in response.json()["predictions"]] == [e["digit"] for e in expected]


def test_concurrent_requests_each_get_their_own_answers(server, digits, digit_model):
    """Many requests at once, of 1 to 5 images each: @serve.batch merges them into shared forward passes,
    and every caller must get the answers for its own images, in order."""
    import asyncio

    import aiohttp

    sizes = np.random.default_rng(0).integers(1, 6, size=60)
    bounds = np.cumsum([0, *sizes])
    expected = Predictor.from_artifact(digit_model).probabilities(digits.images[:bounds[-1]])

    async def one(session: aiohttp.ClientSession, start: int, end: int) -> list[dict]:
        images = [image.tolist() for image in digits.images[start:end]]
        payload = {"pixels": images[0]} if end - start == 1 else {"images": images}
        async with session.post(f"{server}/predict", json=payload) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
        return [body] if end - start == 1 else body["predictions"]

    async def all_at_once() -> list[list[dict]]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            return await asyncio.gather(*[one(session, s, e) for s, e in zip(bounds[:-1], bounds[1:])])

    answers = asyncio.run(all_at_once())
    for start, end, got in zip(bounds[:-1], bounds[1:], answers):
        assert len(got) == end - start
        for i, prediction in zip(range(start, end), got):
            assert prediction["probabilities"] == pytest.approx(expected[i].tolist(), abs=1e-5), i
    # The check above must have covered merged batches: replicas report the most callers one pass served.
    merged = max(requests.get(f"{server}/model").json()["batching"]["most_callers"] for _ in range(8))
    assert merged > 1


def test_explain_returns_what_the_model_saw_and_the_chosen_map(server, digits):
    big = np.asarray(Image.fromarray(255 - digits.images[1]).resize((200, 200)))  # dark on light, large
    for asked, method in (("true", "gradcam"), ("gradcam", "gradcam"), ("saliency", "saliency")):
        response = requests.post(f"{server}/predict?explain={asked}", data=png_bytes(big),
                                 headers={"Content-Type": "image/png"})
        body = response.json()
        assert response.status_code == 200 and body["explanation"]["method"] == method, body.get("explanation")
        seen = png_image(body["seen"])
        assert seen.shape == (28, 28) and seen.dtype == np.uint8 and seen[0].max() == 0  # white on black, framed
        assert png_image(body["saliency"]).shape == (28, 28, 3)
    plain = requests.post(f"{server}/predict?explain=false", data=png_bytes(big),
                          headers={"Content-Type": "image/png"}).json()
    assert "saliency" not in plain and "explanation" not in plain


def test_answers_say_whether_the_model_abstains(server, digits, digit_model):
    """The fixture model carries a not-a-digit rule: a digit passes, a blank canvas does not."""
    info = requests.get(f"{server}/model").json()
    assert info["abstain"]["threshold"] == artifact.read_metadata(digit_model)["abstain"]["threshold"]
    digit = requests.post(f"{server}/predict", data=png_bytes(digits.images[0]),
                          headers={"Content-Type": "image/png"}).json()
    assert digit["abstain"] is False and digit["abstain_score"] <= info["abstain"]["threshold"]
    faint = np.zeros((28, 28), np.uint8)
    faint[13:15, 13:15] = 255  # a speck: far less ink than any digit
    speck = requests.post(f"{server}/predict", json={"pixels": faint.tolist()}).json()
    assert speck["abstain"] is True


def test_health_metadata_and_openapi(server, digit_model):
    assert requests.get(f"{server}/healthz").json() == {
        "status": "ok", "model": {"name": "cnn_bn", "version": digit_model.name}}
    info = requests.get(f"{server}/model").json()
    assert info["metadata"]["test_accuracy"] == artifact.read_metadata(digit_model)["test_accuracy"]
    assert info["auth_required"] is False and info["limits"]["max_images"] == 256
    assert "/predict" in requests.get(f"{server}/openapi.json").json()["paths"]
    assert requests.get(f"{server}/docs").status_code == 200
    assert 'id="canvas"' in requests.get(f"{server}/").text


def over_limit_stream(total: int):
    chunk = b"\0" * 65536
    for _ in range(math.ceil(total / len(chunk))):
        yield chunk


def test_bad_input_gets_a_4xx_saying_why_and_the_server_keeps_serving(server, digits):
    png = png_bytes(np.full((100, 100), 255, np.uint8))
    image = digits.images[0].tolist()
    nine_mib = 9 * 1024 * 1024
    cases = [  # (what, request kwargs, status, words in the error)
        ("not an image", {"data": b"hello", "headers": {"Content-Type": "image/png"}}, 422, "not an image"),
        ("empty body", {"data": b"", "headers": {"Content-Type": "image/png"}}, 400, "empty"),
        ("truncated file", {"data": png[:60], "headers": {"Content-Type": "image/png"}}, 422, "could not be decoded"),
        ("decompression bomb", {"data": png_declaring(60_000, 60_000), "headers": {"Content-Type": "image/png"}},
         422, "at most"),
        ("body over the limit", {"data": b"\0" * nine_mib, "headers": {"Content-Type": "image/png"}}, 413, "limit"),
        ("over the limit, no length", {"data": over_limit_stream(nine_mib), "headers": {"Content-Type": "image/png"}},
         413, "limit"),
        ("wrong JSON shape", {"json": {"pixels": [[1, 2], [3, 4]]}}, 422, "28x28"),
        ("wrong JSON key", {"json": {"image": image}}, 422, '"pixels"'),
        ("JSON not an object", {"json": [image]}, 422, '"pixels"'),
        ("JSON of strings", {"json": {"pixels": [["x"] * 28] * 28}}, 422, "numbers"),
        ("invalid JSON", {"data": b"{pixels: ", "headers": {"Content-Type": "application/json"}}, 400,
         "not valid JSON"),
        ("NaN pixels", {"data": json.dumps({"pixels": [[float("nan")] * 28] * 28}),
                        "headers": {"Content-Type": "application/json"}}, 422, "NaN"),
        ("out-of-range pixels", {"json": {"pixels": [[256] * 28] * 28}}, 422, "[0, 255]"),
        ("too many images", {"json": {"images": [image] * 257}}, 413, "at most 256"),
        ("empty batch", {"json": {"images": []}}, 422, "empty"),
        ("unsupported content type", {"data": b"7", "headers": {"Content-Type": "text/plain"}}, 415, "text/plain"),
        ("unknown multipart field", {"files": {"upload": ("a.png", png_bytes(digits.images[0]))}}, 422, "'file'"),
        ("text multipart field", {"files": {"file": (None, "just text")}}, 422, "not a file"),
        ("blank image", {"data": png, "headers": {"Content-Type": "image/png"}}, 422, "blank"),
        ("explain too many", {"json": {"images": [image] * 17}, "params": {"explain": "true"}}, 422, "explain"),
        ("unknown explain method", {"json": {"pixels": image}, "params": {"explain": "lime"}}, 422, "gradcam"),
        ("deeply nested JSON", {"data": '{"pixels": ' + "[" * 5000 + "]" * 5000 + "}",
                                "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        ("huge integers", {"data": json.dumps({"pixels": [[10 ** 400] * 28] * 28}),
                           "headers": {"Content-Type": "application/json"}}, 422, "non-numbers"),
        ("booleans", {"json": {"pixels": [[True] * 28] * 28}}, 422, "booleans"),
        ("a cut animated GIF", {"data": animated_gif()[:150], "headers": {"Content-Type": "image/gif"}}, 422,
         "no digit found"),  # its first frame decodes: one uniform color
        ("images over the pixel budget", {"files": [("files", (f"{i}.png", png_declaring(4000, 4000)))
                                                    for i in range(3)]}, 413, "pixels in all"),
    ]
    for what, kwargs, status, words in cases:
        response = requests.post(f"{server}/predict", timeout=60, **kwargs)
        assert response.status_code == status, (what, response.status_code, response.text[:300])
        body = response.json()
        assert words in body["error"] and "multipart/form-data" in body["accepted"], (what, body)
    ok = requests.post(f"{server}/predict", json={"pixels": image})
    assert ok.status_code == 200 and 0 <= ok.json()["digit"] <= 9


def test_the_token_guards_predict_only(server, digits):
    png = png_bytes(digits.images[0])
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = requests.post(f"{server}/auth/predict", data=png, headers={"Content-Type": "image/png", **headers})
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        assert "Authorization: Bearer" in response.json()["error"]
    good = requests.post(f"{server}/auth/predict", data=png,
                         headers={"Content-Type": "image/png", "Authorization": f"Bearer {TOKEN}"})
    assert good.status_code == 200 and 0 <= good.json()["digit"] <= 9
    assert requests.get(f"{server}/auth/model").json()["auth_required"] is True
    assert requests.get(f"{server}/auth/healthz").status_code == 200


def test_mnist_test_digits_sent_as_png_match_the_offline_accuracy(server, digits, digit_model):
    offline = Predictor.from_artifact(digit_model).probabilities(digits.images).argmax(axis=1)
    served = []
    for start in range(0, len(digits), 200):
        files = [("files", (f"{i}.png", png_bytes(img), "image/png"))
                 for i, img in enumerate(digits.images[start: start + 200], start)]
        response = requests.post(f"{server}/predict", files=files, timeout=120)
        assert response.status_code == 200, response.text[:300]
        served += [p["digit"] for p in response.json()["predictions"]]
    assert np.array_equal(np.array(served), offline)
    accuracy = float((np.array(served) == digits.labels).mean())
    assert accuracy == pytest.approx(artifact.read_metadata(digit_model)["test_accuracy"], abs=1e-9)


STROKES = {  # digit -> strokes in canvas fractions (0..1), as a person would draw them
    1: [[(0.45, 0.15), (0.55, 0.1), (0.55, 0.9)]],
    7: [[(0.25, 0.2), (0.75, 0.2), (0.45, 0.88)]],
    0: [[(0.5 + 0.22 * math.sin(t / 20 * 2 * math.pi), 0.5 - 0.34 * math.cos(t / 20 * 2 * math.pi))
         for t in range(21)]],
}


def test_the_drawing_page_reads_digits_drawn_in_chromium(server, tmp_path, digits, digit_model):
    from playwright.sync_api import sync_playwright

    from digits_ray.inference.images import image_to_mnist

    assert CHROMIUM, "this test needs Debian's chromium (apt-get install chromium; .ci/run installs it)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 390, "height": 844}, has_touch=True)  # a phone
        page.goto(f"{server}/")
        box = page.locator("#canvas").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390  # fits a phone-sized screen

        for digit, strokes in STROKES.items():
            page.click("#clear")
            assert page.locator("#digit").text_content() == "?"
            with page.expect_response("**/predict?explain=*"):
                for stroke in strokes:
                    (x, y), *rest = stroke
                    page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
                    page.mouse.down()
                    for x, y in rest:
                        page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=6)
                    page.mouse.up()
            page.wait_for_function("document.getElementById('digit').textContent !== '?'")
            assert page.locator("#digit").text_content() == str(digit)
            assert page.locator("#top3 li").count() == 3 and page.locator("#bars .bar").count() == 10
            assert page.locator(f"#bars .bar.best[data-digit='{digit}']").count() == 1
            for view in ("#seen", "#saliency"):
                assert page.locator(view).get_attribute("src").startswith("data:image/png;base64,")
        page.screenshot(path=str(tmp_path / "drawn.png"), full_page=True)

        # A finger on a touch screen: Chromium turns these touch events into the page's pointer events.
        page.click("#clear")
        touch = page.context.new_cdp_session(page)

        def finger(kind: str, x: float, y: float) -> None:
            touch.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [
                {"x": box["x"] + x * box["width"], "y": box["y"] + y * box["height"]}]})

        stroke = STROKES[1][0]
        with page.expect_response("**/predict?explain=*"):
            finger("touchStart", *stroke[0])
            for (x0, y0), (x1, y1) in zip(stroke, stroke[1:]):
                for t in np.linspace(0, 1, 7)[1:]:
                    finger("touchMove", x0 + (x1 - x0) * t, y0 + (y1 - y0) * t)
            touch.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        page.wait_for_function("document.getElementById('digit').textContent === '1'")

        upload = tmp_path / "upload.png"
        upload.write_bytes(png_bytes(255 - np.kron(digits.images[3], np.ones((8, 8), np.uint8))))
        expected = Predictor.from_artifact(digit_model).predict(image_to_mnist(upload.read_bytes())[None])[0]
        with page.expect_response("**/predict?explain=*"):
            page.set_input_files("#upload", str(upload))
        page.wait_for_function(f"document.getElementById('digit').textContent === '{expected['digit']}'")
        browser.close()
    assert Image.open(tmp_path / "drawn.png").size[0] == 390


def test_the_page_asks_for_the_token_and_sends_it(server, tmp_path, digits, digit_model):
    """Behind DIGITS_SERVE_TOKEN the page shows its token row, reports the 401, and predicts once given it."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "this test needs Debian's chromium (apt-get install chromium; .ci/run installs it)"
    upload = tmp_path / "digit.png"
    upload.write_bytes(png_bytes(digits.images[0]))
    expected = Predictor.from_artifact(digit_model).predict(digits.images[:1])[0]["digit"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"{server}/auth/")
        page.wait_for_selector("#token-row", state="visible")  # /model said auth_required
        with page.expect_response("**/auth/predict?explain=*") as answer:
            page.set_input_files("#upload", str(upload))
        assert answer.value.status == 401
        page.wait_for_function("document.getElementById('status').textContent.includes('Bearer')")
        page.fill("#token", TOKEN)
        with page.expect_response("**/auth/predict?explain=*") as answer:
            page.set_input_files("#upload", str(upload))
        assert answer.value.status == 200
        page.wait_for_function(f"document.getElementById('digit').textContent === '{expected}'")
        browser.close()
