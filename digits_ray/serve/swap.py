"""Swap the model of a running service in place: check it here, then a config deploy of a new user_config.

What ``serve deploy`` of an edited cluster/serve.yaml does, with the checks an operator wants first: the
model must load and answer here before anything is sent, the service's current config is read back from
the cluster (so nothing else in it changes), and the command waits until the application is RUNNING and,
given the service's URL, until its /healthz names the new version or reports why the replicas refused it.
Only config deploys (``serve deploy``, this command, a RayService) reconfigure replicas in place; an app
started by ``serve run`` or ``python serve_app.py`` is swapped through the registry instead (promote an
entry: replicas that follow the registry pick it up).
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from digits_ray.errors import DigitsError
from digits_ray.serve.settings import APP_NAME, DEPLOYMENT_NAME, ModelChoice

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


class SwapError(DigitsError):
    pass


def check_model(model: str, registry: str | None) -> Path:
    """Resolve and load ``model`` here, and push the probe digit through it, as a replica will."""
    from digits_ray.models.registry import resolve_model
    from digits_ray.serve.holder import load

    folder = resolve_model(model, registry)
    try:
        load(folder)
    except DigitsError as err:
        raise SwapError(f"refused before deploying: {err}") from None
    return folder


def declarative_config(details: dict[str, Any], app: str) -> dict[str, Any]:
    """The cluster's Serve config (every app deployed from a config) as ``serve deploy`` takes it."""
    apps = details.get("applications") or {}
    if app not in apps:
        raise SwapError(f"no Serve application {app!r} on this cluster; running: {', '.join(apps) or 'none'}")
    if not apps[app].get("deployed_app_config"):
        raise SwapError(f"the application {app!r} was started by `serve run` or `python serve_app.py`, which "
                        f"restart replicas to change them; promote a registry entry instead (its replicas "
                        f"follow the registry), or deploy it from a config (cluster/serve.yaml)")
    configs = [a["deployed_app_config"] for a in apps.values() if a.get("deployed_app_config")]
    config: dict[str, Any] = {"applications": configs}
    for key in ("proxy_location", "http_options", "grpc_options"):
        if details.get(key) is not None:
            config[key] = details[key]
    return json.loads(json.dumps(config))  # a deep copy


def with_model(config: dict[str, Any], app: str, choice: ModelChoice) -> dict[str, Any]:
    """``config`` with the DigitsService deployment of ``app`` given ``choice`` as its user_config."""
    target = next(a for a in config["applications"] if a["name"] == app)
    deployments = target.setdefault("deployments", [])
    entry = next((d for d in deployments if d["name"] == DEPLOYMENT_NAME), None)
    if entry is None:
        entry = {"name": DEPLOYMENT_NAME}
        deployments.append(entry)
    entry["user_config"] = choice.to_user_config()
    return config


def _healthz(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url.rstrip('/')}/healthz", timeout=5) as response:
        return json.loads(response.read())


def swap(model: str | None, registry: str | None, address: str = DEFAULT_DASHBOARD, app: str = APP_NAME,
         url: str | None = None, timeout_s: float = 120) -> dict[str, Any]:
    """Deploy ``model`` (None: follow the registry) to ``app``; returns the final /healthz, or the app status."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from digits_ray.models.registry import registry_path, served_entry

    registry = str(registry_path(registry).resolve())
    folder = check_model(model, registry) if model else check_model(str(served_entry(registry)), registry)
    client = ServeSubmissionClient(address)
    choice = ModelChoice(model=str(folder) if model else None, registry=registry)
    client.deploy_applications(with_model(declarative_config(client.get_serve_details(), app), app, choice))
    deadline = time.monotonic() + timeout_s
    status: Any = None
    while time.monotonic() < deadline:
        status = client.get_serve_details()["applications"][app]["status"]
        if status == "RUNNING":
            if url is None:
                return {"status": status, "model": folder.name}
            health = _healthz(url)
            if health.get("model", {}).get("version") == folder.name:
                return health
            if health.get("swap_error"):
                raise SwapError(f"the replicas refused {folder}: {health['swap_error']['error']}; still serving "
                                f"{health['model']['version']}")
        elif status == "DEPLOY_FAILED":
            raise SwapError(f"the deploy failed: {client.get_serve_details()['applications'][app]['message']}")
        time.sleep(1)
    raise SwapError(f"{app} did not serve {folder.name} within {timeout_s:.0f} s (last status {status})")
