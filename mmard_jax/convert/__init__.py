"""PyTorch / RobustBench checkpoints <-> Flax variables of our model zoo.

    state_dict = read_state_dict("Zhang2019Theoretically.pt")         # weights_only=True, or .safetensors
    variables, dropped = convert_state_dict(state_dict, module, (32, 32, 3))
    write_state_dict("student.pt", export_state_dict(module, variables))

Commands: ``python -m mmard_jax.import_teacher`` and ``python -m mmard_jax.export_student``.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import numpy as np

from mmard_jax import networks
from mmard_jax.convert.files import (
    UnsafeCheckpointError,
    file_sha256,
    read_state_dict,
    strip_wrapper_prefixes,
    unwrap_state_dict,
    write_state_dict,
)
from mmard_jax.convert.names import ConversionError, export_state_dict, import_variables, torch_key

# Top-level buffers in which some reference models keep their input normalisation.
NORMALISATION_KEYS = {"mu": "mean", "sigma": "std", "mean": "mean", "std": "std"}

__all__ = [
    "ConversionError",
    "UnsafeCheckpointError",
    "convert_state_dict",
    "export_state_dict",
    "file_sha256",
    "read_state_dict",
    "strip_wrapper_prefixes",
    "torch_key",
    "unwrap_state_dict",
    "write_state_dict",
]


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray], module: nn.Module, image_shape: tuple[int, int, int]
) -> tuple[dict, dict[str, str]]:
    """(variables, dropped keys with reasons) for ``module`` from a PyTorch state dict; ConversionError if it does
    not fit. Normalisation buffers in the file must equal the module's ``mean``/``std`` (the model applies them)."""
    state = dict(state_dict)
    dropped = _check_normalisation_buffers(state, module)
    abstract = networks.abstract_variables(module, image_shape)
    variables, ignored = import_variables(module, abstract, state, ignored=dict(type(module).torch_unused))
    return variables, {**dropped, **ignored}


def _check_normalisation_buffers(state: dict, module: nn.Module) -> dict[str, str]:
    dropped = {}
    for key, field in NORMALISATION_KEYS.items():
        if key not in state:
            continue
        stored = np.asarray(state.pop(key), np.float64).ravel()
        expected = getattr(module, field)
        if expected is None or stored.shape != (len(expected),) or not np.allclose(stored, expected, atol=1e-6):
            raise ConversionError(
                f"the file's normalisation buffer {key!r} = {stored.tolist()} differs from the model's {field} = "
                f"{expected}; pass the file's values as the model's mean/std"
            )
        dropped[key] = f"input normalisation, equal to the model's {field}"
    return dropped
