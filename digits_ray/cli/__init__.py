"""One command for everything a user does: ``digits-ray`` (the same as ``python -m digits_ray``).

    digits-ray train            one zoo model in this process; --ray: a Ray Train run (jobs/train.py)
    digits-ray tune             the search, its test and its registry entry (jobs/tune.py)
    digits-ray serve            the model behind Ray Serve, with the drawing page (serve_app.py)
    digits-ray evaluate | predict | registry | swap | augment-preview

``jobs/train.py``, ``jobs/tune.py`` and ``serve_app.py`` are the files ``ray job submit`` and ``serve run``
name; they call ``main`` here with their subcommand. Help and argument errors are instant: the command
modules import TensorFlow and Ray only when a command runs. A project error (``DigitsError``) becomes one
line and exit code 2 here, for every command; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from digits_ray.errors import DigitsError


def build_parser(prog: str = "digits-ray") -> argparse.ArgumentParser:
    from digits_ray.cli import predict, preview, registry, serve, train, tune

    parser = argparse.ArgumentParser(prog=prog, description="Handwritten digits with Ray: train, search, serve.",
                                     epilog=f"`{prog} COMMAND --help` tells each command's options")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train, tune, serve, predict, registry, preview):
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "digits-ray", command: str | None = None) -> int:
    """``command``: a job file's subcommand (``tune`` for jobs/tune.py), whose help then reads ``prog ...``."""
    parser = build_parser(prog)
    if command:
        subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subcommands.choices[command].prog = prog
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except DigitsError as err:  # the user can fix it: one line; anything else keeps its traceback
        parser.exit(2, f"{prog}: error: {err}\n")
