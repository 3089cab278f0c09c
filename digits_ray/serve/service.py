"""The Serve deployment: one replica class that is both the HTTP ingress and the batching model holder.

    client -> HAProxy (or Serve's proxy) -> DigitsService replica: parse, bound, authorize,
              @serve.batch -> one forward pass for many requests -> answer

One deployment, so a request costs one hop into a replica and no call between deployments (bench/README.md
measures the alternatives). ``@serve.batch`` sits on its own method, never on a route
(ray-project/ray#34527), and merges the images of concurrent requests into one forward pass.

Each replica bounds its own work: beyond ``Admission.max_pending`` requests it answers 503 with
Retry-After at once, before reading the body, and a request not answered within the request timeout
gets a 503 too, in the same JSON form as every other refusal. The served model is the deployment's
``user_config`` (``ModelChoice``): ``serve deploy`` of a changed config swaps it in place (see holder.py).

No ``from __future__ import annotations`` here: FastAPI must see the route parameters' real types
(``Request``) once ``serve.ingress`` has moved the routes onto its own class.
"""

import asyncio
import hmac
from importlib.resources import files
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve

from digits_ray.inference.explain import DEFAULT_EXPLAIN_METHOD, EXPLAIN_METHODS
from digits_ray.inference.images import data_url, png_bytes, saliency_overlay
from digits_ray.serve.holder import Loaded, ModelHolder, ModelNotReady
from digits_ray.serve.inputs import RequestError, parse
from digits_ray.serve.metrics import ServiceMetrics
from digits_ray.serve.settings import DEPLOYMENT_NAME, ModelChoice, ServeSettings, token_digest

api = FastAPI(
    title="digits-ray",
    description="Handwritten digit recognition (MNIST) on Ray Serve. POST an image to /predict; GET / draws.",
)

PREDICT_BODY = {"requestBody": {"content": {
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary"},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": {"type": "object", "properties": {
        "pixels": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "images": {"type": "array"}}}}}}}


