"""WideResNet-(depth)-(widen_factor) of TRADES / RobustBench (``Zhang2019Theoretically``), NHWC.

conv1 3x3 (16 ch) -> three groups of ``n = (depth - 4) / 6`` pre-activation blocks with widths
16k, 32k, 64k and strides 1, 2, 2 -> BN + ReLU -> global average pool -> fc (with bias).
Convs are bias-free with He-normal (fan-out) init, as in the reference.

Parameter naming (PyTorch key with ``.<i>`` -> ``_<i>`` and ``.`` -> ``/``)::

    conv1/kernel
    block{g}/layer_{i}/bn1/{scale,bias}      g in 1..3, i in 0..n-1
    block{g}/layer_{i}/conv1/kernel
    block{g}/layer_{i}/bn2/{scale,bias}
    block{g}/layer_{i}/conv2/kernel
    block{g}/layer_0/convShortcut/kernel     only where the width changes
    bn1/{scale,bias}                         final BN (running stats under batch_stats)
    fc/{kernel,bias}

RobustBench's file also holds ``sub_block1`` (built but never used in ``forward``); an importer
drops it: 48,262,586 stored parameters vs 46,160,474 here for WRN-34-10, 10 classes.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax

from mmard_jax import checks
from mmard_jax.models.layers import (
    KAIMING_NORMAL_FAN_OUT,
    ImageClassifier,
    ModuleDef,
    PreActBlock,
    global_avg_pool,
)

GROUP_STRIDES = (1, 2, 2)
STEM_WIDTH = 16


def blocks_per_group(depth: int) -> int:
    """``n`` for ``depth = 6n + 4``; ValueError naming ``depth`` otherwise."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth must be an int 6n+4 with n >= 1 (10, 16, 28, 34, 70), got {depth!r}")
    return (depth - 4) // 6


def group_widths(widen_factor: int) -> tuple[int, int, int]:
    """Output widths of the three groups: 16k, 32k, 64k."""
    return (STEM_WIDTH * widen_factor, 2 * STEM_WIDTH * widen_factor, 4 * STEM_WIDTH * widen_factor)


class BlockGroup(nn.Module):
    """``num_blocks`` PreActBlocks named ``layer_0`` ...; the first one has stride ``strides``."""

    num_blocks: int
    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for index in range(self.num_blocks):
            x = PreActBlock(
                self.features,
                self.strides if index == 0 else 1,
                conv=self.conv,
                norm=self.norm,
                shortcut_name="convShortcut",
                name=f"layer_{index}",
            )(x)
        return x


class WideResNet(ImageClassifier):
    """TRADES WideResNet. Attributes: ``depth`` (6n+4), ``widen_factor`` (k)."""

    depth: int = 34
    widen_factor: int = 10

    torch_sequentials: ClassVar[frozenset[str]] = frozenset({"layer"})
    torch_unused: ClassVar[tuple[tuple[str, str], ...]] = (
        ("sub_block1.", "TRADES/RobustBench WideResNet builds sub_block1 but never calls it in forward"),
    )

    def __post_init__(self) -> None:
        blocks_per_group(self.depth)
        checks.positive_int("widen_factor", self.widen_factor)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv, norm = self.conv_def(kernel_init=KAIMING_NORMAL_FAN_OUT), self.norm_def(train)
        x = self.prepare_input(x)
        x = conv(STEM_WIDTH, (3, 3), strides=1, padding=1, name="conv1")(x)
        num_blocks = blocks_per_group(self.depth)
        for group, (width, stride) in enumerate(
            zip(group_widths(self.widen_factor), GROUP_STRIDES, strict=True), start=1
        ):
            x = BlockGroup(num_blocks, width, stride, conv=conv, norm=norm, name=f"block{group}")(x)
        x = nn.relu(norm(name="bn1")(x))
        return self.dense_def()(self.num_classes, name="fc")(global_avg_pool(x))
