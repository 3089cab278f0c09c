"""The Serve application: a FastAPI ingress in front of a batching, autoscaling model deployment.

    client -> DigitsIngress (HTTP: parse, bound, authorize) -> DigitsModel (@serve.batch -> Predictor)

The ingress decodes images (CPU work that scales with its own replicas) and sends uint8 arrays; the
model deployment merges concurrent calls into one forward pass. ``@serve.batch`` sits on the model's own
method, never on a route (ray-project/ray#34527), and the ingress accepts many requests at once so that
those batches can fill.

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
from ray.serve.handle import DeploymentHandle

from digits_ray.images import data_url, png_bytes, saliency_overlay
from digits_ray.predict import describe
from digits_ray.schema import IMAGE_SIZE
from digits_ray.serve.inputs import RequestError, parse
from digits_ray.serve.settings import REPLICA_ENV, ModelScaling, ServeSettings, token_digest

api = FastAPI(
    title="digits-ray",
    description="Handwritten digit recognition (MNIST) on Ray Serve. POST an image to /predict; GET / draws.",
)


@serve.deployment
class DigitsModel:
    """One loaded model per replica; concurrent calls are merged into one forward pass."""

    def __init__(self, model_dir: str, tf_threads: int, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        from digits_ray.keras_api import limit_threads
        from digits_ray.predict import Predictor

        limit_threads(tf_threads)

        self.predictor = Predictor.from_artifact(model_dir)
        self.predictor.probabilities(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE), np.uint8))  # trace before any request
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def info(self) -> dict[str, Any]:
        return {**self.predictor.info.to_dict(), "metadata": self.predictor.metadata}

    async def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, 28, 28) -> probabilities (N, 10); N is one request's images."""
        return await self._batched(images)

    @serve.batch(max_batch_size=ModelScaling.max_batch_size, batch_wait_timeout_s=ModelScaling.batch_wait_timeout_s)
    async def _batched(self, requests: list[np.ndarray]) -> list[np.ndarray]:
        sizes = np.cumsum([len(r) for r in requests])[:-1]
        # In a thread: the replica's event loop keeps collecting the next batch meanwhile.
        probs = await asyncio.to_thread(self.predictor.probabilities, np.concatenate(requests))
        return np.split(probs, sizes)

    def saliency(self, image: np.ndarray, digit: int) -> np.ndarray:
        return self.predictor.saliency(image, digit)


def _page() -> str:
    return (files("digits_ray.serve") / "page.html").read_text(encoding="utf-8")


@serve.deployment
@serve.ingress(api)
class DigitsIngress:
    def __init__(self, model: DeploymentHandle, settings: ServeSettings) -> None:
        self.model = model  # the DigitsModel deployment
        self.settings = settings
        self.page = _page()
        self._info: dict[str, Any] | None = None

    async def model_info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self.model.info.remote()
        return self._info

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page_route(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        info = await self.model_info()
        return {"status": "ok", "model": {k: info[k] for k in ("name", "version")}}

    @api.get("/model")
    async def model_metadata(self) -> dict[str, Any]:
        """The served model's metadata (what trained it, validation and test figures)."""
        info = await self.model_info()
        return {**info, "auth_required": self.settings.token_sha256 is not None,
                "limits": {"max_body_bytes": self.settings.max_body_bytes, "max_images": self.settings.max_images,
                           "max_explained": self.settings.max_explained}}

    @api.post("/predict", openapi_extra={"requestBody": {"content": {
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary"},
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "application/json": {"schema": {"type": "object", "properties": {
            "pixels": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
            "images": {"type": "array"}}}}}}})
    async def predict(self, request: Request, explain: bool = False) -> JSONResponse:
        """Digit, confidence, top 3 and all ten probabilities per image; ``explain=true`` adds the 28x28
        the model saw and a gradient saliency map, as PNG data URLs."""
        try:
            self._authorize(request)
            parsed = await parse(request.headers, request.stream(), self.settings)
            if explain and len(parsed.images) > self.settings.max_explained:
                raise RequestError(422, f"explain=true is accepted for up to {self.settings.max_explained} "
                                        f"images; got {len(parsed.images)}")
        except RequestError as err:
            headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
            return JSONResponse(err.body(), status_code=err.status, headers=headers)
        images = np.stack(parsed.images)
        probs = await self.model.predict.remote(images)
        predictions = [describe(p) for p in probs]
        if explain:
            saliencies = await asyncio.gather(*[self.model.saliency.remote(img, p["digit"])
                                                for img, p in zip(images, predictions)])
            for img, prediction, saliency in zip(images, predictions, saliencies):
                prediction["seen"] = data_url(png_bytes(img))
                prediction["saliency"] = data_url(png_bytes(saliency_overlay(img, saliency)))
        info = await self.model_info()
        model = {"name": info["name"], "version": info["version"]}
        if parsed.batch:
            return JSONResponse({"predictions": predictions, "model": model})
        return JSONResponse({**predictions[0], "model": model})

    def _authorize(self, request: Request) -> None:
        if self.settings.token_sha256 is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(token), self.settings.token_sha256):
            raise RequestError(401, "POST /predict needs the header 'Authorization: Bearer <token>' with the "
                                    "server's token")


def build_app(settings: ServeSettings, model_replicas: int | None = None) -> serve.Application:
    """The application ``serve_app.py`` exposes; ``model_replicas`` fixes the count (else autoscaling)."""
    scaling = settings.model
    model = DigitsModel.options(**scaling.deployment_options(model_replicas)).bind(
        settings.model_dir, scaling.tf_threads, scaling.max_batch_size, scaling.batch_wait_timeout_s)
    ingress = DigitsIngress.options(
        ray_actor_options={"num_cpus": settings.ingress_cpus, "runtime_env": {"env_vars": REPLICA_ENV}},
        max_ongoing_requests=settings.ingress_max_ongoing_requests,
    )
    return ingress.bind(model, settings)
