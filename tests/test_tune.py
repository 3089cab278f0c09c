"""Ray Tune for real: Ray Train trials stopped by ASHA give their resources back; a search whose driver
is SIGKILLed resumes without losing or re-running finished trials; `ray job submit` of a smoke search
against this test's own `ray start --head` publishes a complete registry entry."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.processes import free_ports, marked_env, stop_marked

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def trial_statuses(experiment: Path) -> dict[str, str]:
    """Trial id -> status, from Tune's latest experiment snapshot."""
    files = sorted(glob.glob(str(experiment / "experiment_state-*.json")))
    if not files:
        return {}
    try:
        state = json.loads(Path(files[-1]).read_text())
    except (OSError, ValueError):  # caught mid-write
        return {}
    trials = (json.loads(entry[0]) for entry in state["trial_data"])
    return {t["trial_id"]: t["status"] for t in trials}


def test_ray_train_trials_stopped_by_asha_give_their_resources_back(ray_local, small_mnist):
    import ray
    from ray.util import placement_group_table

    from digits_ray.data.split import load_train_val
    from digits_ray.tune.search import SearchConfig, run, trials_table
    from digits_ray.tune.space import SpaceConfig

    search = SearchConfig(num_samples=3, max_epochs=2, grace_epochs=1, reduction_factor=3, workers_per_trial=2,
                          cpus_per_trial=0.5, storage_path=str(ray_local), name="train_trials",
                          space=SpaceConfig(models=("dense",), augment_choices=("off",)))
    data = load_train_val(0.1, 0, small_mnist)
    table = trials_table(run(search, data))
    assert len(table) == 3 and (table["error"] == "").all()
    assert (table["epochs_run"] < 2).any(), "ASHA stopped no trial; the test needs one stopped early"
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        live = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
        if not live and ray.available_resources().get("CPU", 0) == total:
            break
        time.sleep(1)
    assert not live, f"placement groups left behind: {live}"
    assert ray.available_resources().get("CPU", 0) == total


