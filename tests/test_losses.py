"""Losses against hand-computed values and plain-NumPy references on small fixed logits, plus identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmard_jax import losses
from mmard_jax.losses import Views

# Fixed logits: B = 4 examples, C = 3 classes.
P = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [3.0, 3.0, 0.0], [-2.0, 0.0, 1.5]], np.float32)
Q = np.array([[0.0, 1.0, -1.0], [2.0, 0.0, 1.0], [1.0, -1.0, 0.5], [0.0, 0.3, -0.2]], np.float32)
R = np.array([[2.0, -1.0, 0.0], [1.0, 1.0, -2.0], [0.0, 2.5, 0.5], [1.0, -0.5, 2.0]], np.float32)
S = np.array([[-1.0, 0.5, 1.0], [0.0, 2.0, 0.0], [2.0, 1.0, -1.0], [0.5, 1.5, -0.5]], np.float32)
LABELS = np.array([2, 0, 1, 2], np.int32)


# ---------------------------------------------------------------- plain NumPy references (float64)
def np_log_softmax(z, tau=1.0):
    z = np.asarray(z, np.float64) / tau
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(p, q, tau=1.0):
    lp, lq = np_log_softmax(p, tau), np_log_softmax(q, tau)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def np_ce(z, y):
    return -np_log_softmax(z)[np.arange(len(y)), y]


def np_info_nce(u, v, labels, tau, mask):
    def unit(z):
        z = np.asarray(z, np.float64) - np.mean(z, -1, keepdims=True)
        return z / np.linalg.norm(z, axis=-1, keepdims=True)

    s = unit(u) @ unit(v).T / tau
    n = len(s)
    total = 0.0
    for sim in (s, s.T):
        for i in range(n):
            kept = [j for j in range(n) if j == i or not (mask and labels[j] == labels[i])]
            total += -sim[i, i] + np.log(np.exp(sim[i, kept]).sum())
    return total / (2 * n)


def views(student_nat=S, student_adv=Q, teacher_nat=P, teacher_adv=R):
    return Views(*(jnp.asarray(z) for z in (student_nat, student_adv, teacher_nat, teacher_adv)))


# ---------------------------------------------------------------- building blocks
def test_cross_entropy_hand_values():
    # Uniform logits over 3 classes: log 3. Logits (log 1, log 3): p = (1/4, 3/4).
    logits = jnp.array([[0.0, 0.0, 0.0], [0.0, np.log(3.0), -np.inf]])
    np.testing.assert_allclose(losses.cross_entropy(logits, jnp.array([1, 0])), [np.log(3), np.log(4)], rtol=1e-6)
    np.testing.assert_allclose(losses.cross_entropy(P, LABELS), np_ce(P, LABELS), rtol=1e-6)


def test_kl_hand_value():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = ½ ln 2 + ½ ln(2/3).
    p, q = jnp.log(jnp.array([[0.5, 0.5]])), jnp.log(jnp.array([[0.25, 0.75]]))
    np.testing.assert_allclose(losses.kl_div(p, q), [0.5 * np.log(2) + 0.5 * np.log(2 / 3)], rtol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kl_reductions_and_temperature(tau):
    per_example = np_kl(P, Q, tau)
    expected = {
        "none": per_example,
        "sum": per_example.sum(),
        "batchmean": per_example.sum() / 4,
        "mean": per_example.sum() / (4 * 3),
    }
    for reduction, value in expected.items():
        np.testing.assert_allclose(
            losses.kl_div(P, Q, temperature=tau, reduction=reduction), value, rtol=1e-5, err_msg=reduction
        )


def test_kl_invalid_reduction():
    with pytest.raises(ValueError, match="reduction"):
        losses.kl_div(P, Q, reduction="avg")


def test_kl_identity_and_nonnegative():
    np.testing.assert_allclose(losses.kl_div(P, P), 0.0, atol=1e-6)
    rng = np.random.default_rng(0)
    p, q = rng.normal(0, 3, (64, 10)), rng.normal(0, 3, (64, 10))
    kl = np.asarray(losses.kl_div(p, q))
    assert (kl >= -1e-6).all() and (kl > 1e-3).all()
    np.testing.assert_allclose(kl, np_kl(p, q), rtol=1e-4)


def test_entropy_hand_values():
    logits = jnp.array([[0.0, 0.0, 0.0, 0.0], [0.0, -1e9, -1e9, 0.0]])  # p underflows to exactly 0
    np.testing.assert_allclose(losses.entropy(logits), [np.log(4), np.log(2)], rtol=1e-6)
    lp = np_log_softmax(P)
    np.testing.assert_allclose(losses.entropy(P), -(np.exp(lp) * lp).sum(-1), rtol=1e-5)


def test_margin_and_cw_loss_hand_values():
    logits = jnp.array([[1.0, 5.0, 3.0], [1.0, 5.0, 3.0]])
    labels = jnp.array([1, 0])
    np.testing.assert_allclose(losses.margin(logits, labels), [2.0, -4.0])
    # −max(margin + κ, 0) with κ = 1: −3 and −max(−3, 0) = 0.
    np.testing.assert_allclose(losses.cw_margin_loss(logits, labels, kappa=1.0), [-3.0, 0.0])


# ---------------------------------------------------------------- InfoNCE
def test_same_class_mask_hand_value():
    mask = np.asarray(losses.same_class_mask(jnp.array([0, 1, 0, 2, 1])))
    expected = np.zeros((5, 5), bool)
    for i, j in [(0, 2), (2, 0), (1, 4), (4, 1)]:
        expected[i, j] = True
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("mask", [False, True])
def test_info_nce_matches_numpy(mask):
    value = losses.info_nce(P, Q, jnp.asarray(LABELS), tau=0.5, mask_same_class=mask)
    np.testing.assert_allclose(value, np_info_nce(P, Q, LABELS, 0.5, mask), rtol=1e-5)


def test_info_nce_masking_removes_exactly_same_label_pairs():
    rng = np.random.default_rng(1)
    u, v = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    distinct, repeated = np.arange(6), np.array([0, 1, 0, 2, 1, 0])
    unmasked = losses.info_nce(u, v, mask_same_class=False)
    # Distinct labels: nothing to remove. One label: only the positives remain, so every CE term is 0.
    np.testing.assert_allclose(losses.info_nce(u, v, jnp.asarray(distinct)), unmasked, rtol=1e-6)
    np.testing.assert_allclose(losses.info_nce(u, v, jnp.zeros(6, jnp.int32)), 0.0, atol=1e-6)
    np.testing.assert_allclose(
        losses.info_nce(u, v, jnp.asarray(repeated)), np_info_nce(u, v, repeated, 0.5, True), rtol=1e-5
    )


def test_info_nce_identical_views_beat_shuffled():
    rng = np.random.default_rng(2)
    u = rng.normal(size=(16, 10))
    shuffled = u[rng.permutation(16)]
    aligned = losses.info_nce(u, u, mask_same_class=False)
    assert aligned < losses.info_nce(u, shuffled, mask_same_class=False) - 0.5
    assert aligned < np.log(16)  # the MI lower bound log B − N is positive


def test_info_nce_invariant_to_row_shift_and_scale():
    rng = np.random.default_rng(3)
    u, v = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    moved = 3.0 * u + rng.normal(size=(5, 1))
    np.testing.assert_allclose(
        losses.info_nce(moved, v, mask_same_class=False), losses.info_nce(u, v, mask_same_class=False), rtol=1e-5
    )


def test_info_nce_over_8_devices_matches_the_global_batch():
    """Per-device shares average to the full-batch value; the in-body gradient / 8 is the full-batch gradient."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(4)
    u, v = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32), jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, 16), jnp.int32)

    def local(u, v, y):
        return losses.info_nce(u, v, y, tau=0.5, axis_name="data")

    def body(u, v, y):
        value, grad = jax.value_and_grad(local)(u, v, y)
        return jax.lax.pmean(value, "data"), grad / 8

    spec = jax.sharding.PartitionSpec("data")
    value, grad = jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=(jax.sharding.PartitionSpec(), spec))
    )(u, v, labels)
    global_value, global_grad = jax.value_and_grad(losses.info_nce)(u, v, labels, tau=0.5)
    np.testing.assert_allclose(value, global_value, rtol=1e-5)
    np.testing.assert_allclose(value, np_info_nce(u, v, np.asarray(labels), 0.5, True), rtol=1e-5)
    np.testing.assert_allclose(grad, global_grad, rtol=1e-4, atol=1e-6)


