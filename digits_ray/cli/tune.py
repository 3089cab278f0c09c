"""``digits-ray tune``: search architecture, batch size, LR and augmentation; test the winner once; publish it.

    ray job submit --working-dir . -- python jobs/tune.py --time-budget 60m
    digits-ray tune --smoke                     # a few 1-epoch trials on the small subset
    digits-ray tune --resume                    # continue the latest search (--name for another one)

The winner (by validation accuracy), its TFLite exports, an ensemble of the top trials and the search
report become one entry of the model registry (--registry, $DIGITS_REGISTRY, default ~/digits-ray/models).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from digits_ray.cli.options import add_ray_options
from digits_ray.config import MIXED_PRECISION_MODES, TrainConfig
from digits_ray.errors import ConfigError
from digits_ray.models.zoo import MODELS
from digits_ray.paths import DEFAULT_STORAGE, output_path, registry_default
from digits_ray.train import tracking
from digits_ray.tune.config import PublishConfig, SearchConfig, latest_search, new_search_name
from digits_ray.tune.space import SpaceConfig

SEARCH, PUBLISH, SPACE = SearchConfig(), PublishConfig(), SpaceConfig()
SMALL_MNIST = Path(__file__).resolve().parents[2] / "tests" / "data" / "mnist-small"
# --smoke: a few 1-epoch trials on the small subset, for tests and a first look.
SMOKE = {"num_samples": 3, "max_epochs": 1, "time_budget": "10m", "top_k": 2}
# Of --time-budget, what is kept for after the search (test evaluation, TFLite, ensemble, report):
# the budget covers the whole job.
PUBLISH_RESERVE_S = 180


def parse_duration(text: str) -> float:
    """``90s``, ``60m``, ``1.5h`` or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration such as 90s, 60m or 1.5h; got {text!r}")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def add_commands(sub: Any) -> None:
    parser = sub.add_parser("tune", help="search models with Ray Tune; publish the winner to the registry",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = parser.add_argument_group("budget")
    budget.add_argument("--smoke", action="store_true",
                        help=f"a quick search: {SMOKE}, small subset unless --data-dir")
    budget.add_argument("--num-samples", type=int, default=None, help=f"trials (default {SEARCH.num_samples})")
    budget.add_argument("--max-epochs", type=int, default=None, help=f"per trial (default {SEARCH.max_epochs})")
    budget.add_argument("--grace-epochs", type=int, default=SEARCH.grace_epochs,
                        help="ASHA judges a trial after this many epochs at the earliest")
    budget.add_argument("--time-budget", type=parse_duration, default=None, metavar="DURATION",
                        help=f"wall-clock budget of the whole job, e.g. 60m (default 60m); the search gets it "
                             f"less {PUBLISH_RESERVE_S} s for what follows (a --final-epochs retrain comes on top; "
                             f"with --resume, the resumed search gets a new budget)")
    space = parser.add_argument_group("search space")
    space.add_argument("--models", nargs="+", default=list(SPACE.models), choices=list(MODELS))
    space.add_argument("--min-batch", type=int, default=SPACE.min_batch, help="global batch, power of 2")
    space.add_argument("--max-batch", type=int, default=SPACE.max_batch)
    space.add_argument("--min-lr", type=float, default=SPACE.min_lr)
    space.add_argument("--max-lr", type=float, default=SPACE.max_lr)
    space.add_argument("--no-augment", action="store_true", help="search without augmentation only")
    space.add_argument("--seed", type=int, default=SEARCH.seed, help="Optuna's sampler, splits, training")
    space.add_argument("--val-fraction", type=float, default=TrainConfig().val_fraction)
    space.add_argument("--mixed-precision", default="auto", choices=MIXED_PRECISION_MODES)
    place = parser.add_argument_group("resources (defaults: what the cluster has)")
    place.add_argument("--trials-at-once", type=int, default=None)
    place.add_argument("--cpus-per-trial", type=float, default=None,
                       help="a fraction is fine (default 1; with --workers-per-trial, per worker: an equal "
                            "share of the cluster's CPUs, at most 1)")
    place.add_argument("--gpus-per-trial", type=float, default=None, help="default: 1 where the cluster has GPUs")
    place.add_argument("--workers-per-trial", type=int, default=0,
                       help="N: each trial is a Ray Train run with N workers (GPU clusters); 0: one process")
    add_ray_options(place, "default: every CPU of the machine")
    where = parser.add_argument_group("where")
    where.add_argument("--storage-path", type=Path, default=DEFAULT_STORAGE,
                       help="where Tune keeps its searches (default %(default)s)")
    where.add_argument("--name", default=None,
                       help="the search's folder under --storage-path (default: a new tune-YYYYmmdd-HHMMSS; "
                            "with --resume, the latest search)")
    where.add_argument("--resume", action="store_true",
                       help="continue an interrupted search, with the settings it was started with "
                            "(only --time-budget and the after-search options are taken from this command)")
    where.add_argument("--data-dir", type=Path, default=None, help="MNIST IDX folder (default $DIGITS_DATA_DIR)")
    where.add_argument("--registry", type=Path, default=None,
                       help="model registry folder (default $DIGITS_REGISTRY, else ~/digits-ray/models)")
    after = parser.add_argument_group("after the search")
    after.add_argument("--top-k", type=int, default=None, help=f"ensemble members (default {PUBLISH.top_k})")
    after.add_argument("--final-epochs", type=int, default=0, help="retrain the winner this long with Ray Train")
    after.add_argument("--final-workers", type=int, default=1)
    after.add_argument("--final-use-gpu", action="store_true")
    after.add_argument("--final-cpus-per-worker", type=float, default=None,
                       help="default: an equal share of the cluster's CPUs, at most 1")
    tracking.add_options(parser)
    parser.set_defaults(run=run)


def configs(args: argparse.Namespace) -> tuple[SearchConfig, PublishConfig, Path | None]:
    """The search's and the publish step's settings, checked (and the search folder too) before Ray starts."""
    from digits_ray.tune.config import load_settings
    from digits_ray.tune.search import check_experiment_path

    smoke = SMOKE if args.smoke else {}

    def given(value, key: str, default):
        """The flag when given (0 included, so that it is refused, not replaced), else --smoke's, else the default."""
        return value if value is not None else smoke.get(key, default)

    storage = output_path(args.storage_path, "--storage-path")
    name = args.name or (latest_search(storage) if args.resume else new_search_name())
    max_epochs = given(args.max_epochs, "max_epochs", SEARCH.max_epochs)
    data_dir = args.data_dir or (SMALL_MNIST if args.smoke else None)
    budget = args.time_budget if args.time_budget is not None else parse_duration(smoke.get("time_budget", "60m"))
    search = SearchConfig(
        num_samples=given(args.num_samples, "num_samples", SEARCH.num_samples),
        max_epochs=max_epochs,
        grace_epochs=min(args.grace_epochs, max(1, max_epochs)),
        time_budget_s=budget - PUBLISH_RESERVE_S if budget > 2 * PUBLISH_RESERVE_S else budget / 2,
        trials_at_once=args.trials_at_once, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, workers_per_trial=args.workers_per_trial, seed=args.seed,
        storage_path=str(storage), name=name,
        space=SpaceConfig(models=tuple(args.models), min_batch=args.min_batch, max_batch=args.max_batch,
                          min_lr=args.min_lr, max_lr=args.max_lr,
                          augment_choices=("off",) if args.no_augment else SPACE.augment_choices),
        base=TrainConfig(val_fraction=args.val_fraction, seed=args.seed, mixed_precision=args.mixed_precision),
    )
    top_k = given(args.top_k, "top_k", PUBLISH.top_k)
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1 (1: no ensemble); got {top_k}")
    if args.final_epochs < 0 or args.final_workers < 1 or search.space.min_batch % args.final_workers:
        raise ConfigError(f"--final-epochs must be >= 0 and --final-workers >= 1, a power of two <= --min-batch "
                          f"(the winner's batch is split among them); got {args.final_epochs}, {args.final_workers}")
    check_experiment_path(search.experiment_path, args.resume)
    if args.resume:  # the same trials on the same data as the interrupted search; only the budget is new
        saved, saved_data_dir = load_settings(search.experiment_path)
        search = dataclasses.replace(saved, time_budget_s=search.time_budget_s)
        data_dir = saved_data_dir
    registry = output_path(args.registry or registry_default(), "--registry")
    publish = PublishConfig(registry=str(registry), top_k=top_k,
                            final_epochs=args.final_epochs, final_workers=args.final_workers,
                            final_use_gpu=args.final_use_gpu, final_cpus_per_worker=args.final_cpus_per_worker)
    return search, publish, data_dir


def run(args: argparse.Namespace) -> int:
    search, publish, data_dir = configs(args)
    track = tracking.resolve(args, search.storage_path, search.mlflow_experiment)

    from digits_ray.data.ray_backend import init_ray, quiet_data_progress
    from digits_ray.data.split import load_train_val
    from digits_ray.models.registry import read_index
    from digits_ray.tune.publish import publish_search
    from digits_ray.tune.search import run as run_search

    data = load_train_val(search.base.val_fraction, search.base.seed, data_dir)
    mode = init_ray(args.num_cpus, args.address)
    quiet_data_progress()
    print(f"Ray: {mode}; search {search.experiment_path}: {search.num_samples} trials of up to "
          f"{search.max_epochs} epochs, search budget {search.time_budget_s:.0f} s; {tracking.describe(track)}",
          flush=True)
    start = time.perf_counter()
    results = run_search(search, data, resume=args.resume, data_dir=data_dir, track=track)
    search_seconds = time.perf_counter() - start
    settings = {"argv": sys.argv[1:], "search_seconds": round(search_seconds, 1)}
    entry = publish_search(results, search, publish, data, data_dir, settings, track)
    summary = json.loads((entry / "search" / "search.json").read_text())
    summary.pop("settings", None)
    print(json.dumps({k: summary[k] for k in ("model", "val_accuracy", "test_accuracy",
                                              "tflite_int8_test_accuracy", "ensemble_test_accuracy", "trials")},
                     indent=2))
    print(f"search took {search_seconds:.0f} s, everything {time.perf_counter() - start:.0f} s; "
          f"registry entry {entry}")
    print(tracking.describe(track, summary["mlflow_run_id"]) + ("; and one run per trial" if track else ""))
    index = read_index(entry.parent)
    if index["pinned"] and index["pinned"] != entry.name:
        print(f"the registry keeps serving {index['pinned']}, which is pinned; to serve this entry: "
              f"digits-ray registry promote {entry.name} --registry {entry.parent}")
    return 0
