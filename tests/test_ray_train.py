"""Ray Train on a local 2-CPU Ray: 2 workers under MultiWorkerMirroredStrategy, resume, fault tolerance.

This is also the proof of the Keras path (README, "Why tf-keras"): tf-keras ``fit`` runs under
MultiWorkerMirroredStrategy inside Ray Train's TensorflowTrainer.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from digits_ray import artifact
from digits_ray import checkpoint as ckpt
from digits_ray.config import TrainConfig
from digits_ray.data.pipeline import StreamConfig
from digits_ray.evaluate import keep
from digits_ray.train import distributed
from digits_ray.train.distributed import ScaleConfig

pytestmark = pytest.mark.slow

# The user's short run that once collapsed to chance (BN momentum 0.99): cnn_bn with its defaults,
# global batch 128 over 2 workers, so 35 steps per epoch on the 4,500 training images.
CFG = TrainConfig(model="cnn_bn", epochs=3, batch_size=128, augment={})
STREAM = StreamConfig(block_rows=1024, concurrency=1, cpus_per_actor=0.5)


def scale(storage, name, **kwargs) -> ScaleConfig:
    return ScaleConfig(workers=2, cpus_per_worker=0.5, data=STREAM, storage_path=str(storage), name=name, **kwargs)


def train_and_keep(cfg: TrainConfig, scale_cfg: ScaleConfig, out, data_dir) -> dict:
    """What jobs/train.py does: fit on train/validation, one test evaluation, the artifact."""
    return keep(distributed.fit(cfg, scale_cfg, data_dir=data_dir), out, data_dir)


@pytest.fixture(scope="module")
def two_worker_run(ray_local, small_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray_artifact") / "model"
    meta = train_and_keep(CFG, scale(ray_local, "two_workers", keep_checkpoints=3), out, small_mnist)
    return meta, out, ray_local / "two_workers"


def test_two_workers_train_and_write_the_artifact(two_worker_run):
    meta, out, run_dir = two_worker_run
    assert meta["trained_with"]["runner"] == "ray_train" and meta["trained_with"]["workers"] == 2
    assert set(artifact.REQUIRED_METADATA) <= set(artifact.read_metadata(out))
    assert artifact.read_metadata(out)[artifact.ABSTAIN_FIELD]["validation_kept"] >= 0.99  # the abstain rule
    history = artifact.read_history(out)
    assert list(history["epoch"]) == [1, 2, 3]
    assert meta["test_accuracy"] > 0.85
    artifact.load_model(out)
    assert sorted(p.name for p in run_dir.glob("epoch_*")) == ["epoch_0001", "epoch_0002", "epoch_0003"]
    for checkpoint in sorted(run_dir.glob("epoch_*")):  # every checkpoint in Keras's native (zip) format
        assert (checkpoint / ckpt.MODEL_FILE).read_bytes()[:2] == b"PK"


def test_short_runs_validate_well_above_chance(two_worker_run):
    """Epochs of 35 steps: BN's moving statistics keep up (chance is 10%; with momentum 0.99 it was 11%).

    After epoch 1 they still trail weights that move fast at the peak LR (measured: 44% while the
    last training batches score over 80%); after epoch 2 they have caught up (measured: 97%).
    """
    val = artifact.read_history(two_worker_run[1])["val_accuracy"].tolist()
    assert val[0] > 0.3 and val[1] > 0.9, val


def test_batch_size_is_global_and_the_lr_is_not_rescaled(two_worker_run):
    from digits_ray.keras_api import keras

    meta, out, _ = two_worker_run
    assert meta["train_config"]["batch_size"] == 128
    assert meta["trained_with"]["workers"] == 2
    assert meta["trained_with"]["per_worker_batch"] == 64  # as the workers reported it
    steps = distributed.steps_per_epoch(meta["split_sizes"]["train"], 128)
    assert steps == 35
    # The LR of epoch 1's last step is the single-process schedule's for the same global batch, not x workers.
    schedule = keras.optimizers.schedules.CosineDecay(CFG.learning_rate, CFG.epochs * steps, alpha=0.01)
    assert artifact.read_history(out)["lr"].iloc[0] == pytest.approx(float(schedule(steps - 1)), rel=1e-5)


def test_resume_continues_at_the_next_epoch(two_worker_run, ray_local, small_mnist, tmp_path):
    _, out, run_dir = two_worker_run
    first = artifact.read_history(out)
    meta = train_and_keep(CFG, scale(ray_local, "resumed", resume_from=str(run_dir / "epoch_0001")),
                          tmp_path / "model", small_mnist)
    history = artifact.read_history(tmp_path / "model")
    assert list(history["epoch"]) == [1, 2, 3]
    assert history["loss"].iloc[0] == pytest.approx(first["loss"].iloc[0])  # epoch 1 restored, not re-run
    # The optimizer's step count came back with it, so the LR schedule continues where it was.
    assert history["lr"].iloc[1] == pytest.approx(first["lr"].iloc[1], rel=1e-5)
    assert sorted(p.name for p in (ray_local / "resumed").glob("epoch_*")) == ["epoch_0002", "epoch_0003"]
    assert meta["trained_with"]["attempt_start_epochs"] == [0, 1]
    assert meta["test_accuracy"] > 0.85


@pytest.fixture(scope="module")
def flat_run(ray_local, small_mnist, tmp_path_factory):
    """An LR of 1e-9 leaves val_accuracy flat, so patience 1 stops after epoch 2 of 6.

    A small CNN without batch normalization: under the strategy each worker validates with its own
    BN moving statistics while a checkpoint holds their mean, so only a BN-free model's reported
    accuracy can be compared exactly with one process's.
    """
    cfg = TrainConfig(model="cnn_basic", epochs=6, batch_size=128, learning_rate=1e-9, schedule="constant",
                      early_stopping_patience=1, model_params={"filters": [16, 32], "dense": 64})
    out = tmp_path_factory.mktemp("flat") / "model"
    train_and_keep(cfg, scale(ray_local, "stopped_early"), out, small_mnist)
    return cfg, out, ray_local / "stopped_early"


def test_early_stopping_ends_every_worker_at_the_same_epoch(flat_run):
    """The workers' input generators stop mid-stream here; the run must still end and write its artifact."""
    _, out, run_dir = flat_run
    assert list(artifact.read_history(out)["epoch"]) == [1, 2]
    assert sorted(p.name for p in run_dir.glob("epoch_*")) == ["epoch_0001", "epoch_0002"]


