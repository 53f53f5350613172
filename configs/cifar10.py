"""CIFAR-10: ResNet-18 student distilled by MMARD from a TRADES WRN-34-10 teacher (RSLAD recipe, docs/method.md §5).

python -m mmard_jax.main --config configs/cifar10.py --workdir runs/cifar10
(configs/cifar10_gpu.py and configs/cifar10_tpu.py: the same recipe set up for accelerators.)
"""

from mmard_jax.config import cifar_config


def get_config():
    return cifar_config("cifar10")
