"""The method registry: every combination builds and runs, declarations are exact, configs are validated."""

import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from test_losses import np_kl, np_log_softmax  # tests/ is on sys.path

from mmard_jax import methods
from mmard_jax.config import cifar_config, student_method_config
from mmard_jax.config import method_config as default_method_config
from mmard_jax.methods import Views

B, C = 8, 5
COMBINATIONS = list(itertools.product(methods.DISTILLATION_BASES, (False, True), (False, True)))


def method_config(method_name, **overrides):
    """The default config.method as a plain namespace (build_method takes any attribute object)."""
    return types.SimpleNamespace(**(default_method_config(method_name).to_dict() | overrides))


def build(method_name, **overrides):
    return methods.build_method(method_config(method_name, **overrides))


def all_methods():
    combos = [build(base, mmard_inner=inner, mmard_outer=outer) for base, inner, outer in COMBINATIONS]
    return combos + [build(name) for name in ("pgd_at", "trades", "mmard")]


def random_views(seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    return Views(*(3.0 * jax.random.normal(k, (B, C)) for k in keys))


LABELS = jnp.array([0, 1, 2, 0, 3, 4, 1, 0], jnp.int32)


def keep_only(views, names):
    return Views(**{name: getattr(views, name) if name in names else None for name in Views._fields})


def test_every_combination_runs_finite_under_jit():
    built = all_methods()
    assert len({m.name for m in built}) == len(COMBINATIONS) + 2  # 'mmard' is one of the combinations (iad+outer)

    def run_all(views, epoch):
        results = []
        for m in built:
            inner = m.inner_loss(keep_only(views, m.inner_views), LABELS)
            outer_views = keep_only(views, m.outer_views)
            (loss, metrics), grads = jax.value_and_grad(m.outer_loss, has_aux=True)(outer_views, LABELS, epoch)
            results.append((inner, loss, metrics, grads.student_adv))
        return results

    results = jax.jit(run_all)(random_views(), jnp.int32(100))
    for m, (inner, loss, metrics, grad_adv) in zip(built, results, strict=True):
        assert inner.shape == (B,) and np.isfinite(inner).all(), m.name
        assert loss.shape == () and np.isfinite(loss), m.name
        assert metrics and all(np.isfinite(v) for v in metrics.values()), m.name
        assert np.abs(np.asarray(grad_adv)).max() > 0, m.name  # every outer loss trains the robust student
        assert ("mi_ab" in metrics) == ("mmard_outer" in m.name), m.name


@pytest.mark.parametrize("base, add_inner, add_outer", COMBINATIONS)
def test_declared_views_are_exactly_what_losses_read(base, add_inner, add_outer):
    m = build(base, mmard_inner=add_inner, mmard_outer=add_outer)
    views, epoch = random_views(), jnp.int32(0)
    for declared, loss in (
        (m.inner_views, lambda v: m.inner_loss(v, LABELS)),
        (m.outer_views, lambda v: m.outer_loss(v, LABELS, epoch)),
    ):
        jax.eval_shape(loss, keep_only(views, declared))  # runs with only the declared views
        for missing in declared:
            with pytest.raises((TypeError, AttributeError, ValueError)):
                jax.eval_shape(loss, keep_only(views, declared - {missing}))


def test_view_declarations_follow_the_method_table():
    assert build("rslad").inner_views == {"student_adv", "teacher_nat"}  # no teacher forward in the loop
    assert "teacher_adv" in build("adaad").inner_views
    assert build("trades").inner_views == {"student_nat", "student_adv"}
    assert build("iad").outer_views >= {"teacher_adv"}  # w_i = p_T(x')[y]^β
    assert "teacher_nat" not in build("adaad", mmard_inner=True, boundary="entropy").inner_views
    assert "teacher_nat" in build("ard", mmard_outer=True, teacher_vertex="natural").outer_views
    assert "teacher_adv" not in build("ard", mmard_outer=True, teacher_vertex="natural").outer_views


def test_modes_and_teacher_flags():
    assert build("ard").attack_student_train_mode and build("iad").attack_student_train_mode
    assert not build("ard", mmard_inner=True).attack_student_train_mode  # MMARD attacks in inference mode
    assert build("ard", mmard_outer=True).attack_student_train_mode
    assert not any(build(n).attack_student_train_mode for n in ("pgd_at", "trades", "rslad", "adaad"))
    assert build("mmard").attack_student_train_mode  # IAD's attack, like ARD's; MMARD's inner part is off by default
    assert [n for n in methods.METHOD_NAMES if not build(n).needs_teacher] == ["pgd_at", "trades"]


def test_default_mmard_is_iad_with_the_outer_part():
    mmard = build("mmard")
    composed = build("iad", mmard_outer=True)
    assert (mmard.inner_loss, mmard.outer_loss, mmard.inner_views, mmard.outer_views) == (
        composed.inner_loss,
        composed.outer_loss,
        composed.inner_views,
        composed.outer_views,
    )
    assert mmard.inner_loss == build("iad").inner_loss  # the base's attack, unchanged


@pytest.mark.parametrize("base, parts", [("rslad", "outer"), ("ard", "inner"), ("iad", "both"), ("adaad", "outer")])
def test_mmard_is_its_configured_base_with_its_configured_parts(base, parts):
    mmard = build("mmard", mmard_base=base, mmard_parts=parts)
    composed = build(base, mmard_inner=parts in ("inner", "both"), mmard_outer=parts in ("outer", "both"))
    assert (mmard.inner_loss, mmard.outer_loss, mmard.inner_views, mmard.outer_views) == (
        composed.inner_loss,
        composed.outer_loss,
        composed.inner_views,
        composed.outer_views,
    )
    # The plain-base flags are the composition's, not mmard's: they do not switch parts off or on.
    assert build("mmard", mmard_base=base, mmard_parts=parts, mmard_inner=True, mmard_outer=True) == mmard


def test_methods_are_hashable_static_jit_arguments():
    first, second, other = build("rslad", mmard_outer=True), build("rslad", mmard_outer=True), build("rslad")
    assert first == second and hash(first) == hash(second) and first != other
    traces = []

    def outer(method, views):
        traces.append(method.name)
        return method.outer_loss(views, LABELS, jnp.int32(0))[0]

    step = jax.jit(outer, static_argnums=0)
    views = random_views()
    np.testing.assert_allclose(step(first, views), step(second, views))
    assert traces == [first.name]  # equal methods share one compilation
    step(other, views)
    assert len(traces) == 2


def test_axis_name_makes_the_sharded_outer_loss_the_global_one():
    cfg = method_config("mmard")
    sharded_method, single_method = methods.build_method(cfg, axis_name="data"), methods.build_method(cfg)
    views = keep_only(random_views(), single_method.outer_views)
    labels = jnp.tile(LABELS, 2)
    views = jax.tree.map(lambda z: jnp.concatenate([z, z[::-1] + 1.0]), views)  # 16 rows, 2 per device
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))

    def body(views, labels):
        return jax.lax.pmean(sharded_method.outer_loss(views, labels, jnp.int32(0)), "data")

    rows, replicated = jax.sharding.PartitionSpec("data"), jax.sharding.PartitionSpec()
    sharded = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=rows, out_specs=replicated))(views, labels)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
        sharded,
        single_method.outer_loss(views, labels, jnp.int32(0)),
    )


