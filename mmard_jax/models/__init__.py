"""Model zoo (Flax Linen, NHWC, float inputs in [0, 1]) and its name -> constructor registry.

    model = create_model("resnet18", num_classes=10)
    variables = model.init(key, x, train=False)
    logits = model.apply(variables, x, train=False)                        # running BN stats
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    count_params(variables["params"])

Names: ``resnet18``, ``preact_resnet18`` (kwarg ``final_bn``), ``wide_resnet`` (kwargs ``depth``,
``widen_factor``; aliases ``wrn-28-10``, ``wrn-34-10``, ``wrn-70-16``), ``dm_wide_resnet`` (kwargs ``depth``,
``widen_factor``, ``activation``) and ``dm_preact_resnet`` (kwargs ``depth``, ``activation``): DeepMind's
architectures of RobustBench's Gowal/Rebuffi teachers, ``mobilenet_v2``,
``small_cnn`` (kwarg ``dropout_rate``), ``cnn`` (kwargs ``widths``, ``hidden``, ``use_bn``, ``downsample``) and
``mlp`` (kwarg ``hidden``). Each model module documents its parameter naming.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmard_jax.models.dm_resnet import DMPreActResNet, DMWideResNet
from mmard_jax.models.layers import Dtype, ImageClassifier
from mmard_jax.models.mobilenet_v2 import MobileNetV2
from mmard_jax.models.resnet import PreActResNet18, ResNet18
from mmard_jax.models.small_cnn import CNN, MLP, SmallCNN
from mmard_jax.models.wide_resnet import WideResNet

# name -> (module class, kwargs fixed by the name)
_REGISTRY: dict[str, tuple[type[ImageClassifier], dict[str, Any]]] = {
    "resnet18": (ResNet18, {}),
    "preact_resnet18": (PreActResNet18, {}),
    "wide_resnet": (WideResNet, {}),
    "wrn-28-10": (WideResNet, {"depth": 28, "widen_factor": 10}),
    "wrn-34-10": (WideResNet, {"depth": 34, "widen_factor": 10}),
    "wrn-70-16": (WideResNet, {"depth": 70, "widen_factor": 16}),
    "dm_wide_resnet": (DMWideResNet, {}),
    "dm_preact_resnet": (DMPreActResNet, {}),
    "mobilenet_v2": (MobileNetV2, {}),
    "small_cnn": (SmallCNN, {}),
    "cnn": (CNN, {}),
    "mlp": (MLP, {}),
}

MODEL_NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))

_COMMON_FIELDS = frozenset(field.name for field in dataclasses.fields(ImageClassifier))

__all__ = [
    "CNN",
    "DMPreActResNet",
    "DMWideResNet",
    "MLP",
    "MODEL_NAMES",
    "MobileNetV2",
    "PreActResNet18",
    "ResNet18",
    "SmallCNN",
    "WideResNet",
    "count_params",
    "create_model",
    "model_kwargs",
]


def model_kwargs(name: str) -> tuple[str, ...]:
    """The architecture kwargs that ``create_model(name, ...)`` accepts (besides the common ones)."""
    module_class, fixed = _lookup(name)
    return tuple(
        field.name
        for field in dataclasses.fields(module_class)
        if field.name not in _COMMON_FIELDS and field.name not in fixed
    )


def create_model(
    name: str,
    num_classes: int,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    bn_axis_name: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model ``name``; ValueError for an unknown name, kwarg or bad value.

    Args:
      name: one of ``MODEL_NAMES``.
      num_classes: number of logits.
      dtype: computation dtype (``jnp.bfloat16`` for mixed precision); params stay ``param_dtype``.
      mean, std: per-channel ``(x - mean) / std`` applied by the model; None = raw [0, 1] input.
      bn_axis_name: mapped axis for cross-device BatchNorm statistics (e.g. ``'data'``).
      **kwargs: architecture options, see ``model_kwargs(name)``. Lists are turned into tuples.
    """
    module_class, fixed = _lookup(name)
    allowed = model_kwargs(name)
    for key in kwargs:
        if key in fixed:
            raise ValueError(
                f"kwarg {key!r} is fixed to {fixed[key]!r} by model name {name!r}; use name='wide_resnet' to choose it"
            )
        if key not in allowed:
            raise ValueError(f"unknown kwarg {key!r} for model {name!r}; valid kwargs: {', '.join(allowed) or 'none'}")
    options = {key: tuple(value) if isinstance(value, list) else value for key, value in kwargs.items()}
    return module_class(
        num_classes=num_classes,
        dtype=dtype,
        param_dtype=param_dtype,
        mean=_float_tuple("mean", mean),
        std=_float_tuple("std", std),
        bn_axis_name=bn_axis_name,
        **fixed,
        **options,
    )


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter pytree (arrays or ``jax.ShapeDtypeStruct`` leaves)."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def _lookup(name: str) -> tuple[type[ImageClassifier], dict[str, Any]]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return _REGISTRY[name]


def _float_tuple(arg_name: str, values: Sequence[float] | float | None) -> tuple[float, ...] | None:
    """None, a number or a sequence of numbers -> None or a tuple of floats (hashable field)."""
    if values is None:
        return None
    try:
        return tuple(float(v) for v in np.atleast_1d(np.asarray(values, dtype=np.float64)))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{arg_name} must be a sequence of numbers, got {values!r}") from error
