"""A timed Tune search on full MNIST, everything included: Ray's start, the search, the winner's test
evaluation, TFLite export, the ensemble and the report. Records what the registry entry says.

    python bench/tune_search.py -- --time-budget 60m --models cnn_deep cnn_bn --max-epochs 15 \\
        --grace-epochs 3 --min-batch 64 --max-batch 1024 --num-samples 30

Arguments after ``--`` go to ``digits-ray tune`` (jobs/tune.py) unchanged (a fresh --name and --registry are added).
Needs full MNIST ($DIGITS_DATA_DIR or --data-dir). Writes bench/results/tune_search.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _common import ROOT, markdown_table, save, save_text

from digits_ray.cli import main as cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job_args", nargs=argparse.REMAINDER, help="-- then jobs/tune.py arguments")
    args = parser.parse_args()
    job_args = [a for a in args.job_args if a != "--"]
    name = f"bench-{int(time.time())}"
    registry = ROOT / "artifacts" / "bench" / "registry"
    start = time.perf_counter()
    code = cli(["tune", *job_args, "--name", name, "--registry", str(registry)])
    total = time.perf_counter() - start
    if code:
        sys.exit(code)
    from digits_ray.models.registry import read_index

    index = read_index(registry)
    entry_name = max((n for n in index["entries"] if n.endswith(name)), default=None)
    entry = registry / entry_name
    search = json.loads((entry / "search" / "search.json").read_text())
    row = {
        "winner": search["model"], "trials": search["trials"], "val_accuracy": search["val_accuracy"],
        "test_accuracy": search["test_accuracy"], "ensemble_test_accuracy": search["ensemble_test_accuracy"],
        "ensemble_members": len(search["ensemble_members"]),
        "int8_test_accuracy": search["tflite"]["int8"]["test_accuracy"],
        "int8_drop_points": search["tflite"]["int8"]["drop_vs_keras_points"],
        "int8_size_ratio": search["tflite"]["int8_size_ratio"],
        "search_seconds": search["settings"]["search_seconds"], "total_seconds": round(total, 1),
    }
    print(json.dumps(row, indent=2))
    table = markdown_table(
        [{**row, "val": f"{row['val_accuracy']:.2%}", "test": f"{row['test_accuracy']:.2%}",
          "ens": f"{row['ensemble_test_accuracy']:.2%} ({row['ensemble_members']} models)"
          if row["ensemble_test_accuracy"] else "-",
          "int8": f"{row['int8_test_accuracy']:.2%} ({row['int8_drop_points']:+.2f} pt, "
                  f"{row['int8_size_ratio']:.1f}x smaller)",
          "time": f"{row['total_seconds'] / 60:.1f} min ({row['search_seconds'] / 60:.1f} searching)"}],
        [("winner", "winner"), ("trials", "trials"), ("val", "val accuracy"), ("test", "test accuracy"),
         ("ens", "ensemble test accuracy"), ("int8", "int8 TFLite test accuracy"), ("time", "wall time")],
    )
    print(table)
    save_text("tune_search.md", table + "\n")
    trials = (entry / "search" / "trials.md").read_text()
    save_text("tune_search_trials.md", trials)
    print(f"saved {save('tune_search', {'entry': str(entry), 'row': row, 'job_args': job_args})}")


if __name__ == "__main__":
    main()
