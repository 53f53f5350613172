"""AutoAttack (Croce & Hein 2020) in JAX: APGD-CE, APGD-T, FAB-T, Square and the runner.

Every attack takes the network as ``(apply_fn, variables)``: see `mmard_jax.attacks.common`.
"""

from mmard_jax.attacks.autoattack.apgd import apgd, apgd_checkpoints, apgd_targeted
from mmard_jax.attacks.autoattack.common import AttackOutput
from mmard_jax.attacks.autoattack.fab import fab_targeted, project_hyperplane_l2, project_hyperplane_linf
from mmard_jax.attacks.autoattack.losses import dlr_loss, targeted_dlr_loss
from mmard_jax.attacks.autoattack.runner import STANDARD_ATTACKS, AutoAttackResult, run_autoattack, verify_adversarial
from mmard_jax.attacks.autoattack.square import square_attack, square_sizes

__all__ = [
    "AttackOutput",
    "AutoAttackResult",
    "STANDARD_ATTACKS",
    "apgd",
    "apgd_checkpoints",
    "apgd_targeted",
    "dlr_loss",
    "fab_targeted",
    "project_hyperplane_l2",
    "project_hyperplane_linf",
    "run_autoattack",
    "square_attack",
    "square_sizes",
    "targeted_dlr_loss",
    "verify_adversarial",
]
