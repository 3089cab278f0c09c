"""What a Serve deployment of digits-ray is configured with: one dataclass, filled from flags or environment."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from digits_ray.errors import ConfigError
from digits_ray.images import DEFAULT_MAX_PIXELS

TOKEN_ENV = "DIGITS_SERVE_TOKEN"  # when set, POST /predict needs "Authorization: Bearer <token>"
HOST_ENV = "DIGITS_SERVE_HOST"
PORT_ENV = "DIGITS_SERVE_PORT"
DEFAULT_HOST = "127.0.0.1"  # Serve's HTTP port is outside Ray's token auth: loopback unless told otherwise
DEFAULT_PORT = 8000
APP_NAME = "digits"


def token_digest(token: str) -> str:
    """Replicas keep the token's SHA-256, never the token: deployment arguments are visible in Ray's state."""
    return hashlib.sha256(token.encode()).hexdigest()


# Replica processes run our async handlers on Serve's own event loop instead of a second one in a
# thread: one cross-thread hop less per request (about 3 ms of 16 at p50 on 2 cores). Our handlers keep
# their heavy work off that loop: image decoding and inference run in worker threads, sync methods
# (saliency) in Serve's thread pool.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


@dataclass(frozen=True)
class ModelScaling:
    """The model deployment's replicas and batching, sized for a 2-CPU machine by default."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: int = 16  # per replica, before the autoscaler adds one
    num_cpus: float = 0.5
    tf_threads: int = 1  # TensorFlow intra-op threads per replica (replicas, not threads, scale out)
    max_batch_size: int = 32  # calls merged by @serve.batch (a call carries one request's images)
    batch_wait_timeout_s: float = 0.0005  # at low load a lone request waits this long for company
    max_ongoing_requests: int = 64  # >= max_batch_size, so batches can fill

    def deployment_options(self, replicas: int | None = None) -> dict[str, Any]:
        """``replicas`` fixes the count (benchmarks); None autoscales between min and max."""
        scaling: dict[str, Any] = (
            {"num_replicas": replicas} if replicas else
            {"autoscaling_config": {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                    "target_ongoing_requests": self.target_ongoing_requests,
                                    "upscale_delay_s": 3, "downscale_delay_s": 60}})
        return {**scaling, "ray_actor_options": {"num_cpus": self.num_cpus, "runtime_env": {"env_vars": REPLICA_ENV}},
                "max_ongoing_requests": self.max_ongoing_requests}


@dataclass(frozen=True)
class ServeSettings:
    model_dir: str
    max_body_bytes: int = 8 * 1024 * 1024
    max_images: int = 256  # per request
    max_explained: int = 16  # images per request that may ask for the model's view and saliency
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # declared width x height of one image
    max_request_pixels: int = 2 * DEFAULT_MAX_PIXELS  # all images of one request (about 0.5 GB of gray floats)
    token_sha256: str | None = None
    ingress_cpus: float = 0.25
    ingress_max_ongoing_requests: int = 256  # many in flight, so the model's batches fill
    model: ModelScaling = field(default_factory=ModelScaling)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_images", "max_explained", "max_image_pixels", "max_request_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


BUILDER_ARGS = {  # `serve run serve_app:builder KEY=VALUE ...`
    "model": "model folder (default: $DIGITS_MODEL, else the registry's best)",
    "replicas": "fixed model replicas (default: autoscale 1..2)",
    "max_images": "images per request",
    "max_body_bytes": "request body limit",
}


def settings_from_args(args: dict[str, str]) -> tuple[ServeSettings, int | None]:
    """Settings from builder arguments and the environment; returns them with the fixed replica count, if any."""
    from digits_ray.registry import model_to_serve

    unknown = sorted(set(args) - set(BUILDER_ARGS))
    if unknown:
        raise ConfigError(f"unknown argument(s) {unknown}; accepted: " +
                          "; ".join(f"{k}=... ({v})" for k, v in BUILDER_ARGS.items()))
    numbers = {}
    for key in ("replicas", "max_images", "max_body_bytes"):
        if key in args:
            if not (str(args[key]).isascii() and str(args[key]).isdigit() and int(args[key]) > 0):
                raise ConfigError(f"{key} must be a positive integer, got {args[key]!r}")
            numbers[key] = int(args[key])
    token = os.environ.get(TOKEN_ENV)
    settings = ServeSettings(
        model_dir=str(model_to_serve(args.get("model"))),
        token_sha256=token_digest(token) if token else None,
        **{k: v for k, v in numbers.items() if k != "replicas"},
    )
    return settings, numbers.get("replicas")


def http_options(host: str | None = None, port: int | None = None) -> dict[str, Any]:
    """Serve's proxy address: flags, else $DIGITS_SERVE_HOST / $DIGITS_SERVE_PORT, else 127.0.0.1:8000."""
    raw_port = port if port is not None else os.environ.get(PORT_ENV, DEFAULT_PORT)
    try:
        port_number = int(raw_port)
    except ValueError:
        raise ConfigError(f"{PORT_ENV} must be a port number, got {raw_port!r}") from None
    return {"host": host or os.environ.get(HOST_ENV) or DEFAULT_HOST, "port": port_number}
