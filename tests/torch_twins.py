"""PyTorch twins of the reference architectures that the Flax model zoo mirrors.

Our own definitions, used by the parity tests of the PyTorch-checkpoint converter. Each class has
exactly the ``state_dict()`` keys (same order), shapes and forward computation of its public
reference, and was checked against those definitions (keys, shapes, parameter counts and logits on
32x32 inputs, max abs diff < 1e-5):

- ``ResNet18``, ``PreActResNet18(final_bn=False)``, ``MobileNetV2``: kuangliu/pytorch-cifar;
- ``PreActResNet18(final_bn=True)``: Rice et al. (robust overfitting), a final BN + ReLU before pooling;
- ``WideResNet``: TRADES / RobustBench ``wide_resnet.py``;
- ``DMWideResNet``, ``DMPreActResNet``: DeepMind (Gowal et al. 2020, Rebuffi et al. 2021) via
  RobustBench ``dm_wide_resnet.py``.

Deviations that do not change keys or outputs on 32x32 inputs: pooling is a global mean over the
spatial axes (the references' ``avg_pool2d(out, 4 or 8)``), every class takes ``in_channels``,
constructor arguments are keyword-only, and the DM models take ``activation`` as a string
(``'relu'`` or ``'swish'``) and do not support input ``padding``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
ACTIVATIONS = {"relu": F.relu, "swish": F.silu}  # silu(x) = x * sigmoid(x)


def conv3x3(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, 0, bias=False)


def pool(x: torch.Tensor) -> torch.Tensor:
    return x.mean((2, 3))


# ---------------------------------------------------------------- kuangliu ResNet-18
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()  # identity: no keys
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet_stages(block, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512)):
    """``layer1`` ... ``layer4`` (strides 1, 2, 2, 2) as (name, nn.Sequential) pairs."""
    stages, cin = [], widths[0]
    for s, (width, n, stride) in enumerate(zip(widths, blocks, (1, 2, 2, 2), strict=True), start=1):
        layers = [block(cin if i == 0 else width, width, stride if i == 0 else 1) for i in range(n)]
        stages.append((f"layer{s}", nn.Sequential(*layers)))
        cin = width
    return stages


class ResNet18(nn.Module):
    def __init__(self, *, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(in_channels, 64), nn.BatchNorm2d(64)
        for name, stage in resnet_stages(BasicBlock):
            self.add_module(name, stage)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(pool(out))


# ---------------------------------------------------------------- PreAct ResNet-18
class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), conv3x3(cout, cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv1x1(cin, cout, stride))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class PreActResNet18(nn.Module):
    """``final_bn=True``: Rice et al. (``bn`` + ReLU before pooling); ``False``: kuangliu's variant."""

    def __init__(self, *, num_classes: int = 10, in_channels: int = 3, final_bn: bool = True):
        super().__init__()
        self.conv1 = conv3x3(in_channels, 64)
        for name, stage in resnet_stages(PreActBlock):
            self.add_module(name, stage)
        self.bn = nn.BatchNorm2d(512) if final_bn else None
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        if self.bn is not None:
            out = F.relu(self.bn(out))
        return self.linear(pool(out))


