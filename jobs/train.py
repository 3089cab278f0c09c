"""Ray Train job: multi-worker (multi-GPU) Keras training on the augmented Ray Data stream.

    ray job submit --working-dir . -- python jobs/train.py --workers 2 --epochs 5
    python jobs/train.py --workers 2 --epochs 5       # standalone: starts an embedded local Ray

The file ``ray job submit`` names; it is ``digits-ray train --ray`` (``digits_ray/cli/train.py``), and ends
by writing the same model artifact folder as ``digits-ray train``.
"""

import sys

from digits_ray.cli import main

COMMAND = ["train", "--ray"]  # digits-ray train --ray

if __name__ == "__main__":
    sys.exit(main([*COMMAND, *sys.argv[1:]], prog="python jobs/train.py", command=COMMAND[0]))