def split_answers(answers: list, sizes: list[int]) -> list[list]:
    """One flat list of per-image answers -> one list per caller, in the callers' order."""
    if sum(sizes) != len(answers):
        raise ValueError(f"{len(answers)} answers for {sum(sizes)} images")  # a bug: never hand out others' answers
    bounds = np.cumsum([0, *sizes])
    return [answers[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


def explain_method(value: str | None) -> str | None:
    """``explain`` as the API takes it: absent or false (no map), true (the default method), or a method."""
    text = (value or "false").strip().lower()
    if text in ("false", "0", ""):
        return None
    if text in ("true", "1"):
        return DEFAULT_EXPLAIN_METHOD
    if text not in EXPLAIN_METHODS:
        raise RequestError(422, f"explain={value!r} is not one of true, false, {', '.join(EXPLAIN_METHODS)}")
    return text


def running_ingress() -> str:
    """What answers this replica's requests, as Serve in this process sees it (read at Ray's start)."""
    from ray.serve._private import constants

    return "haproxy" if constants.RAY_SERVE_ENABLE_HA_PROXY else "proxy"


def _page() -> str:
    return (files("digits_ray.serve") / "page.html").read_text(encoding="utf-8")


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class DigitsService:
    def __init__(self, settings: ServeSettings) -> None:
        from digits_ray.keras_api import limit_threads

        limit_threads(settings.scaling.tf_threads)
        self.settings = settings
        self.page = _page()
        self.metrics = ServiceMetrics()
        self.holder = ModelHolder(on_change=self.metrics.swapped)
        self.pending = 0  # requests in this replica now (all on the replica's one event loop)
        self.batching = {"passes": 0, "most_callers": 0, "most_images": 0}  # this replica's, for /model
        self._batched.set_max_batch_size(settings.scaling.max_batch_size)
        self._batched.set_batch_wait_timeout_s(settings.scaling.batch_wait_timeout_s)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this at start and for each config deploy that changes ``user_config``.

        A broken model never raises here once one serves: Serve would stop this replica and start one with
        the broken config, an outage. The refusal is reported instead (holder.py).
        """
        await self.holder.apply(ModelChoice.from_user_config(user_config))

    async def check_health(self) -> None:
        await self.holder.check()

    def __del__(self) -> None:
        self.holder.stop()

    # --- the model ---

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0005)
    async def _batched(self, requests: list[np.ndarray]) -> list[tuple[list[dict[str, Any]], Loaded]]:
        """Each caller's uint8 (N, 28, 28) -> its N answers, and the model that gave them."""
        loaded = self.holder.serving()  # this batch keeps this model even if a swap lands meanwhile
        images = np.concatenate(requests)
        self.batching["passes"] += 1
        self.batching["most_callers"] = max(self.batching["most_callers"], len(requests))
        self.batching["most_images"] = max(self.batching["most_images"], len(images))
        # In a thread: the replica's event loop keeps collecting the next batch meanwhile.
        answers = await asyncio.to_thread(loaded.predictor.predict, images)
        return [(part, loaded) for part in split_answers(answers, [len(r) for r in requests])]

    # --- routes ---

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page_route(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Ready (200) once a model is loaded and warm; names the version it serves."""
        if self.holder.current is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
        body: dict[str, Any] = {"status": "ok", "model": self.holder.current.source}
        if self.holder.swap_error:
            body["swap_error"] = self.holder.swap_error
        return JSONResponse(body)

    @api.get("/model")
    async def model_metadata(self) -> dict[str, Any]:
        """The served model's metadata (what trained it, validation and test figures) and the service's limits."""
        try:
            loaded = self.holder.serving()
        except ModelNotReady as err:
            return JSONResponse({"error": str(err)}, status_code=503, headers={"Retry-After": "1"})
        s = self.settings
        rule = loaded.predictor.abstain_rule
        abstain = ({k: v for k, v in rule.to_dict().items() if k not in ("class_means", "precision")} if rule else
                   None)  # None: this model has no not-a-digit rule, so its answers carry no abstain fields
        return {**loaded.predictor.info.to_dict(), "metadata": loaded.predictor.metadata, "abstain": abstain,
                "explain_methods": list(EXPLAIN_METHODS),
                "auth_required": s.token_sha256 is not None, "ingress": running_ingress(), **self.holder.describe(),
                "batching": dict(self.batching),
                "limits": {"max_body_bytes": s.max_body_bytes, "max_images": s.max_images,
                           "max_explained": s.max_explained, "max_pending": s.admission.max_pending,
                           "request_timeout_s": s.admission.request_timeout_s}}

    @api.post("/predict", openapi_extra=PREDICT_BODY)
    async def predict(self, request: Request, explain: str | None = None) -> JSONResponse:
        """Digit, confidence, top 3 and all ten probabilities per image (and ``abstain``, ``abstain_score`` from a
        model with a not-a-digit rule); ``explain=gradcam|saliency|smoothgrad`` (``true``: gradcam) adds the
        28x28 the model saw and that method's map over it, as PNG data URLs."""
        admission = self.settings.admission
        if self.pending >= admission.max_pending:
            return self._refuse(RequestError(503, f"the service is busy ({self.pending} requests in this "
                                                  f"replica); retry after {admission.retry_after_s} s"), "busy")
        self.pending += 1
        try:
            return await asyncio.wait_for(self._answer(request, explain), admission.request_timeout_s)
        except TimeoutError:
            return self._refuse(RequestError(503, f"no answer within {admission.request_timeout_s} s; retry "
                                                  f"after {admission.retry_after_s} s"), "timeout")
        except ModelNotReady as err:
            return self._refuse(RequestError(503, str(err)), "loading")
        except RequestError as err:
            return self._refuse(err)
        finally:
            self.pending -= 1

    async def _answer(self, request: Request, explain: str | None) -> JSONResponse:
        self._authorize(request)
        method = explain_method(explain)
        parsed = await parse(request.headers, request.stream(), self.settings)
        if method and len(parsed.images) > self.settings.max_explained:
            raise RequestError(422, f"explain is accepted for up to {self.settings.max_explained} "
                                    f"images; got {len(parsed.images)}")
        images = np.stack(parsed.images)
        predictions, loaded = await self._batched(images)
        self.metrics.answered(predictions)
        if method:
            for image, prediction in zip(images, predictions):
                explained = await asyncio.to_thread(loaded.predictor.explain, image, prediction["digit"], method)
                prediction["seen"] = data_url(png_bytes(image))
                prediction["saliency"] = data_url(png_bytes(saliency_overlay(image, explained.map)))
                prediction["explanation"] = {"method": explained.method, "note": explained.note}
        if parsed.batch:
            return JSONResponse({"predictions": predictions, "model": loaded.source})
        return JSONResponse({**predictions[0], "model": loaded.source})

    def _refuse(self, err: RequestError, reason: str | None = None) -> JSONResponse:
        self.metrics.refused(err.status, reason)
        headers = ({"WWW-Authenticate": "Bearer"} if err.status == 401 else
                   {"Retry-After": str(self.settings.admission.retry_after_s)} if err.status == 503 else None)
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    def _authorize(self, request: Request) -> None:
        if self.settings.token_sha256 is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(token), self.settings.token_sha256):
            raise RequestError(401, "POST /predict needs the header 'Authorization: Bearer <token>' with the "
                                    "server's token")


def build_app(settings: ServeSettings, choice: ModelChoice) -> serve.Application:
    """The application ``serve_app.py`` exposes."""
    return DigitsService.options(user_config=choice.to_user_config(), **settings.deployment_options()).bind(settings)