def test_info_nce_needs_labels_to_mask():
    with pytest.raises(ValueError, match="labels"):
        losses.info_nce(P, Q)


def test_info_nce_gradient_finite_with_constant_rows_and_mask():
    u = jnp.asarray(P).at[0].set(1.0)  # a constant row centres to zero
    grad = jax.grad(lambda z: losses.info_nce(z, Q, jnp.asarray(LABELS)))(u)
    assert np.isfinite(np.asarray(grad)).all()


# ---------------------------------------------------------------- method losses
EPOCH = jnp.int32(0)


def test_inner_losses_match_numpy():
    v = views()
    np.testing.assert_allclose(losses.ce_inner(v, LABELS), np_ce(Q, LABELS), rtol=1e-6)
    np.testing.assert_allclose(losses.trades_inner(v, LABELS), np_kl(S, Q), rtol=1e-5)
    np.testing.assert_allclose(losses.rslad_inner(v, LABELS), np_kl(P, Q), rtol=1e-5)
    np.testing.assert_allclose(losses.adaad_inner(v, LABELS), np_kl(R, Q), rtol=1e-5)


@pytest.mark.parametrize("boundary", ["kl", "entropy", "margin"])
def test_mmard_inner_matches_numpy(boundary):
    lp_r = np_log_softmax(R)
    sorted_r = np.sort(R, -1)
    label_logit = R[np.arange(4), LABELS]
    best_other = np.where(label_logit == sorted_r[:, -1], sorted_r[:, -2], sorted_r[:, -1])
    term = {"kl": np_kl(P, R), "entropy": -(np.exp(lp_r) * lp_r).sum(-1), "margin": -np.abs(label_logit - best_other)}[
        boundary
    ]
    value = losses.mmard_inner(views(), LABELS, gamma=0.7, boundary=boundary)
    np.testing.assert_allclose(value, np_kl(R, Q) + 0.7 * term, rtol=1e-5)


