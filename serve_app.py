"""Ray Serve entry point for digits-ray: the drawing page and POST /predict, on 127.0.0.1:8000 by default.

    serve run serve_app:app                          # model: $DIGITS_MODEL, else follow the registry
    serve run serve_app:builder model=~/digits-ray/models/ENTRY   # model (and limits) as arguments
    serve deploy cluster/serve.yaml                  # on a running cluster (the same app, by package path)
    python serve_app.py --model ENTRY                # = digits-ray serve: starts (or joins) Ray, serves until Ctrl-C

Two replicas by default, each both the HTTP ingress and the batching model holder, behind HAProxy.
$DIGITS_SERVE_TOKEN, when set where the app is built, makes /predict require "Authorization: Bearer <token>".

A thin file for the commands above: ``app`` and ``builder`` live in ``digits_ray/serve/app.py``, the
command line in ``digits_ray/cli/serve.py``.
"""

import sys
from typing import Any

from digits_ray.serve import app as _entry
from digits_ray.serve.app import builder

__all__ = ["builder"]  # and `app`, built on first access


def __getattr__(name: str) -> Any:
    if name == "app":  # built on first access: see digits_ray/serve/app.py
        return _entry.app
    raise AttributeError(name)


if __name__ == "__main__":
    from digits_ray.cli import main

    sys.exit(main(["serve", *sys.argv[1:]], prog="python serve_app.py", command="serve"))
