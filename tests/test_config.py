"""Configs: every shipped file loads and validates, CLI overrides reach nested fields, bad values name their field."""

import os
import re

import pytest
from absl import flags
from ml_collections import config_flags

from mmard_jax import config as config_lib
from mmard_jax.attacks import PGDSpec
from mmard_jax.checks import InvalidValue
from mmard_jax.data import pipeline
from mmard_jax.models import create_model

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
ACCELERATOR = ("cifar10_gpu.py", "cifar10_tpu.py", "cifar100_gpu.py", "cifar100_tpu.py")
SHIPPED = ("cifar10.py", "cifar100.py", "mnist5k.py", "tiny.py", *ACCELERATOR)


def parse(config_file: str, *overrides: str):
    """Parses ``--config FILE --config.x=y ...`` exactly as the entry point does."""
    argv = ["prog", f"--config={os.path.join(CONFIG_DIR, config_file)}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate(name):
    config_lib.validate(parse(name), device_count=8)


def test_reference_values_of_cifar_configs():
    c10, c100 = parse("cifar10.py"), parse("cifar100.py")
    assert (c10.optim.lr, c10.optim.weight_decay, c10.optim.epochs) == (0.1, 2e-4, 300)
    assert tuple(c10.optim.decay_epochs) == (215, 260, 285)
    assert c10.attack.eps == pytest.approx(8 / 255) and c10.attack.step_size == pytest.approx(2 / 255)
    assert c10.attack.steps == 10 and c10.optim.batch_size == 128
    assert c10.student.model.name == "resnet18" and c10.teacher.model.name == "wrn-34-10"
    assert c10.method.kl_reduction == "mean" and c100.method.kl_reduction == "batchmean"
    assert c100.data.name == "cifar100"


@pytest.mark.parametrize("name", ACCELERATOR)
def test_accelerator_configs_change_only_what_the_hardware_needs(name):
    """The recipe (losses, attack, optimiser, data) is the CPU-agnostic config's; compute dtype, loop unrolling,
    evaluation batch and compilation cache are the accelerator's."""
    base = parse(name.split("_")[0] + ".py").to_dict()
    accelerated = parse(name).to_dict()
    changed = {
        (section, key)
        for section, values in accelerated.items()
        for key in (values if isinstance(values, dict) else [None])
        if (base[section] if key is None else base[section][key]) != (values if key is None else values[key])
    }
    hardware = {
        ("dtype", None),
        ("compilation_cache_dir", None),
        ("eval", "unroll"),
        ("eval", "batch_size"),
        ("attack", "unroll"),
        ("teacher", "attack"),
    }
    assert {("dtype", None), ("compilation_cache_dir", None), ("eval", "batch_size")} <= changed <= hardware
    assert accelerated["teacher"]["attack"] == {**base["teacher"]["attack"], "unroll": 1}
    assert accelerated["dtype"] == "bfloat16" and accelerated["attack"]["unroll"] == 1
    assert accelerated["teacher"]["attack"]["unroll"] == 1
    assert accelerated["compilation_cache_dir"] == "{workdir}/xla_cache"


def test_overrides_reach_nested_fields():
    config = parse(
        "cifar10.py",
        "--config.optim.epochs=7",
        "--config.method.name=rslad",
        "--config.method.mi_beta=0.25",
        "--config.data.source=cifar_archive",
        "--config.attack.unroll=10",
    )
    assert config.optim.epochs == 7
    assert config.method.name == "rslad"
    assert config.method.mi_beta == 0.25
    assert config.data.source == "cifar_archive"
    assert config.attack.unroll == 10


def test_unknown_override_field_is_refused():
    with pytest.raises(Exception, match="epochz"):
        parse("cifar10.py", "--config.optim.epochz=3")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("student.model.name", "resnet19", "config.student.model.name"),
        ("teacher.model.name", "vgg", "config.teacher.model.name"),
        ("method.name", "fancy", "config.method.name"),
        ("teacher.method.name", "rslad", "config.teacher.method.name"),
        ("attack.eps", -0.1, "config.attack.eps"),
        ("attack.eps", 1.5, "config.attack.eps"),
        ("attack.step_size", 0.0, "config.attack.step_size"),
        ("teacher.attack.step_size", -1.0, "config.teacher.attack.step_size"),
        ("attack.init", "gaussian", "config.attack.init"),
        ("optim.batch_size", 100, "config.optim.batch_size"),
        ("eval.batch_size", 12, "config.eval.batch_size"),
        ("data.source", "imagenet_folder", "config.data.source"),
        ("method.kl_reduction", "avg", "config.method.kl_reduction"),
        ("method.boundary", "distance", "config.method.boundary"),
        ("method.teacher_vertex", "both", "config.method.teacher_vertex"),
        ("method.tau_mi", 0.0, "config.method.tau_mi"),
        ("method.gamma", -1.0, "config.method.gamma"),
        ("optim.schedule", "step", "config.optim.schedule"),
        ("stages", "teacher,finetune", "config.stages"),
        ("baselines", "rslad,unknown", "config.baselines"),
        ("eval.checkpoint", "first", "config.eval.checkpoint"),
        ("dtype", "float16", "config.dtype"),
        ("teacher.method.trades_beta", -1.0, "config.teacher.method.trades_beta"),
        ("stages", " , ", "config.stages"),
        ("eval.every_epochs", 0, "config.eval.every_epochs"),
        ("eval.periodic_examples", -5, "config.eval.periodic_examples"),
        ("log.every_steps", 0, "config.log.every_steps"),
        ("eval.periodic_pgd_steps", 0, "config.eval.periodic_pgd_steps"),
        ("eval.cw_kappa", -1.0, "config.eval.cw_kappa"),
        ("optim.momentum", -0.5, "config.optim.momentum"),
        ("optim.momentum", float("nan"), "config.optim.momentum"),
        ("teacher.optim.decay_factor", -0.1, "config.teacher.optim.decay_factor"),
        ("optim.warmup_epochs", -1.0, "config.optim.warmup_epochs"),
        ("optim.grad_clip_norm", -1.0, "config.optim.grad_clip_norm"),
        ("parallel.num_processes", 2, "config.parallel.coordinator_address"),
        ("profile_steps", "10", "config.profile_steps"),
        ("profile_steps", "20,10", "config.profile_steps"),
        ("profile_steps", "a,b", "config.profile_steps"),
        ("eval.pgd_step_size", 1e-4, "config.eval.pgd_step_size"),  # 20 steps cannot reach 8/255
        ("attack.steps", 2, "config.attack.step_size"),  # 2 x 2/255 cannot reach 8/255
    ],
)
def test_validation_names_the_bad_field(field, value, message):
    config = parse("cifar10.py")
    config.method.mmard_base, config.method.mmard_parts = "adaad", "both"  # a student method reading every MMARD field
    node = config
    *parents, leaf = field.split(".")
    for part in parents:
        node = getattr(node, part)
    setattr(node, leaf, value)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        config_lib.validate(config, device_count=8)


