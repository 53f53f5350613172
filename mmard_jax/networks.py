"""Networks as (module, variables) pairs built from a config's model section."""

from __future__ import annotations

import functools
import json
import logging
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmard_jax import checkpoint as ckpt_lib
from mmard_jax import compilations
from mmard_jax.models import create_model

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Network(NamedTuple):
    """A Flax module with its variables ({'params': ..., 'batch_stats': ...})."""

    module: nn.Module
    variables: Any


def build_module(model_cfg, num_classes: int, *, dtype: str = "float32", bn_axis_name: str | None = None) -> nn.Module:
    """The Linen module a config's model section describes."""
    return create_model(
        model_cfg.name,
        num_classes,
        dtype=DTYPES[dtype],
        mean=tuple(model_cfg.mean) or None,
        std=tuple(model_cfg.std) or None,
        bn_axis_name=bn_axis_name,
        **model_cfg.kwargs.to_dict(),
    )


def initial_variables(module: nn.Module, key, image_shape: tuple[int, ...]) -> dict:
    """Fresh variables for one image shape (H, W, C); 'batch_stats' is {} for models without BatchNorm. Traceable (for
    use inside jit or eval_shape); at top level call `init_variables`, which compiles it as one program."""
    variables = module.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


_compiled_initial_variables = compilations.jit(initial_variables, static_argnames=("module", "image_shape"))


def init_variables(module: nn.Module, key, image_shape: tuple[int, int, int]) -> dict:
    """`initial_variables` as one compiled program (inside another transformation, part of the outer one).

    Flax's initialisers run op by op otherwise, and on CPU those dozens of small programs compiled at XLA's default
    level took seconds: benchmarks/start_up.py measured 4.3-4.6 s against 1.0-1.1 s for the demo's CNN teacher,
    12-14 s against 3.8-4.3 s for ResNet-18 and 2.2x for WRN-34-10. The values are bit-identical for ResNet-18, PreAct
    ResNet-18, MobileNetV2 and the CNNs; the untruncated He-normal kernels of SmallCNN and the WideResNets differ from
    the op-by-op ones in the last bit (fused float32 rounding; 3e-8 at most for WRN-34-10).
    """
    return _compiled_initial_variables(module, key, image_shape=tuple(image_shape))


def abstract_variables(module: nn.Module, image_shape: tuple[int, int, int]) -> dict:
    """Shapes and dtypes of :func:`init_variables`, without computing anything."""
    return jax.eval_shape(functools.partial(initial_variables, module, image_shape=image_shape), jax.random.PRNGKey(0))


def inference_logits(module: nn.Module, variables, x):
    """Logits with BatchNorm in inference mode (running statistics)."""
    return module.apply(variables, x, train=False)


@functools.cache
def inference_apply(module: nn.Module):
    """``(variables, x) -> logits`` of ``module`` in inference mode, the same object for equal modules.

    A static jit argument (e.g. of `run_autoattack`) that compiles once per architecture: a fresh
    ``functools.partial`` compares by identity, so each network built anew would compile its own programs.
    """
    return functools.partial(inference_logits, module)


def logits_function(network: Network):
    """x -> logits for a frozen network in inference mode (what attacks and evaluation call)."""
    return functools.partial(inference_logits, network.module, network.variables)


def load_network(model_cfg, run_dir, *, num_classes: int, image_shape, dtype: str = "float32", which: str = "best"):
    """(network, meta) from a run directory's 'best' or 'last' checkpoint, refused if the shapes do not fit."""
    module = build_module(model_cfg, num_classes, dtype=dtype)
    signature = ckpt_lib.shape_signature(abstract_variables(module, image_shape))
    variables, meta = ckpt_lib.load_variables(ckpt_lib.checkpoint_dir(run_dir), which, signature)
    return Network(module, variables), meta


def saved_model_config(run_dir, fallback):
    """The model section a checkpoint was saved with (an imported teacher knows its architecture and input
    normalisation); ``fallback`` for a checkpoint that does not record one."""
    meta = ckpt_lib.read_run_meta(run_dir)
    saved = (meta or {}).get("model")
    if not saved:
        return fallback
    if saved != json.loads(fallback.to_json()):
        logging.getLogger(__name__).info(
            "architecture from %s: %s (the config's model section is not used)", run_dir, saved
        )
    return ml_collections.ConfigDict(saved)
