"""CIFAR-100: ResNet-18 student distilled by MMARD from a robust WRN-34-10 teacher (RSLAD recipe, docs/method.md §5).

python -m mmard_jax.main --config configs/cifar100.py --workdir runs/cifar100
A RobustBench CIFAR-100 teacher (WRN-34-10 or WRN-70-16) can replace training one: see the README's
"Distil from a RobustBench teacher". configs/cifar100_gpu.py / cifar100_tpu.py: set up for accelerators.
"""

from mmard_jax.config import cifar_config


def get_config():
    return cifar_config("cifar100")
