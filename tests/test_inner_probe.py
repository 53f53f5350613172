"""The inner-loss probe: its margin is the teacher's, it sees the boundary term's effect, and its CLI writes the table."""

import os

import jax
import numpy as np
import pytest

from mmard_jax import checkpoint as ckpt_lib
from mmard_jax import inner_probe, losses, parallel
from mmard_jax.data import load_dataset
from mmard_jax.networks import Network, build_module, inference_logits, init_variables

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = os.path.join(ROOT, "configs", "tiny.py")
NUM_EXAMPLES = 64  # one training batch of the tiny config


@pytest.fixture(scope="module")
def setup():
    config = inner_probe.load_config(TINY)
    dataset = load_dataset(config.data)
    module = build_module(config.teacher.model, dataset.num_classes)
    teacher = Network(module, init_variables(module, jax.random.PRNGKey(1), dataset.image_shape))
    student = inner_probe.student_variables(config, dataset, "init", "last")
    images, labels = inner_probe.probe_examples(dataset, NUM_EXAMPLES, config.seed)
    return config, dataset, teacher, student, images, labels


def run_variant(setup, variant):
    config, dataset, teacher, student, images, labels = setup
    spec = inner_probe.probe_spec(config, variant, teacher, dataset.num_classes)
    run = inner_probe.compiled_probe(spec, parallel.make_mesh())
    return inner_probe.probe_variant(
        run, student, teacher.variables, images, labels, batch_size=config.optim.batch_size, seed=0
    )


def test_teacher_measurements_match_a_hand_computation():
    nat = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
    adv = np.array([[1.0, 3.0, -1.0], [0.5, 0.5, 0.0]], np.float32)
    labels = np.array([0, 2])
    measured = jax.device_get(inner_probe.teacher_measurements(nat, adv, labels))
    np.testing.assert_allclose(measured["margin"], [1.0 - 3.0, 0.0 - 0.5])
    np.testing.assert_allclose(measured["abs_margin"], [2.0, 0.5])
    np.testing.assert_array_equal(measured["teacher_error"], [1.0, 1.0])
    p, q = (np.exp(z) / np.exp(z).sum(-1, keepdims=True) for z in (nat, adv))
    np.testing.assert_allclose(measured["teacher_kl"], np.sum(p * np.log(p / q), -1), rtol=1e-5)


def test_probe_margin_is_the_teachers_margin_at_the_returned_x_adv(setup):
    _, _, teacher, _, _, labels = setup
    measures, x_adv = run_variant(setup, inner_probe.variants()["AdaAD (γ=0)"])
    logits = np.asarray(inference_logits(teacher.module, teacher.variables, x_adv[:4]))
    for i in range(4):
        others = np.delete(logits[i], labels[i])
        assert measures["margin"][i] == pytest.approx(logits[i, labels[i]] - others.max(), abs=1e-5)
    natural, x = run_variant(setup, inner_probe.variants()[inner_probe.NATURAL])
    assert np.all(natural["teacher_kl"] < 1e-6) and not np.array_equal(x, x_adv)


def test_hinge_boundary_term_is_the_teachers_margin_clipped_at_zero():
    teacher_adv = np.array([[1.0, 3.0, -1.0], [2.5, 0.5, 0.0], [0.0, 0.0, 1.0]], np.float32)
    labels = np.array([0, 0, 2])
    views = losses.Views(teacher_adv=teacher_adv)
    np.testing.assert_allclose(losses.boundary_term(views, labels, "hinge"), [0.0, -2.0, -1.0])


@pytest.mark.parametrize("boundary", ["margin", "hinge"])
def test_boundary_term_brings_x_adv_nearer_the_teachers_boundary(setup, boundary):
    """With γ large the attack mostly minimises the term: the measured distance to the boundary must shrink
    (|margin| for 'margin'; its positive part, the distance on the correct side, for 'hinge')."""
    gamma0 = run_variant(setup, inner_probe.variants()["AdaAD (γ=0)"])[0]
    variant = inner_probe.variants(gammas=(16,), boundaries=(boundary,))[f"MMARD {boundary} γ=16"]
    measured = run_variant(setup, variant)[0]
    if boundary == "margin":
        assert measured["abs_margin"].mean() < 0.5 * gamma0["abs_margin"].mean()
    else:
        assert np.maximum(measured["margin"], 0).mean() < 0.5 * np.maximum(gamma0["margin"], 0).mean()
        assert measured["teacher_error"].mean() > gamma0["teacher_error"].mean()


def test_cli_writes_the_table_and_the_plot(setup, tmp_path):
    config, dataset, teacher, *_ = setup
    ckpt_lib.write_variables(tmp_path / "teacher", teacher.variables, {})
    out = tmp_path / "results" / "probe.md"
    args = ["--config", TINY, "--teacher", str(tmp_path / "teacher"), "--student", "init"]
    args += ["--out", str(out), "--num_examples", str(NUM_EXAMPLES), "--boundaries", ""]  # no MMARD rows: fast
    inner_probe.main_cli(args)
    text = out.read_text()
    assert "## Student: init" in text
    for label in (inner_probe.NATURAL, "CE (ARD/IAD)", "RSLAD", "AdaAD (γ=0)"):
        assert f"| {label} |" in text
    assert (tmp_path / "results" / "probe.png").stat().st_size > 0


def test_the_cli_gives_the_probe_one_device_per_core_as_training_has(monkeypatch):
    """The CLI sets main's host device count before JAX's backends start (here: before the data loads, where the
    test stops it); in the test process JAX runs already, so the flag is only read back."""
    from mmard_jax import host_devices

    class Stop(Exception):
        pass

    def stop(_):
        raise Stop

    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv(host_devices.CHOICE_VARIABLE, raising=False)
    monkeypatch.setattr(inner_probe, "load_dataset", stop)
    with pytest.raises(Stop):
        inner_probe.main_cli(["--config", TINY, "--teacher", "unused", "--student", "init"])
    config = inner_probe.load_config(TINY)
    batches = (config.optim.batch_size, config.teacher.optim.batch_size, config.eval.batch_size)
    assert os.environ["XLA_FLAGS"] == f"{host_devices.DEVICE_COUNT_FLAG}={host_devices.default_host_devices(batches)}"
