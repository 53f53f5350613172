"""DeepMind's WideResNet and PreAct ResNet (Gowal et al. 2020, Rebuffi et al. 2021), NHWC.

These are the architectures behind RobustBench's ``Gowal2020Uncovering_*`` and ``Rebuffi2021Fixing_*``
entries (``DMWideResNet``, ``DMPreActResNet``). They differ from the TRADES WideResNet in three ways that
matter for imported weights:

- the activation is a choice (``'swish'`` = ``x * sigmoid(x)`` in every published checkpoint; ``'relu'``);
- each 3x3 convolution that may stride pads TensorFlow-style: 1 pixel on every side at stride 1, but only
  after (bottom/right) at stride 2, so an imported kernel sees the pixels it was trained on;
- the input is normalised by the model (``mean``/``std``; RobustBench's table sets the CIFAR values).

In the PreAct ResNet the projection shortcut is a 3x3 (padded) convolution of the block's *raw* input; in
the WideResNet it is a 1x1 convolution of the *activated* input, as in the TRADES network.

Parameter names follow the PyTorch keys (``torch_sequentials`` says which ``name_<i>`` are ``name.<i>``):
DMWideResNet ``init_conv``, ``layer_{g}/block_{i}/{batchnorm_0,conv_0,batchnorm_1,conv_1[,shortcut]}``,
``batchnorm``, ``logits``; DMPreActResNet ``conv_2d``,
``layer_{s}_{i}/{batchnorm_0,conv_2d_1,batchnorm_1,conv_2d_2[,shortcut]}``, ``batchnorm``, ``logits``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import flax.linen as nn
import jax

from mmard_jax import checks
from mmard_jax.models.layers import ImageClassifier, ModuleDef, global_avg_pool
from mmard_jax.models.wide_resnet import STEM_WIDTH, blocks_per_group, group_widths

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"relu": nn.relu, "swish": nn.swish}
PREACT_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
PREACT_WIDTHS = (64, 128, 256, 512)
GROUP_STRIDES = (1, 2, 2)


def tf_same_padding(strides: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Padding of a 3x3 convolution that reproduces TensorFlow's 'SAME' on even sizes: (1, 1) or (0, 1)."""
    if strides == 1:
        return ((1, 1), (1, 1))
    if strides == 2:
        return ((0, 1), (0, 1))
    raise ValueError(f"strides must be 1 or 2, got {strides!r}")


def check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return name


class _DMBlockBase(nn.Module):
    """Fields of both DeepMind blocks: output width, stride, the conv/norm constructors and the activation."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[jax.Array], jax.Array]


class DMBlock(_DMBlockBase):
    """WideResNet block: pre-activation, TF-style padded strided conv, 1x1 shortcut of the activated input."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        activated = self.act(self.norm(name="batchnorm_0")(x))
        y = self.conv(self.features, (3, 3), self.strides, tf_same_padding(self.strides), name="conv_0")(activated)
        y = self.act(self.norm(name="batchnorm_1")(y))
        y = self.conv(self.features, (3, 3), 1, 1, name="conv_1")(y)
        if x.shape[-1] == self.features:
            return x + y
        return self.conv(self.features, (1, 1), self.strides, 0, name="shortcut")(activated) + y


class DMPreActBlock(_DMBlockBase):
    """PreAct ResNet block: TF-style padded convs; a 3x3 shortcut of the raw input when the shape changes."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = tf_same_padding(self.strides)
        y = self.act(self.norm(name="batchnorm_0")(x))
        y = self.conv(self.features, (3, 3), self.strides, padding, name="conv_2d_1")(y)
        y = self.act(self.norm(name="batchnorm_1")(y))
        y = self.conv(self.features, (3, 3), 1, 1, name="conv_2d_2")(y)
        if self.strides == 1 and x.shape[-1] == self.features:
            return x + y
        return self.conv(self.features, (3, 3), self.strides, padding, name="shortcut")(x) + y


class DMBlockGroup(_DMBlockBase):
    """``num_blocks`` DMBlocks named ``block_0`` ...; the first one has stride ``strides``."""

    num_blocks: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for index in range(self.num_blocks):
            stride = self.strides if index == 0 else 1
            x = DMBlock(self.features, stride, self.conv, self.norm, self.act, name=f"block_{index}")(x)
        return x


class _DMNetwork(ImageClassifier):
    """What both DeepMind networks share: the activation choice and the head (BN, activation, pool, ``logits``)."""

    activation: str = "swish"

    def __post_init__(self) -> None:
        check_activation(self.activation)
        super().__post_init__()

    def features(self, x: jax.Array, conv: ModuleDef, norm: ModuleDef, act) -> jax.Array:
        """Stem and residual stages (called inside ``__call__``'s compact scope)."""
        raise NotImplementedError

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv, norm, act = self.conv_def(), self.norm_def(train), ACTIVATIONS[self.activation]
        x = act(norm(name="batchnorm")(self.features(self.prepare_input(x), conv, norm, act)))
        return self.dense_def()(self.num_classes, name="logits")(global_avg_pool(x))


class DMWideResNet(_DMNetwork):
    """DeepMind WideResNet-(depth)-(widen_factor). Attributes: ``depth`` (6n+4), ``widen_factor``, ``activation``."""

    depth: int = 28
    widen_factor: int = 10

    torch_sequentials: ClassVar[frozenset[str]] = frozenset({"layer", "block"})

    def __post_init__(self) -> None:
        blocks_per_group(self.depth)
        checks.positive_int("widen_factor", self.widen_factor)
        super().__post_init__()

    def features(self, x, conv, norm, act):
        x = conv(STEM_WIDTH, (3, 3), 1, 1, name="init_conv")(x)
        num_blocks = blocks_per_group(self.depth)
        for group, (width, stride) in enumerate(zip(group_widths(self.widen_factor), GROUP_STRIDES, strict=True)):
            x = DMBlockGroup(width, stride, conv, norm, act, num_blocks, name=f"layer_{group}")(x)
        return x


class DMPreActResNet(_DMNetwork):
    """DeepMind PreAct ResNet-18/34. Attributes: ``depth`` (18 or 34), ``activation``."""

    depth: int = 18

    torch_sequentials: ClassVar[frozenset[str]] = frozenset(f"layer_{stage}" for stage in range(4))

    def __post_init__(self) -> None:
        if self.depth not in PREACT_BLOCKS:
            raise ValueError(f"depth must be one of {sorted(PREACT_BLOCKS)}, got {self.depth!r}")
        super().__post_init__()

    def features(self, x, conv, norm, act):
        x = conv(PREACT_WIDTHS[0], (3, 3), 1, 1, name="conv_2d")(x)
        for stage, (width, blocks) in enumerate(zip(PREACT_WIDTHS, PREACT_BLOCKS[self.depth], strict=True)):
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                x = DMPreActBlock(width, stride, conv, norm, act, name=f"layer_{stage}_{index}")(x)
        return x
