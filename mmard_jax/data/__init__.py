"""Data: sources (mnist5k, digits, TFDS, official CIFAR archive), sharded batches, on-device augmentation."""

from mmard_jax.data.augment import augment_batch, augment_image, to_float
from mmard_jax.data.pipeline import eval_batches, prefetch, steps_per_epoch, train_batches
from mmard_jax.data.sources import (
    ArraySource,
    Dataset,
    load_dataset,
    make_source,
    read_cifar_archive,
)

__all__ = [
    "ArraySource",
    "Dataset",
    "augment_batch",
    "augment_image",
    "eval_batches",
    "load_dataset",
    "make_source",
    "prefetch",
    "read_cifar_archive",
    "steps_per_epoch",
    "to_float",
    "train_batches",
]
