"""The train step and loop: device-count equivalence, pmap agreement, exact resume, preemption, frozen teacher."""

import copy
import functools
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmard_jax import checkpoint as ckpt_lib
from mmard_jax import parallel, train
from mmard_jax.attacks import per_example_start
from mmard_jax.config import job_plan, model_config
from mmard_jax.data import load_dataset
from mmard_jax.networks import Network, build_module, init_variables

ROOT = os.path.join(os.path.dirname(__file__), "..")


def tiny_config():
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs", "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def digits():
    return load_dataset(tiny_config().data)


def random_teacher(config, dataset, seed=1):
    module = build_module(config.teacher.model, dataset.num_classes)
    return Network(module, init_variables(module, jax.random.PRNGKey(seed), dataset.image_shape))


def make_job(config, workdir, method_name, teacher):
    method_cfg = copy.deepcopy(config.method)
    method_cfg.name = method_name
    plan = job_plan(method_name, method_name, config.student.model, method_cfg, config.attack, config.optim)
    return train.Job(plan, str(workdir), teacher if plan.method.needs_teacher else None)


# ---------------------------------------------------------------------------------------------------------
# One step: 8 devices == 1 device == pmap


def bn_config(method_name):
    config = tiny_config()
    config.student.model = model_config("cnn", widths=(8,), hidden=16, use_bn=True)
    config.method.name = method_name
    config.data.crop_padding = 2  # exercise the on-device augmentation too
    config.data.flip = True
    config.attack.init = "uniform"
    return config


def one_step_setup(method_name, dataset, devices, dtype="float32"):
    config = bn_config(method_name)
    config.dtype = dtype
    teacher = random_teacher(config, dataset)
    job = make_job(config, "/unused", method_name, teacher)
    spec = train.step_spec(job, config, dataset.num_classes, 10)
    plain = build_module(config.student.model, dataset.num_classes)
    variables = init_variables(plain, jax.random.PRNGKey(0), dataset.image_shape)
    state = train.create_train_state(variables, spec.tx, jax.random.PRNGKey(5))
    mesh = parallel.make_mesh(devices)
    return spec, parallel.replicate(state, mesh), parallel.replicate(teacher.variables, mesh), mesh


def run_steps(method_name, dataset, devices, steps=2, batch=32, dtype="float32"):
    spec, state, teacher_vars, mesh = one_step_setup(method_name, dataset, devices, dtype)
    step_fn = train.make_train_step(spec, mesh)
    for i in range(steps):
        images = dataset.train.images[i * batch : (i + 1) * batch]
        labels = dataset.train.labels[i * batch : (i + 1) * batch]
        images, labels = parallel.global_batch((images, labels), mesh)
        state, metrics = step_fn(state, teacher_vars, images, labels)
    return jax.device_get(state), jax.device_get(metrics)


def assert_trees_close(a, b, rtol=2e-4, atol=2e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("method_name", ["mmard", "ard", "trades"])
def test_eight_devices_equal_one_device(method_name, digits):
    assert jax.device_count() == 8
    state8, metrics8 = run_steps(method_name, digits, jax.devices())
    state1, metrics1 = run_steps(method_name, digits, jax.devices()[:1])
    assert_trees_close(state8.params, state1.params)
    assert_trees_close(state8.batch_stats, state1.batch_stats)
    assert_trees_close(metrics8, metrics1, rtol=1e-4, atol=1e-5)
    # and the step did something: parameters moved away from their initial values
    spec, initial, _, _ = one_step_setup(method_name, digits, jax.devices()[:1])
    moved = jax.tree.map(
        lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), state1.params, jax.device_get(initial.params)
    )
    assert max(jax.tree.leaves(moved)) > 1e-4


@pytest.mark.parametrize("method_name", ["mmard", "rslad"])
def test_a_bfloat16_step_stays_close_to_the_float32_step(method_name, digits):
    """The accelerator configs compute in bfloat16 with float32 parameters, losses and optimizer. Two steps from the
    same state: the loss within 1 % and the parameter updates pointing the same way (cosine > 0.995) as float32."""
    before = jax.device_get(one_step_setup(method_name, digits, jax.devices()[:1])[1])
    results = {
        dtype: run_steps(method_name, digits, jax.devices()[:1], dtype=dtype) for dtype in ("float32", "bfloat16")
    }
    (state32, metrics32), (state16, metrics16) = results["float32"], results["bfloat16"]
    assert jax.tree.leaves(state16.params)[0].dtype == np.float32  # parameters stay float32
    assert abs(float(metrics16["loss"]) - float(metrics32["loss"])) <= 0.01 * abs(float(metrics32["loss"]))
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
    update32, update16 = flat(state32.params) - flat(before.params), flat(state16.params) - flat(before.params)
    cosine = update32 @ update16 / (np.linalg.norm(update32) * np.linalg.norm(update16))
    assert cosine > 0.995, cosine


