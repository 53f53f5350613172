"""Train state, the per-device train step (adversarial training and distillation alike) and the training loop.

The step is written per device, like pmap code (``lax.pmean(..., 'data')``), and mapped over the 1-axis mesh with
``jax.jit(jax.shard_map(..., check_vma=False))``: gradients inside the body are the local ones, and the explicit
``pmean`` makes them the global-batch mean (with ``check_vma=True`` JAX would already have summed them).
The step never branches on a method's name: the method declares which logits its losses read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from mmard_jax import checkpoint as ckpt_lib
from mmard_jax import parallel, reporting, storage
from mmard_jax.attacks import PGDSpec, example_keys, per_example_start, pgd
from mmard_jax.config import JobPlan
from mmard_jax.data import augment, pipeline
from mmard_jax.methods import Method, Views
from mmard_jax.networks import Network, abstract_variables, build_module, inference_logits, init_variables

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: state saved, run the same command again to resume

logger = logging.getLogger(__name__)


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes during training; the teacher is never part of it."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    batch_stats: Any
    opt_state: Any
    key: jax.Array  # the run's root PRNG key (uint32[2]); per-step keys fold in the step and example index


class NonFiniteLossError(RuntimeError):
    """Raised when a loss term becomes NaN or infinite; the last good checkpoint is kept."""


class Preempted(RuntimeError):
    """Raised after SIGTERM once the state has been saved."""


# ----------------------------------------------------------------------------------------------------------
# Optimisation


def learning_rate_schedule(optim_cfg, steps_per_epoch: int) -> optax.Schedule:
    """step -> learning rate (optax schedules); milestones are given in epochs and switch at that epoch's first step.

    Warm-up (``warmup_epochs`` = W steps): ``lr · (step + 1) / W`` until it reaches ``lr``, then the schedule, which
    keeps counting from step 0 (a decay milestone stays where the config puts it).
    """
    base = optim_cfg.lr
    if optim_cfg.schedule == "piecewise":
        milestones = {int(round(e * steps_per_epoch)): optim_cfg.decay_factor for e in optim_cfg.decay_epochs}
        schedule = optax.piecewise_constant_schedule(base, milestones)
    elif optim_cfg.schedule == "cosine":
        schedule = optax.cosine_decay_schedule(base, decay_steps=max(1, optim_cfg.epochs * steps_per_epoch))
    else:
        schedule = optax.constant_schedule(base)
    warmup = optim_cfg.warmup_epochs * steps_per_epoch
    ramp_steps = math.ceil(warmup - 1)  # the first step at which (step + 1) / W >= 1
    if ramp_steps <= 0:
        return schedule
    ramp = optax.linear_schedule(base / warmup, base * (ramp_steps + 1) / warmup, transition_steps=ramp_steps)
    return optax.join_schedules([ramp, lambda step: schedule(step + ramp_steps)], [ramp_steps])


def make_optimizer(optim_cfg, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with momentum and PyTorch-style coupled weight decay (g + wd * w, then momentum)."""
    parts = []
    if optim_cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
    if optim_cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(optim_cfg.weight_decay))
    parts.append(
        optax.sgd(
            learning_rate_schedule(optim_cfg, steps_per_epoch),
            momentum=optim_cfg.momentum or None,
            nesterov=optim_cfg.nesterov,
        )
    )
    return optax.chain(*parts)


def create_train_state(variables: dict, tx: optax.GradientTransformation, key) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        key=key,
    )