def test_batch_size_must_divide_over_devices():
    config = parse("mnist5k.py")
    config_lib.validate(config, device_count=8)  # 64 over 8 devices
    with pytest.raises(ValueError, match=r"optim\.batch_size.*device count \(3\)"):
        config_lib.validate(config, device_count=3)


def test_mmard_parts_need_a_distillation_base():
    config = parse("cifar10.py", "--config.method.name=pgd_at", "--config.method.mmard_outer=True")
    with pytest.raises(ValueError, match=r"config\.method\.mmard"):
        config_lib.validate(config, device_count=1)


def test_validate_returns_the_run_plan_with_each_method_built_once():
    plan = config_lib.validate(parse("mnist5k.py"))
    assert plan.stages == ("teacher", "distill", "eval") and plan.distillation_needs_teacher
    assert (plan.teacher.name, plan.teacher.run_dir, plan.teacher.method.name) == ("teacher", "teacher", "trades")
    assert [(j.name, j.run_dir) for j in plan.students] == [
        ("pgd_at", "students/pgd_at"),
        ("rslad", "students/rslad"),
        ("mmard", "students/mmard"),
    ]
    assert [j.method.needs_teacher for j in plan.students] == [False, True, True]
    assert all(j.model.name == "cnn" and j.optim.epochs == 10 for j in plan.students)
    config = parse(
        "mnist5k.py",
        "--config.method.name=rslad",
        "--config.method.mmard_outer=True",
        "--config.baselines=rslad,adaad",
        "--config.stages=distill",
    )
    plan = config_lib.validate(config)
    assert [j.name for j in plan.students] == ["rslad", "adaad"]  # the main method is not trained twice
    assert plan.students[0].method_cfg.mmard_outer and not plan.students[1].method_cfg.mmard_outer


def test_student_methods_put_baselines_first_without_repeats():
    config = parse("mnist5k.py", "--config.baselines=pgd_at,rslad,mmard")
    assert config_lib.student_methods(config) == ("pgd_at", "rslad", "mmard")


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: config_lib.validate(parse("tiny.py", "--config.optim.lr=-1")), "config.optim.lr"),
        (
            lambda: config_lib.job_plan(
                "x", "x", None, parse("tiny.py", "--config.method.tau_mi=0").method, None, None
            ),
            "config.method.tau_mi",
        ),
        (lambda: create_model("wide_resnet", 10, widen_factor=0), "widen_factor"),
        (lambda: pipeline.steps_per_epoch(100, 0), "global_batch_size"),
        (lambda: PGDSpec(eps=0.1, step_size=0.1, steps=1, norm="l1"), "norm"),
    ],
)
def test_every_layer_refuses_bad_values_in_one_dialect(call, field):
    """Config, methods, models, pipeline and attacks: the same error type, the message starting with the field."""
    with pytest.raises(InvalidValue) as error:
        call()
    assert str(error.value).startswith(f"{field}: ")


