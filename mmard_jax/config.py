"""Default configuration tree, its validation and the run plan.

`configs/*.py` start from :func:`base_config` and override what their setup changes; every field carries a
comment naming its source. :func:`validate` turns a bad value into a ``ValueError`` that names the field and returns
the :class:`RunPlan` that ``main`` and ``train`` consume: the jobs, each with its method built once.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import ml_collections

from mmard_jax import checks
from mmard_jax.attacks.common import INITS, NORMS
from mmard_jax.data.sources import CIFAR_ARCHIVES
from mmard_jax.data.sources import VALID_SOURCES as DATA_SOURCES

PGD_INITS = ("method", *INITS)  # 'method': the method's reference start
SCHEDULES = ("piecewise", "cosine", "constant")
STAGES = ("teacher", "distill", "eval")
TEACHER_FREE_METHODS = ("pgd_at", "trades")
DTYPES = ("float32", "bfloat16")


def model_config(name: str, **kwargs) -> ml_collections.ConfigDict:
    """A model section: registry name, constructor kwargs and optional input normalisation."""
    return ml_collections.ConfigDict(
        {
            "name": name,  # a name of mmard_jax.models.MODEL_NAMES
            "kwargs": ml_collections.ConfigDict(kwargs),  # extra constructor arguments (depth, widths, ...)
            "mean": (),  # per-channel input mean; () = no normalisation (RobustBench teachers take raw [0, 1])
            "std": (),  # per-channel input std; () = no normalisation
        }
    )


def attack_config(eps: float, step_size: float, steps: int, init: str = "method") -> ml_collections.ConfigDict:
    """The PGD attack used inside training (docs/method.md §1)."""
    return ml_collections.ConfigDict(
        {
            "eps": eps,
            "step_size": step_size,
            "steps": steps,
            # 'method' (the method's reference start: uniform for PGD-AT/ARD/IAD, normal for TRADES/RSLAD/AdaAD/MMARD)
            # | 'none' | 'normal' (x + init_scale*N(0,1)) | 'uniform' (x + U(-eps, eps))
            "init": init,
            "init_scale": 0.001,  # σ of the 'normal' init (RSLAD, AdaAD, TRADES code)
            "norm": "linf",
            # lax.fori_loop unroll: 0 = by platform (fully unrolled on CPU, rolled on GPU/TPU); 1 = rolled; >= steps =
            # fully unrolled, 3-7x faster on XLA:CPU (jax-ml/jax#12868; benchmarks/results/step_speed.md)
            "unroll": 0,
        }
    )


def optim_config(
    epochs: int, lr: float, weight_decay: float, decay_epochs: tuple[int, ...], batch_size: int
) -> ml_collections.ConfigDict:
    """SGD with momentum and coupled (PyTorch-style) weight decay; schedule given in epochs."""
    return ml_collections.ConfigDict(
        {
            "epochs": epochs,
            "batch_size": batch_size,  # global batch size, split over all devices
            "lr": lr,
            "momentum": 0.9,
            "nesterov": False,
            "weight_decay": weight_decay,  # added to the gradient before momentum, as torch.optim.SGD
            "schedule": "piecewise",  # 'piecewise' | 'cosine' | 'constant'
            "decay_epochs": decay_epochs,  # piecewise: lr *= decay_factor at each of these epochs
            "decay_factor": 0.1,
            "warmup_epochs": 0.0,  # linear warm-up from 0 (0 = none)
            "grad_clip_norm": 0.0,  # global-norm clipping (0 = none)
        }
    )


# Fields added after runs were first recorded, with the value that reproduces what those runs computed: a record
# (checkpoint or study directory) made before a field existed matches a run whose value of it is this one.
ADDED_FIELDS = {"method.mmard_base": "adaad", "method.mmard_parts": "both"}


def _historical_value(field: str):
    """The value a record without ``field`` implies (ADDED_FIELDS, matched on the field's path suffix)."""
    for suffix, value in ADDED_FIELDS.items():
        if field == suffix or field.endswith("." + suffix):
            return value
    return None


# Method fields read only when the section's method is 'mmard' (every other method ignores them).
MMARD_ONLY_FIELDS = ("mmard_base", "mmard_parts")


def _unread_by_both(field: str, old: dict, new: dict) -> bool:
    """True for an MMARD-only field of a method section that is not 'mmard' in either record."""
    section, _, leaf = field.rpartition(".")
    if leaf not in MMARD_ONLY_FIELDS:
        return False
    name = f"{section}.name" if section else "name"
    return old.get(name) != "mmard" and new.get(name) != "mmard"


def changed_settings(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) of every field of two flat setting records that differs, '(absent)' for a
    missing one; a field added since `old` was recorded (ADDED_FIELDS) counts there as its historical value, and
    MMARD-only fields count only where a record's method is 'mmard'."""
    absent = "(absent)"
    changes = []
    for field in sorted(set(old) | set(new)):
        if _unread_by_both(field, old, new):
            continue
        implied = _historical_value(field)
        before = old.get(field, absent if implied is None else implied)
        after = new.get(field, absent)
        if before != after:
            changes.append((field, before, after))
    return changes


def method_config(name: str) -> ml_collections.ConfigDict:
    """Loss hyperparameters for every method of docs/method.md §2-3 (only the selected method's fields are read)."""
    return ml_collections.ConfigDict(
        {
            # pgd_at | trades | ard | iad | rslad | adaad | mmard (= mmard_base + mmard_parts), or a name added with
            # mmard_jax.methods.register_method (docs/extending.md)
            "name": name,
            "mmard_inner": False,  # add MMARD's teacher-guided inner loss to a distillation base (§3.1)
            "mmard_outer": False,  # add MMARD's triangle mutual-information term to a distillation base (§3.2)
            # what name='mmard' is: this distillation base with these MMARD parts ('inner' | 'outer' | 'both'). IAD with
            # the outer triangle had the best mean AutoAttack accuracy of the 16 variants of the plug-and-play study
            # (3 seeds, benchmarks/results/study_plug_and_play_digits0-4.md; again on balanced digits:
            # study_plug_and_play.md); until then it was AdaAD with both parts.
            "mmard_base": "iad",
            "mmard_parts": "outer",
            # KL reduction of ARD/RSLAD/AdaAD/TRADES/MMARD: 'mean' over B*C (PyTorch KLDivLoss default; ARD/RSLAD/AdaAD
            # CIFAR-10 code), 'batchmean' = sum / B (AdaAD CIFAR-100; TRADES), 'sum'. IAD has its own field below.
            "kl_reduction": "mean",
            "temperature": 30.0,  # ARD distillation temperature τ (Goldblum et al. 2020, CIFAR-10)
            "alpha": 1.0,  # ARD/IAD weight a of the KL terms; AdaAD weight a of the adversarial KL term
            # IAD-I's own τ and KL reduction (Zhu et al. 2022; IAD-I.py of github.com/ZFancy/IAD): --temp defaults to
            # 1.0, and both KL terms are KLDivLoss(reduce=False) summed over classes and examples, times 1/B
            "iad_temperature": 1.0,
            "iad_kl_reduction": "batchmean",
            "trades_beta": 6.0,  # TRADES β (Zhang et al. 2019)
            "iad_beta": 0.1,  # IAD-I exponent β of the teacher's confidence (Zhu et al. 2022)
            "iad_warmup_epochs": 60,  # IAD-I: introspection term from this epoch on (60 of 200 in the paper)
            "rslad_adv_weight": 5.0 / 6.0,  # RSLAD: weight of KL(T(x) || S(x')); 1 - this on KL(T(x) || S(x))
            "gamma": 1.0,  # MMARD γ: weight of the teacher boundary term D_T (docs/method.md §3.1; kept by the demo ablation)
            "boundary": "kl",  # MMARD D_T: 'kl' | 'entropy' | 'margin' | 'hinge' (docs/method.md §3.1)
            "mi_beta": 1.0,  # MMARD β: weight of the triangle InfoNCE term (docs/method.md §3.2 starting value)
            "mi_weights": (1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0),  # edge weights (w_ab, w_at, w_bt)
            "tau_mi": 0.5,  # InfoNCE temperature τ_mi
            "mask_same_class": True,  # drop same-label off-diagonal pairs from the InfoNCE denominators
            "teacher_vertex": "adversarial",  # teacher vertex t of the triangle: sg(T(x')) or 'natural' sg(T(x))
        }
    )


def eval_config(eps: float) -> ml_collections.ConfigDict:
    """Periodic and final evaluation (docs/method.md §4)."""
    return ml_collections.ConfigDict(
        {
            "eps": eps,
            "batch_size": 256,
            "num_examples": 0,  # 0 = the full test split
            "every_epochs": 1,  # periodic clean + PGD evaluation on the holdout (or test) split
            "periodic_examples": 0,  # the periodic evaluation reads the first this many examples (0 = eval.num_examples)
            "periodic_pgd_steps": 10,  # PGD steps of the periodic evaluation (cheap model selection)
            "periodic_pgd_step_size": 2.0 / 255.0,  # its step size: steps * step size must exceed eps
            "fgsm": True,
            "pgd_steps": 20,  # PGD-20 (CIFAR); the MNIST config sets 40; 0 = no PGD in the final evaluation
            "pgd_step_size": 2.0 / 255.0,
            "cw_steps": 30,  # CW∞: 30 steps, κ = 50; 0 = no CW∞ in the final evaluation
            "cw_step_size": 2.0 / 255.0,
            "cw_kappa": 50.0,
            "autoattack": True,  # AutoAttack (standard) in the final evaluation (every ARD paper reports it)
            # AutoAttack on the first this many test examples (0 = the same examples as the other attacks): it costs
            # far more per example than PGD, so a study may run it on a subset (python -m mmard_jax.study)
            "autoattack_examples": 0,
            "checkpoint": "best",  # which student checkpoint the final evaluation reads: 'best' | 'last'
            "unroll": 0,  # the evaluation's PGD / CW loops: as attack.unroll (0 = by platform)
        }
    )


def base_config() -> ml_collections.ConfigDict:
    """The full configuration tree with CIFAR-10 reference values (RSLAD recipe, docs/method.md §5)."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # root PRNG seed: data order, init, augmentation and attack keys derive from it
    c.stages = "teacher,distill,eval"  # comma-separated subset of teacher, distill, eval, run in this order
    c.baselines = ""  # comma-separated methods trained with the same budget for the comparison table
    c.dtype = "float32"  # compute dtype of the networks: 'float32' | 'bfloat16' (params stay float32)
    # JAX's persistent compilation cache: a directory where compiled programs are kept across runs ('' = off; may name
    # '{workdir}', e.g. '{workdir}/xla_cache'). A resumed run or a repeated evaluation then skips XLA compilation.
    c.compilation_cache_dir = ""
    # Profile training steps [start, stop) of every run with jax.profiler: 'start,stop' ('' = off); the trace is written
    # to <run dir>/profile, for TensorBoard's profile plugin or Perfetto.
    c.profile_steps = ""

    c.data = ml_collections.ConfigDict(
        {
            # 'cifar_archive' (the official CIFAR python archive, no TensorFlow needed) | 'tfds' (an array_record copy
            # in data_dir, prepared with TensorFlow) | 'mnist5k' | 'digits' (bundled, offline)
            "source": "cifar_archive",
            "name": "cifar10",  # 'cifar10' | 'cifar100' (cifar_archive); any TFDS name with 'image' and 'label' (tfds)
            "data_dir": "",  # TFDS data_dir ('' = TFDS default)
            # folder of the CIFAR archive ('' = $MMARD_JAX_CACHE if set, else ~/.cache/mmard_jax)
            "archive_dir": "",
            # fetch the archive (~160 MB, SHA-256/MD5-checked) when missing or wrong; it is downloaded from the official
            # URL, or from $MMARD_JAX_CIFAR_URL/<file name> when that mirror folder URL is set
            "download": True,
            "train_split": "train",
            "test_split": "test",
            "holdout_size": 0,  # training examples held out to pick the best checkpoint (0 = use the test split)
            "mnist5k_test_size": 1000,  # size of the stratified MNIST-5k test split
            "crop_padding": 4,  # random crop with 4-pixel zero padding (RSLAD/TRADES CIFAR augmentation)
            "flip": True,  # random horizontal flip
        }
    )

    c.teacher = ml_collections.ConfigDict(
        {
            "model": model_config("wrn-34-10"),  # TRADES WRN-34-10 (RobustBench Zhang2019Theoretically)
            # a teacher run directory of ours or one written by `python -m mmard_jax.import_teacher` (its architecture
            # then comes from the checkpoint); '' = train one into workdir/teacher
            "checkpoint": "",
            "method": method_config("trades"),  # teacher training: 'trades' | 'pgd_at'
            # TRADES CIFAR-10: eps 0.031, step 0.007, 10 steps, init x + 0.001 N(0, 1)
            "attack": attack_config(0.031, 0.007, 10),
            # TRADES CIFAR-10 recipe: SGD 0.1, wd 2e-4, 100 epochs, decay at 75 and 90, batch 128
            "optim": optim_config(100, 0.1, 2e-4, (75, 90), 128),
        }
    )
    c.teacher.method.kl_reduction = "batchmean"  # TRADES: KL summed / B

    c.student = ml_collections.ConfigDict({"model": model_config("resnet18")})
    c.method = method_config("mmard")
    c.attack = attack_config(8.0 / 255.0, 2.0 / 255.0, 10)  # RSLAD: PGD-10, ε 8/255, α 2/255
    # RSLAD recipe: SGD 0.1, momentum 0.9, wd 2e-4, 300 epochs, decay at 215/260/285, batch 128
    c.optim = optim_config(300, 0.1, 2e-4, (215, 260, 285), 128)
    c.eval = eval_config(8.0 / 255.0)

    c.checkpoint = ml_collections.ConfigDict(
        {
            "keep": 2,  # latest checkpoints kept (the best one is kept in addition)
            "every_steps": 500,  # save every this many steps (and at each epoch end and on SIGTERM)
            "async_save": True,  # Orbax asynchronous saves
        }
    )
    c.log = ml_collections.ConfigDict(
        {
            "every_steps": 50,  # per-step metrics to JSONL/TensorBoard every this many steps
            "progress": True,  # tqdm progress bar
            "tensorboard": True,  # TensorBoard event files (tensorboardX, no TensorFlow)
        }
    )
    c.parallel = ml_collections.ConfigDict(
        {
            "sync_batch_stats": True,  # BatchNorm statistics over the global batch (axis 'data')
            "coordinator_address": "",  # multi-host: 'host:port' of process 0 ('' = single process or auto-detect)
            "num_processes": 0,  # multi-host: number of processes (0 = one process; -1 = detect on TPU/SLURM)
            "process_id": -1,  # multi-host: this process's index (-1 = auto)
            # multi-host: seconds a process waits for the coordinator and the other processes before it gives up (JAX's
            # own default; a pod's hosts may boot minutes apart)
            "initialization_timeout_s": 300,
        }
    )
    return c


def cifar_config(name: str) -> ml_collections.ConfigDict:
    """The reference setup for 'cifar10' or 'cifar100' (docs/method.md §5)."""
    config = base_config()  # every CIFAR-10 reference value lives there, with its source
    config.data.name = name
    if name == "cifar100":
        config.method.kl_reduction = "batchmean"  # AdaAD (the base of MMARD) sums the KL / B on CIFAR-100 (§2)
    return config


# Per accelerator: the evaluation batch (images attacked at once; memory, not the recipe, bounds it).
ACCELERATOR_EVAL_BATCH = {"gpu": 1024, "tpu": 2048}


def for_accelerator(config: ml_collections.ConfigDict, hardware: str) -> ml_collections.ConfigDict:
    """What a GPU ('gpu': one 80 GB H100/A100) or Cloud TPU ('tpu': a v4-8 / v5e-8 slice) user wants on top of a config.

    - bfloat16 compute; parameters, BatchNorm statistics, losses and the optimizer stay float32;
    - rolled PGD loops (unroll 1): unrolling pays on XLA:CPU (jax-ml/jax#12868), and a rolled loop compiles faster;
    - evaluation batches sized for the device memory; the training batch stays the recipe's 128 (the published
      numbers depend on it): a larger one is ``--config.optim.batch_size`` with the learning rate scaled alike;
    - the persistent compilation cache in the workdir, so a preempted run resumes without recompiling.
    """
    if hardware not in ACCELERATOR_EVAL_BATCH:
        raise ValueError(f"hardware must be one of {', '.join(ACCELERATOR_EVAL_BATCH)}, got {hardware!r}")
    config.dtype = "bfloat16"
    for attack in (config.attack, config.teacher.attack):
        attack.unroll = 1
    config.eval.unroll = 1
    config.eval.batch_size = ACCELERATOR_EVAL_BATCH[hardware]
    config.compilation_cache_dir = "{workdir}/xla_cache"
    return config


def stages(config) -> tuple[str, ...]:
    """The configured stages as a tuple, validated."""
    if not isinstance(config.stages, str):
        checks.fail("config.stages", f"{config.stages!r} must be a comma-separated string, e.g. 'teacher,distill,eval'")
    names = tuple(s.strip() for s in config.stages.split(",") if s.strip())
    for name in names:
        checks.choice("config.stages", name, STAGES)
    if not names:
        checks.fail("config.stages", f"{config.stages!r} names no stage; use some of {', '.join(STAGES)}")
    return names


def student_methods(config) -> tuple[str, ...]:
    """Baseline methods first, then the main method (config.method.name); no repeats."""
    names = [s.strip() for s in config.baselines.split(",") if s.strip()] + [config.method.name]
    return tuple(dict.fromkeys(names))


def _fail(field: str, message: str):
    checks.fail(f"config.{field}", message)


def _check_choice(field: str, value, choices):
    checks.choice(f"config.{field}", value, choices)


def _check_attack(prefix: str, attack) -> None:
    checks.number(f"config.{prefix}.eps", attack.eps, low=0.0, high=1.0)  # images are in [0, 1]
    checks.number(f"config.{prefix}.step_size", attack.step_size, low=0.0, low_open=True)
    checks.non_negative_int(f"config.{prefix}.steps", attack.steps)
    _check_choice(f"{prefix}.init", attack.init, PGD_INITS)
    checks.number(f"config.{prefix}.init_scale", attack.init_scale, low=0.0)
    _check_choice(f"{prefix}.norm", attack.norm, NORMS)
    checks.non_negative_int(f"config.{prefix}.unroll", attack.unroll)  # 0 = by platform, 1 = rolled loop
    if attack.norm == "linf":
        _check_reach(f"{prefix}.step_size", attack.steps, attack.step_size, attack.eps)


def _check_multiple(field: str, value, device_count: int) -> None:
    """A batch size: a positive int that splits evenly over the devices."""
    checks.positive_int(f"config.{field}", value)
    if value % device_count:
        _fail(field, f"{value} must be a positive multiple of the device count ({device_count})")


def _check_optim(prefix: str, optim, device_count: int) -> None:
    checks.positive_int(f"config.{prefix}.epochs", optim.epochs)
    checks.number(f"config.{prefix}.lr", optim.lr, low=0.0, low_open=True)
    checks.number(f"config.{prefix}.weight_decay", optim.weight_decay, low=0.0)
    _check_multiple(f"{prefix}.batch_size", optim.batch_size, device_count)
    _check_choice(f"{prefix}.schedule", optim.schedule, SCHEDULES)
    checks.number(f"config.{prefix}.momentum", optim.momentum, low=0.0, high=1.0)
    checks.number(f"config.{prefix}.decay_factor", optim.decay_factor, low=0.0)
    checks.number(f"config.{prefix}.warmup_epochs", optim.warmup_epochs, low=0.0)
    checks.number(f"config.{prefix}.grad_clip_norm", optim.grad_clip_norm, low=0.0)
    decay_epochs = checks.number_tuple(f"config.{prefix}.decay_epochs", optim.decay_epochs, low=0.0)
    if list(decay_epochs) != sorted(decay_epochs):
        _fail(f"{prefix}.decay_epochs", f"{decay_epochs} must be increasing")


def _check_model(prefix: str, model) -> None:
    from mmard_jax.models import MODEL_NAMES

    _check_choice(f"{prefix}.name", model.name, MODEL_NAMES)
    checks.number_tuple(f"config.{prefix}.mean", model.mean)
    checks.number_tuple(f"config.{prefix}.std", model.std, low=0.0, low_open=True)
    if len(model.mean) != len(model.std):
        _fail(f"{prefix}.std", "mean and std must have the same length (or both be empty)")


def _check_reach(field: str, steps: int, step_size: float, eps: float) -> None:
    """An L∞ PGD whose steps cannot reach the ε-ball's edge understates robustness."""
    if steps > 0 and steps * step_size < eps * (1 - 1e-9):
        _fail(field, f"{steps} steps of {step_size:g} cannot reach ε = {eps:g}; raise the step size or the steps")


def student_method_config(config, name: str):
    """The method section of one student run: the main method keeps its MMARD flags, baselines run plain."""
    method = copy.deepcopy(config.method)
    with method.unlocked():
        method.name = name
        if name != config.method.name:
            method.mmard_inner = False
            method.mmard_outer = False
    return method


@dataclasses.dataclass(frozen=True)
class JobPlan:
    """One training run: what it trains (model), how (method, attack, optimiser) and where (run_dir, below WORKDIR)."""

    name: str  # 'teacher' or the method name; also the log prefix
    run_dir: str  # 'teacher' or 'students/<method>'
    model: Any  # the model section
    method_cfg: Any  # the method section (recorded in checkpoints)
    method: Any  # the `methods.Method` built from method_cfg, losses over the data-parallel axis
    attack: Any
    optim: Any


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a validated config runs: the stages, the teacher's training job and one job per student method."""

    stages: tuple[str, ...]
    teacher: JobPlan
    students: tuple[JobPlan, ...]

    @property
    def distillation_needs_teacher(self) -> bool:
        return "distill" in self.stages and any(job.method.needs_teacher for job in self.students)


def job_plan(name: str, run_dir: str, model, method_cfg, attack, optim, method_path: str = "config.method") -> JobPlan:
    """A job with its method built (ValueError naming the bad field of the method section at ``method_path``)."""
    from mmard_jax.methods import build_method
    from mmard_jax.parallel import DATA_AXIS

    method = build_method(method_cfg, axis_name=DATA_AXIS, path=method_path)
    return JobPlan(name, run_dir, model, method_cfg, method, attack, optim)


def validate(config, device_count: int = 1) -> RunPlan:
    """Raises ValueError naming the first bad field; returns the run plan of a usable config.

    It reads nothing from disk and starts no JAX backend, so ``main`` calls it before jax.distributed starts; the
    default ``device_count=1`` then checks everything but the divisibility of batches by the real device count.
    """
    run_stages = stages(config)
    checks.non_negative_int("config.seed", config.seed)
    _check_choice("dtype", config.dtype, DTYPES)
    from mmard_jax.reporting import parse_profile_steps

    try:
        parse_profile_steps(config.profile_steps)
    except ValueError as error:
        _fail("profile_steps", str(error))
    try:
        config.compilation_cache_dir.format(workdir="")
    except (KeyError, IndexError, ValueError) as error:
        _fail(
            "compilation_cache_dir", f"{config.compilation_cache_dir!r}: {{workdir}} is its only placeholder ({error})"
        )
    _check_data(config.data)
    _check_model("student.model", config.student.model)
    _check_model("teacher.model", config.teacher.model)
    teacher = config.teacher
    teacher_job = job_plan(
        "teacher", "teacher", teacher.model, teacher.method, teacher.attack, teacher.optim, "config.teacher.method"
    )
    if teacher.method.name not in TEACHER_FREE_METHODS:
        _fail(
            "teacher.method.name", f"{teacher.method.name!r}: a teacher is trained with one of {TEACHER_FREE_METHODS}"
        )
    _check_attack("teacher.attack", teacher.attack)
    _check_optim("teacher.optim", teacher.optim, device_count)
    from mmard_jax import methods

    if not isinstance(config.baselines, str):
        _fail("baselines", f"{config.baselines!r} must be a comma-separated string of method names")
    students = []
    for name in student_methods(config):
        if name not in methods.METHOD_NAMES:
            field = "method.name" if name == config.method.name else "baselines"
            _fail(field, f"unknown method {name!r}; valid methods: {', '.join(methods.METHOD_NAMES)}")
        students.append(
            job_plan(
                name,
                f"students/{name}",
                config.student.model,
                student_method_config(config, name),
                config.attack,
                config.optim,
            )
        )
    _check_attack("attack", config.attack)
    _check_optim("optim", config.optim, device_count)
    _check_eval(config.eval, device_count)
    checks.positive_int("config.checkpoint.keep", config.checkpoint.keep)
    checks.positive_int("config.checkpoint.every_steps", config.checkpoint.every_steps)
    checks.positive_int("config.log.every_steps", config.log.every_steps)
    _check_parallel(config.parallel)
    if "distill" in run_stages and not config.teacher.model.name:
        _fail("teacher.model.name", "distillation needs a teacher model")
    known = known_data_shape(config.data)
    if known is not None:
        check_networks(config, *known)
    return RunPlan(run_stages, teacher_job, tuple(students))


def _check_data(data) -> None:
    _check_choice("data.source", data.source, DATA_SOURCES)
    if data.source == "cifar_archive":
        _check_choice("data.name", data.name, tuple(CIFAR_ARCHIVES))
    if data.source in ("mnist5k", "digits"):
        checks.positive_int("config.data.mnist5k_test_size", data.mnist5k_test_size)
    checks.non_negative_int("config.data.holdout_size", data.holdout_size)
    checks.non_negative_int("config.data.crop_padding", data.crop_padding)


def _check_eval(eval_cfg, device_count: int) -> None:
    checks.number("config.eval.eps", eval_cfg.eps, low=0.0, high=1.0)
    _check_multiple("eval.batch_size", eval_cfg.batch_size, device_count)
    checks.non_negative_int("config.eval.num_examples", eval_cfg.num_examples)  # 0 = all
    checks.non_negative_int("config.eval.autoattack_examples", eval_cfg.autoattack_examples)  # 0 = eval.num_examples
    checks.positive_int("config.eval.every_epochs", eval_cfg.every_epochs)
    checks.non_negative_int("config.eval.periodic_examples", eval_cfg.periodic_examples)  # 0 = eval.num_examples
    checks.positive_int("config.eval.periodic_pgd_steps", eval_cfg.periodic_pgd_steps)
    checks.non_negative_int("config.eval.pgd_steps", eval_cfg.pgd_steps)  # 0 = no PGD in the final evaluation
    checks.non_negative_int("config.eval.cw_steps", eval_cfg.cw_steps)  # 0 = no CW∞
    for field in ("pgd_step_size", "cw_step_size", "periodic_pgd_step_size"):
        checks.number(f"config.eval.{field}", eval_cfg[field], low=0.0, low_open=True)
    checks.number("config.eval.cw_kappa", eval_cfg.cw_kappa, low=0.0)
    checks.non_negative_int("config.eval.unroll", eval_cfg.unroll)  # 0 = by platform
    _check_reach("eval.pgd_step_size", eval_cfg.pgd_steps, eval_cfg.pgd_step_size, eval_cfg.eps)
    _check_reach("eval.cw_step_size", eval_cfg.cw_steps, eval_cfg.cw_step_size, eval_cfg.eps)
    _check_reach(
        "eval.periodic_pgd_step_size", eval_cfg.periodic_pgd_steps, eval_cfg.periodic_pgd_step_size, eval_cfg.eps
    )
    _check_choice("eval.checkpoint", eval_cfg.checkpoint, ("best", "last"))


def _check_parallel(parallel) -> None:
    num_processes = parallel.num_processes
    if not checks.is_int(num_processes) or num_processes < -1:
        _fail("parallel.num_processes", f"{num_processes!r} must be an int >= -1 (0 = one process, -1 = detect)")
    checks.positive_int("config.parallel.initialization_timeout_s", parallel.initialization_timeout_s)
    address = parallel.coordinator_address
    if address:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            _fail("parallel.coordinator_address", f"{address!r} must be 'host:port' (the address of process 0)")
    elif num_processes > 1:
        _fail(
            "parallel.coordinator_address",
            f"{num_processes} processes need the 'host:port' of process 0 (or num_processes=-1 to detect them on "
            "TPU/SLURM)",
        )
    if not checks.is_int(parallel.process_id) or parallel.process_id < -1:
        _fail("parallel.process_id", f"{parallel.process_id!r} must be an int >= -1 (-1 = auto)")
    if num_processes > 0 and parallel.process_id >= num_processes:
        _fail("parallel.process_id", f"{parallel.process_id} must be < parallel.num_processes ({num_processes})")


# Sources whose image shape (H, W, C) and class count are known without loading them; TFDS data is known once loaded.
KNOWN_DATA = {"digits": ((8, 8, 1), 10), "mnist5k": ((28, 28, 1), 10)}
CIFAR_IMAGE_SHAPE = (32, 32, 3)


def known_data_shape(data) -> tuple[tuple[int, int, int], int] | None:
    """(image shape, number of classes) of the configured data when known before loading it; None for TFDS."""
    if data.source == "cifar_archive":
        return CIFAR_IMAGE_SHAPE, CIFAR_ARCHIVES[data.name].num_classes
    return KNOWN_DATA.get(data.source)


def _built_models(config) -> tuple[tuple[str, Any], ...]:
    """(field, model section) of each network the config builds: the student's, and the teacher's unless it comes
    from config.teacher.checkpoint (whose checkpoint records its own architecture)."""
    models = (("student.model", config.student.model),)
    if not config.teacher.checkpoint:
        models += (("teacher.model", config.teacher.model),)
    return models


def check_networks(config, image_shape: tuple[int, int, int], num_classes: int) -> None:
    """Each network of the config builds and takes these images: a mean/std per channel that does not match them, or
    model kwargs the constructor or the initialisation refuses, fail naming their field.

    Shapes only (jax.eval_shape): nothing is computed and no JAX backend starts, so this may run before
    jax.distributed.initialize.
    """
    from mmard_jax import networks

    channels = image_shape[-1]
    for field, model in _built_models(config):
        for key in ("mean", "std"):
            if model[key] and len(model[key]) != channels:
                _fail(
                    f"{field}.{key}",
                    f"{tuple(model[key])} has {len(model[key])} entries, but the {config.data.name} images have "
                    f"{channels} channel(s)",
                )
        kwargs = model.kwargs.to_dict()
        try:
            _abstract_init(networks.build_module(model, num_classes, dtype=config.dtype), image_shape)
        except (TypeError, ValueError) as error:
            _fail(
                f"{field}.kwargs" if kwargs else f"{field}.name",
                f"{model.name} with kwargs {kwargs} cannot be built for {'x'.join(map(str, image_shape))} images "
                f"and {num_classes} classes: {error}",
            )


def _abstract_init(module, image_shape: tuple[int, int, int]) -> None:
    """Traces the module's initialisation for one image, the PRNG key included (an eager key would start the
    backend)."""
    import jax

    from mmard_jax import networks

    jax.eval_shape(lambda: networks.initial_variables(module, jax.random.PRNGKey(0), image_shape))


def _training_batches(config, plan: RunPlan) -> tuple[tuple[str, int], ...]:
    """(field, global batch size) of each training job the stages run."""
    batches = ()
    if "teacher" in plan.stages and not config.teacher.checkpoint:
        batches += (("teacher.optim.batch_size", config.teacher.optim.batch_size),)
    if "distill" in plan.stages:
        batches += (("optim.batch_size", config.optim.batch_size),)
    return batches


def check_data(config, plan: RunPlan, dataset) -> None:
    """The checks that need the loaded data, run before any job starts: each network against its images and classes
    (a TFDS source's are known only now) and each training batch against the training set."""
    check_networks(config, dataset.image_shape, dataset.num_classes)
    train_size = dataset.train.num_examples
    for field, batch_size in _training_batches(config, plan):
        if batch_size > train_size:
            _fail(field, f"{batch_size} exceeds the {train_size} training examples of {config.data.name}; lower it")


def check_paths(config, workdir: str) -> None:
    """The local paths a run needs, checked before anything is written: WORKDIR must be a writable folder or be
    creatable as one, and config.teacher.checkpoint must be a folder. Remote ones (gs://...) wait for first access."""
    from mmard_jax import storage

    if not workdir:
        checks.fail("--workdir", "must name a folder")
    if not storage.is_remote(workdir):
        existing = os.path.abspath(workdir)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            checks.fail("--workdir", f"{existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            checks.fail("--workdir", f"cannot create or write in {existing}")
    teacher = config.teacher.checkpoint
    if teacher and not storage.is_remote(teacher) and not os.path.isdir(teacher):
        _fail(
            "teacher.checkpoint",
            f"{teacher!r} is not a folder; name a teacher run directory (ours, or one written by "
            "python -m mmard_jax.import_teacher)",
        )