def test_validation_covers_the_whole_split_once(flat_run, small_mnist):
    """The workers' validation shares add up to exactly the split: the reported accuracy is the model's."""
    import numpy as np
    from ray.train import Checkpoint

    from digits_ray.data.split import load_train_val

    cfg, _, run_dir = flat_run
    data = load_train_val(cfg.val_fraction, cfg.seed, small_mnist)
    model, state = ckpt.load(Checkpoint.from_directory(str(run_dir / "epoch_0002")))
    predicted = model.predict(data.x_val, batch_size=512, verbose=0).argmax(axis=1)
    assert state.history[-1]["val_accuracy"] == pytest.approx(float(np.mean(predicted == data.y_val)), abs=1e-6)


def train_worker_pids() -> set[int]:
    """PIDs of live Ray Train worker processes, by the process title Ray gives them."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                    pids.add(int(proc.name))
            except OSError:
                continue
    return pids


def latest_checkpoint(run_dir: Path) -> str | None:
    """The checkpoint Ray would resume from, as recorded in the run's persisted state."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return None


def kill_a_worker_after_first_checkpoint(run_dir: Path, seen: dict[str, set[int]], timeout_s: float = 240) -> None:
    """SIGKILL one worker once Ray has registered a checkpoint, then record the workers that replace it."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and not latest_checkpoint(run_dir):
        time.sleep(0.2)
    before = train_worker_pids()
    if not before:
        return
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    seen["killed"] = {victim}
    while time.time() < deadline:
        new = train_worker_pids() - before
        if new:
            seen["restarted"] = new
            return
        time.sleep(0.2)


def test_a_killed_worker_restarts_from_the_latest_checkpoint(ray_local, small_mnist, tmp_path):
    run_dir = ray_local / "killed"
    cfg = TrainConfig(**{**CFG.to_dict(), "epochs": 4})
    seen: dict[str, set[int]] = {}
    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, args=(run_dir, seen), daemon=True)
    killer.start()
    meta = train_and_keep(cfg, scale(ray_local, "killed"), tmp_path / "model", small_mnist)
    killer.join()
    assert seen.get("killed"), "no training worker process was found to kill"
    assert seen.get("restarted"), "Ray Train did not start replacement workers"
    history = artifact.read_history(tmp_path / "model")
    assert list(history["epoch"]) == [1, 2, 3, 4]  # every epoch once
    starts = meta["trained_with"]["attempt_start_epochs"]
    assert starts[0] == 0 and len(starts) >= 2 and starts[-1] >= 1  # resumed from a checkpoint, not from scratch
    assert meta["test_accuracy"] > 0.85  # comparable to an undisturbed run

