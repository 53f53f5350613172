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
from mmard_jax import parallel, preemption, reporting, storage
from mmard_jax.attacks import PGDSpec, example_keys, per_example_start, pgd
from mmard_jax.attacks.pgd import platform_unroll
from mmard_jax.config import JobPlan, changed_settings
from mmard_jax.data import augment, pipeline
from mmard_jax.methods import Method, Views
from mmard_jax.networks import Network, abstract_variables, build_module, inference_logits, init_variables
from mmard_jax.preemption import PREEMPTED_EXIT_CODE, Preempted  # noqa: F401  (part of this module's interface)

logger = logging.getLogger(__name__)


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes during training; the teacher is never part of it."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    batch_stats: Any
    opt_state: Any
    key: jax.Array  # the run's root PRNG key (uint32[2]); per-step keys fold in the step and example index


class NonFiniteLossError(RuntimeError):
    """Raised when a loss term, the gradient or the updated parameters become NaN or infinite, before that state is
    saved: every checkpoint on disk holds finite parameters."""


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


def step_keys(state: TrainState, example_index) -> tuple[jax.Array, jax.Array]:
    """Per-example (augmentation, attack) keys of the step at ``state``: a function of the step and each example's
    index in the global batch only, so results do not depend on how the batch is split over devices."""
    keys = example_keys(jax.random.fold_in(state.key, state.step), example_index)
    keys = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
    return keys[:, 0], keys[:, 1]


def train_step_body(spec: StepSpec, state: TrainState, teacher_vars, images, labels):
    """One optimizer step on this device's slice of the global batch (to be mapped over the 'data' axis)."""
    num_local = images.shape[0]
    global_index = lax.axis_index(spec.axis_name) * num_local + jnp.arange(num_local)  # results independent of devices
    augment_keys, attack_keys = step_keys(state, global_index)
    x = augment_images(spec, augment_keys, images)
    epoch = state.step // spec.steps_per_epoch
    needs_teacher_nat = "teacher_nat" in spec.method.inner_views | spec.method.outer_views
    teacher_nat = lax.stop_gradient(inference_logits(spec.teacher, teacher_vars, x)) if needs_teacher_nat else None
    x_adv = adversarial_examples(spec, state, teacher_vars, x, labels, attack_keys, teacher_nat)

    grad_fn = jax.value_and_grad(outer_objective, has_aux=True)
    (loss, (metrics, batch_stats)), grads = grad_fn(
        state.params, spec, state.batch_stats, teacher_vars, x, x_adv, labels, epoch, teacher_nat
    )
    grads = lax.pmean(grads, spec.axis_name)
    batch_stats = lax.pmean(batch_stats, spec.axis_name)  # identity when BatchNorm already syncs over the axis
    updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = lax.pmean({"loss": loss, **metrics}, spec.axis_name)
    # Finite loss, diverged update: the norms (inf once a square overflows) let the loop refuse to save such a state.
    metrics.update(grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params))
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
            unroll=platform_unroll(attack.unroll, attack.steps),
        ),
        crop_padding=config.data.crop_padding,
        flip=config.data.flip,
    )


def section_prefix(job: Job) -> str:
    """Where a job's method / attack / optim sections live in the config: ``teacher.`` for the teacher, else top level."""
    return "teacher." if job.name == "teacher" else ""


def epochs_field(job: Job) -> str:
    return f"config.{section_prefix(job)}optim.epochs"


def job_sections(job: Job) -> dict[str, Any]:
    """The config sections a job trains with, by their config path (the teacher's live under ``teacher.``)."""
    plan = job.plan
    prefix = section_prefix(job)
    model = f"{prefix}model" if prefix else "student.model"
    return {
        model: plan.model,
        f"{prefix}method": plan.method_cfg,
        f"{prefix}attack": plan.attack,
        f"{prefix}optim": plan.optim,
    }


# Data fields that say where the data lives, not what it is (a moved cache must not block a resume).
DATA_LOCATION_FIELDS = ("download", "archive_dir", "data_dir")


def _flatten(prefix: str, value) -> dict[str, Any]:
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(f"{prefix}.{key}", item))
        return flat
    return {prefix: json.loads(json.dumps(value))}  # as it reads back from a checkpoint's JSON (tuples -> lists)


