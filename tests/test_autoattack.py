"""Tests of the JAX AutoAttack: losses, schedules, projections, the four attacks and the runner.

A tiny MLP is trained for about a second on sklearn's bundled 8x8 digits; attacks run with reduced
iteration counts passed as parameters. A model is a pair (apply_fn, variables), as the attacks take it.
"""

import dataclasses
import functools
import importlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import linprog
from sklearn.datasets import load_digits

from mmard_jax import compilations, networks, parallel
from mmard_jax.attacks.autoattack import (
    apgd,
    apgd_checkpoints,
    apgd_targeted,
    dlr_loss,
    fab_targeted,
    project_hyperplane_l2,
    project_hyperplane_linf,
    run_autoattack,
    square_attack,
    square_sizes,
    targeted_dlr_loss,
    verify_adversarial,
)
from mmard_jax.attacks.autoattack import common as common_module
from mmard_jax.attacks.autoattack import runner as runner_module
from mmard_jax.attacks.autoattack import square as square_module
from mmard_jax.losses import margin

apgd_module = importlib.import_module("mmard_jax.attacks.autoattack.apgd")  # the package's `apgd` is the function

EPS = 0.1
DEVICE_LOOP = dict(loop="device")  # for an MLP the rolled lax loops beat one dispatch per iteration
FAST = dict(
    apgd_ce=dict(n_iter=10, **DEVICE_LOOP),
    apgd_t=dict(n_iter=10, n_target_classes=3, **DEVICE_LOOP),
    fab_t=dict(n_iter=10, n_target_classes=3, **DEVICE_LOOP),
    square=dict(n_queries=100, **DEVICE_LOOP),
)
N_EVAL = 48
BATCH = 32  # every runner test uses it, so each attack compiles for 32 and 16 rows only


MLP_SHAPES = dict(w1=(64, 64), b1=(64,), w2=(64, 10), b2=(10,))


def _mlp(params, x):
    hidden = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def _masked_mlp(params, x):
    """The MLP with its input gradients hidden (stop_gradient): gradient attacks see a flat loss."""
    return _mlp(params, jax.lax.stop_gradient(x))


def _logits(model, x):
    apply_fn, variables = model
    return apply_fn(variables, jnp.asarray(x))


class FlaxMLP(nn.Module):
    """`_mlp` as a Flax module with a train flag, like the project's networks (networks.inference_apply)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return _mlp({name: self.param(name, nn.initializers.zeros, shape) for name, shape in MLP_SHAPES.items()}, x)


def _train_mlp(images, labels, seed):
    """MLP parameters trained with Adam on the first 1,500 digits."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = dict(
        w1=jax.random.normal(k1, (64, 64)) * 0.125,
        b1=jnp.zeros(64),
        w2=jax.random.normal(k2, (64, 10)) * 0.125,
        b2=jnp.zeros(10),
    )
    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(_mlp(p, images[:1500]), labels[:1500]).mean()

        grads = jax.grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    for _ in range(300):
        params, opt_state = step(params, opt_state)
    return params


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    images = (data.data / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    return images, data.target.astype(np.int32)


@pytest.fixture(scope="module")
def model(digits):
    """(apply_fn, variables) of an MLP trained on 1,500 digits (about 97% test accuracy)."""
    return _mlp, _train_mlp(*digits, seed=0)


@pytest.fixture(scope="module")
def eval_set(digits):
    images, labels = digits
    return images[1500 : 1500 + N_EVAL], labels[1500 : 1500 + N_EVAL]


@pytest.fixture(scope="module")
def autoattack_result(model, eval_set):
    return run_autoattack(*model, *eval_set, eps=EPS, batch_size=BATCH, log=None, **FAST)


def _accuracy(model, images, labels):
    return float(np.mean(np.argmax(np.asarray(_logits(model, images)), -1) == labels))


def _assert_in_ball_and_box(adversarial, images, eps, norm="linf"):
    delta = (np.asarray(adversarial) - images).reshape(len(images), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta**2).sum(1))
    assert size.max() <= eps + 1e-6
    assert np.asarray(adversarial).min() >= 0.0 and np.asarray(adversarial).max() <= 1.0


