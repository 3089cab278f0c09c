"""The model a replica serves, swapped in place without dropping a request.

A new model is loaded and warmed in a worker thread beside the one serving, checked with a fixed probe
digit, and only then becomes ``current``; a batch already running keeps the model it started with. A
model that cannot be loaded (missing folder, corrupt file, another input contract) is refused and the
old one keeps serving: the refusal is kept in ``swap_error`` for ``/healthz``, ``/model``, the logs and
the swap metric. The very first load has nothing to fall back on, so its failure fails the replica.

Serve calls ``check_health`` every few seconds; it pushes the probe digit through the serving model and
compares the answer with the one recorded at load, so a replica whose model is wedged (no answer within
Serve's health-check timeout) or broken (different or non-finite answers) is replaced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from digits_ray.errors import DigitsError
from digits_ray.inference.predictor import Predictor
from digits_ray.schema import IMAGE_SIZE
from digits_ray.serve.settings import ModelChoice

logger = logging.getLogger("ray.serve")

# A fixed digit for warm-up and health checks: an upright stroke, a "1" in MNIST's frame.
PROBE = np.zeros((1, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
PROBE[0, 4:24, 13:16] = 255
PROBE_TOLERANCE = 1e-4  # the same model on the same input gives the same probabilities, up to float noise


class ModelNotReady(DigitsError):
    """No model is loaded yet (the replica is still starting)."""


@dataclass(frozen=True)
class Loaded:
    """A loaded, warmed model and its answer to the probe digit when it was loaded."""

    predictor: Predictor
    folder: Path
    probe: np.ndarray

    @property
    def version(self) -> str:
        return self.predictor.info.version

    @property
    def source(self) -> dict[str, str]:
        """What each answer names as the model that produced it."""
        return {"name": self.predictor.info.name, "version": self.version}


def load(folder: Path) -> Loaded:
    """Load and warm a model (blocking: run it in a worker thread). Raises on anything unusable."""
    predictor = Predictor.from_artifact(folder)
    probe = predictor.probabilities(PROBE)[0]  # traces the forward pass before any request
    if not (np.all(np.isfinite(probe)) and abs(probe.sum() - 1) < 1e-3):
        raise DigitsError(f"{folder}: the model gives {probe.round(4).tolist()} for the probe digit, not "
                          f"probabilities")
    return Loaded(predictor, Path(folder), probe)


def target_folder(choice: ModelChoice) -> Path:
    """The folder ``choice`` asks for now: its model, else what its registry serves."""
    from digits_ray.models.registry import resolve_model, served_entry

    if choice.model:
        return resolve_model(choice.model, choice.registry)
    return served_entry(choice.registry).resolve()


def probe_matches(loaded: Loaded) -> None:
    """Push the probe digit through ``loaded``; raise when the answer differs from the one at load."""
    now = loaded.predictor.probabilities(PROBE)[0]
    if not np.all(np.isfinite(now)) or float(np.abs(now - loaded.probe).max()) > PROBE_TOLERANCE:
        raise RuntimeError(f"model {loaded.version} answers the probe digit with {now.round(4).tolist()}, "
                           f"not {loaded.probe.round(4).tolist()} as when it was loaded")


class ModelHolder:
    """``current`` is what new batches use; ``apply`` and the registry follower replace it."""

    def __init__(self, on_change: Callable[[str, dict | None, dict | None], None] | None = None) -> None:
        self.on_change = on_change or (lambda outcome, before, after: None)  # (outcome, old source, new source)
        self.current: Loaded | None = None
        self.choice = ModelChoice()
        self.swap_error: dict[str, str] | None = None  # the last refused swap, until one succeeds
        self.swaps = {"ok": 0, "refused": 0}
        self._lock = asyncio.Lock()
        self._follower: asyncio.Task | None = None

    def serving(self) -> Loaded:
        if self.current is None:
            raise ModelNotReady("the model is still loading")
        return self.current

    async def apply(self, choice: ModelChoice) -> None:
        """A new user_config: serve what it names, and follow the registry when it names no model."""
        self.choice = choice
        await self.refresh()
        if choice.model is None and self._follower is None:
            self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def refresh(self) -> None:
        """Swap to the folder the choice asks for now, if it is not the one serving."""
        async with self._lock:
            try:
                folder = await asyncio.to_thread(target_folder, self.choice)
                if self.current is not None and folder == self.current.folder:
                    self.swap_error = None  # asked for what already serves
                    return
                started = time.perf_counter()
                loaded = await asyncio.to_thread(load, folder)
            except Exception as err:
                if self.current is None:
                    raise  # nothing to keep serving: the replica fails to start, with this error
                self._refuse(err)
                return
            old, self.current = self.current, loaded
            self.swap_error = None
            self.swaps["ok"] += old is not None
            self.on_change("ok", old.source if old else None, loaded.source)
            if old is not None:
                logger.info(f"model swapped from {old.version} to {loaded.version} "
                            f"(loaded and warmed in {time.perf_counter() - started:.1f} s)")

    def _refuse(self, err: Exception) -> None:
        requested = self.choice.model or f"the entry {self.choice.registry} serves"
        error = f"{type(err).__name__}: {err}"
        if self.swap_error and (self.swap_error["requested"], self.swap_error["error"]) == (requested, error):
            return  # the registry follower retries every poll: one refusal is counted and logged once
        self.swaps["refused"] += 1
        self.swap_error = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "requested": requested,
                           "error": error, "serving": self.current.version if self.current else None}
        logger.error(f"model swap refused; still serving {self.swap_error['serving']}: {error}")
        self.on_change("refused", self.current.source if self.current else None, None)

    async def _follow(self) -> None:
        """Poll the registry while the choice names no model (a promotion or a better entry swaps it)."""
        while True:
            await asyncio.sleep(self.choice.poll_s)
            if self.choice.model is None:
                await self.refresh()

    async def check(self) -> None:
        """The health check: the probe digit through the serving model, in a worker thread."""
        await asyncio.to_thread(probe_matches, self.serving())

    def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()

    def describe(self) -> dict[str, Any]:
        """What ``/model`` says about serving and swapping."""
        return {"following_registry": self.choice.registry if self.choice.model is None else None,
                "swap_error": self.swap_error, "swaps": dict(self.swaps)}
