"""``digits-ray evaluate`` and ``digits-ray predict``: an artifact's test figures, and predictions for images.

    digits-ray evaluate ~/digits-ray/artifacts/model             # test metrics and plots (ARTIFACT/report)
    digits-ray predict a.png b.jpg --out predictions.csv         # image files, in this process
    digits-ray predict --dir images/ --out predictions.csv       # a folder, through Ray Data
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from digits_ray.cli.options import add_data_dir, add_ray_options
from digits_ray.errors import ConfigError
from digits_ray.paths import output_path


def add_commands(sub: Any) -> None:
    evaluate = sub.add_parser("evaluate", help="test-set metrics and plots for an artifact folder")
    evaluate.add_argument("artifact", type=Path)
    add_data_dir(evaluate)
    evaluate.add_argument("--report-dir", type=Path, default=None, help="default: ARTIFACT/report")
    evaluate.set_defaults(run=run_evaluate)

    predict = sub.add_parser("predict", help="predict image files (or a folder, through Ray Data) into a CSV")
    predict.add_argument("images", nargs="*", type=Path, help="image files (PNG, JPEG, ...)")
    predict.add_argument("--dir", type=Path, default=None, help="a folder of images, read through Ray Data")
    predict.add_argument("--model", type=Path, default=None,
                         help="model folder (default: $DIGITS_MODEL, else the registry's served entry)")
    predict.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write")
    predict.add_argument("--max-actors", type=int, default=None, help="--dir: predictor actors (default: 1 per CPU)")
    add_ray_options(predict, "for --dir (default: every CPU of the machine)")
    predict.set_defaults(run=run_predict)


def run_evaluate(args: argparse.Namespace) -> int:
    from digits_ray.inference.evaluate import evaluate_artifact

    report_dir = output_path(args.report_dir or Path(args.artifact) / "report", "--report-dir")
    report = evaluate_artifact(args.artifact, args.data_dir, report_dir)
    test = report["test"]
    print(f"test accuracy {test['accuracy']:.4%}  loss {test['loss']:.4f}  ({test['count']} images)")
    print("class  precision  recall  support")
    for cls, row in test["per_class"].items():
        print(f"{cls:>5}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['support']:7d}")
    print(f"plots: {', '.join(report['plots'])} in {report_dir}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from digits_ray.inference import batch
    from digits_ray.models.registry import model_to_serve

    if bool(args.images) == bool(args.dir):
        raise ConfigError("give image files or --dir FOLDER (one of the two)")
    if args.max_actors is not None and args.max_actors < 1:
        raise ConfigError(f"--max-actors must be >= 1, got {args.max_actors}")
    out = output_path(args.out, "--out")
    if out.is_dir():
        raise ConfigError(f"--out {args.out} is a folder; name the CSV file to write")
    model_dir = model_to_serve(args.model)
    if args.dir:
        if not args.dir.is_dir():
            raise ConfigError(f"--dir {args.dir} is not a folder")
        if not batch.has_images(args.dir):
            raise ConfigError(f"--dir {args.dir} holds no image files (extensions read: "
                              f"{', '.join(batch.IMAGE_EXTENSIONS)})")
        from digits_ray.data.ray_backend import init_ray

        init_ray(args.num_cpus, args.address)
        rows = batch.predict_folder(model_dir, args.dir.resolve(), args.max_actors)
    else:
        rows = batch.predict_paths(model_dir, args.images)
    count = batch.write_rows(out, rows, batch.columns(model_dir))
    print(f"{count} predictions by {model_dir} written to {out}")
    return 0
