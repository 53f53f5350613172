"""CIFAR-100 on a Cloud TPU slice (v4-8 / v5e-8, one process per VM worker).

configs/cifar100.py with bfloat16 compute, rolled PGD loops, larger evaluation batches and the compilation cache in
the workdir (mmard_jax.config.for_accelerator says what and why).

python -m mmard_jax.main --config configs/cifar100_tpu.py --workdir WORKDIR
"""

from mmard_jax.config import cifar_config, for_accelerator


def get_config():
    return for_accelerator(cifar_config("cifar100"), "tpu")
