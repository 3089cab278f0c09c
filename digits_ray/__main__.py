import sys

from digits_ray.cli import main

sys.exit(main(prog="python -m digits_ray"))