def trajectory_settings(job: Job, config, teacher_digest: str | None) -> dict[str, Any]:
    """{'config.field': value} of every setting that changes the states a job computes, step by step.

    Evaluation, logging, checkpointing and profiling settings are not among them: a resume may change those.
    ``optim.epochs`` is left out (a resume may extend training) unless the schedule's shape depends on it (cosine).
    """
    settings = {}
    for path, section in job_sections(job).items():
        settings.update(_flatten(f"config.{path}", section))
    if job.plan.optim.schedule != "cosine":
        del settings[epochs_field(job)]
    data = {k: v for k, v in config.data.to_dict().items() if k not in DATA_LOCATION_FIELDS}
    settings.update(_flatten("config.data", data))
    settings.update(
        {
            "config.seed": config.seed,
            "config.dtype": config.dtype,
            "config.parallel.sync_batch_stats": config.parallel.sync_batch_stats,
        }
    )
    if teacher_digest is not None:
        settings["the teacher's weights (SHA-256)"] = teacher_digest
    return settings


def run_metadata(job: Job, config, num_train: int, signature: dict, settings: dict) -> dict:
    """What a checkpoint records besides the state: enough to refuse an incompatible resume."""
    return {
        "job": job.name,
        "model": json.loads(job.plan.model.to_json()),
        "method": json.loads(job.plan.method_cfg.to_json()),
        "batch_size": job.plan.optim.batch_size,
        "num_train_examples": num_train,
        "seed": config.seed,
        "signature": signature,
        "trajectory": settings,
        "config": json.loads(config.to_json_best_effort()),
    }


def check_resumable(saved: dict, current: dict, where, total_steps: int, epochs_field: str) -> None:
    """Refuses a resume that would not continue the saved run's trajectory, naming every differing setting.

    Checkpoints of earlier versions (no 'trajectory' record) are checked on model, batch size, data size and seed.
    """
    fields = ("model", "batch_size", "num_train_examples", "seed")
    differences = [
        f"{name}: checkpoint {saved.get(name)!r}, this run {current[name]!r}"
        for name in fields
        if saved.get(name) != current[name]
    ]
    if "trajectory" in saved and not differences:
        differences = [
            f"{name}: checkpoint {before!r}, this run {after!r}"
            for name, before, after in changed_settings(saved["trajectory"], current["trajectory"])
        ]
    if differences:
        raise ckpt_lib.IncompatibleCheckpointError(
            f"checkpoint {where} was trained with other settings; resuming would silently change its training:\n  "
            + "\n  ".join(differences)
            + "\nUse a fresh --workdir, or the settings the checkpoint was made with (evaluation, logging and "
            "checkpoint settings may change, and optim.epochs may grow)."
        )
    if saved.get("step", 0) > total_steps:
        raise ckpt_lib.IncompatibleCheckpointError(
            f"{epochs_field}: the checkpoint in {where} is at step {saved['step']}, beyond this run's {total_steps} "
            "steps; raise the epochs to at least the trained ones, or use a fresh --workdir"
        )


def _first_nonfinite(metrics: dict) -> str | None:
    for name, value in metrics.items():
        if not math.isfinite(float(value)):
            return name
    return None


@dataclasses.dataclass
class EpochProgress:
    """What an epoch's record averages, kept in each mid-epoch checkpoint so a resumed epoch reports all its steps."""

    sums: dict = dataclasses.field(default_factory=dict)
    count: int = 0
    train_seconds: float = 0.0

    def add(self, values: dict) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.count += 1

    def means(self) -> dict:
        return {f"train_{k}": v / max(self.count, 1) for k, v in self.sums.items()}

    def to_meta(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: dict | None) -> EpochProgress:
        return cls(**meta) if meta else cls()


def _check_progress_without_checkpoint(log: reporting.MetricsLog, directory, name: str) -> None:
    """A run whose log shows finished epochs but that has no checkpoint lost its checkpoints: never restart silently."""
    epochs = log.read("epoch")
    if epochs:
        raise ckpt_lib.IncompatibleCheckpointError(
            f"{name}: {log.path} records {len(epochs)} finished epoch(s) (up to step {epochs[-1]['step']}) but "
            f"{directory} holds no checkpoint; refusing to restart from step 0 silently. Restore the checkpoints, or "
            "delete the run directory to train it again."
        )


def train(job: Job, config, dataset, mesh, *, eval_fn=None) -> Outcome:
    """Trains ``job`` to its last epoch, resuming from ``job.workdir`` when a checkpoint is there.

    ``eval_fn(network) -> {'clean_acc': ..., 'pgd_acc': ...}`` runs at the configured epochs; the save with the
    highest 'pgd_acc' is kept as the best one. SIGTERM saves and raises :class:`Preempted`.
    """
    with preemption.guard() as guard, guard.deferred():
        return _train(job, config, dataset, mesh, eval_fn, guard)