def _linear_nets():
    rng = np.random.default_rng(0)
    student = jnp.asarray(rng.normal(size=(6, C)), jnp.float32)
    teacher = jnp.asarray(rng.normal(size=(6, C)), jnp.float32)
    x = jnp.asarray(rng.uniform(size=(B, 6)), jnp.float32)
    return student, teacher, x, x + 0.1 * jnp.asarray(rng.normal(size=(B, 6)), jnp.float32)


def inner_views_at(method, student, teacher, x, x_adv):
    """What the train step does: *_adv fields at x', *_nat fields once and stop-gradiented."""
    fields = {}
    for name in method.inner_views:
        logits = (x_adv if name.endswith("adv") else x) @ (student if name.startswith("student") else teacher)
        fields[name] = logits if name.endswith("adv") else lax.stop_gradient(logits)
    return Views(**fields)


@pytest.mark.parametrize(
    "name, overrides, through_teacher",
    [
        ("adaad", {}, True),
        ("mmard", {"mmard_base": "adaad", "mmard_parts": "both"}, True),
        ("mmard", {"mmard_parts": "both", "boundary": "margin", "gamma": 2.0}, True),
        ("mmard", {}, False),  # the default, IAD + outer: IAD's CE attack
        ("rslad", {"mmard_inner": True}, True),
        ("rslad", {}, False),
        ("ard", {}, False),
    ],
)
def test_inner_gradient_through_teacher(name, overrides, through_teacher):
    m = build(name, **overrides)
    student, teacher, x, x_adv = _linear_nets()

    def inner(teacher_weights, z):
        return m.inner_loss(inner_views_at(m, student, teacher_weights, x, z), LABELS).sum()

    teacher_grad, input_grad = jax.grad(inner, argnums=(0, 1))(teacher, x_adv)
    assert (np.abs(np.asarray(teacher_grad)).max() > 1e-4) == through_teacher
    if through_teacher:  # the attack direction changes if the teacher's logits are cut from the graph

        def inner_teacher_cut(z):
            views = inner_views_at(m, student, teacher, x, z)
            return m.inner_loss(views._replace(teacher_adv=lax.stop_gradient(views.teacher_adv)), LABELS).sum()

        assert np.abs(np.asarray(input_grad - jax.grad(inner_teacher_cut)(x_adv))).max() > 1e-4


