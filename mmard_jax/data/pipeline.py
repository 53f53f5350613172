"""Deterministic host-side batching (NumPy, no TensorFlow), sharded over processes.

A global batch of G examples is split into P contiguous per-process slices of G // P examples;
process p feeds its slice to its local devices. Training order depends only on (seed, epoch),
so a run resumed at (epoch, start_step) sees exactly the batches it would have seen.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from mmard_jax import checks
from mmard_jax.data.sources import ArraySource


def _check_sharding(global_batch_size: int, process_index: int, process_count: int) -> int:
    """Validates the sharding arguments and returns the per-process batch size."""
    checks.positive_int("global_batch_size", global_batch_size)
    if not 0 <= process_index < process_count:
        checks.fail("process_index", f"{process_index} must be in [0, process_count={process_count})")
    if global_batch_size % process_count:
        checks.fail(
            "global_batch_size",
            f"{global_batch_size} is not divisible by process_count={process_count}; "
            "pick a batch size that is a multiple of the number of processes",
        )
    return global_batch_size // process_count


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full batches in one epoch (the remainder is dropped)."""
    checks.positive_int("global_batch_size", global_batch_size)
    if num_examples < global_batch_size:
        checks.fail(
            "global_batch_size",
            f"{global_batch_size} exceeds the {num_examples} training examples; lower the batch size",
        )
    return num_examples // global_batch_size


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of one epoch: a permutation drawn from ``default_rng([seed, epoch])``."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batches(
    src: ArraySource,
    *,
    global_batch_size: int,
    seed: int,
    epoch: int,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields this process's (images uint8 [G/P, H, W, C], labels int32 [G/P]) for one epoch.

    Global batch b is ``perm[b*G:(b+1)*G]``; process p gets its p-th contiguous slice of G // P.
    Batches before `start_step` are skipped without being gathered.
    """
    local = _check_sharding(global_batch_size, process_index, process_count)
    steps = steps_per_epoch(src.num_examples, global_batch_size)
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step must be in [0, {steps}] (steps per epoch); got {start_step}")
    perm = epoch_permutation(src.num_examples, seed, epoch)
    for step in range(start_step, steps):
        first = step * global_batch_size + process_index * local
        indices = perm[first : first + local]
        yield src.images[indices], src.labels[indices]


def eval_batches(
    src: ArraySource,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    num_examples: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields (images, labels, mask) over the first `num_examples` examples, in order.

    Every process yields ceil(n / G) batches of G // P examples; global batch b covers examples
    [b*G, (b+1)*G), process p its p-th slice. Positions past the end hold zero images and label 0
    with mask False, so summing masked results over all processes counts each example once.
    """
    local = _check_sharding(global_batch_size, process_index, process_count)
    count = src.num_examples if num_examples is None else num_examples
    if not 0 <= count <= src.num_examples:
        raise ValueError(f"num_examples must be in [0, {src.num_examples}]; got {num_examples}")
    num_batches = -(-count // global_batch_size)
    for batch in range(num_batches):
        positions = batch * global_batch_size + process_index * local + np.arange(local)
        mask = positions < count
        real = positions[mask]
        images = np.zeros((local,) + src.images.shape[1:], dtype=src.images.dtype)
        labels = np.zeros((local,), dtype=src.labels.dtype)
        images[mask] = src.images[real]
        labels[mask] = src.labels[real]
        yield images, labels, mask


_END = object()


def prefetch(iterator: Iterable[Any], size: int = 2) -> Iterator[Any]:
    """Runs `iterator` in a background thread, keeping up to `size` items ready.

    The thread starts at the first `next()`. An exception raised by the producer is re-raised in
    the consumer; closing the returned generator early stops the producer.
    """
    if size < 1:
        raise ValueError(f"prefetch size must be at least 1; got {size}")
    items: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterator:
                if not put((item, None)):
                    return
        except BaseException as err:  # noqa: BLE001  (forwarded to the consumer)
            put((_END, err))
            return
        put((_END, None))

    worker = threading.Thread(target=produce, daemon=True, name="prefetch")
    worker.start()
    try:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        worker.join()