# ---------------------------------------------------------------- kuangliu MobileNetV2 (CIFAR strides)
class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expansion: int, stride: int):
        super().__init__()
        hidden = expansion * cin
        self.stride = stride
        self.conv1, self.bn1 = conv1x1(cin, hidden), nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3, self.bn3 = conv1x1(hidden, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride == 1 and cin != cout:
            self.shortcut = nn.Sequential(conv1x1(cin, cout), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    # (expansion, out_planes, num_blocks, stride)
    cfg = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip

    def __init__(self, *, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(in_channels, 32), nn.BatchNorm2d(32)
        layers, cin = [], 32
        for expansion, cout, n, stride in self.cfg:
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, expansion, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.conv2, self.bn2 = conv1x1(320, 1280), nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, num_classes)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(pool(F.relu(self.bn2(self.conv2(out)))))


# ---------------------------------------------------------------- TRADES / RobustBench WideResNet
def wrn_blocks(depth: int) -> int:
    if (depth - 4) % 6:
        raise ValueError(f"depth must be 6n+4, got {depth}")
    return (depth - 4) // 6


class WideBasicBlock(nn.Module):
    """Pre-activation block; the 1x1 ``convShortcut`` (where the width changes) sees the activated input."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), conv3x3(cout, cout)
        self.convShortcut = conv1x1(cin, cout, stride) if cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(out)
        return shortcut + self.conv2(F.relu(self.bn2(self.conv1(out))))


class NetworkBlock(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        blocks = [WideBasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """``sub_block1`` is built (it is in RobustBench checkpoints) but never used in ``forward``."""

    def __init__(
        self, *, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, sub_block1: bool = False,
        in_channels: int = 3,
    ):  # fmt: skip
        super().__init__()
        n, widths = wrn_blocks(depth), [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = conv3x3(in_channels, 16)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        if sub_block1:
            self.sub_block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(pool(F.relu(self.bn1(out))))


# ---------------------------------------------------------------- DeepMind WideResNet / PreAct ResNet
def tf_pad(x: torch.Tensor, stride: int) -> torch.Tensor:
    """TF 'SAME' padding of a 3x3 conv on even sizes: every side at stride 1, bottom/right at stride 2."""
    if stride not in (1, 2):
        raise ValueError(f"unsupported stride {stride}")
    return F.pad(x, (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1))


class Normalized(nn.Module):
    """Holds ``mean``/``std`` as non-persistent buffers (not in the state dict), like the references."""

    def __init__(self, mean, std, activation: str, in_channels: int):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be 'relu' or 'swish', got {activation!r}")
        self.act = ACTIVATIONS[activation]
        for name, values in (("mean", mean), ("std", std)):
            buffer = torch.as_tensor(values, dtype=torch.float32).reshape(-1, 1, 1)
            if buffer.shape[0] not in (1, in_channels):
                raise ValueError(f"{name} needs 1 or {in_channels} values, got {buffer.shape[0]}")
            self.register_buffer(name, buffer, persistent=False)

    def normalize(self, x):
        return (x - self.mean) / self.std


class DMBlock(nn.Module):
    """WideResNet block: the 1x1 ``shortcut`` (only where the width changes) sees the activated input."""

    def __init__(self, cin: int, cout: int, stride: int, act):
        super().__init__()
        self.act, self.stride = act, stride
        self.batchnorm_0, self.conv_0 = nn.BatchNorm2d(cin), conv3x3(cin, cout, stride, padding=0)
        self.batchnorm_1, self.conv_1 = nn.BatchNorm2d(cout), conv3x3(cout, cout)
        self.shortcut = conv1x1(cin, cout, stride) if cin != cout else None

    def forward(self, x):
        out = self.act(self.batchnorm_0(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv_1(self.act(self.batchnorm_1(self.conv_0(tf_pad(out, self.stride)))))
        return shortcut + out


class DMBlockGroup(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int, act):
        super().__init__()
        blocks = [DMBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, act) for i in range(n)]
        self.block = nn.Sequential(*blocks)

    def forward(self, x):
        return self.block(x)


class DMWideResNet(Normalized):
    def __init__(
        self, *, num_classes: int = 10, depth: int = 28, width: int = 10, activation: str = "relu",
        mean=CIFAR10_MEAN, std=CIFAR10_STD, in_channels: int = 3,
    ):  # fmt: skip
        super().__init__(mean, std, activation, in_channels)
        n, widths = wrn_blocks(depth), [16, 16 * width, 32 * width, 64 * width]
        self.init_conv = conv3x3(in_channels, 16)
        groups = [DMBlockGroup(n, widths[g], widths[g + 1], s, self.act) for g, s in enumerate((1, 2, 2))]
        self.layer = nn.Sequential(*groups)
        self.batchnorm = nn.BatchNorm2d(widths[3])
        self.logits = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        out = self.layer(self.init_conv(self.normalize(x)))
        return self.logits(pool(self.act(self.batchnorm(out))))


class DMPreActBlock(nn.Module):
    """PreAct block; the 3x3 ``shortcut`` (stride or width change) sees the block's *raw* input."""

    def __init__(self, cin: int, cout: int, stride: int, act):
        super().__init__()
        self.act, self.stride = act, stride
        self.batchnorm_0, self.conv_2d_1 = nn.BatchNorm2d(cin), conv3x3(cin, cout, stride, padding=0)
        self.batchnorm_1, self.conv_2d_2 = nn.BatchNorm2d(cout), conv3x3(cout, cout)
        self.shortcut = conv3x3(cin, cout, stride, padding=0) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = self.act(self.batchnorm_0(x))
        shortcut = x if self.shortcut is None else self.shortcut(tf_pad(x, self.stride))
        out = self.conv_2d_2(self.act(self.batchnorm_1(self.conv_2d_1(tf_pad(out, self.stride)))))
        return out + shortcut


class DMPreActResNet(Normalized):
    def __init__(
        self, *, num_classes: int = 10, depth: int = 18, activation: str = "relu",
        mean=CIFAR10_MEAN, std=CIFAR10_STD, in_channels: int = 3,
    ):  # fmt: skip
        super().__init__(mean, std, activation, in_channels)
        blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
        if depth not in blocks:
            raise ValueError(f"depth must be 18 or 34, got {depth}")
        self.conv_2d = conv3x3(in_channels, 64)
        stages = resnet_stages(lambda cin, cout, stride: DMPreActBlock(cin, cout, stride, self.act), blocks[depth])
        for s, (_, stage) in enumerate(stages):
            self.add_module(f"layer_{s}", stage)  # layer_0 ... layer_3
        self.batchnorm = nn.BatchNorm2d(512)
        self.logits = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.conv_2d(self.normalize(x))
        out = self.layer_3(self.layer_2(self.layer_1(self.layer_0(out))))
        return self.logits(pool(self.act(self.batchnorm(out))))


# ---------------------------------------------------------------- helpers
def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def randomize_batch_stats(model: nn.Module, seed: int = 0, image_size: int = 32, batch_size: int = 8) -> nn.Module:
    """Make every BatchNorm non-trivial, deterministically in ``seed``; returns ``model`` (mode kept).

    weight ~ U(0.5, 1.5), bias ~ N(0, 0.1). Running statistics are fitted, in one eval-mode pass over
    a seeded uniform [0, 1) batch, to the input each BN actually sees, then perturbed:
    ``running_mean = mean + N(0, 0.1) * std``, ``running_var = var * U(0.5, 1.5)``. So every BN output
    is O(1) (deep nets neither blow up nor vanish) yet differs from batch-statistics normalisation.
    BNs that the forward pass never reaches (``sub_block1``) get running_mean ~ N(0, 0.1) and
    running_var ~ U(0.5, 1.5).
    """
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def normal(like, std):
        return (torch.randn(like.shape, generator=gen) * std).to(like)

    def uniform(like, low, high):
        return (low + (high - low) * torch.rand(like.shape, generator=gen)).to(like)

    for bn in bns:
        bn.weight.copy_(uniform(bn.weight, 0.5, 1.5))
        bn.bias.copy_(normal(bn.bias, 0.1))
        bn.running_mean.copy_(normal(bn.running_mean, 0.1))
        bn.running_var.copy_(uniform(bn.running_var, 0.5, 1.5))

    def fit(bn, inputs):
        x = inputs[0].transpose(0, 1).flatten(1).double()  # (channels, everything else)
        mean, var = x.mean(1).to(bn.running_mean), x.var(1, unbiased=False).clamp_min(1e-4).to(bn.running_var)
        bn.running_mean.copy_(mean + normal(bn.running_mean, 0.1) * var.sqrt())
        bn.running_var.copy_(var * uniform(bn.running_var, 0.5, 1.5))

    in_channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    param = next(model.parameters())
    x = torch.rand(batch_size, in_channels, image_size, image_size, generator=gen).to(param)
    hooks = [bn.register_forward_pre_hook(fit) for bn in bns]
    was_training = model.training
    try:
        model.eval()(x)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return model