# ----------------------------------------------------------------------------------------------------------
# The per-device step


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The static description of one train step (hashable; closed over by the jitted program)."""

    student: nn.Module
    teacher: nn.Module | None
    method: Method
    tx: optax.GradientTransformation
    steps_per_epoch: int
    attack: PGDSpec  # the inner maximisation (its init: the start drawn per example before the loop)
    crop_padding: int
    flip: bool
    axis_name: str = parallel.DATA_AXIS


def student_forward(module: nn.Module, params, batch_stats, x, train: bool):
    """(logits, batch_stats): train=True normalises with batch statistics and returns the updated running ones."""
    variables = {"params": params, "batch_stats": batch_stats}
    if not train:
        return module.apply(variables, x, train=False), batch_stats
    logits, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    return logits, updates.get("batch_stats", batch_stats)


def augment_images(spec: StepSpec, keys, images_uint8):
    """Float images in [0, 1], each cropped and flipped with its own key."""
    return augment.augment_batch(keys, augment.to_float(images_uint8), crop_padding=spec.crop_padding, flip=spec.flip)


def adversarial_examples(spec: StepSpec, state: TrainState, teacher_vars, x, labels, keys, teacher_nat):
    """Runs the method's inner maximisation (PGD) from a per-example random start."""
    needs = spec.method.inner_views
    student_nat = None
    if "student_nat" in needs:
        student_nat = lax.stop_gradient(student_forward(spec.student, state.params, state.batch_stats, x, False)[0])

    def inner(x_adv):
        student_adv = teacher_adv = None
        if "student_adv" in needs:
            train_mode = spec.method.attack_student_train_mode
            student_adv = student_forward(spec.student, state.params, state.batch_stats, x_adv, train_mode)[0]
        if "teacher_adv" in needs:
            teacher_adv = inference_logits(spec.teacher, teacher_vars, x_adv)
        views = Views(
            student_nat=student_nat, student_adv=student_adv, teacher_nat=teacher_nat, teacher_adv=teacher_adv
        )
        return spec.method.inner_loss(views, labels)

    x_init = per_example_start(keys, x, **spec.attack.start)  # device-count independent
    return pgd(inner, x, None, **dataclasses.replace(spec.attack, init="none").kwargs, x_init=x_init)


def _accuracy(logits, labels):
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def outer_objective(params, spec: StepSpec, batch_stats, teacher_vars, x, x_adv, labels, epoch, teacher_nat):
    """The method's outer loss on the student (train mode) with the frozen teacher's logits."""
    needs = spec.method.outer_views
    stats = batch_stats
    student_adv = student_nat = teacher_adv = None
    metrics = {}
    if "student_adv" in needs:
        student_adv, stats = student_forward(spec.student, params, stats, x_adv, True)
        metrics["accuracy_adv"] = _accuracy(student_adv, labels)
    if "student_nat" in needs:
        student_nat, stats = student_forward(spec.student, params, stats, x, True)
        metrics["accuracy_nat"] = _accuracy(student_nat, labels)
    if "teacher_adv" in needs:
        teacher_adv = lax.stop_gradient(inference_logits(spec.teacher, teacher_vars, x_adv))
    views = Views(student_nat=student_nat, student_adv=student_adv, teacher_nat=teacher_nat, teacher_adv=teacher_adv)
    loss, terms = spec.method.outer_loss(views, labels, epoch)
    return loss, ({**terms, **metrics}, stats)


def train_step_body(spec: StepSpec, state: TrainState, teacher_vars, images, labels):
    """One optimizer step on this device's slice of the global batch (to be mapped over the 'data' axis)."""
    num_local = images.shape[0]
    global_index = lax.axis_index(spec.axis_name) * num_local + jnp.arange(num_local)  # results independent of devices
    keys = example_keys(jax.random.fold_in(state.key, state.step), global_index)
    keys = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
    x = augment_images(spec, keys[:, 0], images)
    epoch = state.step // spec.steps_per_epoch
    needs_teacher_nat = "teacher_nat" in spec.method.inner_views | spec.method.outer_views
    teacher_nat = lax.stop_gradient(inference_logits(spec.teacher, teacher_vars, x)) if needs_teacher_nat else None
    x_adv = adversarial_examples(spec, state, teacher_vars, x, labels, keys[:, 1], teacher_nat)

    grad_fn = jax.value_and_grad(outer_objective, has_aux=True)
    (loss, (metrics, batch_stats)), grads = grad_fn(
        state.params, spec, state.batch_stats, teacher_vars, x, x_adv, labels, epoch, teacher_nat
    )
    grads = lax.pmean(grads, spec.axis_name)
    batch_stats = lax.pmean(batch_stats, spec.axis_name)  # identity when BatchNorm already syncs over the axis
    updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = lax.pmean({"loss": loss, **metrics}, spec.axis_name)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics


def make_train_step(spec: StepSpec, mesh):
    """jit(shard_map(body)) over the mesh: state and teacher replicated, the batch split, the state donated."""
    data = P(spec.axis_name)
    mapped = jax.shard_map(
        functools.partial(train_step_body, spec),
        mesh=mesh,
        in_specs=(P(), P(), data, data),
        out_specs=(P(), P()),
        check_vma=False,
    )
    return jax.jit(mapped, donate_argnums=(0,))


# ----------------------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class Job:
    """One job of the run plan, placed: the directory it writes to and the teacher it distils from."""

    plan: JobPlan
    workdir: str | os.PathLike  # run directory (local or gs://...): checkpoints, metrics.jsonl, TensorBoard events
    teacher: Network | None = None

    @property
    def name(self) -> str:
        return self.plan.name


@dataclasses.dataclass
class Outcome:
    network: Network  # the final (last-step) student
    steps: int
    epoch_records: list[dict]


class PreemptionGuard:
    """Decides, after each step, whether to save and stop because a process was sent SIGTERM.

    One process: a SIGTERM handler sets a flag (installed only from the main thread). Several processes: JAX's
    preemption sync point, whose notifier (started by jax.distributed) catches SIGTERM in any one process and makes
    every process stop at the same step, the next one all of them can reach; a local flag would let processes enter
    the collective save at different steps and hang.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._synchronized = jax.process_count() > 1

    def __enter__(self):
        if not self._synchronized and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        logger.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        """Called by every process after every step with the number of steps taken."""
        if self._synchronized:
            from jax.experimental import multihost_utils

            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def step_spec(job: Job, config, num_classes: int, steps_per_epoch: int) -> StepSpec:
    """The step of ``job``; batch-level loss terms (InfoNCE) see the global batch through the 'data' axis."""
    method = job.plan.method
    axis = parallel.DATA_AXIS if config.parallel.sync_batch_stats else None
    student = build_module(job.plan.model, num_classes, dtype=config.dtype, bn_axis_name=axis)
    teacher = job.teacher.module if job.teacher is not None else None
    attack = job.plan.attack
    return StepSpec(
        student=student,
        teacher=teacher,
        method=method,
        tx=make_optimizer(job.plan.optim, steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        attack=PGDSpec(
            eps=attack.eps,
            step_size=attack.step_size,
            steps=attack.steps,
            init=method.attack_init if attack.init == "method" else attack.init,
            init_scale=attack.init_scale,
            norm=attack.norm,
            unroll=attack.unroll,
        ),
        crop_padding=config.data.crop_padding,
        flip=config.data.flip,
    )


def run_metadata(job: Job, config, num_train: int, signature: dict) -> dict:
    """What a checkpoint records besides the state: enough to refuse an incompatible resume."""
    return {
        "job": job.name,
        "model": json.loads(job.plan.model.to_json()),
        "method": json.loads(job.plan.method_cfg.to_json()),
        "batch_size": job.plan.optim.batch_size,
        "num_train_examples": num_train,
        "seed": config.seed,
        "signature": signature,
        "config": json.loads(config.to_json_best_effort()),
    }


def check_resumable(saved: dict, current: dict, where: str) -> None:
    """Refuses a resume whose model, batch size, data size or seed differ (the batch sequence would change)."""
    for field in ("model", "batch_size", "num_train_examples", "seed"):
        if saved.get(field) != current[field]:
            raise ckpt_lib.IncompatibleCheckpointError(
                f"checkpoint {where} was made with {field} = {saved.get(field)!r}, this run has {current[field]!r}; "
                "use a fresh --workdir, or the config the checkpoint was made with"
            )


def _first_nonfinite(metrics: dict) -> str | None:
    for name, value in metrics.items():
        if not math.isfinite(float(value)):
            return name
    return None


def train(job: Job, config, dataset, mesh, *, eval_fn=None) -> Outcome:
    """Trains ``job`` to its last epoch, resuming from ``job.workdir`` when a checkpoint is there.

    ``eval_fn(network) -> {'clean_acc': ..., 'pgd_acc': ...}`` runs at the configured epochs; the save with the
    highest 'pgd_acc' is kept in ``best/``.
    """
    optim = job.plan.optim
    num_train = dataset.train.num_examples
    try:
        steps_per_epoch = pipeline.steps_per_epoch(num_train, optim.batch_size)
    except ValueError as e:
        raise ValueError(f"{job.name}: {e} (the optim.batch_size field)") from None
    total_steps = optim.epochs * steps_per_epoch
    spec = step_spec(job, config, dataset.num_classes, steps_per_epoch)
    step_fn = make_train_step(spec, mesh)

    plain_module = build_module(job.plan.model, dataset.num_classes, dtype=config.dtype)
    signature = ckpt_lib.shape_signature(abstract_variables(plain_module, dataset.image_shape))
    meta = run_metadata(job, config, num_train, signature)
    root_key = jax.random.PRNGKey(config.seed)
    init_key, run_key = jax.random.split(jax.random.fold_in(root_key, job.name == "teacher"))
    state = create_train_state(init_variables(plain_module, init_key, dataset.image_shape), spec.tx, run_key)
    state = parallel.replicate(state, mesh)

    checkpoints = ckpt_lib.RunCheckpoints(
        storage.path(job.workdir) / "checkpoints", keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    abstract_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    latest_meta = checkpoints.read_meta("latest")
    if latest_meta is not None:
        try:
            check_resumable(latest_meta, meta, checkpoints.directory)
            state, latest_meta = checkpoints.restore_latest(abstract_state, signature)
        except Exception:
            checkpoints.close()  # Orbax's background threads would otherwise keep the process from exiting
            raise
    start_step = int(state.step)
    log = reporting.MetricsLog(job.workdir, tensorboard=config.log.tensorboard)
    epoch_records = log.read("epoch")
    teacher_vars = parallel.replicate(job.teacher.variables, mesh) if job.teacher is not None else None
    step_fn = parallel.compile_synchronized(
        step_fn, state, teacher_vars, *abstract_batch(dataset, optim.batch_size, mesh), name=f"{job.name}/step"
    )
    lr_at = learning_rate_schedule(optim, steps_per_epoch)
    if start_step:
        logger.info("%s: resuming at step %d of %d", job.name, start_step, total_steps)

    def save(step: int, extra: dict | None = None, wait: bool = False, evaluation: dict | None = None):
        epoch, in_epoch = divmod(step, steps_per_epoch)
        saved_meta = {**meta, "step": step, "epoch": epoch, "step_in_epoch": in_epoch, **(extra or {})}
        checkpoints.save(step, state, saved_meta, evaluation)
        if wait:
            checkpoints.wait()

    step = start_step
    progress = reporting.progress_bar(total_steps, start_step, f"{job.name}", enabled=config.log.progress)
    profiler = reporting.StepProfiler(config.profile_steps, storage.path(job.workdir) / "profile")
    pending = None  # (step, metrics on device) of the previous step, checked one step late to keep the pipeline full
    window_start, window_images = time.perf_counter(), 0
    try:
        with PreemptionGuard() as guard:
            for epoch in range(start_step // steps_per_epoch, optim.epochs):
                batches = pipeline.prefetch(
                    pipeline.train_batches(
                        dataset.train,
                        global_batch_size=optim.batch_size,
                        seed=config.seed,
                        epoch=epoch,
                        process_index=jax.process_index(),
                        process_count=jax.process_count(),
                        start_step=step - epoch * steps_per_epoch,
                    )
                )
                epoch_sums: dict[str, float] = {}
                epoch_start = time.perf_counter()
                for images, labels in batches:
                    images, labels = parallel.global_batch((images, labels), mesh)
                    profiler.before_step(step)
                    state, metrics = step_fn(state, teacher_vars, images, labels)
                    profiler.after_step(step + 1, metrics)
                    if pending is not None:
                        _record(pending, log, epoch_sums, config.log.every_steps)
                    pending = (step, metrics)
                    step += 1
                    window_images += optim.batch_size
                    if step % config.log.every_steps == 0 or step == total_steps:
                        now = time.perf_counter()
                        rate = window_images / max(now - window_start, 1e-9)
                        window_start, window_images = now, 0
                        values = jax.device_get(metrics)
                        progress.set_postfix(
                            loss=f"{float(values['loss']):.4f}",
                            acc=f"{float(values.get('accuracy_adv', values.get('accuracy_nat', float('nan')))):.3f}",
                            img_s=f"{rate:.0f}",
                            refresh=False,
                        )
                        log.write("throughput", step, {"images_per_second": rate, "lr": float(lr_at(step - 1))})
                    progress.update(1)
                    if step % config.checkpoint.every_steps == 0 and step % steps_per_epoch:
                        _record(pending, log, epoch_sums, config.log.every_steps)
                        pending = None
                        save(step)
                    if guard.should_stop(step):
                        if pending is not None:
                            _record(pending, log, epoch_sums, config.log.every_steps)
                        save(step, wait=True)
                        raise Preempted(f"{job.name}: preempted at step {step}; checkpoint saved")
                if pending is not None:
                    _record(pending, log, epoch_sums, config.log.every_steps)
                    pending = None
                record = _epoch_record(epoch, step, epoch_sums, lr_at)
                record["train_seconds"] = time.perf_counter() - epoch_start  # metrics were read: the steps are done
                evaluation = None
                last_epoch = epoch + 1 == optim.epochs
                if eval_fn is not None and ((epoch + 1) % config.eval.every_epochs == 0 or last_epoch):
                    eval_start = time.perf_counter()
                    evaluation = eval_fn(
                        Network(plain_module, {"params": state.params, "batch_stats": state.batch_stats})
                    )
                    record.update(evaluation, eval_seconds=time.perf_counter() - eval_start)
                log.write("epoch", step, record)
                epoch_records.append(record)
                progress.write(reporting.epoch_line(job.name, record))
                save(step, {"eval": evaluation, "complete": last_epoch}, evaluation=evaluation)
        checkpoints.wait()
    finally:
        profiler.close()
        progress.close()
        log.close()
        checkpoints.close()
    network = Network(plain_module, jax.device_get({"params": state.params, "batch_stats": state.batch_stats}))
    return Outcome(network=network, steps=step, epoch_records=epoch_records)


def abstract_batch(dataset, batch_size: int, mesh) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Shapes, dtypes and shardings of one global training batch (images, labels), as the loop places it."""
    sharding = parallel.batch_sharded(mesh)
    images = dataset.train.images
    return (
        jax.ShapeDtypeStruct((batch_size, *images.shape[1:]), images.dtype, sharding=sharding),
        jax.ShapeDtypeStruct(
            (batch_size,), jax.dtypes.canonicalize_dtype(dataset.train.labels.dtype), sharding=sharding
        ),
    )


def _record(pending, log, epoch_sums: dict, every: int) -> None:
    """Checks one step's metrics for non-finite values, accumulates them, and logs every ``every`` steps."""
    step, metrics = pending
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = _first_nonfinite(values)
    if bad is not None:
        raise NonFiniteLossError(
            f"non-finite loss at step {step + 1}: term {bad!r} = {values[bad]} (all terms: {values}); "
            "the last good checkpoint is kept. Lower the learning rate or check the method's weights."
        )
    for name, value in values.items():
        epoch_sums[name] = epoch_sums.get(name, 0.0) + value
    epoch_sums["_count"] = epoch_sums.get("_count", 0.0) + 1
    if (step + 1) % every == 0:
        log.write("step", step + 1, values)


def _epoch_record(epoch: int, step: int, sums: dict, lr_at) -> dict:
    count = max(sums.get("_count", 0.0), 1.0)
    record = {f"train_{k}": v / count for k, v in sums.items() if k != "_count"}
    record.update(epoch=epoch + 1, step=step, lr=float(lr_at(step - 1)))
    return record