def test_default_host_devices_one_per_core_dividing_every_batch():
    from mmard_jax import host_devices

    assert host_devices.default_host_devices([128, 256], cores=2) == 2
    assert host_devices.default_host_devices([128, 256], cores=16) == 8  # capped
    assert host_devices.default_host_devices([128, 200], cores=16) == 8
    assert host_devices.default_host_devices([64, 100], cores=8) == 4  # 100 = 4 * 25
    assert host_devices.default_host_devices([33], cores=8) == 1
    assert host_devices.default_host_devices([128], cores=3) == 2  # a power of two no larger than the cores
    env = {"XLA_FLAGS": "--xla_cpu_use_xnnpack=true"}
    assert host_devices.set_default_host_devices([128], env) in (1, 2, 4, 8)
    assert "--xla_force_host_platform_device_count=" in env["XLA_FLAGS"] and "xnnpack" in env["XLA_FLAGS"]
    user = {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
    assert host_devices.set_default_host_devices([128], user) is None and user["XLA_FLAGS"].endswith("=3")


@pytest.mark.parametrize(
    "choice, expected",
    [(None, 2), ("auto", 2), ("1", 1), ("4", 4), (" 2 ", 2)],
)
def test_host_devices_default_to_one_per_core_unless_the_variable_names_a_count(monkeypatch, choice, expected):
    from mmard_jax import host_devices

    monkeypatch.setattr(host_devices, "usable_cores", lambda: 2)
    env = {} if choice is None else {host_devices.CHOICE_VARIABLE: choice}
    assert host_devices.set_default_host_devices([128, 200], env) == expected
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count={expected}"


@pytest.mark.parametrize("choice", ["0", "two", "-1", "1.5"])
def test_a_bad_host_device_choice_is_refused_even_when_xla_flags_set_the_count(choice):
    from mmard_jax import host_devices

    env = {host_devices.CHOICE_VARIABLE: choice, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    with pytest.raises(ValueError, match=f"MMARD_JAX_HOST_DEVICES='{re.escape(choice)}'"):
        host_devices.set_default_host_devices([128], env)


def test_records_made_before_a_field_existed_match_its_historical_value():
    old = {"config.method.name": "mmard", "config.method.gamma": 1.0}  # recorded before mmard_base / mmard_parts
    same = {**old, "config.method.mmard_base": "adaad", "config.method.mmard_parts": "both"}
    assert config_lib.changed_settings(old, same) == []
    other = {**same, "config.method.mmard_base": "rslad"}
    assert config_lib.changed_settings(old, other) == [("config.method.mmard_base", "adaad", "rslad")]
    # Other methods do not read the MMARD-only fields: a TRADES teacher or an RSLAD student recorded before them
    # matches whatever the new defaults are.
    teacher = {"config.teacher.method.name": "trades"}
    assert config_lib.changed_settings(teacher, {**teacher, "config.teacher.method.mmard_base": "iad"}) == []
    student = {"method.name": "rslad", "method.mmard_parts": "both"}
    assert config_lib.changed_settings(student, {**student, "method.mmard_parts": "outer"}) == []
    assert config_lib.changed_settings(student, {**student, "method.name": "mmard", "method.mmard_parts": "outer"}) == [
        ("method.mmard_parts", "both", "outer"),
        ("method.name", "rslad", "mmard"),
    ]
    # Any other field missing on one side is a difference, named with '(absent)'.
    assert config_lib.changed_settings(old, {**same, "config.method.tau": 2.0}) == [
        ("config.method.tau", "(absent)", 2.0)
    ]
    assert config_lib.changed_settings({**old, "config.seed": 0}, same) == [("config.seed", 0, "(absent)")]


def test_a_checkpoint_recorded_before_a_field_existed_resumes_only_with_its_historical_value():
    from mmard_jax import checkpoint, train

    fixed = {"model": {"name": "cnn"}, "batch_size": 8, "num_train_examples": 64, "seed": 0, "step": 4}
    saved = {**fixed, "trajectory": {"config.method.name": "mmard"}}  # an MMARD run of the AdaAD + both days

    def resume(**trajectory):
        current = {**fixed, "trajectory": {"config.method.name": "mmard", **trajectory}}
        train.check_resumable(saved, current, "runs/x", total_steps=8, epochs_field="optim.epochs")

    resume(**{"config.method.mmard_base": "adaad", "config.method.mmard_parts": "both"})
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="mmard_base: checkpoint 'adaad', this run 'iad'"):
        resume(**{"config.method.mmard_base": "iad", "config.method.mmard_parts": "outer"})
