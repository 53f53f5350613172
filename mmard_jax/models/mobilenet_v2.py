"""MobileNetV2 with CIFAR strides (kuangliu/pytorch-cifar, as used by RSLAD), NHWC.

Stem 3x3 conv (32 ch, stride 1) + BN + ReLU -> 17 inverted-residual blocks from the (t, c, n, s)
table below (the stem and the first stride-2 stage changed to stride 1 for 32x32) -> 1x1 conv to
1280 + BN + ReLU -> global average pool -> linear. Activations are ReLU (not ReLU6), every block
expands (also for t = 1), and a stride-1 block whose width changes adds a 1x1 conv + BN shortcut,
all as in the reference. 2,296,922 parameters for 10 classes.

Parameter names (PyTorch key with ``.<i>`` -> ``_<i>`` and ``.`` -> ``/``): ``conv1``, ``bn1``,
``layers_{i}/{conv1,bn1,conv2,bn2,conv3,bn3[,shortcut_0 (conv),shortcut_1 (bn)]}`` for i in 0..16,
``conv2``, ``bn2``, ``linear``.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax

from mmard_jax.models.layers import ImageClassifier, ModuleDef, global_avg_pool

# (expansion t, output width c, blocks n, first stride s)
CIFAR_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 in the ImageNet model
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_WIDTH = 32
HEAD_WIDTH = 1280


def block_specs() -> list[tuple[int, int, int]]:
    """(expansion, width, stride) of every inverted-residual block, in order."""
    return [
        (expansion, width, stride if index == 0 else 1)
        for expansion, width, blocks, stride in CIFAR_STAGES
        for index in range(blocks)
    ]


class InvertedResidual(nn.Module):
    """1x1 expand + BN + ReLU -> 3x3 depthwise + BN + ReLU -> 1x1 project + BN.

    Stride-1 blocks add a shortcut: ``x``, or a 1x1 conv + BN of ``x`` when the width changes.
    """

    expansion: int
    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_width = x.shape[-1]
        hidden = self.expansion * in_width
        y = self.conv(hidden, (1, 1), padding=0, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(hidden, (3, 3), strides=self.strides, padding=1, feature_group_count=hidden, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.norm(name="bn3")(self.conv(self.features, (1, 1), padding=0, name="conv3")(y))
        if self.strides != 1:
            return y
        if in_width != self.features:
            x = self.conv(self.features, (1, 1), padding=0, name="shortcut_0")(x)
            x = self.norm(name="shortcut_1")(x)
        return y + x


class MobileNetV2(ImageClassifier):
    """CIFAR MobileNetV2 (width multiplier 1)."""

    torch_sequentials: ClassVar[frozenset[str]] = frozenset({"layers", "shortcut"})

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv, norm = self.conv_def(), self.norm_def(train)
        x = self.prepare_input(x)
        x = nn.relu(norm(name="bn1")(conv(STEM_WIDTH, (3, 3), padding=1, name="conv1")(x)))
        for index, (expansion, width, stride) in enumerate(block_specs()):
            x = InvertedResidual(expansion, width, stride, conv=conv, norm=norm, name=f"layers_{index}")(x)
        x = nn.relu(norm(name="bn2")(conv(HEAD_WIDTH, (1, 1), padding=0, name="conv2")(x)))
        return self.dense_def()(self.num_classes, name="linear")(global_avg_pool(x))