# ----------------------------------------------------------------------------- losses and schedules
def test_dlr_losses_equal_hand_computed_values():
    logits = np.array(
        [
            [3.0, 1.0, 2.0, 0.0, -1.0],  # label 0 is the top class
            [1.0, 4.0, 0.5, 2.0, 3.0],
        ],
        np.float32,
    )  # label 0 is not the top class
    labels = np.array([0, 0])
    targets = np.array([2, 4])
    # DLR: -(z_y - max_{j != y} z_j) / (z_(1) - z_(3)); sorted rows: [3,2,1,0,-1], [4,3,2,1,0.5].
    expected_dlr = [-(3.0 - 2.0) / (3.0 - 1.0), -(1.0 - 4.0) / (4.0 - 2.0)]
    # targeted DLR: -(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2).
    expected_targeted = [-(3.0 - 2.0) / (3.0 - 0.5 * (1.0 + 0.0)), -(1.0 - 3.0) / (4.0 - 0.5 * (2.0 + 1.0))]
    expected_margin = [3.0 - 2.0, 1.0 - 4.0]
    np.testing.assert_allclose(dlr_loss(jnp.asarray(logits), jnp.asarray(labels)), expected_dlr, rtol=1e-6)
    np.testing.assert_allclose(
        targeted_dlr_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(targets)), expected_targeted, rtol=1e-6
    )
    np.testing.assert_allclose(margin(jnp.asarray(logits), jnp.asarray(labels)), expected_margin)


def test_apgd_checkpoints_follow_the_papers_schedule():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) -> checks after
    # 22, 41, 57, 70, 80, 87, 93, 99 iterations (0-based index one less), windows the gaps.
    checkpoints = apgd_checkpoints(100)
    assert [c[0] for c in checkpoints] == [21, 40, 56, 69, 79, 86, 92, 98]
    assert [c[1] for c in checkpoints] == [22, 19, 16, 13, 10, 7, 6, 6]


def test_square_sizes_follow_the_p_schedule():
    sizes = square_sizes(5000, 28, 28)
    # s = round(sqrt(p * 784)) with p = 0.8 / 2^k after iterations 10, 50, 200, 500, 1000, 2000, 4000.
    expected = {0: 25, 10: 25, 11: 18, 50: 18, 51: 13, 201: 9, 501: 6, 1001: 4, 2001: 3, 4001: 2}
    assert {i: int(sizes[i]) for i in expected} == expected
    assert square_sizes(20, 4, 4, p_init=1.0).max() == 4  # never larger than the image
    l2_sizes = square_sizes(5000, 28, 28, norm="l2")  # L2: at least 3 and odd (even sides get +1)
    expected = {0: 25, 11: 19, 51: 13, 201: 9, 501: 7, 1001: 5, 2001: 3, 4001: 3}
    assert {i: int(l2_sizes[i]) for i in expected} == expected


