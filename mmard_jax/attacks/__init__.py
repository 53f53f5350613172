"""Attacks: the one PGD engine and its configurations (FGSM, PGD-CE, CW∞). AutoAttack lives in `autoattack`."""

from mmard_jax.attacks.pgd import ce_attack, cw_linf, fgsm, pgd, random_start

__all__ = ['ce_attack', 'cw_linf', 'fgsm', 'pgd', 'random_start']
