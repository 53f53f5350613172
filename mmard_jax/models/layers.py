"""Pieces shared by every model: the classifier base, PyTorch-matching layer defaults, checks.

Conventions that make imported PyTorch checkpoints behave identically:

- BatchNorm: Flax ``momentum=0.9`` (= PyTorch ``momentum=0.1``), ``epsilon=1e-5``. One difference
  remains: PyTorch updates ``running_var`` with the unbiased batch variance, Flax with the biased
  one (a factor n/(n-1) on the update, 1.008 at batch 128); inference is identical.
- Convolutions use explicit symmetric padding (``padding=1`` for 3x3, ``0`` for 1x1) like PyTorch,
  never ``'SAME'``, whose stride-2 padding on even sizes is asymmetric (0 before, 1 after).
- Initialisers follow each reference definition; PyTorch's default (Kaiming-uniform with
  a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))) is ``TORCH_DEFAULT_INIT``. Dense biases start
  at zero (PyTorch draws them uniformly; Flax initialisers cannot see fan-in).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmard_jax import checks
from mmard_jax.models import convolution

Dtype = Any
ModuleDef = Any

BN_MOMENTUM = 0.9  # Flax decay of the running statistics; PyTorch momentum 0.1.
BN_EPSILON = 1e-5  # PyTorch default.

TORCH_DEFAULT_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
KAIMING_NORMAL_FAN_IN = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
KAIMING_NORMAL_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def check_mean_std(mean: Any, std: Any) -> None:
    """Both None, or two equally long sequences of floats with every std > 0."""
    if mean is None and std is None:
        return
    if mean is None or std is None:
        raise ValueError("mean and std must be given together (or both left None)")
    if len(mean) != len(std) or not mean:
        raise ValueError(f"mean and std must have the same non-zero length, got {mean} and {std}")
    if min(std) <= 0:
        raise ValueError(f"std entries must be > 0, got {std}")


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes of an NHWC batch (PyTorch's ``avg_pool2d(out, H)``)."""
    return jnp.mean(x, axis=(1, 2))


class ImageClassifier(nn.Module):
    """Fields and helpers common to every model: NHWC float images in [0, 1] -> logits.

    Attributes:
      num_classes: size of the logits.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay in ``param_dtype``.
      param_dtype: parameter dtype.
      mean, std: per-channel input normalisation ``(x - mean) / std`` done by the model; None = none.
      bn_axis_name: mapped axis over which BatchNorm averages batch statistics (e.g. ``'data'``).
    """

    num_classes: int = 10
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    bn_axis_name: str | None = None

    # Names ``n`` whose Flax submodules ``n_<i>`` are the PyTorch ``nn.Sequential`` entries ``n.<i>`` (the
    # checkpoint converter's naming rule); None = no PyTorch counterpart to convert from or to.
    torch_sequentials: ClassVar[frozenset[str] | None] = None
    # (key prefix, why) of PyTorch state-dict entries the reference definition holds but never uses.
    torch_unused: ClassVar[tuple[tuple[str, str], ...]] = ()
    # The convolution every ``conv_def`` layer runs: ``lax.conv_general_dilated``'s values and gradients, on CPU
    # through the faster of XLA's two convolution libraries per convolution. Setting it to
    # ``jax.lax.conv_general_dilated`` (before tracing) gives XLA's own choice (benchmarks compare the two) and
    # forward-mode autodiff (``jax.jvp``), which the product's custom-gradient convolution does not support.
    conv_op: ClassVar[Any] = staticmethod(convolution.conv_general_dilated)

    def __post_init__(self) -> None:
        checks.positive_int("num_classes", self.num_classes)
        check_mean_std(self.mean, self.std)
        super().__post_init__()

    def prepare_input(self, x: jax.Array) -> jax.Array:
        """Check an NHWC float batch, normalise it if configured, cast it to ``dtype``."""
        if x.ndim != 4:
            raise ValueError(f"x must be an NHWC batch (4 dims), got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"x must be float in [0, 1], got dtype {x.dtype}; divide uint8 by 255")
        if self.mean is not None:
            if len(self.mean) not in (1, x.shape[-1]):
                raise ValueError(f"mean/std have {len(self.mean)} entries but x has {x.shape[-1]} channels")
            mean = jnp.asarray(self.mean, dtype=x.dtype)
            std = jnp.asarray(self.std, dtype=x.dtype)
            x = (x - mean) / std
        return x.astype(self.dtype)

    def conv_def(self, kernel_init: Any = TORCH_DEFAULT_INIT, use_bias: bool = False) -> ModuleDef:
        """``nn.Conv`` with this model's dtypes and ``conv_op``; bias-free by default (as before BatchNorm)."""
        return functools.partial(
            nn.Conv,
            conv_general_dilated=type(self).conv_op,  # through the class: a plain function set there stays unbound
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=kernel_init,
        )

    def dense_def(self, kernel_init: Any = TORCH_DEFAULT_INIT) -> ModuleDef:
        """``nn.Dense`` with this model's dtypes and zero bias init."""
        return functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=kernel_init)

    def norm_def(self, train: bool) -> ModuleDef:
        """PyTorch-matching ``nn.BatchNorm``: batch statistics iff ``train``."""
        return functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            axis_name=self.bn_axis_name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016), shared by PreAct ResNet and WideResNet.

    ``a = relu(bn1(x)); y = conv2(relu(bn2(conv1(a)))); return y + shortcut`` where the shortcut is
    ``x`` or, when the shape changes, a 1x1 conv of ``a`` (the activated input, as in both references).
    Submodules: ``bn1``, ``conv1``, ``bn2``, ``conv2`` and ``shortcut_name``.
    """

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    shortcut_name: str = "shortcut_0"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        activated = nn.relu(self.norm(name="bn1")(x))
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = self.conv(self.features, (1, 1), strides=self.strides, padding=0, name=self.shortcut_name)(
                activated
            )
        else:
            shortcut = x
        y = self.conv(self.features, (3, 3), strides=self.strides, padding=1, name="conv1")(activated)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.features, (3, 3), strides=1, padding=1, name="conv2")(y)
        return y + shortcut
