"""CIFAR-10 on one 80 GB GPU (H100 / A100).

configs/cifar10.py with bfloat16 compute, rolled PGD loops, larger evaluation batches and the compilation cache in
the workdir (mmard_jax.config.for_accelerator says what and why).

python -m mmard_jax.main --config configs/cifar10_gpu.py --workdir WORKDIR
"""

from mmard_jax.config import cifar_config, for_accelerator


def get_config():
    return for_accelerator(cifar_config("cifar10"), "gpu")
