"""Ray Train job: multi-worker (multi-GPU) Keras training on the augmented Ray Data stream.

    ray start --head --num-cpus 2
    ray job submit --working-dir . -- python jobs/train.py --workers 2 --epochs 5
    python jobs/train.py --workers 2 --epochs 5       # standalone: starts an embedded local Ray

Ends by writing the same model artifact folder as `python -m digits_ray train`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

from digits_ray.cli import add_train_options, train_config  # noqa: E402
from digits_ray.data.pipeline import StreamConfig  # noqa: E402
from digits_ray.data.ray_backend import init_ray, quiet_data_progress  # noqa: E402
from digits_ray.data.split import load_train_val  # noqa: E402
from digits_ray.errors import DigitsError  # noqa: E402
from digits_ray.inference.evaluate import keep  # noqa: E402
from digits_ray.models.artifact import check_writable  # noqa: E402
from digits_ray.train import tracking  # noqa: E402
from digits_ray.train.distributed import DEFAULT_STORAGE, ScaleConfig, fit, per_worker_batch  # noqa: E402

SCALE = ScaleConfig()
STREAM = StreamConfig()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_options(parser)
    scale = parser.add_argument_group("scaling (ScalingConfig, RunConfig, Ray Data)")
    scale.add_argument("--workers", type=int, default=SCALE.workers,
                       help="training workers (one GPU each); each takes --batch-size / WORKERS of every step")
    scale.add_argument("--use-gpu", action="store_true", help="give each worker a GPU")
    scale.add_argument("--cpus-per-worker", type=float, default=SCALE.cpus_per_worker)
    scale.add_argument("--data-actors", type=int, default=STREAM.concurrency, help="augmentation actors")
    scale.add_argument("--cpus-per-data-actor", type=float, default=STREAM.cpus_per_actor)
    scale.add_argument("--block-rows", type=int, default=STREAM.block_rows)
    scale.add_argument("--max-data-cpus", type=float, default=STREAM.max_data_cpus,
                       help="cap on the CPUs Ray Data may hold in all (default: no cap)")
    scale.add_argument("--storage-path", default=str(DEFAULT_STORAGE), help="where Ray keeps checkpoints")
    scale.add_argument("--name", default=None, help="run name; the same name resumes that run")
    scale.add_argument("--max-failures", type=int, default=SCALE.max_failures)
    scale.add_argument("--keep-checkpoints", type=int, default=SCALE.keep_checkpoints)
    scale.add_argument("--resume-from", default=None, metavar="CHECKPOINT_DIR",
                       help="continue after the epoch of this checkpoint (e.g. RUN/epoch_0003)")
    scale.add_argument("--num-cpus", type=float, default=None,
                       help="CPUs of the embedded local Ray (ignored when a cluster is running)")
    scale.add_argument("--address", default=None,
                       help="Ray cluster address (default: RAY_ADDRESS, else a running cluster, else local); "
                            "'local' always starts an embedded Ray")
    parser.add_argument("--out", type=Path, default=Path("artifacts") / "ray_model", help="artifact folder")
    tracking.add_options(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = train_config(args)
        scale = ScaleConfig(
            workers=args.workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
            data=StreamConfig(block_rows=args.block_rows, concurrency=args.data_actors,
                              cpus_per_actor=args.cpus_per_data_actor, max_data_cpus=args.max_data_cpus),
            storage_path=args.storage_path, name=args.name, max_failures=args.max_failures,
            keep_checkpoints=args.keep_checkpoints, resume_from=args.resume_from,
        )
        per_worker_batch(cfg.batch_size, scale.workers)
        check_writable(args.out)
        track = tracking.resolve(args, scale.storage_path, tracking.TRAIN_EXPERIMENT)
        data = load_train_val(cfg.val_fraction, cfg.seed, args.data_dir)
    except DigitsError as err:  # the user can fix it: one line; anything else keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    mode = init_ray(args.num_cpus, args.address)
    quiet_data_progress()
    print(f"Ray: {mode}; {scale.workers} worker(s) x batch {cfg.batch_size // scale.workers}, "
          f"{scale.data.concurrency} augmentation actor(s)")
    fitted = fit(cfg, scale, data)
    metadata = keep(fitted, args.out, args.data_dir)  # the one test evaluation, then the artifact
    keys = ("model", "training_seconds", "validation", "test_accuracy", "trained_with")
    print(json.dumps({k: metadata[k] for k in keys}, indent=2))
    print(f"artifact written to {args.out}")
    run_id = tracking.log_training(track, args.out)
    print(tracking.describe(track, run_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