def test_pmap_agrees_with_shard_map(digits):
    spec, state, teacher_vars, mesh = one_step_setup("mmard", digits, jax.devices())
    images, labels = digits.train.images[:32], digits.train.labels[:32]
    body = functools.partial(train.train_step_body, spec)
    pmapped = jax.pmap(body, axis_name=parallel.DATA_AXIS, in_axes=(None, None, 0, 0))
    host_state = jax.device_get(state)
    p_state, p_metrics = pmapped(
        host_state, jax.device_get(teacher_vars), images.reshape(8, 4, *images.shape[1:]), labels.reshape(8, 4)
    )
    s_state, s_metrics = train.make_train_step(spec, mesh)(
        state, teacher_vars, *parallel.global_batch((images, labels), mesh)
    )

    def first(tree):  # device 0's copy of a pmapped result
        return jax.tree.map(lambda x: np.asarray(x)[0], tree)

    assert_trees_close(first(p_state.params), jax.device_get(s_state.params))
    assert_trees_close(first(p_state.batch_stats), jax.device_get(s_state.batch_stats))
    assert_trees_close(first(p_metrics), jax.device_get(s_metrics))


def test_gradient_is_the_global_batch_mean_not_the_sum(digits):
    """With lr 1 and no momentum/decay, one step moves params by exactly -grad of the global-batch loss."""
    config = bn_config("pgd_at")
    config.optim.momentum = 0.0
    config.optim.weight_decay = 0.0
    config.optim.lr = 1.0
    config.attack.steps = 0
    config.data.crop_padding = 0
    config.data.flip = False
    job = make_job(config, "/unused", "pgd_at", None)
    spec = train.step_spec(job, config, digits.num_classes, 10)
    plain = build_module(config.student.model, digits.num_classes)
    variables = jax.device_get(
        init_variables(plain, jax.random.PRNGKey(0), digits.image_shape)
    )  # host copy: the step donates
    state = train.create_train_state(variables, spec.tx, jax.random.PRNGKey(5))
    images, labels = digits.train.images[:32], digits.train.labels[:32]
    x = images.astype(np.float32) / 255.0
    # attack steps = 0 with 'uniform' init: x' is a random point, so compute the reference on the same x'
    mesh = parallel.make_mesh()
    root_key = np.asarray(state.key)  # the step donates the state's buffers
    new_state, _ = train.make_train_step(spec, mesh)(
        parallel.replicate(state, mesh), None, *parallel.global_batch((images, labels), mesh)
    )
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(root_key, 0), i))(jnp.arange(32))
    keys = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
    x_adv = per_example_start(keys[:, 1], jnp.asarray(x), **spec.attack.start)

    def loss(params):
        logits, _ = plain.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x_adv, train=True, mutable=["batch_stats"]
        )
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(32), labels])

    grads = jax.grad(loss)(variables["params"])
    expected = jax.tree.map(lambda p, g: p - g, variables["params"], grads)
    assert_trees_close(jax.device_get(new_state.params), expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The loop: resume, preemption, incompatibility, frozen teacher, learning


def loop_config():
    config = tiny_config()
    config.optim.epochs = 2
    config.checkpoint.every_steps = 7  # not a multiple of the 22 steps per epoch
    config.eval.every_epochs = 1
    return config


def params_of(outcome):
    return jax.device_get(outcome.network.variables)


def test_sigterm_saves_and_resume_is_exact(digits, tmp_path):
    config = loop_config()
    teacher = random_teacher(config, digits)
    mesh = parallel.make_mesh()
    reference = train.train(make_job(config, tmp_path / "full", "rslad", teacher), config, digits, mesh)

    calls = []

    def sigterm_after_first_epoch(network):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"clean_acc": 0.0, "pgd_acc": float(len(calls))}

    job = make_job(config, tmp_path / "interrupted", "rslad", teacher)
    with pytest.raises(train.Preempted):
        train.train(job, config, digits, mesh, eval_fn=sigterm_after_first_epoch)
    steps_per_epoch = digits.train.num_examples // config.optim.batch_size
    saved = ckpt_lib.RunCheckpoints(os.path.join(job.workdir, "checkpoints"))
    assert saved.latest_step() == steps_per_epoch  # SIGTERM during the epoch's evaluation: stopped after its save
    saved.close()
    resumed = train.train(job, config, digits, mesh)
    assert resumed.steps == reference.steps == 2 * steps_per_epoch
    assert_trees_close(params_of(resumed), params_of(reference), rtol=0, atol=0)