def test_a_killed_search_resumes_without_losing_or_rerunning_finished_trials(train_only_mnist, tmp_path):
    """The search runs on a data folder without test files: no trial opens them (the final test
    evaluation, after the search, is what fails on their absence)."""
    storage, name = tmp_path / "runs", "resumable"
    experiment = storage / name
    argv = [sys.executable, str(ROOT / "jobs" / "tune.py"), "--address", "local", "--num-cpus", "2",
            "--models", "dense", "--no-augment", "--max-batch", "64", "--num-samples", "6", "--max-epochs", "4",
            "--grace-epochs", "4", "--trials-at-once", "2", "--data-dir", str(train_only_mnist),
            "--storage-path", str(storage), "--name", name, "--registry", str(tmp_path / "models")]
    env, marker = marked_env(TUNE_GLOBAL_CHECKPOINT_S="1")
    log = (tmp_path / "first.log").open("w")
    driver = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            statuses = trial_statuses(experiment)
            running_with_checkpoint = [
                t for t, s in statuses.items()
                if s == "RUNNING" and list(experiment.glob(f"trial_{t}/checkpoint_*"))]
            if sum(s == "TERMINATED" for s in statuses.values()) >= 2 and running_with_checkpoint:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the search never had 2 finished trials and a checkpointed running one: {statuses}")
        time.sleep(2)  # the next snapshot (every second here) records that checkpoint
        statuses = trial_statuses(experiment)
        finished = {t: (experiment / f"trial_{t}" / "result.json").read_bytes()
                    for t, s in statuses.items() if s == "TERMINATED"}
        interrupted = [t for t, s in statuses.items() if s == "RUNNING"
                       and list(experiment.glob(f"trial_{t}/checkpoint_*"))]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        driver.kill()
        stop_marked(marker)

    resumed = subprocess.run([*argv, "--resume"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    stop_marked(marker, env["RAY_TMPDIR"])
    (tmp_path / "resumed.log").write_text(resumed.stdout + resumed.stderr)
    # The search finished; then the one test evaluation found no test files, as intended here.
    assert resumed.returncode == 2 and "t10k-images-idx3-ubyte.gz is not in" in resumed.stderr, resumed.stderr[-3000:]
    final = trial_statuses(experiment)
    assert len(final) == 6 and set(final.values()) == {"TERMINATED"}, final
    for trial_id, results in finished.items():  # kept, and not run again
        assert (experiment / f"trial_{trial_id}" / "result.json").read_bytes() == results
    for trial_id in interrupted:  # went on from its checkpoint, not from scratch
        last = sorted(experiment.glob(f"trial_{trial_id}/checkpoint_*"))[-1]
        starts = json.loads((last / "state.json").read_text())["attempt_starts"]
        assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 1, (trial_id, starts)
        epochs = [json.loads(line)["epoch"] for line in (experiment / f"trial_{trial_id}" / "result.json").open()]
        assert epochs[-1] == 4


def test_ray_job_submit_of_a_smoke_search_publishes_a_registry_entry(tmp_path, monkeypatch):
    """As a user would: `ray start --head` (its own ports and temp dir, token auth), `ray job submit`,
    with the winner retrained longer by Ray Train before it is published; tracked in MLflow's default store
    (the `track` extra), beside the search's storage."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store, not the session's
    gcs, dashboard, *others = free_ports(9)  # every port of its own: another Ray may run beside it
    env, marker = marked_env(RAY_AUTH_MODE="token")
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--node-manager-port", str(others[0]), "--object-manager-port", str(others[1]),
         "--ray-client-server-port", str(others[2]), "--dashboard-agent-listen-port", str(others[3]),
         "--dashboard-agent-grpc-port", str(others[4]), "--metrics-export-port", str(others[5]),
         "--runtime-env-agent-port", str(others[6]),
         "--temp-dir", env["RAY_TMPDIR"], "--disable-usage-stats"],
        env=env, stdout=(tmp_path / "head.log").open("w"), stderr=subprocess.STDOUT)
    registry, runs = tmp_path / "models", tmp_path / "runs"
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the head accepts jobs once its job agent is up
            probe = subprocess.run(["ray", "job", "list", "--address", address], env=env, capture_output=True)
            if probe.returncode == 0:
                break
            time.sleep(2)
        submitted = subprocess.run(
            ["ray", "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
             "python", "jobs/tune.py", "--smoke", "--registry", str(registry), "--storage-path", str(runs),
             "--final-epochs", "2", "--final-workers", "2"],
            env=env, capture_output=True, text=True, timeout=600)
        (tmp_path / "job.log").write_text(submitted.stdout + submitted.stderr)
        assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-4000:]
        assert "succeeded" in submitted.stdout
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        stop_marked(marker, env["RAY_TMPDIR"])

    from digits_ray import artifact
    from digits_ray.registry import best_entry

    entry = best_entry(registry)
    metadata = artifact.read_metadata(entry)
    # The winner's config, retrained for 2 epochs by 2 Ray Train workers inside the submitted job.
    assert metadata["trained_with"]["runner"] == "ray_train" and metadata["trained_with"]["workers"] == 2
    assert metadata["epochs_run"] == 2 and 0.3 < metadata["test_accuracy"] <= 1
    artifact.load_model(entry)
    tflite = json.loads((entry / "tflite" / "tflite.json").read_text())
    assert tflite["int8"]["bytes"] * 3 <= tflite["float32"]["bytes"]
    assert (entry / "tflite" / "model_int8.tflite").is_file() and (entry / "tflite" / "model_float32.tflite").is_file()
    ensemble = artifact.read_metadata(entry / "ensemble")
    assert ensemble["model"] == "ensemble" and 0 < ensemble["test_accuracy"] <= 1
    artifact.load_model(entry / "ensemble")
    for meta in (metadata, ensemble):  # both kept models carry a "not a digit" rule fitted on validation
        assert meta[artifact.ABSTAIN_FIELD]["validation_kept"] >= 0.99
    report = {p.name for p in (entry / "search").iterdir()}
    assert {"trials.csv", "trials.md", "val_accuracy_vs_batch_size.png", "val_accuracy_vs_learning_rate.png",
            "best_per_architecture.png", "trial_curves.png", "winner_history.png", "winner_confusion_matrix.png",
            "search.json"} <= report
    assert len((entry / "search" / "trials.csv").read_text().splitlines()) == 1 + 3
    check_mlflow(runs, registry, entry)


def check_mlflow(runs: Path, registry: Path, entry: Path) -> None:
    """One MLflow run per trial (its config, every epoch) and one for the winner (its entry), whose id the
    registry records; all in the SQLite store beside the search's storage."""
    from digits_ray import artifact, tracking
    from digits_ray import registry as models

    index_entry = models.read_index(registry)["entries"][entry.name]
    if not tracking.installed():
        assert index_entry["mlflow_run_id"] is None
        pytest.skip('MLflow is the optional `track` extra (pip install -e ".[dev,track]"); registry checked')
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{runs / tracking.DB_FILE}")
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT_PREFIX + "tune")
    found = client.search_runs([experiment.experiment_id])
    by_role = {role: [r for r in found if r.data.tags.get(tracking.ROLE_TAG) == role] for role in ("trial", "winner")}
    assert len(found) == 4 and len(by_role["trial"]) == 3 and len(by_role["winner"]) == 1
    trials = {r.info.run_name for r in by_role["trial"]}
    assert trials == {f"trial_{t}" for t in pd.read_csv(entry / "search" / "trials.csv")["trial_id"]}
    for trial_run in by_role["trial"]:
        assert trial_run.info.status == "FINISHED" and {"model", "learning_rate"} <= set(trial_run.data.params)
        assert [m.step for m in client.get_metric_history(trial_run.info.run_id, "val_accuracy")] == [1]
    [winner] = by_role["winner"]
    assert index_entry["mlflow_run_id"] == winner.info.run_id == json.loads(
        (entry / "search" / "search.json").read_text())["mlflow_run_id"]
    assert winner.data.metrics["test_accuracy"] == pytest.approx(artifact.read_metadata(entry)["test_accuracy"])
    assert winner.data.params["registry_entry"] == entry.name
    assert [m.step for m in client.get_metric_history(winner.info.run_id, "val_accuracy")] == [1, 2]
    logged = {a.path for a in client.list_artifacts(winner.info.run_id, "entry/search")}
    assert {"entry/search/trial_curves.png", "entry/search/winner_history.png"} <= logged
    assert {"entry/model.keras", "entry/ensemble", "entry/tflite"} <= {
        a.path for a in client.list_artifacts(winner.info.run_id, "entry")}
