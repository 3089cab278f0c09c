"""Serve's parts without Serve: splitting a batch among callers, the settings the app is built from, the
HAProxy wrapper's rewrite, and the model holder's swap, refusal and health probe on real models."""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest

from digits_ray.errors import ConfigError, DigitsError
from digits_ray.serve.haproxy import Rewrite, busy_response, rewritten
from digits_ray.serve.holder import PROBE, Loaded, ModelHolder, load, probe_matches
from digits_ray.serve.service import split_answers
from digits_ray.serve.settings import ModelChoice, ServeSettings, settings_from_args


def test_split_answers_gives_each_caller_its_own_slice():
    answers = [f"image {i}" for i in range(7)]
    assert split_answers(answers, [1, 3, 2, 1]) == [["image 0"], ["image 1", "image 2", "image 3"],
                                                    ["image 4", "image 5"], ["image 6"]]
    assert split_answers(answers, [7]) == [answers]
    with pytest.raises(ValueError, match="6 answers for 7 images"):
        split_answers(answers[:6], [4, 3])


def test_builder_arguments_are_checked(digit_model, tmp_path, monkeypatch):
    monkeypatch.delenv("DIGITS_MODEL", raising=False)
    settings, choice = settings_from_args({"model": str(digit_model), "replicas": "3", "max_pending": "8"})
    assert (settings.scaling.replicas, settings.admission.max_pending) == (3, 8)
    assert choice.model == str(digit_model.resolve())
    options = settings.deployment_options()
    assert options["num_replicas"] == 3 and options["max_ongoing_requests"] > 8
    assert options["logging_config"] == {"enable_access_log": False}
    assert options["backpressure_config"].retry_after_s == 1
    settings, choice = settings_from_args({"registry": str(tmp_path), "autoscale": "1-3", "access_log": "true"})
    assert choice.model is None and choice.registry == str(tmp_path.resolve())  # follows the registry
    assert settings.deployment_options()["autoscaling_config"]["max_replicas"] == 3
    assert settings.deployment_options()["logging_config"] == {"enable_access_log": True}
    for args, words in [({"replicas": "0"}, "positive integer"), ({"autoscale": "3"}, "MIN-MAX"),
                        ({"autoscale": "3-1"}, "MIN <= MAX"), ({"replicas": "1", "autoscale": "1-2"}, "not both"),
                        ({"access_log": "maybe"}, "true or false"), ({"colour": "red"}, "unknown argument"),
                        ({"model": str(tmp_path / "nothing")}, "neither a model folder")]:
        with pytest.raises(DigitsError, match=words):
            settings_from_args({"registry": str(tmp_path), **args})
    with pytest.raises(ConfigError, match="unknown user_config key"):
        ModelChoice.from_user_config({"modle": "x"})
    with pytest.raises(ConfigError, match="max_images"):
        ServeSettings(max_images=0)


HAPROXY_CONFIG = """global
    stats socket /tmp/x/admin.sock mode 666 level admin
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    errorfile 503 /tmp/x/500.http
frontend prometheus
    bind :9101
    mode http
frontend http_frontend
    bind *:8000
    # a comment line
    acl is_http-digits path_beg /
    use_backend http-digits if is_http-digits
backend http-digits
    server SERVE_REPLICA_digits-DigitsService-ab12 127.0.0.1:30000 check observe layer4
    server SERVE_PROXY_ACTOR-fallback-77 127.0.0.1:8500 check backup
listen stats
  bind *:8404
  stats enable
"""


