"""Flax variables <-> PyTorch ``state_dict``: key names, layouts and the checks between them.

A Flax leaf ``(collection, *module_path, leaf)`` has one PyTorch key. Module names map one to one, except that
``n_<i>`` is the ``nn.Sequential`` entry ``n.<i>`` when ``n`` is one of the model's ``torch_sequentials``
(``layer1_0/shortcut_1`` -> ``layer1.0.shortcut.1``; in DeepMind's models ``batchnorm_0`` stays a name).
Leaves: conv ``kernel`` (H, W, I, O) <-> ``weight`` (O, I, H, W); dense ``kernel`` (I, O) <-> ``weight``
(O, I); BatchNorm ``scale`` <-> ``weight``, ``mean``/``var`` <-> ``running_mean``/``running_var``; ``bias``
is ``bias``. PyTorch's ``num_batches_tracked`` counters carry nothing used at inference: read past on import,
written as 0 on export so that ``load_state_dict(strict=True)`` accepts the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import flax.linen as nn
import jax
import numpy as np

PARAM_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
STAT_LEAVES = {"mean": "running_mean", "var": "running_var"}
BATCHES_TRACKED = "num_batches_tracked"
_INDEXED = re.compile(r"^(.*)_(\d+)$")


class ConversionError(ValueError):
    """A state dict that does not fit the model: names the key(s) and the shapes."""


def torch_sequentials(module: nn.Module) -> frozenset[str]:
    """The model's ``nn.Sequential`` names; ConversionError for a model without a PyTorch counterpart."""
    names = getattr(type(module), "torch_sequentials", None)
    if names is None:
        raise ConversionError(
            f"{type(module).__name__} has no PyTorch counterpart to convert from or to; convertible models: "
            "resnet18, preact_resnet18, mobilenet_v2, wide_resnet (wrn-*), dm_wide_resnet, dm_preact_resnet"
        )
    return names


def torch_module_name(flax_path: tuple[str, ...], sequentials: frozenset[str]) -> str:
    """``('layer1_0', 'shortcut_1')`` -> ``'layer1.0.shortcut.1'`` for sequentials {'layer1', 'shortcut'}."""
    parts = []
    for name in flax_path:
        match = _INDEXED.match(name)
        parts.append(f"{match[1]}.{match[2]}" if match and match[1] in sequentials else name)
    return ".".join(parts)


def torch_key(collection: str, flax_path: tuple[str, ...], sequentials: frozenset[str]) -> str:
    """The PyTorch key of the Flax leaf ``variables[collection][flax_path...]``."""
    *modules, leaf = flax_path
    table = PARAM_LEAVES if collection == "params" else STAT_LEAVES
    if leaf not in table:
        raise ConversionError(f"no PyTorch name for the Flax leaf {collection}/{'/'.join(flax_path)}")
    return f"{torch_module_name(tuple(modules), sequentials)}.{table[leaf]}"


def to_torch_layout(array: np.ndarray) -> np.ndarray:
    """Flax (H, W, I, O) conv or (I, O) dense kernel -> PyTorch (O, I, H, W) or (O, I); other leaves as they are."""
    if array.ndim == 4:
        return np.transpose(array, (3, 2, 0, 1))
    if array.ndim == 2:
        return array.T
    return array


def to_flax_layout(array: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_torch_layout`."""
    if array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if array.ndim == 2:
        return array.T
    return array


def flax_leaves(variables: Mapping) -> Iterator[tuple[str, tuple[str, ...], object]]:
    """(collection, path, leaf) of every array in {'params': ..., 'batch_stats': ...}."""
    for collection in ("params", "batch_stats"):
        flat = jax.tree_util.tree_flatten_with_path(dict(variables.get(collection) or {}))[0]
        for path, leaf in flat:
            yield collection, tuple(str(entry.key) for entry in path), leaf


def export_state_dict(module: nn.Module, variables: Mapping) -> dict[str, np.ndarray]:
    """A PyTorch ``state_dict`` (NumPy arrays, float32) of ``variables``, loadable with ``strict=True``."""
    sequentials = torch_sequentials(module)
    state = {}
    for collection, path, leaf in flax_leaves(variables):
        state[torch_key(collection, path, sequentials)] = np.ascontiguousarray(
            to_torch_layout(np.asarray(leaf, np.float32))
        )
        if collection == "batch_stats" and path[-1] == "mean":
            state[f"{torch_module_name(path[:-1], sequentials)}.{BATCHES_TRACKED}"] = np.zeros((), np.int64)
    return state


def import_variables(
    module: nn.Module,
    abstract_variables: Mapping,
    state_dict: Mapping[str, np.ndarray],
    *,
    ignored: Mapping[str, str] | None = None,
) -> tuple[dict, dict[str, str]]:
    """(variables, dropped) from a PyTorch ``state_dict`` for ``module``, whose shapes ``abstract_variables`` gives.

    Every leaf of ``abstract_variables`` must find its key with the right shape, and every key of ``state_dict``
    must be used, be a ``num_batches_tracked`` counter, or start with a prefix of ``ignored`` (prefix -> why it is
    safe to drop). ``dropped`` maps each key read past to its reason. Raises ConversionError naming every
    missing, unexpected or mis-shaped key with both shapes.
    """
    sequentials = torch_sequentials(module)
    ignored = dict(ignored or {})
    variables: dict = {"params": {}, "batch_stats": {}}
    used, problems = set(), []
    for collection, path, leaf in flax_leaves(abstract_variables):
        key = torch_key(collection, path, sequentials)
        if key not in state_dict:
            problems.append(f"missing key {key!r} (the model needs shape {_torch_shape(leaf.shape)})")
            continue
        used.add(key)
        value = np.asarray(state_dict[key])
        if value.shape != _torch_shape(leaf.shape):
            problems.append(
                f"key {key!r} has shape {value.shape} in the file, the model needs {_torch_shape(leaf.shape)}"
            )
            continue
        _set_path(variables[collection], path, to_flax_layout(value).astype(leaf.dtype))
    dropped = {}
    for key in state_dict:
        if key in used:
            continue
        if key.rsplit(".", 1)[-1] == BATCHES_TRACKED:
            dropped[key] = "BatchNorm batch counter (not used at inference)"
            continue
        reason = next((why for prefix, why in ignored.items() if key.startswith(prefix)), None)
        if reason is None:
            problems.append(f"unexpected key {key!r} with shape {np.shape(state_dict[key])}")
        else:
            dropped[key] = reason
    if problems:
        raise ConversionError(
            f"the state dict does not fit {type(module).__name__} ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems[:20])
            + ("\n  ..." if len(problems) > 20 else "")
        )
    return variables, dropped


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape :func:`to_torch_layout` gives an array of ``flax_shape``."""
    if len(flax_shape) == 4:
        height, width, inputs, outputs = flax_shape
        return (outputs, inputs, height, width)
    return tuple(reversed(flax_shape)) if len(flax_shape) == 2 else tuple(flax_shape)


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value
