"""What a Serve deployment of digits-ray is configured with, and the environment Ray must start with.

Three kinds of setting, three places:
- ``ServeSettings``: fixed for the life of a replica (limits, batching, scaling); deployment arguments.
- ``ModelChoice``: which model is served; the deployment's ``user_config``, so a config deploy
  (``serve deploy``) swaps it in place through ``reconfigure`` without restarting replicas.
- ``ray_start_env()``: Serve switches that Ray reads once, at import, in every Ray process (the
  controller, the HAProxy manager, the replicas). They must be in the environment of whatever starts
  Ray: ``ray start`` (``cluster/start-local.sh`` exports them), the KubeRay head container, or the
  process that starts a local instance (``python serve_app.py`` and ``serve run`` set them first).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digits_ray.errors import ConfigError
from digits_ray.inference.images import DEFAULT_MAX_PIXELS

TOKEN_ENV = "DIGITS_SERVE_TOKEN"  # when set, POST /predict needs "Authorization: Bearer <token>"
HOST_ENV = "DIGITS_SERVE_HOST"
PORT_ENV = "DIGITS_SERVE_PORT"
INGRESS_ENV = "DIGITS_SERVE_INGRESS"  # haproxy (default) | proxy: what answers on the HTTP port
DEFAULT_HOST = "127.0.0.1"  # Serve's HTTP port is outside Ray's token auth: loopback unless told otherwise
DEFAULT_PORT = 8000
APP_NAME = "digits"
DEPLOYMENT_NAME = "DigitsService"
INGRESS_MODES = ("haproxy", "proxy")
HAPROXY_WRAPPER = "digits-ray-haproxy"  # console script: see digits_ray/serve/haproxy.py
# HAProxy's admission (haproxy.py): requests it sends one replica at once, and how long the rest may wait in
# its queue before it answers 503. A replica answers a few hundred single images per second, in batches of
# up to 32, so 32 at once keeps its batches full and a second of queue is a few hundred requests per replica.
HAPROXY_REPLICA_MAXCONN = 32
HAPROXY_QUEUE_PER_REPLICA = 32  # beyond this many queued per replica, a new request is refused at once
HAPROXY_QUEUE_TIMEOUT_S = 1.0


def token_digest(token: str) -> str:
    """Replicas keep the token's SHA-256, never the token: deployment arguments are visible in Ray's state."""
    return hashlib.sha256(token.encode()).hexdigest()


def ingress_mode() -> str:
    mode = os.environ.get(INGRESS_ENV, "haproxy").strip().lower()
    if mode not in INGRESS_MODES:
        raise ConfigError(f"{INGRESS_ENV}={mode!r} is not one of {', '.join(INGRESS_MODES)}")
    return mode


def haproxy_wrapper() -> Path:
    """The installed ``digits-ray-haproxy`` script, beside this Python (a venv's or a conda env's bin)."""
    path = Path(sys.executable).parent / HAPROXY_WRAPPER
    if not os.access(path, os.X_OK):
        raise ConfigError(f"{path} is missing: install the project (pip install -e .) so that its "
                          f"{HAPROXY_WRAPPER} script exists, or set {INGRESS_ENV}=proxy")
    return path


def ray_start_env(mode: str | None = None) -> dict[str, str]:
    """The Serve switches for the environment that starts Ray (see the module docstring); ``mode``:
    one of INGRESS_MODES, by default $DIGITS_SERVE_INGRESS, else haproxy.

    HAProxy mode (the default) puts a compiled proxy on the HTTP port that forwards straight to each
    replica's own HTTP server: one hop per request instead of three Ray calls through Serve's Python
    proxy (bench/README.md has the figures). Our wrapper keeps HAProxy's stats and metrics ports on
    loopback and ends HAProxy with the Ray process that started it.
    """
    env = {
        # User code on the replica's own event loop: one cross-thread hop less per request. Our handlers
        # keep heavy work off the loop (decoding and inference run in worker threads).
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    }
    if (mode or ingress_mode()) == "haproxy":
        env.update({
            "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_HAPROXY_BINARY_PATH": str(haproxy_wrapper()),
            "RAY_SERVE_HAPROXY_NBTHREAD": "1",  # one thread forwards thousands of requests/s; cores go to replicas
            # A replica leaving (scale-down, swap of replicas, shutdown) stops taking requests at once and
            # finishes those it holds; HAProxy drops it from its table within a reload, well under this.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3",
            "DIGITS_SERVE_REPLICA_MAXCONN": str(HAPROXY_REPLICA_MAXCONN),
            "DIGITS_SERVE_QUEUE_PER_REPLICA": str(HAPROXY_QUEUE_PER_REPLICA),
            "DIGITS_SERVE_QUEUE_TIMEOUT_S": f"{HAPROXY_QUEUE_TIMEOUT_S:g}",
        })
    return env


def apply_ray_start_env() -> dict[str, str]:
    """Put ``ray_start_env()`` into this process's environment (values already set win), before Ray starts."""
    env = ray_start_env()
    for name, value in env.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in env}


