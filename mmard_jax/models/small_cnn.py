"""Small models: the TRADES MNIST ``SmallCNN``, a configurable demo ``CNN`` and an ``MLP``, NHWC.

``SmallCNN`` (TRADES ``models/small_cnn.py``): conv 32, conv 32, maxpool, conv 64, conv 64, maxpool,
fc 200, fc 200, fc C; 3x3 valid convs with bias, ReLU, 2x2 max-pools. Init as the reference
(He-normal fan-in convs with zero bias, zero-initialised ``fc3``). Names ``conv1..conv4`` and
``fc1..fc3`` (the PyTorch keys without their ``feature_extractor.`` / ``classifier.`` prefix). The
features are flattened in PyTorch's channel-major (C, H, W) order, so an imported ``fc1`` weight
needs only a transpose. The reference's dropout (0.5, after ``fc1``) is ``dropout_rate``, default 0
here so that ``train=True`` needs no dropout key; with a rate > 0 pass ``rngs={'dropout': key}``.
312,202 parameters for 28x28x1 input and 10 classes.

``CNN``: per entry of ``widths`` a 3x3 conv (padding 1) [+ BN] + ReLU + 2x2 max-pool, then an
optional hidden dense layer + ReLU, then the logits. ``MLP``: flatten, dense + ReLU layers, logits.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmard_jax import checks
from mmard_jax.models.layers import (
    KAIMING_NORMAL_FAN_IN,
    ImageClassifier,
)

SMALL_CNN_MIN_SIZE = 16  # four valid 3x3 convs and two 2x2 pools leave at least 2x2


def _pool_windows(x: jax.Array) -> jax.Array:
    """NHWC -> (N, H/2, 2, W/2, 2, C): the 2x2 windows of ``x``, odd remainders dropped."""
    n, h, w, c = x.shape
    return x[:, : h - h % 2, : w - w % 2].reshape(n, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """PyTorch ``MaxPool2d(2, 2)``: non-overlapping 2x2 windows, odd remainders dropped.

    The same values and gradients as ``nn.max_pool(x, (2, 2), (2, 2))`` (the gradient goes to the first maximum of each
    window in row-major order, as in PyTorch), but differentiated with elementwise operations instead of XLA's
    select-and-scatter, which dominated the input gradient of a max-pooling CNN on XLA:CPU
    (benchmarks/results/cpu_downsampling.md). A ``jax.custom_vjp``: reverse mode (grad, vjp, jacrev) only.
    """
    return _pool_windows(x).max(axis=(2, 4))


def _max_pool_forward(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    pooled = max_pool_2x2(x)
    return pooled, (x, pooled)


def _max_pool_backward(residuals: tuple[jax.Array, jax.Array], grad: jax.Array) -> tuple[jax.Array]:
    """Each window's gradient goes to its first maximum in row-major order: the four window positions are visited in
    that order and each claims the gradient if it equals the maximum and no earlier one did (elementwise only)."""
    x, pooled = residuals
    n, h, w, c = x.shape
    windows = _pool_windows(x)
    unclaimed = jnp.ones(pooled.shape, bool)
    rows = []
    for i in range(2):
        row = []
        for j in range(2):
            claims = unclaimed & (windows[:, :, i, :, j] == pooled)
            unclaimed = unclaimed & ~claims
            row.append(jnp.where(claims, grad, 0))
        rows.append(jnp.stack(row, axis=3))  # (N, H/2, W/2, 2, C)
    spread = jnp.stack(rows, axis=2).reshape(n, h - h % 2, w - w % 2, c)
    return (jnp.pad(spread, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_forward, _max_pool_backward)


def flatten_channel_major(x: jax.Array) -> jax.Array:
    """Flatten NHWC features in the (C, H, W) order of PyTorch's ``view(N, -1)`` on NCHW."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


class SmallCNN(ImageClassifier):
    """TRADES SmallCNN. Attributes: ``dropout_rate`` after ``fc1`` (reference 0.5, default 0)."""

    dropout_rate: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.dropout_rate, bool) or not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = self.conv_def(kernel_init=KAIMING_NORMAL_FAN_IN, use_bias=True)
        dense = self.dense_def()
        x = self.prepare_input(x)
        if min(x.shape[1:3]) < SMALL_CNN_MIN_SIZE:
            raise ValueError(f"small_cnn needs inputs of at least 16x16, got shape {x.shape}")
        for index, width in enumerate((32, 32, 64, 64), start=1):
            x = nn.relu(conv(width, (3, 3), padding=0, name=f"conv{index}")(x))
            if index % 2 == 0:
                x = max_pool_2x2(x)
        x = nn.relu(dense(200, name="fc1")(flatten_channel_major(x)))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.relu(dense(200, name="fc2")(x))
        zeros = nn.initializers.zeros
        return dense(self.num_classes, kernel_init=zeros, name="fc3")(x)


DOWNSAMPLING = ("max_pool", "stride")


class CNN(ImageClassifier):
    """Configurable small CNN for fast demos and tests.

    Attributes:
      widths: output channels of the conv stages (each halves the spatial size).
      hidden: width of the dense layer before the logits; 0 = none.
      use_bn: BatchNorm after each conv (the convs then have no bias).
      downsample: 'max_pool' (conv, ReLU, 2x2 max-pool) or 'stride' (a stride-2 conv, ReLU): the stride form is
        3-5x faster to differentiate on XLA:CPU (benchmarks/results/cpu_downsampling.md), so the CPU demo uses it.
    """

    widths: tuple[int, ...] = (16, 32)
    hidden: int = 64
    use_bn: bool = False
    downsample: str = "max_pool"

    def __post_init__(self) -> None:
        checks.int_tuple("widths", self.widths, allow_empty=False)
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden < 0:
            raise ValueError(f"hidden must be an int >= 0 (0 = no hidden layer), got {self.hidden!r}")
        checks.boolean("use_bn", self.use_bn)
        if self.downsample not in DOWNSAMPLING:
            raise ValueError(f"downsample must be one of {DOWNSAMPLING}, got {self.downsample!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv, norm = self.conv_def(use_bias=not self.use_bn), self.norm_def(train)
        dense = self.dense_def()
        x = self.prepare_input(x)
        for index, width in enumerate(self.widths):
            if min(x.shape[1:3]) < 2:
                raise ValueError(f"widths={self.widths} has too many stages for input shape {x.shape}")
            strides = 2 if self.downsample == "stride" else 1
            x = conv(width, (3, 3), strides=strides, padding=1, name=f"conv_{index}")(x)
            if self.use_bn:
                x = norm(name=f"bn_{index}")(x)
            x = nn.relu(x)
            if self.downsample == "max_pool":
                x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        if self.hidden:
            x = nn.relu(dense(self.hidden, name="hidden")(x))
        return dense(self.num_classes, name="head")(x)


class MLP(ImageClassifier):
    """Flatten, then ``dense + ReLU`` per entry of ``hidden``, then the logits."""

    hidden: tuple[int, ...] = (128,)

    def __post_init__(self) -> None:
        checks.int_tuple("hidden", self.hidden, allow_empty=True)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dense = self.dense_def()
        x = self.prepare_input(x)
        x = x.reshape(x.shape[0], -1)
        for index, width in enumerate(self.hidden):
            x = nn.relu(dense(width, name=f"dense_{index}")(x))
        return dense(self.num_classes, name="head")(x)