def test_incompatible_resume_is_refused(digits, tmp_path):
    config = loop_config()
    config.optim.epochs = 1
    mesh = parallel.make_mesh()
    train.train(make_job(config, tmp_path, "pgd_at", None), config, digits, mesh)
    wider = copy.deepcopy(config)
    wider.student.model = model_config("cnn", widths=(12,), hidden=0)
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match="model"):
        train.train(make_job(wider, tmp_path, "pgd_at", None), wider, digits, mesh)
    other_batch = copy.deepcopy(config)
    other_batch.optim.batch_size = 32
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match="batch_size"):
        train.train(make_job(other_batch, tmp_path, "pgd_at", None), other_batch, digits, mesh)


def test_teacher_is_frozen_and_not_checkpointed(digits, tmp_path):
    config = loop_config()
    config.optim.epochs = 1
    teacher = random_teacher(config, digits)
    before = jax.tree.map(np.array, teacher.variables)
    job = make_job(config, tmp_path, "mmard", teacher)
    outcome = train.train(job, config, digits, mesh=parallel.make_mesh())
    assert_trees_close(teacher.variables, before, rtol=0, atol=0)
    manager = ocp.CheckpointManager(
        os.path.join(tmp_path, "checkpoints"), options=ocp.CheckpointManagerOptions(read_only=True)
    )
    state = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    manager.close()
    student_signature = ckpt_lib.shape_signature(jax.device_get(outcome.network.variables["params"]))
    assert ckpt_lib.shape_signature(state["params"]) == student_signature
    assert set(state) == {"step", "params", "batch_stats", "opt_state", "key"}
    n_teacher = sum(np.size(x) for x in jax.tree.leaves(teacher.variables))
    n_saved = sum(np.size(x) for x in jax.tree.leaves(state))
    n_student_state = sum(np.size(x) for x in jax.tree.leaves(jax.device_get(outcome.network.variables)))
    assert n_saved < n_student_state * 2 + 16 < n_student_state + n_teacher + n_saved  # params + momentum only


def test_training_on_real_digits_lowers_loss_and_raises_pgd_accuracy(digits, tmp_path):
    from mmard_jax import evaluate

    config = tiny_config()
    config.optim.epochs = 4
    config.optim.decay_epochs = ()
    mesh = parallel.make_mesh()
    specs = evaluate.periodic_attacks(config.eval)

    def pgd_accuracy(network):
        acc = evaluate.accuracy(network, digits.test, specs, mesh, batch_size=64)
        return {"clean_acc": acc["clean"], "pgd_acc": acc["pgd"]}

    module = build_module(config.student.model, digits.num_classes)
    initial = pgd_accuracy(Network(module, init_variables(module, jax.random.PRNGKey(0), digits.image_shape)))
    outcome = train.train(make_job(config, tmp_path, "pgd_at", None), config, digits, mesh, eval_fn=pgd_accuracy)
    losses = [r["train_loss"] for r in outcome.epoch_records]
    assert losses[-1] < 0.7 * losses[0]
    assert outcome.epoch_records[-1]["pgd_acc"] > initial["pgd_acc"] + 0.2