def _rings_by_definition(rows, cols):
    """Square paper Sec. 3.2, literally: for k = 0, 1, ..., add 1/(k+1)^2 inside the (2k+1)-square
    centred on (rows // 2, cols // 2), until the square covers the rectangle."""
    pattern = np.zeros((rows, cols))
    for k in range(max(rows // 2, cols // 2) + 1):
        for i in range(rows):
            for j in range(cols):
                if abs(i - rows // 2) <= k and abs(j - cols // 2) <= k:
                    pattern[i, j] += 1.0 / (k + 1) ** 2
    return pattern / np.sqrt((pattern**2).sum())


def test_l2_square_tiles_are_nested_rectangles():
    by_hand = np.array([0.25, 1.25, 0.25])  # ring 0 gets 1 + 1/4, ring 1 gets 1/4
    np.testing.assert_allclose(square_module.nested_rectangles(1, 3), [by_hand / np.linalg.norm(by_hand)])
    for rows in range(1, 8):
        for cols in range(1, 10):
            np.testing.assert_allclose(square_module.nested_rectangles(rows, cols), _rings_by_definition(rows, cols))
    for side in (1, 3, 4, 7):
        tile = square_module.pseudo_gaussian_tile(side)
        assert tile.shape == (side, side) and np.sum(tile**2) == pytest.approx(1.0)
        assert (tile[: side // 2] > 0).all() and (tile[side // 2 :] < 0).all()
    tiles = square_module.l2_init_tiles(28, 28)  # side 5, a 5 x 5 grid from pixel 1
    assert tiles.shape == (25, 2, 28, 28)
    np.testing.assert_allclose(tiles[0, 0, 1:6, 1:6], square_module.pseudo_gaussian_tile(5), rtol=1e-6)
    np.testing.assert_allclose(tiles[0, 1, 1:6, 1:6], square_module.pseudo_gaussian_tile(5).T, rtol=1e-6)
    assert np.count_nonzero(tiles.sum(axis=0)) == 2 * 25 * 25  # the grid covers rows/columns 1-25 once
    with pytest.raises(ValueError, match="5 pixels"):
        square_module.l2_init_tiles(4, 4)


def test_l2_square_query_keeps_the_norm_and_moves_two_windows_only():
    rng = np.random.default_rng(0)
    x = jnp.full((16, 16, 3), 0.5, jnp.float32)
    delta = rng.normal(size=(16, 16, 3)).astype(np.float32)
    eps, side = 0.8, 5
    x_best = x + 0.6 * eps * delta / np.linalg.norm(delta)  # inside the ball, far from the box edges
    tile = jnp.zeros((7, 7)).at[:side, :side].set(square_module.pseudo_gaussian_tile(side))
    for seed in range(5):
        x_new = square_module._l2_proposal(jax.random.key(seed), side, tile, x, x_best, eps)
        new_delta = np.asarray(x_new - x)
        assert np.linalg.norm(new_delta) == pytest.approx(eps, rel=1e-5)  # always the full budget
        # Outside the two windows the old perturbation is only rescaled, by one common factor.
        ratio = new_delta / np.asarray(x_best - x)
        common = np.median(ratio)
        assert np.sum(~np.isclose(ratio, common, rtol=1e-4)) <= 2 * side * side * 3


# ----------------------------------------------------------------------------- FAB projections
def _feasible_hyperplane(rng, dim):
    point = rng.uniform(0.05, 0.95, dim)
    w = rng.normal(size=dim)
    w[rng.uniform(size=dim) < 0.2] = 0.0
    target = np.clip(point + rng.uniform(-0.3, 0.3, dim), 0, 1)  # a point inside the box ...
    return point, w, float(w @ target)  # ... on the hyperplane


def _projections(project, seed, n_cases=10, dim=12):
    """(point, w, b, d) with d = project(point, w, b) (float32, returned in float64) on random feasible hyperplanes."""
    rng = np.random.default_rng(seed)
    for _ in range(n_cases):
        point, w, b = _feasible_hyperplane(rng, dim)
        d = project(jnp.asarray(point, jnp.float32), jnp.asarray(w, jnp.float32), jnp.float32(b))
        yield point, w, b, np.asarray(d, np.float64)


def test_linf_hyperplane_projection_matches_linear_program():
    for point, w, b, d in _projections(project_hyperplane_linf, seed=0):
        # min lambda s.t. w.(point + d) = b, |d_i| <= lambda, 0 <= point + d <= 1; variables (d, lambda).
        dim = len(point)
        cost = np.r_[np.zeros(dim), 1.0]
        a_ub = np.block([[np.eye(dim), -np.ones((dim, 1))], [-np.eye(dim), -np.ones((dim, 1))]])
        bounds = [(-p, 1 - p) for p in point] + [(0, None)]
        lp = linprog(
            cost, A_ub=a_ub, b_ub=np.zeros(2 * dim), A_eq=np.r_[w, 0.0][None], b_eq=[b - w @ point], bounds=bounds
        )
        assert lp.status == 0
        assert abs(w @ (point + d) - b) < 1e-4
        assert np.abs(d).max() == pytest.approx(lp.fun, abs=1e-4)
        assert np.all(point + d >= -1e-6) and np.all(point + d <= 1 + 1e-6)


def _linf_projection_by_sorting(point, w, b):
    """The L-inf projection as the reference computes it, in float64: coordinates sorted by room (distance to the
    face that decreases <w, .>), each prefix of the largest rooms moving freely and the rest used up, the first prefix
    whose linear solve fits taken; the smallest-room and the unreachable cases as in FAB Sec. 3.1."""
    if w @ point - b < 0:
        w, b = -w, -b
    gap, weight = w @ point - b, np.abs(w)
    towards_one = w < 0
    room = np.where(towards_one, 1 - point, point)
    direction = np.where(towards_one, 1.0, -1.0) * (w != 0)
    if gap < weight.sum() * room.min():
        return direction * gap / weight.sum()
    if gap >= weight @ room:
        return direction * room
    order = np.argsort(-room, kind="stable")
    for free in range(1, len(order) + 1):
        moving, used_up = order[:free], order[free:]
        lam = (gap - weight[used_up] @ room[used_up]) / weight[moving].sum() if weight[moving].sum() else np.inf
        if (free == len(order) or lam >= room[order[free]]) and lam <= room[order[free - 1]]:
            return direction * np.minimum(lam, room)
    raise AssertionError("no prefix fits")


@pytest.mark.parametrize("regime", ["reachable", "smallest_room", "unreachable"])
def test_linf_hyperplane_projection_matches_the_sorted_search_on_digit_like_points(regime):
    """Digit-like points (most pixels exactly 0 or 1: rooms tie in large groups) in 784 dimensions, against the
    reference's sort-based search; the three regimes: a face reached by some coordinates, by none, unreachable."""
    rng = np.random.default_rng({"reachable": 0, "smallest_room": 1, "unreachable": 2}[regime])
    for _ in range(5):
        point = np.where(rng.uniform(size=784) < 0.7, 0.0, rng.uniform(size=784))
        point[rng.uniform(size=784) < 0.1] = 1.0
        w = rng.normal(size=784) * (rng.uniform(size=784) < 0.9)
        room = np.where(w < 0, 1 - point, point)
        reach = np.abs(w) @ room
        scale = {"reachable": rng.uniform(0.2, 0.9), "smallest_room": 0.0, "unreachable": 1.5}[regime]
        gap = scale * reach
        if regime == "smallest_room":
            point = np.clip(point, 0.2, 0.8)  # every room >= 0.2 ...
            room = np.where(w < 0, 1 - point, point)
            gap = 0.5 * np.abs(w).sum() * room.min()  # ... and half of the smallest one is enough
        b = w @ point - gap
        want = _linf_projection_by_sorting(point, w, b)
        got = np.asarray(project_hyperplane_linf(*(jnp.asarray(a, jnp.float32) for a in (point, w, b))), np.float64)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
        assert abs(w @ (point + got) - b) < 1e-3 * max(1.0, abs(b)) or regime == "unreachable"


def test_l2_hyperplane_projection_matches_bisection_on_the_multiplier():
    for point, w, b, d in _projections(project_hyperplane_l2, seed=1):
        # KKT: d(mu) = clip(mu * w, -point, 1 - point); w.d(mu) is increasing in mu; solve w.d = b - w.point.
        low, high = -1e4, 1e4
        for _ in range(200):
            mu = 0.5 * (low + high)
            if w @ np.clip(mu * w, -point, 1 - point) < b - w @ point:
                low = mu
            else:
                high = mu
        np.testing.assert_allclose(d, np.clip(mu * w, -point, 1 - point), atol=1e-4)


# ----------------------------------------------------------------------------- attacks and runner
def test_eps_zero_gives_clean_accuracy_for_every_attack(model, eval_set):
    images, labels = eval_set
    result = run_autoattack(*model, images, labels, eps=0.0, batch_size=BATCH, log=None, **FAST)
    clean = _accuracy(model, images, labels)
    assert result.clean_accuracy == pytest.approx(clean)
    assert list(result.per_attack) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert all(v == pytest.approx(clean) for v in result.per_attack.values())
    np.testing.assert_array_equal(result.adversarial, images)


def test_autoattack_is_at_most_each_attack_which_is_at_most_clean(model, eval_set, autoattack_result):
    images, labels = eval_set
    result = autoattack_result
    assert result.robust_accuracy < result.clean_accuracy  # eps = 0.1 breaks a plain MLP
    assert result.robust_accuracy == pytest.approx(result.robust_mask.mean())
    for name in ("apgd-ce", "apgd-t", "fab-t", "square"):
        single = run_autoattack(*model, images, labels, eps=EPS, batch_size=BATCH, attacks=(name,), log=None, **FAST)
        assert result.robust_accuracy <= single.robust_accuracy <= single.clean_accuracy
    steps = list(result.per_attack.values())
    assert all(a >= b for a, b in zip(steps, steps[1:], strict=False))


def test_returned_examples_are_valid_and_counted_exactly(model, eval_set, autoattack_result):
    images, labels = eval_set
    result = autoattack_result
    _assert_in_ball_and_box(result.adversarial, images, EPS)
    predictions = np.argmax(np.asarray(_logits(model, result.adversarial)), -1)
    np.testing.assert_array_equal(result.robust_mask, predictions == labels)
    np.testing.assert_array_equal(result.adversarial[result.robust_mask], images[result.robust_mask])
    assert result.recheck_failures == 0
    assert result.log_lines[-1] == f"robust accuracy: {result.robust_accuracy:.2%}"


def test_l2_attacks_respect_the_ball_and_the_box(model, eval_set):
    """The L-inf attacks are checked through the runner (test_returned_examples_are_valid...)."""
    images, labels = eval_set
    key, norm, eps = jax.random.key(3), "l2", 0.5
    outputs = [
        apgd(*model, images, labels, key, eps=eps, norm=norm, n_iter=10, **DEVICE_LOOP),
        fab_targeted(
            *model, images, labels, key, eps=eps, norm=norm, n_iter=10, n_target_classes=2, n_restarts=2, **DEVICE_LOOP
        ),
        square_attack(*model, images, labels, key, eps=eps, norm=norm, n_queries=100, **DEVICE_LOOP),
    ]
    for out in outputs:
        _assert_in_ball_and_box(out.adversarial, images, eps, norm)
        predictions = np.argmax(np.asarray(_logits(model, out.adversarial)), -1)
        np.testing.assert_array_equal(np.asarray(out.fooled), predictions != labels)
        assert np.asarray(out.fooled).any()
        unchanged = ~np.asarray(out.fooled)
        np.testing.assert_array_equal(np.asarray(out.adversarial)[unchanged], images[unchanged])


def _cross_entropy_grad(logits_fn, labels):
    return jax.grad(lambda x: optax.softmax_cross_entropy_with_integer_labels(logits_fn(x), labels).sum())


def _pgd(logits_fn, images, labels, eps, key, steps=20, step_size=None):
    """Plain L-inf PGD with a random start (Madry et al. 2018); PGD-20 with step eps / 4 by default."""
    grad_fn = _cross_entropy_grad(logits_fn, labels)
    step_size = eps / 4 if step_size is None else step_size
    x = jnp.clip(images + jax.random.uniform(key, images.shape, minval=-eps, maxval=eps), 0, 1)
    for _ in range(steps):
        x = jnp.clip(jnp.clip(x + step_size * jnp.sign(grad_fn(x)), images - eps, images + eps), 0, 1)
    return x


@pytest.fixture(scope="module")
def robust_model(digits, model):
    """The MLP fine-tuned with PGD-3 adversarial training at eps = 0.1 (a model PGD finds harder)."""
    images, labels = digits
    params = model[1]
    optimizer = optax.adam(1e-2)
    train_x, train_y = jnp.asarray(images[:1500]), labels[:1500]

    def loss(p, x):
        return optax.softmax_cross_entropy_with_integer_labels(_mlp(p, x), train_y).mean()

    @jax.jit
    def step(params, opt_state, key):
        x_adv = _pgd(functools.partial(_mlp, params), train_x, train_y, 0.1, key, steps=3, step_size=0.05)
        updates, opt_state = optimizer.update(jax.grad(loss)(params, x_adv), opt_state)
        return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    for i in range(300):
        params, opt_state = step(params, opt_state, jax.random.key(i))
    return _mlp, params


def test_apgd_ce_is_at_least_as_strong_as_pgd20(robust_model, digits):
    images, labels = digits
    images, labels = jnp.asarray(images[1500:]), labels[1500:]
    eps = 0.15
    logits_fn = functools.partial(*robust_model)
    pgd = jax.jit(lambda key: logits_fn(_pgd(logits_fn, images, labels, eps, key)))
    pgd_robust = apgd_robust = 0
    for seed in range(3):
        key = jax.random.key(seed)
        pgd_robust += np.sum(np.argmax(np.asarray(pgd(key)), -1) == labels)
        out = apgd(*robust_model, images, labels, key, eps=eps, n_iter=20, **DEVICE_LOOP)  # same budget
        apgd_robust += np.sum(~np.asarray(out.fooled))
    clean = np.sum(np.argmax(np.asarray(logits_fn(images)), -1) == labels)
    assert 3 * clean > pgd_robust > 0.1 * 3 * len(labels)  # a meaningful comparison
    assert apgd_robust <= pgd_robust


@pytest.mark.parametrize("norm, eps", [("linf", 0.2), ("l2", 1.5)])
def test_square_breaks_a_model_that_hides_its_gradients(model, eval_set, norm, eps):
    images, labels = eval_set
    masked = (_masked_mlp, model[1])
    clean = _accuracy(masked, images, labels)
    gradient = run_autoattack(
        *masked,
        images,
        labels,
        eps=eps,
        norm=norm,
        attacks=("apgd-ce",),
        log=None,
        apgd_ce=dict(n_iter=10, **DEVICE_LOOP),
    )
    square = run_autoattack(
        *masked,
        images,
        labels,
        eps=eps,
        norm=norm,
        attacks=("square",),
        log=None,
        square=dict(n_queries=300, **DEVICE_LOOP),
    )
    _assert_in_ball_and_box(square.adversarial, images, eps, norm)
    assert square.robust_accuracy <= 0.25 * clean
    assert square.robust_accuracy < gradient.robust_accuracy


def test_same_seed_same_result_whatever_the_batching(model, eval_set, autoattack_result):
    images, labels = eval_set
    again = run_autoattack(*model, images[:45], labels[:45], eps=EPS, batch_size=BATCH // 2, log=None, **FAST)
    np.testing.assert_array_equal(again.robust_mask, autoattack_result.robust_mask[:45])
    np.testing.assert_allclose(again.adversarial, autoattack_result.adversarial[:45], atol=1e-6)
    assert again.robust_accuracy == pytest.approx(autoattack_result.robust_mask[:45].mean())


def test_verify_adversarial_rejects_each_kind_of_invalid_example():
    def apply_fn(variables, x):  # no variables: the prediction is the brightest of three pixels
        return x.reshape(x.shape[0], 3)

    images = np.array([[0.5, 0.4, 0.3], [0.5, 0.4, 0.3], [0.98, 0.95, 0.0], [0.5, 0.4, 0.3]], np.float32)
    adversarial = np.array(
        [
            [0.4, 0.45, 0.3],  # valid: within 0.1, class 1
            [0.3, 0.45, 0.3],  # 0.2 away
            [0.98, 1.05, 0.0],  # outside [0, 1]
            [0.5, 0.45, 0.3],
        ],  # still class 0
        np.float32,
    )
    shape = (4, 1, 1, 3)
    valid = verify_adversarial(
        apply_fn, None, images.reshape(shape), adversarial.reshape(shape), np.zeros(4, np.int32), eps=0.1
    )
    np.testing.assert_array_equal(valid, [True, False, False, False])


def test_runner_reports_claims_the_recheck_rejects(model, eval_set, monkeypatch):
    images, labels = eval_set

    def lying_attack(apply_fn, variables, x, y, key, *, eps, norm, example_ids, active, **_):
        return runner_module.AttackOutput(jnp.clip(x + 3 * eps, 0, 1), active)

    monkeypatch.setitem(runner_module._ATTACK_FUNCTIONS, "apgd-ce", lying_attack)
    result = run_autoattack(*model, images, labels, eps=EPS, attacks=("apgd-ce",), log=None)
    assert result.recheck_failures == round(result.clean_accuracy * len(labels))
    assert result.robust_accuracy == result.clean_accuracy
    assert any("re-check rejected" in line for line in result.log_lines)


def test_bad_arguments_raise_value_errors(model, eval_set):
    images, labels = eval_set
    with pytest.raises(ValueError, match="images"):
        run_autoattack(*model, images * 2, labels, eps=EPS, log=None)
    with pytest.raises(ValueError, match="apply_fn"):
        run_autoattack({"not": "hashable"}, model[1], images, labels, eps=EPS, log=None)
    with pytest.raises(ValueError, match="norm"):
        run_autoattack(*model, images, labels, eps=EPS, norm="l1", log=None)
    with pytest.raises(ValueError, match="attacks"):
        run_autoattack(*model, images, labels, eps=EPS, attacks=("apgd-dlr",), log=None)
    with pytest.raises(ValueError, match="override"):
        run_autoattack(*model, images, labels, eps=EPS, apgd=dict(n_iter=3), log=None)
    with pytest.raises(ValueError, match="target"):
        apgd_targeted(*model, images, labels, jax.random.key(0), eps=EPS, n_target_classes=10)


@pytest.mark.parametrize("split", [False, True], ids=["one device", "split over the devices"])
def test_device_and_host_loops_give_the_same_result(model, eval_set, split):
    """Split over the 8 test devices (as the runner places batches), each device loops over its own rows."""
    images, labels = eval_set
    if split:
        rows = len(labels) // 8 * 8
        sharding = parallel.batch_sharded(parallel.make_mesh())
        images, labels = (jax.device_put(np.asarray(a)[:rows], sharding) for a in (images, labels))
    key = jax.random.key(5)
    attacks = [
        functools.partial(apgd, n_iter=10),  # APGD-T runs the same step
        functools.partial(fab_targeted, n_iter=10, n_target_classes=1),
        functools.partial(square_attack, n_queries=47),  # not a multiple of the loops' check_every
    ]
    for attack in attacks:
        device = attack(*model, images, labels, key, eps=EPS, loop="device")
        host = attack(*model, images, labels, key, eps=EPS, loop="host")
        np.testing.assert_array_equal(np.asarray(device.fooled), np.asarray(host.fooled))
        np.testing.assert_allclose(np.asarray(device.adversarial), np.asarray(host.adversarial), atol=1e-5)


# ----------------------------------------------------------------------------- one compilation per architecture
def test_a_second_network_of_the_same_architecture_compiles_nothing(digits, model, eval_set):
    """The weights are traced arguments, not constants: every program compiled for the first network (a Flax
    module built anew, as main.py builds each network) serves the second one, whose results differ."""
    images, labels = eval_set[0][:16], eval_set[1][:16]
    # batch_size = the 8 test devices: every batch has 8 rows whatever is left robust, so both runs use one shape.
    # eps is small enough that points stay robust through all four attacks (so the first run compiles each).
    settings = dict(eps=0.05, batch_size=8, log=None, **FAST)
    first = run_autoattack(networks.inference_apply(FlaxMLP()), {"params": model[1]}, images, labels, **settings)
    assert all(accuracy > 0 for accuracy in first.per_attack.values())
    other = {"params": _train_mlp(*digits, seed=1)}
    with compilations.recorded() as compiled:
        second = run_autoattack(networks.inference_apply(FlaxMLP()), other, images, labels, **settings)
    assert compiled == []
    assert not np.array_equal(first.adversarial, second.adversarial)
    predictions = np.argmax(np.asarray(_mlp(other["params"], jnp.asarray(second.adversarial))), -1)
    np.testing.assert_array_equal(second.robust_mask, predictions == labels)  # the second network's own result


# Every program an AutoAttack run may compile: one per attack stage, none op by op (a stray jnp call outside them
# compiles a program of its own, and on CPU compilation is most of a first run's time).
ATTACK_PROGRAMS = {
    "_classify",
    "_apgd_start",
    "_apgd_finish",
    "_one_step",
    "_holds",
    "_device_fori",
    "_device_while",
    "_fab_start",
    "_fab_finish",
    "_square_start",
    "_square_finish",
    "_valid_adversarial",
    "_identity",  # compilations.compiler_options probes XLA once per process and option set
    "_attack_keys",
    "stage",  # placing the weights on the devices
}


def test_a_run_compiles_only_the_attack_programs_once_per_stage(model, eval_set):
    """With one batch shape (8 rows on the 8 test devices), a standard run with the default (device) loops compiles
    each attack stage once: APGD's start evaluates inside its step, so the forward and backward pass compile once per
    loss (APGD-CE, APGD-T) and once for FAB-T's loop."""
    images, labels = eval_set[0][:8], eval_set[1][:8]
    budgets = dict(
        apgd_ce=dict(n_iter=4), apgd_t=dict(n_iter=4, n_target_classes=2), fab_t=dict(n_iter=4, n_target_classes=2)
    )
    jax.clear_caches()
    with compilations.recorded() as compiled:
        result = run_autoattack(
            *model, images, labels, eps=0.05, batch_size=8, log=None, square=dict(n_queries=20), **budgets
        )
    assert all(accuracy > 0 for accuracy in result.per_attack.values())  # every attack ran on some rows
    names = [name.removeprefix("jit(").removesuffix(")") for name, _ in compiled]
    assert set(names) <= ATTACK_PROGRAMS, sorted(set(names) - ATTACK_PROGRAMS)
    counts = {name: names.count(name) for name in set(names)}
    assert counts.pop("_device_fori") == 3  # APGD-CE, APGD-T, FAB-T (Square's loop: _device_while)
    assert counts.pop("_apgd_start") == 2  # the CE and the targeted loss
    assert counts.pop("_identity", 0) <= 2  # the probes of the loops' and the once-per-batch programs' options
    assert all(count == 1 for count in counts.values()), counts


def _apgd_ce_iteration(apply_fn, variables, x, y, state_sharding=None):
    """(step, consts, state) of a host-driven APGD-CE run (10 iterations) on (x, y), its state made by the start program
    with ``state_sharding`` (the runner's is the batch's own, `common.batch_sharding`)."""
    batch = common_module.prepare_batch(apply_fn, variables, x, y, EPS, "linf")
    settings = apgd_module._Settings("linf", "ce", 10, 0.75, 0.75, 2.0, apgd_checkpoints(10))
    folds = common_module.fold_values(0)
    args = (
        batch.clean_logits,
        0,
        jax.random.key(0),
        batch.ids,
        folds,
        batch.eps,
        batch.attack_mask,
        batch.found.fooled,
    )
    targets, _, state = apgd_module._apgd_start(settings, state_sharding, x, y, *args)
    return apgd_module._ApgdStep(apply_fn, settings), (batch.variables, x, y, targets, batch.eps), state


def test_the_cpu_compiler_options_change_an_apgd_iteration_by_float_rounding_at_most(digits):
    """common.CPU_COMPILER_OPTIONS make compilation faster and choose what YNNPACK runs; they change no result beyond
    the summation order of reductions. An APGD-CE iteration of a max-pool CNN (forward pass, input gradient through
    convolutions and max-pooling, the step's bookkeeping) compiled with them and with XLA's defaults: the gradients
    agree to float32 rounding (a one-channel layer's input gradient sums in XLA's loops, not YNNPACK's), and every
    other leaf, the step included, to the bit."""
    from mmard_jax.models import create_model

    module = create_model("cnn", 10, widths=(8, 16), hidden=32, downsample="max_pool")
    x, y = (jnp.asarray(a[:16]) for a in digits)
    variables = networks.init_variables(module, jax.random.key(1), x.shape[1:])
    step, consts, state = _apgd_ce_iteration(networks.inference_apply(module), variables, x, y)
    lowered = jax.jit(step).lower(consts, np.int32(0), state)

    def two_iterations(compiled):  # i = -1 evaluates the random start, i = 0 takes the first step
        return compiled(consts, np.int32(0), compiled(consts, np.int32(-1), state))

    default = two_iterations(lowered.compile())
    tuned = two_iterations(lowered.compile(compiler_options=dict(common_module.CPU_COMPILER_OPTIONS)))
    for name in state:
        if name.startswith("grad"):
            scale = np.abs(np.asarray(default[name])).max()
            np.testing.assert_allclose(tuned[name], default[name], rtol=0, atol=1e-5 * scale, err_msg=name)
        else:
            np.testing.assert_array_equal(np.asarray(tuned[name]), np.asarray(default[name]), err_msg=name)
    assert not np.array_equal(np.asarray(default["x_adv"]), np.asarray(state["x_adv"]))  # the step moved x_adv


def _apgd_step_hlo(model, eval_set, state_sharding):
    """The compiled HLO of one host-driven APGD-CE iteration on a batch of 16 split over the 8 test devices, its state
    made by the start program with `state_sharding` (the runner's: the batch's own)."""
    sharding = parallel.batch_sharded(parallel.make_mesh())
    x, y = (jax.device_put(a[:16], sharding) for a in eval_set)
    step, consts, state = _apgd_ce_iteration(*model, x, y, state_sharding(x))
    return common_module._one_step.lower(step, consts, np.int32(3), state).compile().as_text()


COLLECTIVE = re.compile(r"all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter")


def test_an_apgd_iteration_split_over_devices_runs_without_collectives(model, eval_set):
    """Each device iterates on its own rows: no device waits for another inside the host-driven loop (an all-gather
    there, from writing the loss history, once stalled and aborted a 2-device XLA:CPU run)."""
    assert not COLLECTIVE.search(_apgd_step_hlo(model, eval_set, common_module.batch_sharding))
    # the check can fail: a state left to XLA's choice of layout makes the same step gather the loss history
    assert COLLECTIVE.search(_apgd_step_hlo(model, eval_set, lambda images: None))


@dataclasses.dataclass(frozen=True)
class _CountUp:
    """A per-row step: rows below their limit count up by one."""

    def __call__(self, consts, i, state):
        (limit,) = consts
        return (jnp.where(state[0] < limit, state[0] + 1, state[0]),)


@dataclasses.dataclass(frozen=True)
class _AnyBelow:
    def __call__(self, consts, state):
        return jnp.any(state[0] < consts[0])


def test_the_device_loop_on_a_split_batch_runs_on_each_device_without_collectives():
    """On a batch split over the 8 test devices the device loop is mapped over the mesh: each device iterates over its
    own rows and looks at its own stop condition, so the compiled loop has no collective (no device waits for
    another), and gives the result of the loop over the whole batch."""
    sharding = parallel.batch_sharded(parallel.make_mesh())
    limit = jax.device_put(np.arange(16, dtype=np.float32), sharding)
    state = (jax.device_put(np.zeros(16, np.float32), sharding),)
    specs = common_module._batch_specs((limit,), state)
    assert specs is not None and specs[0] == sharding.mesh

    def loop_text(specs):
        lowered = common_module._device_while.lower(_CountUp(), _AnyBelow(), 40, (limit,), state, 10, specs)
        return lowered.compile().as_text()

    assert not COLLECTIVE.search(loop_text(specs))
    assert COLLECTIVE.search(loop_text(None))  # the check can fail: as one program, the stop condition is a reduction
    (counted,) = common_module.run_while(_CountUp(), _AnyBelow(), 40, (limit,), state, host=False)
    np.testing.assert_array_equal(np.asarray(counted), np.arange(16))
    assert common_module._batch_specs((np.float32(1.0),), (jnp.zeros(3),)) is None  # nothing split: no mapping


def test_padded_batches_hold_every_row_waste_at_most_a_third_and_take_few_shapes():
    """The runner's batch sizes: a multiple of the device count holding n rows, capped at the batch size; padding at
    most a third of the batch (a tiny one excepted: 3 rows may take 4); over all n up to 1,000, few distinct sizes."""
    for n_devices in (1, 2, 8):
        sizes = set()
        for n in range(1, 1001):
            size = runner_module._padded_size(n, 4096, n_devices)
            sizes.add(size)
            assert size >= n and size % n_devices == 0
            per_device = size // n_devices
            needed = -(-n // n_devices)
            assert per_device - needed <= max(per_device / 3, 1), (n, n_devices, size)
        assert len(sizes) <= 20, (n_devices, sorted(sizes))
    assert runner_module._padded_size(97, 100, 2) == 100  # capped at the batch size
    assert [runner_module._rows_per_device(n) for n in (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33)] == [
        1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48,
    ]  # fmt: skip
