"""benchmarks/apgdt_strength.py without the reference checkout or the trained run: the PyTorch twin of the demo
student's architecture computes the Flax logits, and the verdict rule passes and fails where it should."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import apgdt_strength  # noqa: E402

from mmard_jax import models, networks  # noqa: E402

DEMO_STUDENT = dict(widths=(16, 32), hidden=64, downsample="stride", use_bn=True)  # configs/mnist5k.py
IMAGE_SHAPE = (28, 28, 1)


def non_trivial(variables, key):
    """Non-trivial BatchNorm (scale ~ U(0.5, 1.5), bias ~ N(0, 0.1), running mean ~ N(0, 0.3), var ~ U(0.2, 2)),
    kernels x 3 and dense biases ~ N(0, 0.5), so that the logits are O(1) and differ between examples."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    keys = jax.random.split(key, len(leaves))
    new = []
    for (path, leaf), k in zip(leaves, keys, strict=True):
        name = jax.tree_util.keystr(path)
        if "bn_" in name and name.endswith("['scale']"):
            leaf = jax.random.uniform(k, leaf.shape, minval=0.5, maxval=1.5)
        elif "bn_" in name and name.endswith("['bias']"):
            leaf = 0.1 * jax.random.normal(k, leaf.shape)
        elif name.endswith("['mean']"):
            leaf = 0.3 * jax.random.normal(k, leaf.shape)
        elif name.endswith("['var']"):
            leaf = jax.random.uniform(k, leaf.shape, minval=0.2, maxval=2.0)
        elif name.endswith("['kernel']"):
            leaf = 3.0 * leaf
        elif name.endswith("['bias']"):
            leaf = 0.5 * jax.random.normal(k, leaf.shape)
        new.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, new)


@pytest.mark.parametrize("seed", [0, 1])
def test_torch_twin_of_the_demo_student_gives_the_flax_logits(seed):
    module = models.create_model("cnn", 10, **DEMO_STUDENT)
    init_key, bn_key, data_key = jax.random.split(jax.random.key(seed), 3)
    variables = non_trivial(networks.init_variables(module, init_key, IMAGE_SHAPE), bn_key)
    stats = jax.tree_util.tree_leaves(variables["batch_stats"])
    assert len(stats) == 4 and all(float(jnp.abs(s).max()) > 0.1 for s in stats)  # the BN statistics are not trivial
    images = np.asarray(jax.random.uniform(data_key, (16, *IMAGE_SHAPE)), np.float32)

    net = apgdt_strength.torch_twin(module, variables, IMAGE_SHAPE)
    assert not net.training  # BatchNorm in eval mode: running statistics
    flax_logits = apgdt_strength.jax_logits(module, variables, images)
    assert flax_logits.std() > 0.5  # logits that differ between examples: the comparison is not vacuous
    gap = apgdt_strength.logit_gap(module, variables, net, images)
    assert gap < 1e-5 * max(1.0, float(np.abs(flax_logits).max())), gap  # float32 rounding, relative to the logits
    np.testing.assert_array_equal(
        apgdt_strength.torch_logits(net, images).argmax(1), flax_logits.argmax(1)
    )  # same predictions too


def test_verdict_passes_within_the_seed_spread():
    ours, ref = [300, 301, 299, 300, 302], [300, 300, 301, 299, 301]
    result = apgdt_strength.verdict(ours, ref)
    assert result["passed"]
    assert result["mean_diff"] == pytest.approx(0.2)
    assert result["spread"] == pytest.approx(max(np.std(ours, ddof=1), np.std(ref, ddof=1), 1.0))
    assert "no weaker" in apgdt_strength.verdict_line(result)


def test_verdict_fails_when_ours_is_weaker_beyond_the_spread():
    ours, ref = [305, 306, 305, 307, 305], [300, 301, 300, 300, 301]
    result = apgdt_strength.verdict(ours, ref)
    assert not result["passed"]
    assert result["mean_diff"] == pytest.approx(5.2)
    assert result["spread"] == pytest.approx(1.0)  # both sides' sds are below the 1-example floor
    assert result["ours_more_robust_seeds"] == 5
    assert "WEAKER" in apgdt_strength.verdict_line(result)


def test_verdict_allows_a_gap_within_a_large_seed_spread_and_any_stronger_result():
    ref = [290, 300, 310, 295, 305]
    assert apgdt_strength.verdict([r + 3 for r in ref], ref)["passed"]  # sd(ref) ~ 7.9 > 3
    assert not apgdt_strength.verdict([r + 9 for r in ref], ref)["passed"]
    assert apgdt_strength.verdict([r - 20 for r in ref], ref)["passed"]  # ours stronger


def test_verdict_with_one_seed_uses_the_one_example_floor():
    assert apgdt_strength.verdict([101], [100])["passed"]
    assert not apgdt_strength.verdict([102], [100])["passed"]
    assert apgdt_strength.sample_std([5]) == 0.0


def test_verdict_refuses_unpaired_counts():
    with pytest.raises(ValueError):
        apgdt_strength.verdict([1, 2], [1])
    with pytest.raises(ValueError):
        apgdt_strength.verdict([], [])
