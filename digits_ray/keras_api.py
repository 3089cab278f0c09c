"""The single import point for Keras: tf-keras, for the reason given in ``digits_ray/__init__``."""

from pathlib import Path

import tensorflow as tf
import tf_keras as keras

import digits_ray  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

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