def _train(job: Job, config, dataset, mesh, eval_fn, guard: preemption.PreemptionGuard) -> Outcome:
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
    teacher_digest = ckpt_lib.state_digest(job.teacher.variables) if job.teacher is not None else None
    meta = run_metadata(job, config, num_train, signature, trajectory_settings(job, config, teacher_digest))
    root_key = jax.random.PRNGKey(config.seed)
    init_key, run_key = jax.random.split(jax.random.fold_in(root_key, job.name == "teacher"))
    state = create_train_state(init_variables(plain_module, init_key, dataset.image_shape), spec.tx, run_key)
    state = parallel.replicate(state, mesh)

    checkpoints = ckpt_lib.RunCheckpoints(
        storage.path(job.workdir) / "checkpoints", keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    log = progress = profiler = None
    try:
        log = reporting.MetricsLog(job.workdir, tensorboard=config.log.tensorboard)
        abstract_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
        latest_meta = checkpoints.read_meta("latest")
        if latest_meta is None:
            _check_progress_without_checkpoint(log, checkpoints.directory, job.name)
        else:
            check_resumable(latest_meta, meta, checkpoints.directory, total_steps, epochs_field(job))
            state, latest_meta = checkpoints.restore_latest(abstract_state, signature)
        start_step = int(state.step)
        progress_in_epoch = EpochProgress.from_meta((latest_meta or {}).get("epoch_progress"))
        epoch_records = [r for r in log.read("epoch") if r["step"] <= start_step]
        teacher_vars = parallel.replicate(job.teacher.variables, mesh) if job.teacher is not None else None
        step_fn = parallel.compile_synchronized(
            step_fn, state, teacher_vars, *abstract_batch(dataset, optim.batch_size, mesh), name=f"{job.name}/step"
        )
        lr_at = learning_rate_schedule(optim, steps_per_epoch)
        if start_step:
            logger.info("%s: resuming at step %d of %d", job.name, start_step, total_steps)
        progress = reporting.progress_bar(total_steps, start_step, f"{job.name}", enabled=config.log.progress)
        profiler = reporting.StepProfiler(config.profile_steps, storage.path(job.workdir) / "profile")
        loop = _Loop(
            job,
            config,
            dataset,
            mesh,
            step_fn,
            teacher_vars,
            steps_per_epoch,
            lr_at,
            log,
            progress,
            profiler,
            checkpoints,
            meta,
            guard,
        )
        state = loop.run(state, start_step, progress_in_epoch, epoch_records, eval_fn, plain_module)
        checkpoints.wait()
    except BaseException:
        _close_all((profiler, progress, log, checkpoints), failing=True)
        raise
    _close_all((profiler, progress, log, checkpoints), failing=False)
    network = Network(plain_module, jax.device_get({"params": state.params, "batch_stats": state.batch_stats}))
    return Outcome(network=network, steps=loop.step, epoch_records=epoch_records)


def _close_all(resources, failing: bool) -> None:
    """Closes every resource; while an error is already on its way, a second one from closing is logged, not raised
    (a full disk must be reported as the failed save, not as the log file that could not be flushed after it)."""
    first = None
    for resource in resources:
        if resource is None:
            continue
        try:
            resource.close()
        except Exception as error:  # noqa: BLE001 - reported below
            if failing or first is not None:
                logger.warning("while stopping, closing %s failed too: %s", type(resource).__name__, error)
            else:
                first = error
    if first is not None:
        raise first


@dataclasses.dataclass
class _Loop:
    """The epoch / step loop of one job: the checks, saves, records and preemption checks around each step."""

    job: Job
    config: Any
    dataset: Any
    mesh: Any
    step_fn: Any  # the compiled train step
    teacher_vars: Any
    steps_per_epoch: int
    lr_at: optax.Schedule
    log: reporting.MetricsLog
    progress: Any
    profiler: reporting.StepProfiler
    checkpoints: ckpt_lib.RunCheckpoints
    meta: dict  # what every save records besides the state
    guard: preemption.PreemptionGuard
    state: TrainState | None = None
    step: int = 0

    def save(self, progress_in_epoch: EpochProgress, extra=None, wait=False, evaluation=None) -> None:
        epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
        saved_meta = {
            **self.meta,
            "step": self.step,
            "epoch": epoch,
            "step_in_epoch": in_epoch,
            "epoch_progress": progress_in_epoch.to_meta() if in_epoch else None,
            **(extra or {}),
        }
        self.checkpoints.save(self.step, self.state, saved_meta, evaluation)
        if wait:
            self.checkpoints.wait()

    def stop(self, progress_in_epoch: EpochProgress) -> None:
        self.save(progress_in_epoch, wait=True)
        raise Preempted(f"{self.job.name}: preempted at step {self.step}; checkpoint saved")

    def check(self, pending, progress_in_epoch: EpochProgress) -> None:
        """Checks one step's metrics (before anything after that step is saved), accumulates and logs them."""
        step, metrics = pending
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        bad = _first_nonfinite(values)
        if bad is not None:
            raise NonFiniteLossError(
                f"{self.job.name} diverged at step {step + 1}: {bad} = {values[bad]} (all: {values}). Nothing from "
                f"this step on was saved: the newest checkpoint in {self.checkpoints.directory} holds the last finite "
                "state. To retry with a lower learning rate (or other method weights), use a fresh --workdir or "
                "delete that run directory: a resume keeps the settings the run was started with."
            )
        progress_in_epoch.add(values)
        if (step + 1) % self.config.log.every_steps == 0:
            self.log.write("step", step + 1, values)

    def run(self, state, start_step, progress_in_epoch, epoch_records, eval_fn, plain_module):
        config, optim, spe = self.config, self.job.plan.optim, self.steps_per_epoch
        total_steps = optim.epochs * spe
        self.state, self.step = state, start_step
        pending = (
            None  # (step, metrics on device) of the previous step, checked one step late to keep the pipeline full
        )
        window_start, window_images = time.perf_counter(), 0
        for epoch in range(start_step // spe, optim.epochs):
            batches = pipeline.prefetch(
                pipeline.train_batches(
                    self.dataset.train,
                    global_batch_size=optim.batch_size,
                    seed=config.seed,
                    epoch=epoch,
                    process_index=jax.process_index(),
                    process_count=jax.process_count(),
                    start_step=self.step - epoch * spe,
                )
            )
            if self.step % spe == 0:
                progress_in_epoch = EpochProgress()
            epoch_start = time.perf_counter() - progress_in_epoch.train_seconds
            for images, labels in batches:
                images, labels = parallel.global_batch((images, labels), self.mesh)
                self.profiler.before_step(self.step)
                self.state, metrics = self.step_fn(self.state, self.teacher_vars, images, labels)
                self.profiler.after_step(self.step + 1, metrics)
                if pending is not None:
                    self.check(pending, progress_in_epoch)
                pending = (self.step, metrics)
                self.step += 1
                window_images += optim.batch_size
                if self.step % config.log.every_steps == 0 or self.step == total_steps:
                    now = time.perf_counter()
                    self._report_rate(metrics, window_images / max(now - window_start, 1e-9))
                    window_start, window_images = now, 0
                self.progress.update(1)
                mid_epoch = self.step % spe != 0
                # The epoch's last step goes on to the evaluation and the epoch-end save; the stop comes after them.
                stopping = mid_epoch and self.guard.should_stop()
                if stopping or (mid_epoch and self.step % config.checkpoint.every_steps == 0):
                    self.check(pending, progress_in_epoch)
                    pending = None
                    progress_in_epoch.train_seconds = time.perf_counter() - epoch_start
                    if stopping:
                        self.stop(progress_in_epoch)
                    self.save(progress_in_epoch)
            if pending is not None:
                self.check(pending, progress_in_epoch)
                pending = None
            record = {
                **progress_in_epoch.means(),
                "epoch": epoch + 1,
                "step": self.step,
                "lr": float(self.lr_at(self.step - 1)),
            }
            record["train_seconds"] = time.perf_counter() - epoch_start  # metrics were read: the steps are done
            evaluation = None
            last_epoch = epoch + 1 == optim.epochs
            if eval_fn is not None and ((epoch + 1) % config.eval.every_epochs == 0 or last_epoch):
                eval_start = time.perf_counter()
                evaluation = eval_fn(
                    Network(plain_module, {"params": self.state.params, "batch_stats": self.state.batch_stats})
                )
                record.update(evaluation, eval_seconds=time.perf_counter() - eval_start)
            self.log.write("epoch", self.step, record)
            epoch_records.append(record)
            self.progress.write(reporting.epoch_line(self.job.name, record))
            self.save(progress_in_epoch, {"eval": evaluation, "complete": last_epoch}, evaluation=evaluation)
            if self.guard.should_stop():
                self.checkpoints.wait()
                raise Preempted(
                    f"{self.job.name}: preempted at step {self.step} (end of epoch {epoch + 1}); checkpoint saved"
                )
        return self.state

    def _report_rate(self, metrics, rate: float) -> None:
        values = jax.device_get(metrics)
        accuracy = values.get("accuracy_adv", values.get("accuracy_nat", float("nan")))
        self.progress.set_postfix(
            loss=f"{float(values['loss']):.4f}", acc=f"{float(accuracy):.3f}", img_s=f"{rate:.0f}", refresh=False
        )
        self.log.write("throughput", self.step, {"images_per_second": rate, "lr": float(self.lr_at(self.step - 1))})


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
