"""Reading and writing PyTorch weight files safely: ``.pt``/``.pth`` through ``torch.load(weights_only=True)``
only, ``.safetensors`` without PyTorch.

A pickled PyTorch file can run arbitrary code when it is loaded. ``weights_only=True`` restricts unpickling to
tensors, containers and numbers; a file that needs more (a pickled model object, NumPy scalars, an optimizer
with custom classes) is refused with the reason, never loaded in full.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping

import numpy as np

# Keys under which training scripts and RobustBench files nest the weights.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "net", "model")
# Prefixes that wrappers add to every key (DataParallel's 'module.', RobustBench's 'model.').
WRAPPER_PREFIXES = ("module.", "model.")
SAFETENSORS_SUFFIX = ".safetensors"


class UnsafeCheckpointError(ValueError):
    """A PyTorch file that cannot be read without full (code-executing) unpickling."""


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The weights of a ``.pt``/``.pth``/``.safetensors`` file as {key: float32/int NumPy array}, unwrapped.

    Raises FileNotFoundError, UnsafeCheckpointError (needs full unpickling), ImportError (a PyTorch file
    without PyTorch installed) or ValueError (no state dict inside).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path!r}")
    if path.endswith(SAFETENSORS_SUFFIX):
        from safetensors.numpy import load_file

        return strip_wrapper_prefixes(load_file(path))
    return strip_wrapper_prefixes(_tensors_to_numpy(unwrap_state_dict(_torch_load(path))))


def _torch_load(path: str):
    try:
        import torch
    except ImportError:
        raise ImportError(
            f'reading the PyTorch file {path!r} needs PyTorch: pip install -e ".[torch]" '
            "(or convert it to .safetensors on a machine that has PyTorch)"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"{path!r} is refused: it holds pickled Python objects besides tensors, and loading it in full could run "
            f"arbitrary code (PyTorch's weights_only check says: {str(error).splitlines()[0]}). If you trust the file, "
            "re-save just its weights on a machine you can risk, e.g. torch.save(torch.load(FILE, weights_only=False)"
            "['state_dict'], 'weights.pt'), and import that."
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{path!r} is not a readable PyTorch file: {error}") from None


def unwrap_state_dict(obj) -> Mapping:
    """Descends through {'state_dict': ...}, {'model_state_dict': ...}, {'net': ...}, {'model': ...} wrappers."""
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        kind = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(
            f"no state dict found: the file holds {kind}; expected a dict of tensors, possibly under one of "
            f"{', '.join(WRAPPER_KEYS)}"
        )
    return obj


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(hasattr(value, "shape") for value in obj.values())


def _tensors_to_numpy(state_dict: Mapping) -> dict[str, np.ndarray]:
    out = {}
    for key, tensor in state_dict.items():
        if tensor.is_floating_point():
            tensor = tensor.float()  # half/bfloat16 files convert to float32 exactly
        out[str(key)] = tensor.detach().cpu().numpy()
    return out


def strip_wrapper_prefixes(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Removes a 'module.' / 'model.' prefix that every key carries (DataParallel, RobustBench wrappers)."""
    state = dict(state_dict)
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                changed = True
    return state


def write_state_dict(path: str, state_dict: Mapping[str, np.ndarray]) -> None:
    """Writes ``.safetensors`` (no PyTorch needed) or a PyTorch ``torch.save`` file (any other suffix)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.partial"
    if path.endswith(SAFETENSORS_SUFFIX):
        from safetensors.numpy import save_file

        save_file({key: np.ascontiguousarray(value) for key, value in state_dict.items()}, temporary)
    else:
        try:
            import torch
        except ImportError:
            raise ImportError(
                f'writing {path!r} as a PyTorch file needs PyTorch: pip install -e ".[torch]", '
                "or name the output *.safetensors"
            ) from None
        torch.save({key: torch.from_numpy(np.array(value)) for key, value in state_dict.items()}, temporary)
    os.replace(temporary, path)  # never a half-written file under the final name