def test_periodic_evaluation_reads_only_its_first_examples(digits):
    """A network with all parameters zero gives equal logits, so it predicts class 0 for every input, attacked or not.
    Test labels 0 for the first 30 digits and 1 for the rest: the periodic evaluation scores 1.0 on its first 30
    (eval.periodic_examples = 30), 0.3 on eval.num_examples = 100 (periodic_examples 0, the default) and 30 / N on
    all N."""
    from mmard_jax import main
    from mmard_jax.data.sources import ArraySource

    config = tiny_config()
    labels = np.ones(digits.test.num_examples, np.int32)
    labels[:30] = 0
    dataset = digits._replace(test=ArraySource(digits.test.images, labels), holdout=None)
    module = build_module(config.student.model, dataset.num_classes)
    variables = init_variables(module, jax.random.PRNGKey(0), dataset.image_shape)
    zeros = Network(module, jax.tree.map(jnp.zeros_like, variables))
    mesh = parallel.make_mesh()
    config.eval.batch_size = 16  # 30 digits: the last batch is padded, and padding must not count
    config.eval.periodic_examples = 30
    assert main._periodic_eval(config, dataset, mesh)(zeros) == {"clean_acc": 1.0, "pgd_acc": 1.0}
    config.eval.periodic_examples, config.eval.num_examples = 0, 100  # falls back to the final evaluation's
    assert main._periodic_eval(config, dataset, mesh)(zeros) == {"clean_acc": 0.3, "pgd_acc": 0.3}
    config.eval.num_examples = 0
    everything = main._periodic_eval(config, dataset, mesh)(zeros)
    assert everything == {"clean_acc": 30 / labels.size, "pgd_acc": 30 / labels.size}


def test_divergence_is_caught_before_it_is_saved_and_names_the_run(digits, tmp_path):
    """The learning rate jumps to 1e29 at epoch 2: the first update there overflows the parameters while that step's
    loss (computed before the update) is still finite. The run stops at that step, names itself, and every checkpoint
    left on disk, the newest included, holds finite parameters from before the jump."""
    config = loop_config()
    config.optim.decay_epochs, config.optim.decay_factor = (1,), 1e30
    config.checkpoint.every_steps = 1  # a save after every step: the diverged one must not be among them
    mesh = parallel.make_mesh()
    steps_per_epoch = digits.train.num_examples // config.optim.batch_size
    with pytest.raises(train.NonFiniteLossError, match=rf"pgd_at diverged at step {steps_per_epoch + 1}: param_norm"):
        train.train(make_job(config, tmp_path, "pgd_at", None), config, digits, mesh)
    manager = ocp.CheckpointManager(tmp_path / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True))
    assert manager.latest_step() == steps_per_epoch
    for step in manager.all_steps():
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state["params"])), step
    manager.close()


def test_learning_rate_schedule_switches_at_epoch_boundaries():
    config = tiny_config()
    optim = config.optim
    optim.lr, optim.decay_epochs, optim.decay_factor = 0.1, (2, 3), 0.1
    schedule = train.learning_rate_schedule(optim, steps_per_epoch=5)
    lrs = [float(schedule(s)) for s in range(20)]
    np.testing.assert_allclose(lrs[:10], 0.1, rtol=1e-6)
    np.testing.assert_allclose(lrs[10:15], 0.01, rtol=1e-6)
    np.testing.assert_allclose(lrs[15:], 0.001, rtol=1e-6)
    optim.schedule = "cosine"
    optim.epochs = 4
    cosine = train.learning_rate_schedule(optim, steps_per_epoch=5)
    assert (
        float(cosine(0)) == pytest.approx(0.1)
        and float(cosine(10)) == pytest.approx(0.05)
        and float(cosine(20)) == pytest.approx(0.0, abs=1e-9)
    )


def hand_written_schedule(optim, steps_per_epoch, step):
    """The schedule as the code computed it before it used optax (the values the optax version must keep)."""
    total = max(1, optim.epochs * steps_per_epoch)
    milestones = [int(round(e * steps_per_epoch)) for e in optim.decay_epochs]
    if optim.schedule == "piecewise":
        lr = optim.lr * optim.decay_factor ** sum(step >= b for b in milestones)
    elif optim.schedule == "cosine":
        lr = 0.5 * optim.lr * (1.0 + np.cos(np.pi * min(step, total) / total))
    else:
        lr = optim.lr
    warmup = optim.warmup_epochs * steps_per_epoch
    return lr * min(1.0, (step + 1.0) / warmup) if warmup > 0 else lr


@pytest.mark.parametrize(
    "schedule, decay_epochs, warmup_epochs",
    [
        ("piecewise", (2, 3), 0.0),
        ("piecewise", (), 0.0),
        ("piecewise", (1.5, 3), 1.3),
        ("piecewise", (2,), 1.0),
        ("cosine", (), 0.0),
        ("constant", (), 0.0),
        ("constant", (), 0.7),
    ],
)
def test_optax_schedules_keep_the_hand_written_values(schedule, decay_epochs, warmup_epochs):
    optim = tiny_config().optim
    optim.lr, optim.epochs, optim.decay_factor = 0.1, 4, 0.2
    optim.schedule, optim.decay_epochs, optim.warmup_epochs = schedule, decay_epochs, warmup_epochs
    lr_at = train.learning_rate_schedule(optim, steps_per_epoch=10)
    for step in range(45):
        assert float(lr_at(step)) == pytest.approx(hand_written_schedule(optim, 10, step), rel=1e-6, abs=1e-8), step