def test_iad_extra_term_switches_on_at_warmup():
    m = build("iad", iad_warmup_epochs=3)
    views = keep_only(random_views(), m.outer_views)
    outer = jax.jit(m.outer_loss)
    before, before_metrics = outer(views, LABELS, jnp.int32(2))
    after, after_metrics = outer(views, LABELS, jnp.int32(3))
    assert before_metrics["kl_self"] == 0 and after_metrics["kl_self"] > 0
    np.testing.assert_allclose(after - before, after_metrics["kl_self"], rtol=1e-5)  # alpha = 1


@pytest.mark.parametrize(
    "name, field, value",
    [
        ("mmard", "name", "madry"),
        ("ard", "kl_reduction", "none"),
        ("ard", "temperature", 0.0),
        ("iad", "iad_temperature", 0.0),
        ("iad", "iad_kl_reduction", "avg"),
        ("adaad", "alpha", 1.5),
        ("iad", "iad_beta", -0.1),
        ("iad", "iad_warmup_epochs", -1),
        ("rslad", "rslad_adv_weight", 2.0),
        ("trades", "trades_beta", float("nan")),
        ("mmard", "gamma", -1.0),
        ("mmard", "boundary", "l2"),
        ("mmard", "mi_beta", "one"),
        ("mmard", "mi_weights", (1.0, 1.0)),
        ("mmard", "tau_mi", 0.0),
        ("mmard", "mask_same_class", "yes"),
        ("mmard", "teacher_vertex", "clean"),
        ("mmard", "mmard_base", "trades"),
        ("mmard", "mmard_parts", "none"),
        ("ard", "mmard_inner", 1),
        ("pgd_at", "mmard_inner", True),
        ("trades", "mmard_outer", True),
    ],
)
def test_invalid_config_names_the_field(name, field, value):
    reads_every_part = {"mmard_base": "adaad", "mmard_parts": "both"} if name == "mmard" else {}
    with pytest.raises(ValueError, match=f"config.method.{field}"):
        build(name, **{**reads_every_part, field: value})


