"""The layout before (for bench/serve_load.py): an ingress deployment that parses and calls a batching model
deployment. Its own module without ``from __future__ import annotations``: FastAPI must see the routes'
real types once ``serve.ingress`` has moved them onto its class."""

import asyncio
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def split_app(model: str) -> Any:
    """The layout before: an ingress deployment that parses and calls a batching model deployment."""
    from ray import serve

    from digits_ray.inference.predictor import Predictor
    from digits_ray.serve.inputs import RequestError, parse
    from digits_ray.serve.service import split_answers
    from digits_ray.serve.settings import ServeSettings

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5})
    class Model:
        def __init__(self) -> None:
            from digits_ray.keras_api import limit_threads

            limit_threads(1)
            self.predictor = Predictor.from_artifact(model)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0005)
        async def predict(self, requests: list[np.ndarray]) -> list[list[dict[str, Any]]]:
            answers = await asyncio.to_thread(self.predictor.predict, np.concatenate(requests))
            return split_answers(answers, [len(r) for r in requests])

    @serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
    @serve.ingress(api)
    class Ingress:
        def __init__(self, handle: Any) -> None:
            self.model = handle
            self.settings = ServeSettings()

        @api.get("/healthz")
        async def healthz(self) -> dict[str, str]:
            return {"status": "ok"}

        @api.post("/predict")
        async def predict(self, request: Request) -> JSONResponse:
            try:
                parsed = await parse(request.headers, request.stream(), self.settings)
            except RequestError as err:
                return JSONResponse(err.body(), status_code=err.status)
            predictions = await self.model.predict.remote(np.stack(parsed.images))
            return JSONResponse({"predictions": predictions} if parsed.batch else predictions[0])

    return Ingress.bind(Model.bind())
