"""mmard_jax: adversarial robustness distillation (MMARD and baselines) in JAX/Flax."""

__version__ = "0.1.0"
