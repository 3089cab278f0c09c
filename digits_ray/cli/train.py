"""``digits-ray train``: one zoo model, in this process or (``--ray``) as a Ray Train run; writes an artifact.

    digits-ray train --model cnn_bn --epochs 5                  # one process, no Ray
    digits-ray train --ray --workers 2 --augment                # Ray Train + Ray Data (jobs/train.py)
    ray job submit --working-dir . -- python jobs/train.py --workers 2 --epochs 5

Both end the same way: the one test evaluation, then the artifact folder (``--out``, default
~/digits-ray/artifacts/model, or .../ray_model for a Ray Train run).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

from digits_ray.cli.options import (
    add_scale_options,
    add_train_options,
    keras_verbosity,
    scale_config,
    train_config,
)
from digits_ray.errors import ConfigError
from digits_ray.paths import DEFAULT_STORAGE, artifact_default, output_path
from digits_ray.train import tracking


def add_commands(sub: Any) -> None:
    parser = sub.add_parser("train", help="train one zoo model (--ray: with Ray Train) into an artifact folder",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_options(parser)
    parser.add_argument("--out", type=Path, default=None,
                        help="artifact folder to write (default ~/digits-ray/artifacts/model, --ray: .../ray_model)")
    parser.add_argument("--ray", action="store_true",
                        help="train with Ray Train: data-parallel workers fed by Ray Data, checkpoints, resume")
    parser.add_argument("--verbose", type=int, default=keras_verbosity(), choices=(0, 1, 2),
                        help="one process: Keras progress, 1 a bar per step, 2 a line per epoch")
    ray_only = add_scale_options(parser)  # given without --ray, these are refused
    tracking.add_options(parser)
    parser.set_defaults(run=functools.partial(run, ray_only=ray_only))


def run(args: argparse.Namespace, ray_only: dict[str, Any]) -> int:
    from digits_ray.models.artifact import check_writable

    cfg = train_config(args)
    given = sorted(f"--{name.replace('_', '-')}" for name, default in ray_only.items()
                   if getattr(args, name) != default)
    if given and not args.ray:
        raise ConfigError(f"{', '.join(given)} set how a Ray Train run is spread; add --ray, or leave them out "
                          f"to train in this process")
    out = output_path(args.out or artifact_default("ray_model" if args.ray else "model"), "--out")
    check_writable(out)
    scale = scale_config(args) if args.ray else None
    if scale is not None:
        from digits_ray.train.scale import per_worker_batch

        per_worker_batch(cfg.batch_size, scale.workers)
    track = tracking.resolve(args, scale.storage_path if scale else DEFAULT_STORAGE, tracking.TRAIN_EXPERIMENT)

    from digits_ray.data.split import load_train_val
    from digits_ray.inference.evaluate import keep

    data = load_train_val(cfg.val_fraction, cfg.seed, args.data_dir)
    if scale is None:
        from digits_ray.train.local import fit

        fitted = fit(cfg, data, verbose=args.verbose)
    else:
        from digits_ray.data.ray_backend import init_ray, quiet_data_progress
        from digits_ray.train.distributed import fit

        mode = init_ray(args.num_cpus, args.address)
        quiet_data_progress()
        print(f"Ray: {mode}; {scale.workers} worker(s) x batch {cfg.batch_size // scale.workers}, "
              f"{scale.data.concurrency} augmentation actor(s)", flush=True)
        fitted = fit(cfg, scale, data)
    metadata = keep(fitted, out, args.data_dir)  # the one test evaluation, then the artifact
    keys = ("model", "training_seconds", "validation", "test_accuracy", "trained_with")
    print(json.dumps({k: metadata[k] for k in keys if k in metadata}, indent=2))
    print(f"artifact written to {out}")
    run_id = tracking.log_training(track, out)
    print(tracking.describe(track, run_id))
    return 0
