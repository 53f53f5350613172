"""CIFAR-100: ResNet-18 student distilled by MMARD from a robust WRN-34-10 teacher (RSLAD recipe, docs/method.md §5).

python -m mmard_jax.main --config configs/cifar100.py --workdir runs/cifar100
"""

from mmard_jax.config import base_config


def get_config():
    config = base_config()
    config.data.name = "cifar100"
    # AdaAD (the base of MMARD) uses KL summed / B on CIFAR-100 (docs/method.md §2).
    config.method.kl_reduction = "batchmean"
    # A RobustBench CIFAR-100 teacher (WRN-34-10 or WRN-70-16) can replace training one: set teacher.checkpoint.
    return config
