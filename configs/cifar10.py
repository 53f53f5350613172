"""CIFAR-10: ResNet-18 student distilled by MMARD from a TRADES WRN-34-10 teacher (RSLAD recipe, docs/method.md §5).

python -m mmard_jax.main --config configs/cifar10.py --workdir runs/cifar10
"""

from mmard_jax.config import base_config


def get_config():
    config = base_config()  # every CIFAR-10 reference value lives there, with its source
    return config
