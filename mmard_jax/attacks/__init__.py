"""Attacks: the shared vocabulary (`common`), the one PGD engine and its configurations (FGSM, PGD-CE, CW∞).

AutoAttack lives in `autoattack`.
"""

from mmard_jax.attacks.common import INITS, NORMS, example_keys, per_example_start, project, random_start
from mmard_jax.attacks.pgd import PGDSpec, ce_attack, cw_linf, fgsm, pgd

__all__ = [
    "INITS",
    "NORMS",
    "PGDSpec",
    "ce_attack",
    "cw_linf",
    "example_keys",
    "fgsm",
    "per_example_start",
    "pgd",
    "project",
    "random_start",
]