def test_the_haproxy_wrapper_bounds_replicas_and_keeps_admin_ports_on_loopback():
    rewrite = Rewrite(maxconn=32, queue_per_replica=16, queue_timeout_s=1.0, busy_page="/tmp/x/busy.http",
                      busy_body="/tmp/x/busy.json")
    fixed = rewritten(HAPROXY_CONFIG, rewrite)
    assert "    bind 127.0.0.1:9101\n" in fixed and "  bind 127.0.0.1:8404\n" in fixed
    assert "    bind *:8000\n" in fixed  # the HTTP frontend keeps the host Serve was given
    assert "127.0.0.1:30000 check observe layer4 maxconn 32\n" in fixed
    assert "127.0.0.1:8500 check backup\n" in fixed  # the fallback proxy is not capped
    assert "    timeout connect 5s\n    timeout queue 1s\n" in fixed
    assert "    errorfile 503 /tmp/x/busy.http\n" in fixed and "500.http" not in fixed
    assert "tune.pool-low-fd-ratio 80" in fixed  # idle connections to replicas are kept under many clients
    refusal = next(line for line in fixed.splitlines() if "http-request return status 503" in line)
    assert "file /tmp/x/busy.json hdr Retry-After 1 if is_http-digits { avg_queue(http-digits) ge 16 }" in refusal
    assert fixed.index(refusal) < fixed.index("use_backend http-digits")  # refused before it is queued
    assert rewritten(fixed, rewrite) == fixed  # a second pass changes nothing
    no_errorfile = HAPROXY_CONFIG.replace("    errorfile 503 /tmp/x/500.http\n", "")
    assert "errorfile 503 /tmp/x/busy.http" in rewritten(no_errorfile, rewrite)


def test_haproxys_own_503_is_the_services_json_with_retry_after():
    head, _, body = busy_response().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 503 ") and "Retry-After: 1" in head
    assert f"Content-Length: {len(body.encode())}" in head
    assert set(json.loads(body)) == {"error", "accepted"} and "busy" in json.loads(body)["error"]


def test_the_holder_swaps_refuses_a_broken_model_and_keeps_serving(digit_model, cli_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(digit_model, broken)
    (broken / "model.keras").write_bytes(b"not a model")
    changes = []

    async def scenario() -> ModelHolder:
        holder = ModelHolder(on_change=lambda *change: changes.append(change))
        await holder.apply(ModelChoice(model=str(digit_model)))
        first = holder.serving()
        await holder.apply(ModelChoice(model=str(broken)))
        assert holder.serving() is first and "broken" in holder.swap_error["requested"]
        await holder.apply(ModelChoice(model=str(cli_model)))
        assert holder.serving().version == cli_model.name and holder.swap_error is None
        await holder.check()
        return holder

    holder = asyncio.run(scenario())
    assert holder.swaps == {"ok": 1, "refused": 1}
    assert [c[0] for c in changes] == ["ok", "refused", "ok"]


def test_a_new_holder_fails_to_start_on_a_missing_model(tmp_path):
    with pytest.raises(DigitsError, match="neither a model folder"):
        asyncio.run(ModelHolder().apply(ModelChoice(model=str(tmp_path / "missing"))))


def test_the_health_probe_catches_a_model_that_changed(digit_model):
    loaded = load(digit_model)
    probe_matches(loaded)  # the same model: the same answer
    drifted = Loaded(loaded.predictor, loaded.folder, np.roll(loaded.probe, 1))
    with pytest.raises(RuntimeError, match="answers the probe digit"):
        probe_matches(drifted)
    assert PROBE.shape == (1, 28, 28) and PROBE.max() == 255


def test_the_app_builds_from_its_real_import_paths_with_the_token_from_the_environment(digit_model, monkeypatch):
    """What `serve run serve_app:app` and the Serve configs import, imported the same way Serve does."""
    import importlib

    from ray import serve

    from digits_ray.serve.settings import ray_start_env, token_digest

    for name, value in ray_start_env().items():  # the builder sets these for `serve run`: undone after the test
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DIGITS_MODEL", str(digit_model))
    monkeypatch.setenv("DIGITS_SERVE_TOKEN", "s3cret")
    for path in ("digits_ray.serve.app:app", "serve_app:app"):
        module, _, name = path.partition(":")
        app = getattr(importlib.import_module(module), name)
        assert isinstance(app, serve.Application), path
        settings = app._bound_deployment.init_args[0]
        assert settings.token_sha256 == token_digest("s3cret") and "s3cret" not in repr(settings)
        assert app._bound_deployment._deployment_config.user_config["model"] == str(digit_model.resolve())
    with pytest.raises(AttributeError):
        importlib.import_module("serve_app").application  # noqa: B018