@pytest.mark.parametrize("boundary", ["kl", "entropy", "margin"])
def test_mmard_inner_gamma_zero_is_adaad(boundary):
    v = views()
    assert np.abs(losses.boundary_term(v, LABELS, boundary)).max() > 1e-3  # the term is really there
    np.testing.assert_allclose(
        losses.mmard_inner(v, LABELS, gamma=0.0, boundary=boundary), losses.adaad_inner(v, LABELS), rtol=1e-6
    )


def test_pgd_at_and_trades_outer():
    loss, metrics = losses.pgd_at_outer(views(), LABELS, EPOCH)
    np.testing.assert_allclose(loss, np_ce(Q, LABELS).mean(), rtol=1e-6)
    assert set(metrics) == {"ce_adv"}
    loss, metrics = losses.trades_outer(views(), LABELS, EPOCH, beta=6.0, reduction="batchmean")
    np.testing.assert_allclose(loss, np_ce(S, LABELS).mean() + 6.0 * np_kl(S, Q).sum() / 4, rtol=1e-5)
    assert set(metrics) == {"ce_nat", "kl_adv"}


def test_ard_outer_temperature_factor():
    # a · τ² · KL(p_T(x; τ) ‖ p_S(x'; τ)) averaged over B·C + (1 − a) · CE(S(x), y).
    loss, metrics = losses.ard_outer(views(), LABELS, EPOCH, alpha=0.9, temperature=3.0, reduction="mean")
    kl = 9.0 * np_kl(P, Q, 3.0).sum() / 12
    np.testing.assert_allclose(loss, 0.9 * kl + 0.1 * np_ce(S, LABELS).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["kl_adv"], kl, rtol=1e-5)


