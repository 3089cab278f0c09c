"""The single import point for TensorFlow and Keras: tf-keras, for the reason given in ``digits_ray/__init__``.

TensorFlow prints its start-up lines (the oneDNN notice, CUDA probing on a machine without a GPU) through
absl before its logging is set up, so ``TF_CPP_MIN_LOG_LEVEL`` cannot hide them, and every process of a
run (driver, Train workers, Tune trials, Serve replicas) would print them again. They are held back here,
while TensorFlow loads and looks for devices; every other line written meanwhile is written back.
"""

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import digits_ray  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

STARTUP_LINES = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|port\.cc:\d+\] oneDNN custom operations are on"
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation_placer\.cc:\d+\] computation placer already registered"
)


@contextmanager
def startup_lines_held() -> Iterator[None]:
    """Standard error (the file descriptor: C++ writes there) goes to a file until the block ends; then
    every line but TensorFlow's known start-up lines is written back."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held.read().decode(errors="replace").splitlines(keepends=True):
                if not STARTUP_LINES.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


with startup_lines_held():
    import tensorflow as tf
    import tf_keras as keras

    tf.config.list_physical_devices("GPU")  # CUDA probing prints when devices are first listed

__all__ = ["keras", "tf", "save_model", "limit_threads"]


def save_model(model: keras.Model, path: Path) -> None:
    """Save in Keras's native format, always.

    tf-keras picks the format from a thread-local flag that its own ``save_model`` resets to
    False in any thread that never set it, so from the second save on in such a thread (Ray
    Train runs the training function in one) a ``.keras`` path silently gets HDF5. Naming the
    format avoids that.
    """
    model.save(path, save_format="keras_v3")


def limit_threads(threads: int) -> None:
    """Run TensorFlow ops on ``threads`` threads: call in a fresh process before the first op.

    A replica or actor holding a share of a node's CPUs must not spread over all of its cores;
    more processes, not more threads per process, scale prediction out.
    """
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
