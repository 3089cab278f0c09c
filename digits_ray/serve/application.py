"""The Serve application as an import path: ``app`` (built on first access), ``builder`` and a standalone ``main``.

``serve_app.py`` at the repository root re-exports these for ``serve run serve_app:app``; Serve configs name
``digits_ray.serve.application:app``, which imports wherever the package is installed (``serve deploy`` cannot
upload a local working directory). $DIGITS_SERVE_TOKEN, when set where the app is built, makes /predict
require "Authorization: Bearer <token>".
"""

from __future__ import annotations

import argparse
from typing import Any

from digits_ray.errors import DigitsError


def builder(args: dict[str, str]) -> Any:
    """Application builder for ``serve run serve_app:builder KEY=VALUE``; keys: see settings.BUILDER_ARGS."""
    from digits_ray.serve.app import build_app
    from digits_ray.serve.settings import settings_from_args

    settings, replicas = settings_from_args(args)
    return build_app(settings, replicas)


def __getattr__(name: str) -> Any:
    # `app` is built on first access, not at import: `serve run serve_app:builder model=...` imports this
    # module too, and must not fail because $DIGITS_MODEL is unset or the registry is still empty.
    if name == "app":
        return builder({})
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: $DIGITS_MODEL, else registry best)")
    parser.add_argument("--host", default=None, help="bind address (default: $DIGITS_SERVE_HOST, else 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: $DIGITS_SERVE_PORT, else 8000)")
    parser.add_argument("--replicas", type=int, default=None, help="fixed model replicas (default: autoscale)")
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs of the local Ray instance")
    parser.add_argument("--address", default=None, help="Ray address (default: running cluster, else local)")
    args = parser.parse_args(argv)
    try:
        from ray import serve

        from digits_ray.ray_backend import init_ray
        from digits_ray.serve.settings import APP_NAME, http_options

        options = http_options(args.host, args.port)
        app = builder({k: str(v) for k, v in (("model", args.model), ("replicas", args.replicas)) if v is not None})
        init_ray(args.num_cpus, args.address)
        serve.start(http_options=options)
        serve.run(app, name=APP_NAME, route_prefix="/")
    except DigitsError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"serving on http://{options['host']}:{options['port']}/ (Ctrl-C stops)", flush=True)
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0

