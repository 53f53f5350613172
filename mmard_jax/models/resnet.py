"""CIFAR ResNet-18 and PreAct ResNet-18 (3x3 stem, stride 1, no max-pool), NHWC.

References: kuangliu/pytorch-cifar ``ResNet18`` and Rice et al. (robust overfitting) ``PreActResNet18``.

Parameter names follow the PyTorch ``state_dict`` keys with ``.<i>`` -> ``_<i>`` and ``.`` -> ``/``:
``layer2.0.shortcut.1.weight`` is ``layer2_0/shortcut_1/scale``. ResNet-18: ``conv1``, ``bn1``,
``layer{1..4}_{0,1}/{conv1,bn1,conv2,bn2[,shortcut_0 (conv),shortcut_1 (bn)]}``, ``linear``.
PreAct ResNet-18: ``conv1``, ``layer{s}_{i}/{bn1,conv1,bn2,conv2[,shortcut_0]}``, ``bn``, ``linear``.

Parameter counts, 10 classes: ResNet-18 11,173,962; PreAct ResNet-18 11,172,170 with its final
BN (Rice et al.), 11,171,146 with ``final_bn=False`` (kuangliu's variant, which lacks it).
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax

from mmard_jax import checks
from mmard_jax.models.layers import (
    ImageClassifier,
    ModuleDef,
    PreActBlock,
    global_avg_pool,
)

STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
BLOCKS_PER_STAGE = (2, 2, 2, 2)  # ResNet-18
TORCH_SEQUENTIALS = frozenset({"layer1", "layer2", "layer3", "layer4", "shortcut"})


def stage_block_specs() -> list[tuple[str, int, int]]:
    """(name, width, stride) of every residual block, in order: ``layer1_0`` ... ``layer4_1``."""
    specs = []
    for stage, (width, stride, blocks) in enumerate(
        zip(STAGE_WIDTHS, STAGE_STRIDES, BLOCKS_PER_STAGE, strict=True), start=1
    ):
        for index in range(blocks):
            specs.append((f"layer{stage}_{index}", width, stride if index == 0 else 1))
    return specs


class BasicBlock(nn.Module):
    """Post-activation basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(self.features, (3, 3), strides=self.strides, padding=1, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), strides=1, padding=1, name="conv2")(y)
        y = self.norm(name="bn2")(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = self.conv(self.features, (1, 1), strides=self.strides, padding=0, name="shortcut_0")(x)
            x = self.norm(name="shortcut_1")(x)
        return nn.relu(y + x)


class ResNet18(ImageClassifier):
    """CIFAR ResNet-18: conv-bn-relu stem, BasicBlocks [2, 2, 2, 2], global average pool, linear."""

    torch_sequentials: ClassVar[frozenset[str]] = TORCH_SEQUENTIALS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv, norm = self.conv_def(), self.norm_def(train)
        x = self.prepare_input(x)
        x = conv(STAGE_WIDTHS[0], (3, 3), strides=1, padding=1, name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x))
        for name, width, stride in stage_block_specs():
            x = BasicBlock(width, stride, conv=conv, norm=norm, name=name)(x)
        return self.dense_def()(self.num_classes, name="linear")(global_avg_pool(x))


class PreActResNet18(ImageClassifier):
    """CIFAR PreAct ResNet-18: conv stem, PreActBlocks [2, 2, 2, 2], [bn-relu], pool, linear.

    Attributes:
      final_bn: the BN + ReLU before pooling (Rice et al.: True; kuangliu/pytorch-cifar: False).
    """

    final_bn: bool = True

    torch_sequentials: ClassVar[frozenset[str]] = TORCH_SEQUENTIALS

    def __post_init__(self) -> None:
        checks.boolean("final_bn", self.final_bn)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv, norm = self.conv_def(), self.norm_def(train)
        x = self.prepare_input(x)
        x = conv(STAGE_WIDTHS[0], (3, 3), strides=1, padding=1, name="conv1")(x)
        for name, width, stride in stage_block_specs():
            x = PreActBlock(width, stride, conv=conv, norm=norm, name=name)(x)
        if self.final_bn:
            x = nn.relu(norm(name="bn")(x))
        return self.dense_def()(self.num_classes, name="linear")(global_avg_pool(x))
