"""A test hook: hold a training run at a known point, so that a test can kill it mid-run without racing it.

With ``DIGITS_HOLD_AFTER_CHECKPOINT=/some/GATE`` set (for a Ray Train run, in the driver's environment;
for a Tune trial, in the trial's), a process that has just reported a checkpoint of any epoch but the
run's last waits until the file GATE exists. While it waits, the file ``GATE.held.WHO`` (WHO: the Ray
Train worker's rank, or the Tune trial's name) says which epoch it holds after, so the test knows the
run is there; creating GATE lets every holder go on. Unset (always, outside tests), nothing happens.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

HOLD_ENV = "DIGITS_HOLD_AFTER_CHECKPOINT"
HOLD_TIMEOUT_S = 900.0  # a test that never opens the gate fails the run instead of hanging it
POLL_S = 0.2


def gate_from_env() -> str | None:
    """The gate file named in this process's environment, or None (the normal case)."""
    return os.environ.get(HOLD_ENV) or None


def marker(gate: str | Path, who: str) -> Path:
    """The file a holder writes beside ``gate`` while it waits."""
    gate = Path(gate)
    return gate.with_name(f"{gate.name}.held.{who}")


def after_checkpoint(gate: str | None, epoch: int, last_epoch: int, who: str,
                     timeout_s: float = HOLD_TIMEOUT_S) -> None:
    """Wait until ``gate`` exists, after the checkpoint of ``epoch`` (1-based) when it is not ``last_epoch``."""
    if not gate or epoch >= last_epoch or Path(gate).exists():
        return
    held = marker(gate, who)
    held.write_text(json.dumps({"epoch": epoch, "pid": os.getpid()}))
    deadline = time.monotonic() + timeout_s
    try:
        while not Path(gate).exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{HOLD_ENV}: held after epoch {epoch} for {timeout_s:.0f} s and {gate} "
                                   f"never appeared")
            time.sleep(POLL_S)
    finally:
        held.unlink(missing_ok=True)
