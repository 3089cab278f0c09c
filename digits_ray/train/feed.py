"""Turning a stream of numpy batches into what Keras ``fit`` consumes."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

import numpy as np

from digits_ray.keras_api import tf
from digits_ray.schema import IMAGE_SIZE

Batches = Iterable[tuple[np.ndarray, np.ndarray]]
T = TypeVar("T")

SIGNATURE = (
    tf.TensorSpec(shape=(None, IMAGE_SIZE, IMAGE_SIZE), dtype=tf.uint8),
    tf.TensorSpec(shape=(None,), dtype=tf.uint8),
)


def tf_dataset(make_batches: Callable[[], Batches], prefetch: int = 2) -> tf.data.Dataset:
    """A tf.data pipeline over a Python batch stream; the stream runs once, across all epochs.

    Keras keeps one iterator across epochs when ``steps_per_epoch`` is given, so a stream that
    covers every epoch feeds the whole run.
    """

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield from make_batches()

    return tf.data.Dataset.from_generator(generate, output_signature=SIGNATURE).prefetch(prefetch)


def tf_dataset_from_chunks(make_chunks: Callable[[], Batches], batch_size: int, prefetch: int = 2) -> tf.data.Dataset:
    """Training batches cut inside tf.data from chunks of whole batches: one Python call per chunk.

    Each chunk is (k * batch_size images, k * batch_size labels); it is reshaped to k batches here
    and sliced in C++, so the training loop never waits on Python (or its lock) between steps.
    """
    chunk_signature = (
        tf.TensorSpec(shape=(None, batch_size, IMAGE_SIZE, IMAGE_SIZE), dtype=tf.uint8),
        tf.TensorSpec(shape=(None, batch_size), dtype=tf.uint8),
    )

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for images, labels in make_chunks():
            if len(labels) % batch_size or len(images) != len(labels):
                raise ValueError(f"a chunk must hold whole batches of {batch_size}; got {len(images)} images, "
                                 f"{len(labels)} labels")
            yield images.reshape(-1, batch_size, IMAGE_SIZE, IMAGE_SIZE), labels.reshape(-1, batch_size)

    chunks = tf.data.Dataset.from_generator(generate, output_signature=chunk_signature)
    return chunks.flat_map(lambda x, y: tf.data.Dataset.from_tensor_slices((x, y))).prefetch(prefetch)


class StartedEarly(Generic[T]):
    """``items``, whose first element is fetched now, in a background thread.

    A Ray Data stream starts its actors and first blocks only when it is first read; reading it
    while the strategy and model are built takes those seconds out of the critical path, and
    ``wait()`` lets training start its clock once data is there. Errors are raised to the
    consumer, where they would have happened anyway.
    """

    def __init__(self, items: Iterable[T]):
        self._iterator = iter(items)
        self._first: list[T] = []
        self._failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._fetch, name="first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first.append(next(self._iterator))
        except StopIteration:
            pass
        except BaseException as error:  # noqa: BLE001 - re-raised in the consuming thread
            self._failure.append(error)

    def wait(self) -> None:
        """Block until the first element (or the stream's end or error) is there."""
        self._thread.join()

    def __iter__(self) -> Iterator[T]:
        self.wait()
        if self._failure:
            raise self._failure[0]
        if self._first:
            yield self._first.pop()
            yield from self._iterator


def even_shards(n: int, workers: int, batch_size: int) -> tuple[list[slice], int, int]:
    """Contiguous shares of ``n`` items, a per-worker batch and a step count that every share fits.

    MultiWorkerMirroredStrategy needs every worker to run the same number of evaluation steps, so
    the batch is chosen to give every share that many batches, the last ones partial; nothing is
    left out. ``batch_size`` is the global batch: each worker takes its part of it.
    """
    if n < workers:
        raise ValueError(f"{n} items cannot be shared among {workers} workers")
    sizes = [n // workers + (rank < n % workers) for rank in range(workers)]
    starts = np.cumsum([0, *sizes])
    steps = -(-sizes[0] // max(1, batch_size // workers))
    per_worker = -(-sizes[0] // steps)
    if sizes[-1] <= (steps - 1) * per_worker:  # only possible for tiny shares; never silently short
        steps, per_worker = 1, sizes[0]
    return [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])], per_worker, steps


class FreedInBackground(tf.distribute.DistributedDataset):
    """A distributed dataset whose iterators are freed in a background thread, not in ``fit``.

    Freeing a MultiWorkerMirroredStrategy input iterator waits for the tf.data autotuning threads
    of its per-device datasets (which TensorFlow builds, so their options cannot be set), and those
    notice it only at their next wake-up, an interval that grows over a run (bench/README.md has
    the measured wait). Keras frees the training iterator when ``fit`` returns, so a worker
    finished that much later. Keras only ever uses the newest
    iterator: each older one, and all of them on ``release()``, go to a daemon thread to be freed.
    """

    def __init__(self, dataset: tf.distribute.DistributedDataset):
        self._dataset = dataset
        self._iterators: list = []

    def __iter__(self):
        self.release()
        iterator = iter(self._dataset)
        self._iterators.append(iterator)
        return iterator

    def release(self) -> None:
        """Free the iterators made so far, off this thread (call it once ``fit`` has returned)."""
        if self._iterators:
            held, self._iterators = self._iterators, []
            threading.Thread(target=held.clear, name="free-input-iterators", daemon=True).start()

    @property
    def element_spec(self):
        return self._dataset.element_spec

    def reduce(self, initial_state, reduce_func):
        return self._dataset.reduce(initial_state, reduce_func)
