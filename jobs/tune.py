"""Ray Tune job: search architecture, batch size, LR and augmentation; test the winner once; publish it.

    ray job submit --working-dir . -- python jobs/tune.py --time-budget 60m
    python jobs/tune.py --smoke                         # a few 1-epoch trials on the small subset
    python jobs/tune.py --resume                        # continue the latest search

The file ``ray job submit`` names; it is ``digits-ray tune`` (``digits_ray/cli/tune.py``).
"""

import sys

from digits_ray.cli import main

COMMAND = ["tune"]  # digits-ray tune

if __name__ == "__main__":
    sys.exit(main([*COMMAND, *sys.argv[1:]], prog="python jobs/tune.py", command=COMMAND[0]))
