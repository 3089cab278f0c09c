"""Feeding Keras: chunks cut into batches in order, an early-started stream, even validation shares,
input iterators freed off the training thread."""

import threading
import time
import weakref

import numpy as np
import pytest

from digits_ray.keras_api import tf
from digits_ray.train import distributed
from digits_ray.train.feed import FreedInBackground, StartedEarly, even_shards, tf_dataset_from_chunks


def _chunks(sizes: list[int]):
    start = 0
    for size in sizes:
        images = (np.arange(start, start + size) % 256).astype(np.uint8)[:, None, None] * np.ones((1, 28, 28), np.uint8)
        yield images, (np.arange(start, start + size) % 10).astype(np.uint8)
        start += size


def test_chunks_become_batches_in_order():
    batches = list(tf_dataset_from_chunks(lambda: _chunks([32, 16, 48]), batch_size=16).as_numpy_iterator())
    assert len(batches) == 6
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    assert all(b[0].shape == (16, 28, 28) and b[1].shape == (16,) for b in batches)
    np.testing.assert_array_equal(labels, np.arange(96) % 10)
    np.testing.assert_array_equal(images[:, 5, 5], np.arange(96) % 256)


def test_a_chunk_that_is_not_whole_batches_is_an_error():
    dataset = tf_dataset_from_chunks(lambda: _chunks([20]), batch_size=16)
    with pytest.raises(Exception, match="whole batches of 16; got 20 images"):
        list(dataset.as_numpy_iterator())


def test_started_early_fetches_the_first_item_before_it_is_read():
    fetched = threading.Event()

    def items():
        fetched.set()
        yield from range(5)

    stream = StartedEarly(items())
    assert fetched.wait(timeout=10)  # nobody has read yet
    stream.wait()
    assert list(stream) == [0, 1, 2, 3, 4]
    assert list(StartedEarly(iter([]))) == []


def test_started_early_raises_the_stream_error_to_the_reader():
    def broken():
        raise OSError("shard unavailable")
        yield

    stream = StartedEarly(broken())
    stream.wait()  # waiting does not raise: reading does
    with pytest.raises(OSError, match="shard unavailable"):
        next(iter(stream))


@pytest.mark.parametrize("n, workers, batch, expected", [
    # (per-worker batch, steps): the batch never exceeds its part of the global batch, except for
    # shares too small to split (7 items over 3 workers: one step of the whole share).
    (6000, 2, 1024, (500, 6)), (6001, 2, 1024, (501, 6)), (1025, 2, 1024, (257, 2)), (7, 3, 1024, (3, 1)),
    (100, 1, 32, (25, 4)), (2053, 4, 64, (16, 33))])
def test_even_shards_cover_everything_in_equal_step_counts(n, workers, batch, expected):
    shares, per_worker, steps = even_shards(n, workers, batch)
    assert (per_worker, steps) == expected
    covered = np.concatenate([np.arange(n)[share] for share in shares])
    np.testing.assert_array_equal(covered, np.arange(n))  # every item once, in order
    for share in shares:
        size = share.stop - share.start
        assert -(-size // per_worker) == steps  # every worker runs exactly `steps` batches
    assert per_worker <= max(1, batch // workers) or steps == 1


def test_even_shards_need_an_item_per_worker():
    with pytest.raises(ValueError, match="3 items cannot be shared among 4 workers"):
        even_shards(3, 4, 64)


def _freed_by(iterator) -> list[str]:
    """The name of the thread that frees ``iterator``, once it is freed."""
    names: list[str] = []
    weakref.finalize(iterator, lambda: names.append(threading.current_thread().name))
    return names


def _wait_for(names: list[str], timeout_s: float = 60) -> list[str]:
    """``names`` once the iterator it watches is freed; a failure saying so after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not names:
        if time.monotonic() > deadline:
            pytest.fail(f"the input iterator was not freed within {timeout_s:.0f}s")
        time.sleep(0.05)
    return names


def test_input_iterators_are_freed_off_the_training_thread():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    data = FreedInBackground(strategy.distribute_datasets_from_function(lambda _: tf.data.Dataset.range(6).batch(2)))
    assert isinstance(data, tf.distribute.DistributedDataset)  # what Keras fit accepts as distributed input
    first = iter(data)
    assert next(first).numpy().tolist() == [0, 1]
    first_freed = _freed_by(first)
    del first
    assert first_freed == []  # still held: Keras has let go, this thread does not free it
    second = iter(data)  # Keras' next epoch: the first iterator is freed, in the background
    assert _wait_for(first_freed) == ["free-input-iterators"]
    assert [b.numpy().tolist() for b in second] == [[0, 1], [2, 3], [4, 5]]
    second_freed = _freed_by(second)
    del second
    data.release()  # once fit has returned
    assert _wait_for(second_freed) == ["free-input-iterators"]


def test_batches_to_train_skip_trained_epochs_and_stop_at_the_last_batch():
    import numpy as np

    def stream(chunks: int, per_chunk: int, batch: int):
        for c in range(chunks):
            ids = np.arange(c * per_chunk * batch, (c + 1) * per_chunk * batch)
            yield {"image": ids, "label": ids}

    assert distributed.chunk_window(seen=0, whole=4, skip=6, end=12) == (4, 4)  # all before skip: none
    assert distributed.chunk_window(seen=4, whole=4, skip=6, end=12) == (2, 4)
    assert distributed.chunk_window(seen=8, whole=4, skip=6, end=10) == (0, 2)  # the run ends mid-chunk
    pulled = []

    def counted(chunks):
        for chunk in chunks:
            pulled.append(chunk)
            yield chunk

    # 3 batches of 2 per chunk; the run trains stream batches 4..8 (epoch 2-3 of 2-batch epochs, say).
    got = list(distributed.batches_to_train(counted(stream(10, 3, 2)), batch_size=2, skip=4, end=9))
    labels = np.concatenate([labels for _, labels in got])
    np.testing.assert_array_equal(labels, np.arange(8, 18))  # batches 4..8, each of 2 rows
    assert len(pulled) == 3  # not one chunk more than the last batch needs


def test_a_global_batch_that_does_not_divide_is_refused():
    from digits_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="batch_size 65 .global. does not divide among 2 workers"):
        distributed.per_worker_batch(65, 2)
    assert distributed.per_worker_batch(128, 2) == 64
