"""docs/extending.md runs as written: its python blocks register a method that validates, builds and trains.

Also the rules of `methods.register_method`. Every test restores the registry, so other tests see the built-ins.
"""

import importlib.machinery
import importlib.util
import os
import re

import jax
import numpy as np
import pytest

from mmard_jax import config as config_lib
from mmard_jax import losses, methods, parallel, train
from mmard_jax.data import load_dataset
from mmard_jax.networks import Network, build_module, init_variables

ROOT = os.path.join(os.path.dirname(__file__), "..")
DOC = os.path.join(ROOT, "docs", "extending.md")


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    """Registrations made by a test are undone after it."""
    monkeypatch.setattr(methods, "_REGISTERED", dict(methods._REGISTERED))
    monkeypatch.setattr(methods, "METHOD_NAMES", methods.METHOD_NAMES)


def load_file(name, path):
    """What ml_collections' --config flag does with a config file."""
    loader = importlib.machinery.SourceFileLoader(name, path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    loader.exec_module(module)
    return module


@pytest.fixture
def doc_config_module(tmp_path, monkeypatch):
    """The doc's python blocks saved, in order, as the config file the doc describes, and loaded."""
    with open(DOC, encoding="utf-8") as f:
        blocks = re.findall(r"^```python\n(.*?)^```$", f.read(), flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) == 3  # the loss, the registry entry, the config
    path = tmp_path / "rslad_js.py"
    path.write_text("\n\n".join(blocks), encoding="utf-8")
    monkeypatch.syspath_prepend(ROOT)  # `from configs import mnist5k`, as when run from the repository root
    return load_file("rslad_js", str(path))


def test_the_doc_method_registers_validates_and_composes(doc_config_module):
    config = doc_config_module.get_config()
    assert "rslad_js" in methods.METHOD_NAMES and config.method.name == "rslad_js"
    config_lib.validate(config)  # names from the registry pass validation, as main method and as baseline
    config.baselines, config.method.name = "rslad_js", "mmard"
    config_lib.validate(config)
    assert methods.build_method(config_lib.student_method_config(config, "rslad_js")).name == "rslad_js"
    config.method.name, config.method.mmard_outer = "rslad_js", True
    composed = methods.build_method(config.method)
    assert composed.name == "rslad_js+mmard_outer" and "teacher_adv" in composed.outer_views


def test_the_doc_method_trains_through_the_real_train_step(doc_config_module):
    """Two steps of the real (jit + shard_map) train step on the tiny digits config, with the doc's method section."""
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs", "tiny.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    config = tiny.get_config()
    config.method = doc_config_module.get_config().method
    dataset = load_dataset(config.data)
    teacher_module = build_module(config.teacher.model, dataset.num_classes)
    teacher = Network(teacher_module, init_variables(teacher_module, jax.random.PRNGKey(1), dataset.image_shape))
    plan = config_lib.job_plan(
        "rslad_js", "students/rslad_js", config.student.model, config.method, config.attack, config.optim
    )
    job = train.Job(plan, "/unused", teacher)
    step_spec = train.step_spec(job, config, dataset.num_classes, steps_per_epoch=10)
    student = build_module(config.student.model, dataset.num_classes)
    variables = init_variables(student, jax.random.PRNGKey(0), dataset.image_shape)
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = parallel.replicate(train.create_train_state(variables, step_spec.tx, jax.random.PRNGKey(5)), mesh)
    initial = jax.device_get(state.params)
    step = train.make_train_step(step_spec, mesh)
    for i in range(2):
        batch = (dataset.train.images[32 * i : 32 * (i + 1)], dataset.train.labels[32 * i : 32 * (i + 1)])
        state, metrics = step(state, parallel.replicate(teacher.variables, mesh), *parallel.global_batch(batch, mesh))
    metrics = jax.device_get(metrics)
    assert {"js_adv", "js_nat"} <= set(metrics) and np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert 0 < metrics["js_adv"] <= np.log(2)  # τ = 1: JS is bounded by log 2
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), jax.device_get(state.params), initial)
    assert max(jax.tree.leaves(moved)) > 1e-4


def builder(outer_views=("student_nat", "student_adv", "teacher_nat"), needs_teacher=True):
    """A builder of RSLAD under another name, with the given declarations (sets, not frozensets)."""
    return lambda cfg: methods.Method(
        name="custom",
        inner_loss=losses.rslad_inner,
        outer_loss=methods.bind(losses.rslad_outer, adv_weight=0.5, reduction="mean"),
        inner_views={"student_adv", "teacher_nat"},
        outer_views=set(outer_views),
        attack_student_train_mode=False,
        needs_teacher=needs_teacher,
    )


def test_register_method_rules():
    for name in ("rslad", "mmard"):
        with pytest.raises(ValueError, match="built-in"):
            methods.register_method(name, builder())
    for name in ("", "a,b", "students/x", "rslad+mmard_outer"):
        with pytest.raises(ValueError, match="identifier"):
            methods.register_method(name, builder())
    methods.register_method("custom", builder(needs_teacher=False))
    methods.register_method("custom", builder())  # a config file loaded twice: the last builder wins
    assert methods.METHOD_NAMES == methods.BUILTIN_METHOD_NAMES + ("custom",)
    method = methods.build_method(config_lib.method_config("custom"))
    assert method.needs_teacher and hash(method) == hash(methods.build_method(config_lib.method_config("custom")))

    methods.register_method("typo", builder(outer_views=("student_adv", "teacher_natural")))
    with pytest.raises(ValueError, match="teacher_natural"):
        methods.build_method(config_lib.method_config("typo"))
    methods.register_method("teacher_free", builder(needs_teacher=False))
    cfg = config_lib.method_config("teacher_free")
    cfg.mmard_inner = True
    with pytest.raises(ValueError, match="config.method.mmard_inner.*need a teacher"):
        methods.build_method(cfg)
