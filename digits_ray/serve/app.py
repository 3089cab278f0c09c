"""The Serve application's one entry: ``app`` (built on first access), ``builder`` and a standalone ``main``.

Serve configs name ``digits_ray.serve.app:app`` (or ``:builder`` with ``args``), which imports wherever the
package is installed (``serve deploy`` cannot upload a local working directory). ``serve_app.py`` at the
repository root is the thin file that ``serve run serve_app:app`` and ``python serve_app.py`` name: it only
re-exports these. $DIGITS_SERVE_TOKEN, when set where the app is built, makes /predict require
"Authorization: Bearer <token>".
"""

from __future__ import annotations

import argparse
from typing import Any

from digits_ray.errors import DigitsError


def builder(args: dict[str, str]) -> Any:
    """Application builder for ``serve run serve_app:builder KEY=VALUE``; keys: see settings.BUILDER_ARGS.

    It also puts Serve's start-up switches into this process's environment: ``serve run`` builds the app
    before it starts a local Ray, which then inherits them (a running cluster keeps its own).
    """
    from digits_ray.serve.service import build_app
    from digits_ray.serve.settings import apply_ray_start_env, settings_from_args

    apply_ray_start_env()
    return build_app(*settings_from_args(args))


def __getattr__(name: str) -> Any:
    # `app` is built on first access, not at import: `serve run serve_app:builder model=...` imports this
    # module too, and must not fail because $DIGITS_MODEL is unset or the registry is still empty.
    if name == "app":
        return builder({})
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="model folder or registry entry (default: $DIGITS_MODEL, else follow the registry)")
    parser.add_argument("--registry", default=None, help="registry folder (default: $DIGITS_REGISTRY, else ./models)")
    parser.add_argument("--host", default=None, help="bind address (default: $DIGITS_SERVE_HOST, else 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: $DIGITS_SERVE_PORT, else 8000)")
    parser.add_argument("--replicas", type=int, default=None, help="fixed replicas (default: 2)")
    parser.add_argument("--autoscale", default=None, metavar="MIN-MAX", help="autoscaled replicas instead")
    parser.add_argument("--max-pending", type=int, default=None,
                        help="requests a replica holds before it answers 503 (default: 64)")
    parser.add_argument("--access-log", action="store_true", help="Serve logs every request (off by default)")
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs of the local Ray instance")
    parser.add_argument("--address", default=None, help="Ray address (default: running cluster, else local)")
    args = parser.parse_args(argv)
    try:
        from ray import serve

        from digits_ray.data.ray_backend import init_ray
        from digits_ray.serve.settings import APP_NAME, http_options, ingress_mode

        options = http_options(args.host, args.port)
        builder_args = {"model": args.model, "registry": args.registry, "replicas": args.replicas,
                        "autoscale": args.autoscale, "max_pending": args.max_pending,
                        "access_log": "true" if args.access_log else None}
        app = builder({k: str(v) for k, v in builder_args.items() if v is not None})
        init_ray(args.num_cpus, args.address)
        serve.start(http_options=options)
        serve.run(app, name=APP_NAME, route_prefix="/")
    except DigitsError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"serving on http://{options['host']}:{options['port']}/ ({ingress_mode()} ingress; Ctrl-C stops)",
          flush=True)
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
