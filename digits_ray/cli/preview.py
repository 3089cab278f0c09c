"""``digits-ray augment-preview``: a PNG of training digits beside the augmented versions Ray Data would stream."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from digits_ray.cli.options import DEFAULTS, add_data_dir, parse_param
from digits_ray.errors import ConfigError
from digits_ray.paths import artifact_default, output_path


def add_commands(sub: Any) -> None:
    preview = sub.add_parser("augment-preview", help="PNG of original digits beside augmented versions")
    preview.add_argument("--aug", type=parse_param, action="append", default=[], metavar="KEY=VALUE",
                         help="augmentation option, e.g. --aug elastic_alpha=2 (repeatable)")
    preview.add_argument("--count", type=int, default=8, help="digits (rows)")
    preview.add_argument("--epochs", type=int, default=5, help="augmented versions (columns), one per epoch")
    preview.add_argument("--seed", type=int, default=DEFAULTS.seed)
    add_data_dir(preview)
    preview.add_argument("--out", type=Path, default=None,
                         help="PNG to write (default ~/digits-ray/artifacts/augment_preview.png)")
    preview.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from digits_ray import plots
    from digits_ray.config import AugmentConfig
    from digits_ray.data.mnist import load_split
    from digits_ray.data.pipeline import EpochSampler

    cfg = AugmentConfig.from_dict(dict(args.aug))
    out = output_path(args.out or artifact_default("augment_preview.png"), "--out")
    train = load_split("train", args.data_dir)
    if not 1 <= args.count <= len(train) or args.epochs < 1:
        raise ConfigError(f"--count must be in 1..{len(train)} and --epochs >= 1; got {args.count}, {args.epochs}")
    picked = np.random.default_rng(args.seed).choice(len(train), size=args.count, replace=False)
    sampler = EpochSampler(train.images, train.labels, args.seed, cfg)
    n = len(train)
    # Stream rows whose epoch-shuffled position is each picked image, for epochs 0..k-1.
    columns = [train.images[picked]]
    for epoch in range(args.epochs):
        where = np.argsort(sampler.order(epoch))[picked]
        columns.append(sampler.rows(epoch * n + where)["image"])
    plots.augment_preview(columns, train.labels[picked], out, cfg)
    print(f"preview written to {out}")
    return 0
