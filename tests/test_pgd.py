"""The PGD engine: constraints, ascent, the analytic step, loop/jit/vmap/shard_map equivalences, configurations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from mmard_jax.attacks import PGDSpec, ce_attack, cw_linf, fgsm, per_example_start, pgd, project
from mmard_jax.losses import cross_entropy

BATCH, SHAPE, CLASSES = 8, (4, 4, 1), 3
EPS, STEP = 0.1, 0.03


def make_key(seed):
    """An 'rbg' PRNG key: the engine takes any key; threefry's XLA:CPU compile would dominate this file's runtime.

    (rbg bits may depend on sharding and batching, so the shard_map test uses threefry.)
    """
    return jax.random.key(seed, impl="rbg")


def _fixed_network():
    """A tiny fixed MLP on 4x4x1 images (NumPy-seeded weights) and a batch of inputs in [0, 1]."""
    rng = np.random.default_rng(0)
    w1 = jnp.asarray(rng.normal(0, 1, (16, 12)), jnp.float32)
    w2 = jnp.asarray(rng.normal(0, 1, (12, CLASSES)), jnp.float32)
    x = jnp.asarray(rng.uniform(0, 1, (BATCH,) + SHAPE), jnp.float32)
    x = x.at[0].set(0.0).at[1].set(1.0)  # corners, where clipping to [0, 1] matters
    y = jnp.asarray(rng.integers(0, CLASSES, BATCH), jnp.int32)

    def logits_fn(z):
        return jnp.tanh(z.reshape(z.shape[0], -1) @ w1) @ w2

    return logits_fn, x, y


LOGITS_FN, X, Y = _fixed_network()


def ce_loss(z):
    return cross_entropy(LOGITS_FN(z), Y)


def _per_example_distance(a, b, norm):
    diff = np.asarray(a - b).reshape(len(a), -1)
    return np.abs(diff).max(1) if norm == "linf" else np.linalg.norm(diff, axis=1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("init", ["none", "normal", "uniform"])
def test_stays_in_ball_and_unit_box(norm, init):
    eps = EPS if norm == "linf" else 0.5
    step_counts = (0, 1, 4)
    attack = functools.partial(pgd, ce_loss, eps=eps, step_size=eps / 2, init=init, init_scale=0.3, norm=norm)
    results = jax.jit(lambda x, key: [attack(x, key, steps=steps) for steps in step_counts])(X, make_key(0))
    for steps, x_adv in zip(step_counts, results, strict=True):
        x_adv = np.asarray(x_adv)
        assert (x_adv >= 0).all() and (x_adv <= 1).all()
        assert (_per_example_distance(x_adv, X, norm) <= eps + 1e-5).all()
        if steps or init != "none":
            assert _per_example_distance(x_adv, X, norm).max() > eps / 4  # it did move


def test_steps_zero_is_projected_start():
    key = make_key(3)
    np.testing.assert_array_equal(pgd(ce_loss, X, None, eps=EPS, step_size=STEP, steps=0, init="none"), X)
    start = pgd(ce_loss, X, key, eps=EPS, step_size=STEP, steps=0, init="normal", init_scale=0.05)
    noise = 0.05 * np.asarray(jax.random.normal(key, X.shape, X.dtype))
    assert np.abs(noise).max() > EPS  # some noise is cut by the ball
    np.testing.assert_allclose(start, np.clip(np.clip(noise, -EPS, EPS) + X, 0, 1), atol=1e-6)


def test_uniform_init_covers_the_ball():
    x = jnp.full((256, 4), 0.5)
    start = np.asarray(pgd(lambda z: z.sum(-1), x, make_key(0), eps=0.2, step_size=0.0, steps=0))
    delta = start - 0.5
    assert np.abs(delta).max() <= 0.2 + 1e-6 and np.abs(delta).max() > 0.19
    assert abs(delta.mean()) < 0.02 and abs(delta.std() - 0.2 / np.sqrt(3)) < 0.01  # U(−ε, ε): std ε/√3


def test_loss_increases_on_fixed_network():
    x_adv = pgd(ce_loss, X, None, eps=EPS, step_size=STEP / 3, steps=10, init="none")
    before, after = np.asarray(ce_loss(X)), np.asarray(ce_loss(x_adv))
    assert (after >= before - 1e-6).all()
    assert after.mean() > before.mean() + 0.1


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_linear_model_step_is_analytic(norm):
    w = jnp.array([[0.5, -2.0, 0.0], [1.5, -0.1, 3.0]])
    x = jnp.full((3, 2, 3), 0.5)
    x_adv = pgd(lambda z: jnp.sum(z * w, axis=(1, 2)), x, None, eps=0.4, step_size=0.1, steps=1, init="none", norm=norm)
    w_np = np.asarray(w)
    expected = np.sign(w_np) if norm == "linf" else w_np / np.linalg.norm(w_np)
    np.testing.assert_allclose(x_adv - x, np.broadcast_to(0.1 * expected, x.shape), atol=1e-6)


def test_linear_model_multi_step_saturates_at_eps():
    w = jnp.array([[1.0, -1.0, 2.0, -0.5]])
    x = jnp.array([[0.5, 0.5, 0.95, 0.02]])
    x_adv = pgd(lambda z: (z * w).sum(-1), x, None, eps=0.1, step_size=0.03, steps=5, init="none")
    # Four steps reach ±0.1 (0.12 clipped to 0.1); clipping to [0, 1] cuts the last two coordinates.
    np.testing.assert_allclose(x_adv, [[0.6, 0.4, 1.0, 0.0]], atol=1e-6)


def test_rolled_and_unrolled_agree_and_jit_matches_eager():
    kwargs = dict(eps=EPS, step_size=STEP, steps=5, init="uniform")
    key = make_key(1)
    rolled = pgd(ce_loss, X, key, unroll=1, **kwargs)
    unrolled = pgd(ce_loss, X, key, unroll=True, **kwargs)
    partly = pgd(ce_loss, X, key, unroll=2, **kwargs)
    jitted = jax.jit(lambda x, k: pgd(ce_loss, x, k, **kwargs))(X, key)
    np.testing.assert_allclose(unrolled, rolled, atol=1e-6)
    np.testing.assert_allclose(partly, rolled, atol=1e-6)
    np.testing.assert_allclose(jitted, rolled, atol=1e-6)
    assert np.abs(np.asarray(rolled - X)).max() > EPS / 2


def test_vmap_over_batches_matches_loop():
    xs = jnp.stack([X, 1.0 - X])
    attack = functools.partial(ce_attack, LOGITS_FN, y=Y, key=None, eps=EPS, step_size=STEP, steps=3, init="none")
    mapped = jax.vmap(lambda x: attack(x))(xs)
    for i in range(2):
        np.testing.assert_allclose(mapped[i], attack(xs[i]), atol=1e-6)


def test_shard_map_over_8_devices_matches_single_device():
    devices = jax.devices()
    assert len(devices) == 8, "conftest sets 8 host CPU devices"
    mesh = Mesh(np.array(devices), ("data",))

    def attack(x, y, keys):
        return ce_attack(
            LOGITS_FN,
            x,
            y,
            None,
            eps=EPS,
            step_size=STEP,
            steps=4,
            init="none",
            x_init=per_example_start(keys, x, eps=EPS),
        )

    keys = jax.random.split(jax.random.key(5), BATCH)  # threefry: its bits do not depend on the sharding
    sharded = jax.jit(jax.shard_map(attack, mesh=mesh, in_specs=PartitionSpec("data"), out_specs=PartitionSpec("data")))
    single = attack(X, Y, keys)
    np.testing.assert_allclose(sharded(X, Y, keys), single, atol=1e-6)
    assert np.abs(np.asarray(single - X)).max() > EPS / 2


def test_x_init_is_projected_and_needs_init_none():
    far = X + 5.0 * jnp.sign(jnp.arange(X.size, dtype=jnp.float32).reshape(X.shape) % 2 - 0.5)
    start = pgd(ce_loss, X, None, eps=EPS, step_size=STEP, steps=0, init="none", x_init=far)
    np.testing.assert_allclose(start, np.clip(np.clip(far - X, -EPS, EPS) + X, 0, 1), atol=1e-6)
    with pytest.raises(ValueError, match="x_init"):
        pgd(ce_loss, X, make_key(0), eps=EPS, step_size=STEP, steps=1, init="uniform", x_init=X)


def test_result_is_stop_gradiented():
    grad = jax.grad(lambda x: pgd(ce_loss, x, None, eps=EPS, step_size=STEP, steps=2, init="none").sum())(X)
    np.testing.assert_array_equal(grad, 0.0)


def test_fgsm_is_one_eps_sign_step():
    grad_sign = np.sign(np.asarray(jax.grad(lambda z: ce_loss(z).sum())(X)))
    expected = np.clip(np.asarray(X) + EPS * grad_sign, 0, 1)
    np.testing.assert_allclose(fgsm(ce_loss, X, eps=EPS), expected, atol=1e-6)


def test_cw_linf_lowers_margin_and_respects_kappa():
    def margin(z):
        logits = np.asarray(LOGITS_FN(z))
        label = logits[np.arange(BATCH), Y]
        others = np.where(np.eye(CLASSES, dtype=bool)[Y], -np.inf, logits).max(1)
        return label - others

    x_adv = cw_linf(LOGITS_FN, X, Y, None, eps=EPS, step_size=STEP, steps=5, kappa=50.0, init="none")
    assert margin(x_adv).mean() < margin(X).mean() - 0.1
    # With κ below −max margin, the loss −max(margin + κ, 0) is flat at 0: no gradient, no step.
    frozen = cw_linf(LOGITS_FN, X, Y, None, eps=EPS, step_size=STEP, steps=5, kappa=-margin(X).max() - 1.0, init="none")
    np.testing.assert_array_equal(frozen, X)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(norm="l1"), "norm"),
        (dict(init="gaussian"), "init"),
        (dict(eps=-0.1), "eps"),
        (dict(step_size=-1.0), "step_size"),
        (dict(steps=2.5), "steps"),
        (dict(unroll=0), "unroll"),
        (dict(init="uniform", key=None), "key"),
    ],
)
def test_invalid_arguments_raise(kwargs, field):
    arguments = dict(eps=EPS, step_size=STEP, steps=2, init="none", key=make_key(0)) | kwargs
    key = arguments.pop("key")
    with pytest.raises(ValueError, match=field):
        pgd(ce_loss, X, key, **arguments)


def test_pgd_spec_holds_pgd_arguments_and_checks_them():
    spec = PGDSpec(eps=EPS, step_size=STEP, steps=3, init="normal", init_scale=0.05)
    key = make_key(2)
    np.testing.assert_array_equal(
        pgd(ce_loss, X, key, **spec.kwargs),
        pgd(ce_loss, X, key, eps=EPS, step_size=STEP, steps=3, init="normal", init_scale=0.05),
    )
    assert spec.start == dict(eps=EPS, init="normal", init_scale=0.05, norm="linf")
    assert hash(spec) == hash(PGDSpec(eps=EPS, step_size=STEP, steps=3, init="normal", init_scale=0.05))
    for kwargs, field in [
        (dict(norm="l1"), "norm"),
        (dict(init="gaussian"), "init"),
        (dict(eps=-0.1), "eps"),
        (dict(step_size=-1.0), "step_size"),
        (dict(steps=2.5), "steps"),
        (dict(unroll=0), "unroll"),
    ]:
        with pytest.raises(ValueError, match=field):
            PGDSpec(**(dict(eps=EPS, step_size=STEP, steps=2) | kwargs))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_sphere_start_lies_on_the_eps_sphere_and_per_example_starts_ignore_batching(norm):
    x = jnp.full((6, 4, 4, 3), 0.5)  # far from the box edges, so clipping to [0, 1] does not cut the start
    eps = 0.2
    keys = jax.random.split(jax.random.key(0), 6)
    start = per_example_start(keys, x, eps=eps, init="sphere", norm=norm)
    np.testing.assert_allclose(_per_example_distance(start, x, norm), eps, rtol=1e-5)
    np.testing.assert_array_equal(per_example_start(keys[:2], x[:2], eps=eps, init="sphere", norm=norm), start[:2])


@pytest.mark.parametrize("norm, eps", [("linf", EPS), ("l2", 0.5)])
def test_projection_keeps_inner_points_and_pulls_outer_points_onto_the_sphere(norm, eps):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(0.3, 0.7, (4, 4, 4, 1)), jnp.float32)
    direction = rng.normal(size=x.shape)
    unit = jnp.asarray(direction / _per_example_distance(direction, 0.0, norm)[:, None, None, None], jnp.float32)
    inside, outside = x + 0.5 * eps * unit, x + 2.0 * eps * unit
    np.testing.assert_allclose(project(inside, x, eps, norm), inside, atol=1e-7)
    np.testing.assert_allclose(_per_example_distance(project(outside, x, eps, norm), x, norm), eps, rtol=1e-5)


def test_unroll_zero_means_by_platform_fully_unrolled_on_cpu_rolled_elsewhere():
    from mmard_jax.attacks.pgd import platform_unroll

    assert [platform_unroll(0, 10, backend) for backend in ("cpu", "gpu", "tpu")] == [10, 1, 1]
    assert platform_unroll(0, 0, "cpu") == 1  # a 0-step loop still gets a valid unroll
    assert [platform_unroll(4, 10, backend) for backend in ("cpu", "gpu")] == [4, 4]  # an explicit value is kept