def test_iad_outer_before_and_after_warmup():
    kwargs = dict(alpha=0.8, temperature=2.0, reduction="batchmean", beta=0.1, warmup_epochs=5)
    ard = 0.8 * 4.0 * np_kl(P, Q, 2.0).sum() / 4 + 0.2 * np_ce(S, LABELS).mean()
    reliability = np.exp(np_log_softmax(R)[np.arange(4), LABELS]) ** 0.1
    extra = ((1 - reliability) * np_kl(S, Q)).mean()
    before, metrics = losses.iad_outer(views(), LABELS, jnp.int32(4), **kwargs)
    after, _ = jax.jit(lambda e: losses.iad_outer(views(), LABELS, e, **kwargs))(jnp.int32(5))
    np.testing.assert_allclose(before, ard, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl_self"], 0.0)
    np.testing.assert_allclose(after, ard + 0.8 * extra, rtol=1e-5)


def test_rslad_and_adaad_outer():
    loss, _ = losses.rslad_outer(views(), LABELS, EPOCH, adv_weight=5 / 6, reduction="mean")
    np.testing.assert_allclose(loss, (5 / 6 * np_kl(P, Q).sum() + 1 / 6 * np_kl(P, S).sum()) / 12, rtol=1e-5)
    loss, metrics = losses.adaad_outer(views(), LABELS, EPOCH, alpha=0.75, reduction="sum")
    np.testing.assert_allclose(loss, 0.75 * np_kl(R, Q).sum() + 0.25 * np_kl(P, S).sum(), rtol=1e-5)
    assert set(metrics) == {"kl_adv", "kl_nat"}


@pytest.mark.parametrize("vertex", ["adversarial", "natural"])
def test_mmard_outer_matches_numpy(vertex):
    base = lambda v, y, e: losses.adaad_outer(v, y, e, alpha=1.0, reduction="mean")  # noqa: E731
    weights = (0.5, 0.3, 0.2)
    loss, metrics = losses.mmard_outer(
        views(),
        LABELS,
        EPOCH,
        base_outer=base,
        beta=2.0,
        weights=weights,
        tau=0.5,
        mask_same_class=True,
        teacher_vertex=vertex,
    )
    t = R if vertex == "adversarial" else P
    edges = [np_info_nce(u, w, LABELS, 0.5, True) for u, w in ((S, Q), (S, t), (Q, t))]
    expected = np_kl(R, Q).sum() / 12 + 2.0 * np.dot(weights, edges)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose([metrics[k] for k in ("mi_ab", "mi_at", "mi_bt")], edges, rtol=1e-5)
    assert set(metrics) == {"kl_adv", "kl_nat", "mi_ab", "mi_at", "mi_bt"}


def test_mmard_outer_beta_zero_is_base():
    base = lambda v, y, e: losses.rslad_outer(v, y, e, adv_weight=5 / 6, reduction="mean")  # noqa: E731
    loss, _ = losses.mmard_outer(
        views(),
        LABELS,
        EPOCH,
        base_outer=base,
        beta=0.0,
        weights=(1.0, 1.0, 1.0),
        tau=0.5,
        mask_same_class=True,
        teacher_vertex="adversarial",
    )
    np.testing.assert_allclose(loss, base(views(), LABELS, EPOCH)[0], rtol=1e-6)


def test_triangle_teacher_vertex_is_stop_gradiented():
    def triangle(teacher_adv):
        v = views()._replace(teacher_adv=teacher_adv)
        return losses.triangle_mi(
            v, LABELS, weights=(1.0, 1.0, 1.0), tau=0.5, mask_same_class=False, teacher_vertex="adversarial"
        )[0]

    def student_grad(student_adv):
        v = views()._replace(student_adv=student_adv)
        return losses.triangle_mi(
            v, LABELS, weights=(1.0, 1.0, 1.0), tau=0.5, mask_same_class=False, teacher_vertex="adversarial"
        )[0]

    np.testing.assert_array_equal(jax.grad(triangle)(jnp.asarray(R)), 0.0)
    assert np.abs(np.asarray(jax.grad(student_grad)(jnp.asarray(Q)))).max() > 1e-3
