"""``digits-ray serve`` and ``digits-ray swap``: the model behind Ray Serve, and changing it in place.

    digits-ray serve --model ~/digits-ray/models/ENTRY   # starts (or joins) Ray, serves until Ctrl-C
    digits-ray swap ENTRY --url http://127.0.0.1:8000    # a config deploy: the replicas load ENTRY in place

``python serve_app.py`` is ``digits-ray serve``; ``serve run serve_app:app`` and ``serve deploy
cluster/serve.yaml`` build the same application (``digits_ray/serve/app.py``).
"""

from __future__ import annotations

import argparse
from typing import Any

from digits_ray.cli.options import add_ray_options
from digits_ray.serve.settings import DEFAULT_HOST, DEFAULT_PORT, HOST_ENV, PORT_ENV, Admission, Scaling


def add_commands(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve a model over HTTP with Ray Serve (the drawing page, POST /predict)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--model", default=None,
                       help="model folder or registry entry (default: $DIGITS_MODEL, else follow the registry)")
    add_registry_option(serve)
    serve.add_argument("--host", default=None, help=f"bind address (default: ${HOST_ENV}, else {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, default=None, help=f"HTTP port (default: ${PORT_ENV}, else {DEFAULT_PORT})")
    serve.add_argument("--replicas", type=int, default=None, help=f"fixed replicas (default: {Scaling().replicas})")
    serve.add_argument("--autoscale", default=None, metavar="MIN-MAX", help="autoscaled replicas instead")
    serve.add_argument("--max-pending", type=int, default=None,
                       help=f"requests a replica holds before it answers 503 (default: {Admission().max_pending})")
    serve.add_argument("--access-log", action="store_true", help="Serve logs every request (off by default)")
    add_ray_options(serve, "default: every CPU of the machine")
    serve.set_defaults(run=run_serve)

    swap = sub.add_parser("swap", help="swap the model of a running Serve app in place (a config deploy)")
    swap.add_argument("model", nargs="?", default=None,
                      help="model folder or registry entry (omit: follow the registry's served entry)")
    add_registry_option(swap)
    swap.add_argument("--address", default="http://127.0.0.1:8265", help="the Ray dashboard's address")
    swap.add_argument("--app", default="digits", help="Serve application name")
    swap.add_argument("--url", default=None, help="the service's URL: wait until /healthz names the new version")
    swap.add_argument("--timeout", type=float, default=120, help="seconds to wait for the swap")
    swap.set_defaults(run=run_swap)


def add_registry_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", default=None,
                        help="registry folder (default: $DIGITS_REGISTRY, else ~/digits-ray/models)")


def run_serve(args: argparse.Namespace) -> int:
    import time

    from ray import serve

    from digits_ray.data.ray_backend import init_ray
    from digits_ray.serve.app import builder
    from digits_ray.serve.settings import APP_NAME, http_options, ingress_mode

    options = http_options(args.host, args.port)
    builder_args = {"model": args.model, "registry": args.registry, "replicas": args.replicas,
                    "autoscale": args.autoscale, "max_pending": args.max_pending,
                    "access_log": "true" if args.access_log else None}
    app = builder({k: str(v) for k, v in builder_args.items() if v is not None})
    init_ray(args.num_cpus, args.address)
    serve.start(http_options=options)
    serve.run(app, name=APP_NAME, route_prefix="/")
    print(f"serving on http://{options['host']}:{options['port']}/ ({ingress_mode()} ingress; Ctrl-C stops)",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def run_swap(args: argparse.Namespace) -> int:
    from digits_ray.serve.swap import swap

    result = swap(args.model, args.registry, args.address, args.app, args.url, args.timeout)
    served = result.get("model", {})
    version = served.get("version") if isinstance(served, dict) else served
    print(f"{args.app} serves {version}" + ("" if args.url else f" (status {result['status']})"))
    return 0