def test_cosine_after_warm_up_counts_from_step_zero():
    """With warm-up, cosine differs from the old product only inside the warm-up (a ramp to lr, not to cos·lr)."""
    optim = tiny_config().optim
    optim.lr, optim.epochs, optim.schedule, optim.warmup_epochs = 0.1, 4, "cosine", 1.0
    lr_at = train.learning_rate_schedule(optim, steps_per_epoch=10)
    for step in range(9, 45):
        assert float(lr_at(step)) == pytest.approx(hand_written_schedule(optim, 10, step), rel=1e-6, abs=1e-8), step
    assert [float(lr_at(s)) for s in range(9)] == pytest.approx([0.1 * (s + 1) / 10 for s in range(9)], rel=1e-6)


def test_optimizer_matches_pytorch_sgd_with_coupled_weight_decay():
    """Hand-rolled torch.optim.SGD update: buf = m*buf + (g + wd*p); p -= lr*buf."""
    config = tiny_config()
    optim = config.optim
    optim.lr, optim.momentum, optim.weight_decay, optim.decay_epochs = 0.1, 0.9, 0.01, ()
    tx = train.make_optimizer(optim, steps_per_epoch=10)
    params = {"w": jnp.array([1.0, -2.0])}
    grads = [jnp.array([0.5, 0.25]), jnp.array([-1.0, 2.0])]
    opt_state = tx.init(params)
    p, buf = np.array([1.0, -2.0]), np.zeros(2)
    for g in grads:
        updates, opt_state = tx.update({"w": g}, opt_state, params)
        params = jax.tree.map(lambda a, b: a + b, params, updates)
        buf = 0.9 * buf + (np.asarray(g) + 0.01 * p)
        p = p - 0.1 * buf
    np.testing.assert_allclose(np.asarray(params["w"]), p, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The entry point, as a user runs it


def run_main(workdir, *overrides):
    command = [
        sys.executable,
        "-m",
        "mmard_jax.main",
        "--config",
        os.path.join(ROOT, "configs", "tiny.py"),
        "--workdir",
        str(workdir),
        *overrides,
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _pids_with(*fragments: str) -> list[int]:
    """PIDs of this machine's processes whose command line contains every fragment."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if entry.isdigit() and all(fragment in command for fragment in fragments):
            pids.append(int(entry))
    return pids


def _launch(workdir, overrides):
    env = {**os.environ, "PYTHON": sys.executable, "PORT": str(_free_port()), "DEVICES_PER_PROCESS": "1"}
    command = [
        "bash",
        os.path.join(ROOT, "launch", "local_multiprocess.sh"),
        "2",
        os.path.join(ROOT, "configs", "tiny.py"),
        str(workdir),
        *overrides,
    ]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_train_exactly_like_one_process_with_two_devices(tmp_path):
    """Multi-host data parallelism through the launch script: 2 processes x 1 CPU device (jax.distributed, gloo)
    train the teacher and distil the student of 1 process x 2 devices (same global batch); their checkpoints load
    into a process of another topology (this one, 8 devices)."""
    overrides = (
        "--config.stages=teacher,distill",
        "--config.baselines=",
        "--config.teacher.optim.epochs=1",
        "--config.optim.epochs=1",
        "--config.checkpoint.every_steps=8",
    )
    single = run_main(tmp_path / "single", *overrides)
    output, _ = single.communicate(timeout=600)
    assert single.returncode == 0, output
    multi = _launch(tmp_path / "multi", overrides)
    output, _ = multi.communicate(timeout=600)
    assert multi.returncode == 0, output
    assert "process 1 of 2, 1 local / 2 global devices" in output
    for run in ("teacher", os.path.join("students", "mmard")):
        expected, expected_meta = ckpt_lib.load_variables(str(tmp_path / "single" / run / "checkpoints"), "latest")
        found, found_meta = ckpt_lib.load_variables(str(tmp_path / "multi" / run / "checkpoints"), "latest")
        assert found_meta["step"] == expected_meta["step"] > 0
        assert_trees_close(found, expected)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_the_same_step_and_resume_is_exact(tmp_path):
    """2 processes (launch script): SIGTERM to process 1 only. JAX's preemption sync point makes both save the same
    step and exit 75 within a bounded time; running again resumes there and ends where an uninterrupted run ends."""
    overrides = ("--config.stages=teacher", "--config.teacher.optim.epochs=12", "--config.checkpoint.every_steps=1000")
    reference = run_main(tmp_path / "reference", *overrides)
    output, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, output

    workdir = tmp_path / "multi"
    launcher = _launch(workdir, overrides)
    metrics = workdir / "teacher" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"kind": "epoch"') >= 3):
        time.sleep(0.2)
    [process_1] = _pids_with(str(workdir), "--config.parallel.process_id=1")
    signalled = time.time()
    os.kill(process_1, signal.SIGTERM)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == train.PREEMPTED_EXIT_CODE, output
    assert time.time() - signalled < 120
    stopped = re.findall(r"teacher: preempted at step (\d+)", output)
    assert len(stopped) == 2 and stopped[0] == stopped[1], output  # both processes, the same step
    step = int(stopped[0])
    assert 0 < step < 12 * 24
    assert ckpt_lib.load_variables(str(workdir / "teacher" / "checkpoints"), "latest")[1]["step"] == step

    resumed = _launch(workdir, overrides)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert f"resuming at step {step} of 288" in output
    expected, expected_meta = ckpt_lib.load_variables(str(tmp_path / "reference" / "teacher" / "checkpoints"), "latest")
    found, found_meta = ckpt_lib.load_variables(str(workdir / "teacher" / "checkpoints"), "latest")
    assert found_meta["step"] == expected_meta["step"] == 288
    assert_trees_close(found, expected)


def test_profile_steps_write_a_trace_of_those_steps(digits, tmp_path):
    config = tiny_config()
    config.profile_steps = "2,4"
    config.optim.epochs = 1
    train.train(make_job(config, tmp_path, "pgd_at", None), config, digits, mesh=parallel.make_mesh())
    runs = list((tmp_path / "profile" / "plugins" / "profile").iterdir())
    assert len(runs) == 1
    assert list(runs[0].glob("*.xplane.pb")) and list(runs[0].glob("*.trace.json.gz"))


@pytest.mark.slow
def test_main_end_to_end_on_the_tiny_config(tmp_path):
    cache = tmp_path / "xla_cache"
    process = run_main(
        os.path.relpath(tmp_path, ROOT), f"--config.compilation_cache_dir={cache}"
    )  # a relative --workdir, as users type it
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    assert any(name.endswith("-cache") for name in os.listdir(cache))  # compiled programs kept for the next run
    for path in (
        "results.json",
        "results.md",
        "curves.png",
        "teacher/metrics.jsonl",
        "students/mmard/metrics.jsonl",
        "students/rslad/checkpoints",
    ):
        assert os.path.exists(tmp_path / path), path
    assert os.listdir(tmp_path / "students" / "mmard" / "tensorboard")
    import json

    summary = json.load(open(tmp_path / "results.json"))
    assert summary["devices"] == {"count": 2, "platform": "cpu"}  # run_main's XLA_FLAGS
    results = summary["results"]
    assert set(results) == {"teacher", "rslad", "mmard"}
    for row in results.values():
        acc = row["accuracy"]
        assert 0.0 <= acc["pgd"] <= acc["clean"] <= 1.0 and acc["fgsm"] <= acc["clean"]
    assert "| mmard |" in output  # the table is printed


@pytest.mark.slow
def test_sigkill_mid_run_keeps_a_good_checkpoint_and_resumes(tmp_path):
    overrides = ("--config.stages=teacher", "--config.teacher.optim.epochs=6", "--config.checkpoint.every_steps=3")
    process = run_main(tmp_path, *overrides)
    latest = tmp_path / "teacher" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        steps = [d for d in os.listdir(latest) if d.isdigit()] if latest.exists() else []
        if len(steps) >= 2:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[0]
    process.send_signal(signal.SIGKILL)
    process.wait()
    manager = ocp.CheckpointManager(str(latest), options=ocp.CheckpointManagerOptions(read_only=True))
    killed_at = manager.latest_step()
    assert killed_at is not None and killed_at < 6 * 22
    restored = manager.restore(killed_at, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    manager.close()
    assert int(restored["step"]) == killed_at
    process = run_main(tmp_path, *overrides)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    assert f"resuming at step {killed_at}" in output