@pytest.mark.parametrize("field, value", [("gamma", -1.0), ("boundary", "l2")])
def test_mmard_checks_its_inner_fields_even_with_the_inner_part_off(field, value):
    """A user who sets gamma or boundary for MMARD learns it is wrong even when mmard_parts leaves the term out."""
    with pytest.raises(ValueError, match=f"config.method.{field}"):
        build("mmard", mmard_parts="outer", **{field: value})


def test_missing_field_names_the_field():
    cfg = default_method_config("rslad")
    del cfg["rslad_adv_weight"]
    with pytest.raises(ValueError, match="config.method.rslad_adv_weight"):
        methods.build_method(cfg)


@pytest.mark.parametrize(
    "name, flags, expected",
    [
        ("pgd_at", {}, "uniform"),
        ("trades", {}, "normal"),
        ("ard", {}, "uniform"),
        ("iad", {}, "uniform"),
        ("rslad", {}, "normal"),
        ("adaad", {}, "normal"),
        ("mmard", {}, "uniform"),  # default: IAD + outer, IAD's start
        ("mmard", {"mmard_parts": "both"}, "normal"),
        ("ard", {"mmard_inner": True}, "normal"),  # MMARD's inner loss replaces ARD's, with AdaAD's start
        ("ard", {"mmard_outer": True}, "uniform"),
    ],
)
def test_reference_attack_start_per_method(name, flags, expected):
    """docs/method.md §2: PGD-AT and ARD/IAD start uniformly in the ball; TRADES, RSLAD, AdaAD at x + 0.001·N."""
    cfg = default_method_config(name)
    for field, value in flags.items():
        setattr(cfg, field, value)
    assert methods.build_method(cfg).attack_init == expected


def test_iad_has_its_own_defaults_as_a_baseline_of_the_cifar10_mmard_run():
    """IAD-I.py (github.com/ZFancy/IAD): τ = 1, KL terms summed / B; ARD keeps τ = 30 and the shared 'mean'."""
    config = cifar_config("cifar10")
    config.baselines = "iad,rslad"
    assert config.method.name == "mmard"
    iad = methods.build_method(student_method_config(config, "iad"))
    ard = methods.build_method(student_method_config(config, "ard"))
    iad_hyper = dict(iad.outer_loss.hyperparameters)
    assert (iad_hyper["temperature"], iad_hyper["reduction"]) == (1.0, "batchmean")
    assert dict(ard.outer_loss.hyperparameters) == {"alpha": 1.0, "temperature": 30.0, "reduction": "mean"}

    s_nat = np.array([[1.0, -0.5, 0.3], [0.2, 0.8, -1.0], [-0.3, 0.1, 0.9], [2.0, 0.0, -2.0]])
    s_adv, t_nat, t_adv = 0.7 * s_nat[::-1], 1.5 * s_nat + 0.2, s_nat[[1, 0, 3, 2]]
    labels = np.array([0, 1, 2, 0])
    views = Views(*(jnp.asarray(z, jnp.float32) for z in (s_nat, s_adv, t_nat, t_adv)))
    b, c = s_nat.shape
    reliability = np.exp(np_log_softmax(t_adv)[np.arange(b), labels]) ** 0.1  # w_i = p_T(x'_i)[y_i]^β
    # IAD-I.py after --begin: KL(T(x)/τ ‖ S(x')/τ)·τ² summed / B + ((1 − w) · KL(S(x) ‖ S(x'))) summed / B, a = 1
    expected_iad = (np_kl(t_nat, s_adv).sum() + ((1 - reliability) * np_kl(s_nat, s_adv)).sum()) / b
    expected_ard = 30.0**2 * np_kl(t_nat, s_adv, 30.0).sum() / (b * c)
    np.testing.assert_allclose(iad.outer_loss(views, jnp.asarray(labels), jnp.int32(60))[0], expected_iad, rtol=1e-5)
    # float32 at τ = 30: the KL is ~1e-4 before the τ² factor
    np.testing.assert_allclose(ard.outer_loss(views, jnp.asarray(labels), jnp.int32(0))[0], expected_ard, rtol=1e-4)
