"""The Serve application's one entry: ``app`` (built on first access) and ``builder``.

Serve configs name ``digits_ray.serve.app:app`` (or ``:builder`` with ``args``), which imports wherever the
package is installed (``serve deploy`` cannot upload a local working directory). ``serve_app.py`` at the
repository root is the thin file that ``serve run serve_app:app`` names: it re-exports these, and
``python serve_app.py`` is ``digits-ray serve`` (``digits_ray/cli/serve.py``). $DIGITS_SERVE_TOKEN, when set
where the app is built, makes /predict require "Authorization: Bearer <token>".
"""

from __future__ import annotations

from typing import Any


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