@dataclass(frozen=True)
class Scaling:
    """Replicas of the one deployment and what each holds, sized for a 2-CPU machine by default.

    Two fixed replicas by default: a replica killed or wedged leaves the other answering while Serve
    replaces it (starting TensorFlow takes many seconds on 2 cores), and with HAProxy each replica
    parses its own HTTP, so two replicas also use both cores. ``autoscale`` (min, max) instead lets
    Serve add replicas under load, at the price of starting them while the load is on.
    """

    replicas: int = 2
    autoscale: tuple[int, int] | None = None
    target_ongoing_requests: int = 16  # per replica, before the autoscaler adds one
    num_cpus: float = 0.5
    tf_threads: int = 1  # TensorFlow intra-op threads per replica (replicas, not threads, scale out)
    max_batch_size: int = 32  # calls merged by @serve.batch (a call carries one request's images)
    batch_wait_timeout_s: float = 0.0005  # at low load a lone request waits this long for company
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 10.0  # a replica that cannot push one digit through in this is replaced
    graceful_shutdown_timeout_s: float = 20.0  # a stopping replica finishes what it holds within this

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"replicas must be >= 1, got {self.replicas}")
        if self.autoscale is not None and not 1 <= self.autoscale[0] <= self.autoscale[1]:
            raise ConfigError(f"autoscale must be MIN-MAX with 1 <= MIN <= MAX, got {self.autoscale}")


@dataclass(frozen=True)
class Admission:
    """How much work one replica accepts before it answers 503 at once (with Retry-After).

    ``max_pending`` requests in a replica (being parsed, waiting for a batch, in the model): a replica
    answers a few hundred single images per second on 2 cores, so 64 pending is a few hundred
    milliseconds of queue at most. Beyond that a client is better served by a fast "busy" than by
    waiting. Serve's own limits sit above ours as a backstop (``max_ongoing_requests``) so that our
    handler, not Serve's queue, sees the overflow and answers it in the same JSON form as other errors.
    """

    max_pending: int = 64
    retry_after_s: int = 1
    request_timeout_s: float = 10.0  # a request admitted but not answered in this gets a 503
    serve_headroom: int = 64  # Serve's max_ongoing_requests = max_pending + this
    serve_max_queued: int = 64  # requests Serve itself holds for a replica (its 503 beyond, Retry-After too)

    def __post_init__(self) -> None:
        for name in ("max_pending", "retry_after_s", "serve_headroom", "serve_max_queued"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")


@dataclass(frozen=True)
class ServeSettings:
    max_body_bytes: int = 8 * 1024 * 1024
    max_images: int = 256  # per request
    max_explained: int = 16  # images per request that may ask for the model's view and saliency
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # declared width x height of one image
    max_request_pixels: int = 2 * DEFAULT_MAX_PIXELS  # all images of one request (about 0.5 GB of gray floats)
    token_sha256: str | None = None
    access_log: bool = False  # Serve logs every request otherwise: a cost per request that tells little
    scaling: Scaling = field(default_factory=Scaling)
    admission: Admission = field(default_factory=Admission)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_images", "max_explained", "max_image_pixels", "max_request_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    def deployment_options(self) -> dict[str, Any]:
        """Serve options of the one deployment (scaling, limits, health, logging)."""
        from ray.serve.config import BackpressureConfig

        s, a = self.scaling, self.admission
        scaling: dict[str, Any] = (
            {"num_replicas": s.replicas} if s.autoscale is None else
            {"autoscaling_config": {"min_replicas": s.autoscale[0], "max_replicas": s.autoscale[1],
                                    "target_ongoing_requests": s.target_ongoing_requests,
                                    "upscale_delay_s": 3, "downscale_delay_s": 60}})
        return {
            **scaling,
            "ray_actor_options": {"num_cpus": s.num_cpus},
            "max_ongoing_requests": a.max_pending + a.serve_headroom,
            "max_queued_requests": a.serve_max_queued,
            "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=a.retry_after_s),
            "health_check_period_s": s.health_check_period_s,
            "health_check_timeout_s": s.health_check_timeout_s,
            "graceful_shutdown_timeout_s": s.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": 0.5,
            "logging_config": {"enable_access_log": self.access_log},
        }


@dataclass(frozen=True)
class ModelChoice:
    """The served model: a model folder, or (``model`` None) whatever the registry serves, followed.

    A following replica checks the registry every ``poll_s`` seconds and swaps to a newly promoted
    (or, when nothing is pinned, newly best) entry by itself; a pinned folder changes only through a
    new ``user_config``.
    """

    model: str | None = None
    registry: str | None = None
    poll_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.poll_s > 0:
            raise ConfigError(f"poll_s must be > 0, got {self.poll_s}")

    def to_user_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_user_config(cls, config: dict[str, Any] | None) -> ModelChoice:
        config = dict(config or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"unknown user_config key(s) {unknown}; accepted: {sorted(known)}")
        return cls(**config)


BUILDER_ARGS = {  # `serve run serve_app:builder KEY=VALUE ...` and `args:` of a Serve config
    "model": "model folder or registry entry name (default: $DIGITS_MODEL, else follow the registry)",
    "registry": "registry folder (default: $DIGITS_REGISTRY, else ./models)",
    "replicas": "fixed replicas (default: 2)",
    "autoscale": "MIN-MAX replicas, autoscaled, instead of a fixed count",
    "max_images": "images per request",
    "max_body_bytes": "request body limit",
    "max_pending": "requests a replica holds before it answers 503 (default 64)",
    "access_log": "true: Serve logs every request (default false)",
}


def _positive_int(key: str, value: str) -> int:
    text = str(value).strip()
    if not (text.isascii() and text.isdigit() and int(text) > 0):
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return int(text)


def parse_autoscale(value: str) -> tuple[int, int]:
    low, sep, high = str(value).partition("-")
    if not sep:
        raise ConfigError(f"autoscale must be MIN-MAX (for example 1-2), got {value!r}")
    return _positive_int("autoscale MIN", low), _positive_int("autoscale MAX", high)


def _flag(key: str, value: str) -> bool:
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return text in ("true", "1")


def settings_from_args(args: dict[str, str]) -> tuple[ServeSettings, ModelChoice]:
    """Settings and the model choice from builder arguments and the environment, checked now."""
    from digits_ray.models.registry import MODEL_ENV, registry_path, resolve_model

    unknown = sorted(set(args) - set(BUILDER_ARGS))
    if unknown:
        raise ConfigError(f"unknown argument(s) {unknown}; accepted: " +
                          "; ".join(f"{k}=... ({v})" for k, v in BUILDER_ARGS.items()))
    if "replicas" in args and "autoscale" in args:
        raise ConfigError("give replicas=N or autoscale=MIN-MAX, not both")
    scaling = Scaling(
        **({"replicas": _positive_int("replicas", args["replicas"])} if "replicas" in args else {}),
        **({"autoscale": parse_autoscale(args["autoscale"])} if "autoscale" in args else {}),
    )
    admission = Admission(**({"max_pending": _positive_int("max_pending", args["max_pending"])}
                             if "max_pending" in args else {}))
    token = os.environ.get(TOKEN_ENV)
    settings = ServeSettings(
        token_sha256=token_digest(token) if token else None,
        access_log=_flag("access_log", args["access_log"]) if "access_log" in args else False,
        scaling=scaling,
        admission=admission,
        **{k: _positive_int(k, args[k]) for k in ("max_images", "max_body_bytes") if k in args},
    )
    registry = registry_path(args.get("registry")).resolve()
    model = args.get("model") or os.environ.get(MODEL_ENV)
    # Checked where the app is built, so a bad name fails `serve run`/`serve deploy` with this message.
    choice = ModelChoice(model=str(resolve_model(model, registry)) if model else None, registry=str(registry))
    return settings, choice


def http_options(host: str | None = None, port: int | None = None) -> dict[str, Any]:
    """Serve's HTTP address: flags, else $DIGITS_SERVE_HOST / $DIGITS_SERVE_PORT, else 127.0.0.1:8000.

    The request timeout is a backstop above each replica's own (``Admission.request_timeout_s``).
    """
    raw_port = port if port is not None else os.environ.get(PORT_ENV, DEFAULT_PORT)
    try:
        port_number = int(raw_port)
    except ValueError:
        raise ConfigError(f"{PORT_ENV} must be a port number, got {raw_port!r}") from None
    return {"host": host or os.environ.get(HOST_ENV) or DEFAULT_HOST, "port": port_number,
            "request_timeout_s": 30}


if __name__ == "__main__":  # `env $(python -m digits_ray.serve.settings) ray start ...`: one place for the switches
    print("\n".join(f"{name}={value}" for name, value in ray_start_env().items()))
