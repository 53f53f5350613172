"""Studies: named grids of distillation runs, trained resumably and reported with seed statistics (docs/study.md).

python -m mmard_jax.study --config configs/mnist5k.py --study plug_and_play --workdir runs/study --seeds 0,1,2

A study is a list of runs, each a (variant, seed, teacher) with its config overrides:

- ``plug_and_play``: every distillation base (ARD, IAD, RSLAD, AdaAD) alone, with MMARD's inner part, its outer part
  and both (``method.mmard_inner`` / ``method.mmard_outer``);
- ``teacher_ladder``: teachers of increasing robustness (``--ladder``), and for each one students by RSLAD, AdaAD and
  the MMARD variant named by ``--ladder_student``;
- ``tiny``: RSLAD alone and with the outer part (the tests' grid).

Each teacher is trained (and evaluated) once into TEACHERS/<id> with a fixed seed (``--teacher_seed``), so seeds vary
only the students; each student run goes to WORKDIR/runs/<label>/seed<k>. A finished run is never retrained, an
interrupted one resumes from its checkpoints, and a run directory made with other settings is refused. Every
invocation ends by writing WORKDIR/study.json, study.md and study.png from what the run directories hold.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import io
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath

from mmard_jax import checkpoint as ckpt_lib
from mmard_jax import config as config_lib
from mmard_jax import main as entry
from mmard_jax import methods, parallel, preemption, storage, train
from mmard_jax.data import load_dataset

logger = logging.getLogger("mmard_jax.study")

BASES = ("ard", "iad", "rslad", "adaad")  # the distillation bases MMARD's parts plug into
PART_SETS = ((), ("inner",), ("outer",), ("inner", "outer"))  # base alone, +inner, +outer, +both
LADDER_METHODS = ("rslad", "adaad")  # the ladder's reference students, besides --ladder_student
BASE_TEACHER = "base"  # the config's own teacher (trained, or config.teacher.checkpoint)
STUDIES = ("plug_and_play", "teacher_ladder", "tiny")

# Teacher ladders per data source, weakest first (``--ladder`` overrides). A rung is 'base' or
# MODEL[:KEY=VALUE...]@EPOCHS; the MNIST-5k rungs end at the demo teacher (cnn 32-64, 15 epochs).
DEFAULT_LADDERS = {
    "mnist5k": "cnn:widths=8-16@2,cnn:widths=16-32@4,cnn:widths=32-64@8,base",
    "digits": "cnn:widths=4@1,base",
    "cifar_archive": "resnet18@10,resnet18@30,wrn-34-10@30,base",
    "tfds": "resnet18@10,resnet18@30,wrn-34-10@30,base",
}

# Config fields that say where things are or how a run reports, not what it computes: a finished or interrupted run
# may be re-run with other values (a path prefix covers every field below it).
VOLATILE_FIELDS = (
    "teacher.checkpoint",  # a student run records its teacher's id instead (the path depends on the working dir)
    "data.archive_dir",
    "data.data_dir",
    "data.download",
    "compilation_cache_dir",
    "profile_steps",
    "log",
    "checkpoint",
    "parallel.coordinator_address",
    "parallel.num_processes",
    "parallel.process_id",
    "parallel.initialization_timeout_s",
)
# What a teacher's training and evaluation depend on (it is shared by runs whose student settings differ).
TEACHER_FIELDS = ("teacher", "data", "seed", "dtype", "eval", "parallel.sync_batch_stats")

RECORD_FILE = "study_run.json"  # in each run / teacher directory: what it is and the settings it was made with
RESULTS_FILE = "results.json"  # written by the final evaluation (main.final_evaluation)
METRICS = ("clean", "fgsm", "pgd", "cw", "autoattack")  # keys of a results.json accuracy entry
ROBUST_METRICS = ("pgd", "autoattack")  # compared between variants and bases, plotted

# Wall seconds on 2 CPU cores, measured on the MNIST-5k demo (docs/study.md, "Cost"): one epoch of a student (cnn
# 16-32 + BN, PGD-10, with its periodic evaluation) or of the demo teacher (cnn 32-64, TRADES PGD-10); one final
# evaluation (FGSM, PGD-40, CW∞-30 on 1,000 digits); AutoAttack per example (a robust teacher costs about twice a
# student: more of its points survive to the expensive attacks).
CPU_SECONDS = {
    "mnist5k": {
        "student_epoch": 4.5,
        "teacher_epoch": 6.0,
        "evaluation": 10.0,
        "teacher_evaluation": 25.0,
        "autoattack_example": 0.25,
        "teacher_autoattack_example": 0.5,
    }
}


class StudyError(ValueError):
    """A study that cannot go on as asked (a run directory made with other settings, a bad grid option)."""


# ----------------------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A teacher of the study: its id (a directory name) and the config overrides that make it."""

    id: str
    overrides: tuple[tuple[str, Any], ...] = ()  # (dotted config field, value)


@dataclasses.dataclass(frozen=True)
class Run:
    """One student run: a method variant distilled from one teacher with one seed."""

    variant: str  # 'adaad', 'adaad+inner', 'adaad+outer', 'adaad+both' or 'mmard'
    base: str  # the distillation base of the variant
    parts: tuple[str, ...]  # MMARD parts added to the base: () or some of ('inner', 'outer')
    seed: int
    teacher: str  # a Teacher id
    label: str  # directory name under WORKDIR/runs: the variant, '@teacher' appended in multi-teacher studies
    overrides: tuple[tuple[str, Any], ...]  # the method fields of the variant

    @property
    def run_dir(self) -> str:
        return f"runs/{self.label}/seed{self.seed}"

    @property
    def name(self) -> str:
        return f"{self.label} seed {self.seed}"


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    kind: str  # 'variants' (bars per base) or 'ladder' (student vs teacher robustness)
    teachers: tuple[Teacher, ...]
    runs: tuple[Run, ...]


def variant_name(base: str, parts: tuple[str, ...]) -> str:
    """'adaad', 'adaad+inner', 'adaad+outer' or 'adaad+both'."""
    if not parts:
        return base
    return f"{base}+{'both' if len(parts) == 2 else parts[0]}"


def parse_variant(spec: str, method_cfg=None) -> tuple[str, tuple[str, ...], tuple[tuple[str, Any], ...]]:
    """(base, parts, method overrides) of 'BASE', 'BASE+inner', 'BASE+outer', 'BASE+both' or 'mmard' (the base and
    parts named by ``method_cfg.mmard_base`` / ``mmard_parts``; the shipped ones without a config)."""
    if spec == "mmard":
        method_cfg = method_cfg or config_lib.method_config("mmard")
        parts = methods.MMARD_PARTS.get(method_cfg.mmard_parts, ())
        return method_cfg.mmard_base, parts, (("method.name", "mmard"),)
    base, _, part = spec.partition("+")
    parts = {"": (), **methods.MMARD_PARTS}
    if base not in BASES or part not in parts:
        raise StudyError(
            f"--ladder_student: {spec!r} is not a variant; use 'mmard' or BASE[+inner|+outer|+both] with BASE one of "
            f"{', '.join(BASES)}"
        )
    chosen = parts[part]
    return base, chosen, _method_overrides(base, chosen)


def _method_overrides(base: str, parts: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    return (("method.name", base), ("method.mmard_inner", "inner" in parts), ("method.mmard_outer", "outer" in parts))


def _runs(
    variants: Iterable[tuple[str, str, tuple[str, ...], tuple]], teachers: tuple[Teacher, ...], seeds: tuple[int, ...]
) -> tuple[Run, ...]:
    """Every (seed, teacher, variant), seed-major: an interrupted study has whole seeds done first."""
    variants = tuple(variants)
    return tuple(
        Run(name, base, parts, seed, t.id, name if len(teachers) == 1 else f"{name}@{t.id}", overrides)
        for seed in seeds
        for t in teachers
        for name, base, parts, overrides in variants
    )


def plug_and_play(seeds: tuple[int, ...], bases: tuple[str, ...] = BASES) -> Study:
    """Each base alone, +inner, +outer and +both, distilled from the config's teacher."""
    variants = [
        (variant_name(base, parts), base, parts, _method_overrides(base, parts))
        for base in bases
        for parts in PART_SETS
    ]
    teachers = (Teacher(BASE_TEACHER),)
    return Study("plug_and_play", "variants", teachers, _runs(variants, teachers, seeds))


def tiny(seeds: tuple[int, ...]) -> Study:
    """RSLAD alone and with MMARD's outer part: the smallest grid with a variant/base pair (used by the tests)."""
    variants = [(variant_name("rslad", p), "rslad", p, _method_overrides("rslad", p)) for p in ((), ("outer",))]
    teachers = (Teacher(BASE_TEACHER),)
    return Study("tiny", "variants", teachers, _runs(variants, teachers, seeds))


def teacher_ladder(
    seeds: tuple[int, ...], teachers: tuple[Teacher, ...], ladder_student: str = "mmard", method_cfg=None
) -> Study:
    """For each teacher, students by RSLAD, AdaAD and ``ladder_student`` (a variant: 'mmard', 'adaad+outer', ...)."""
    variants = [(m, m, (), _method_overrides(m, ())) for m in LADDER_METHODS]
    if ladder_student not in LADDER_METHODS:
        variants.append((ladder_student, *parse_variant(ladder_student, method_cfg)))
    return Study("teacher_ladder", "ladder", teachers, _runs(variants, teachers, seeds))


def _value(text: str):
    """A rung's kwarg value: int, dash-separated ints (a tuple), true/false, float, or the text itself."""
    if re.fullmatch(r"\d+(-\d+)+", text):
        return tuple(int(v) for v in text.split("-"))
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_ladder(spec: str, config) -> tuple[Teacher, ...]:
    """Teachers of a ladder spec: comma-separated rungs, each 'base' (the config's teacher) or MODEL[:K=V...]@EPOCHS.

    A rung with the config teacher's model name keeps that model's other kwargs; the teacher's learning-rate decay
    epochs are scaled to the rung's epochs; the rung's teacher is always trained (config.teacher.checkpoint cleared).
    """
    teachers = []
    for rung in (r.strip() for r in spec.split(",") if r.strip()):
        if rung == BASE_TEACHER:
            teachers.append(Teacher(BASE_TEACHER))
            continue
        match = re.fullmatch(r"([\w-]+)((?::\w+=[\w.-]+)*)@(\d+)", rung)
        if match is None:
            raise StudyError(
                f"--ladder: rung {rung!r} is not 'base' or MODEL[:KEY=VALUE...]@EPOCHS (cnn:widths=8-16@3)"
            )
        name, kwargs_text, epochs = match.group(1), match.group(2), int(match.group(3))
        rung_kwargs = dict(item.split("=", 1) for item in kwargs_text.split(":") if item)
        kwargs = config.teacher.model.kwargs.to_dict() if name == config.teacher.model.name else {}
        kwargs.update({k: _value(v) for k, v in rung_kwargs.items()})
        base_optim = config.teacher.optim
        decay = tuple(sorted({max(1, round(d * epochs / base_optim.epochs)) for d in base_optim.decay_epochs}))
        suffix = "".join(f"_{k}{'-'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in rung_kwargs.items())
        overrides = (
            ("teacher.checkpoint", ""),
            ("teacher.model.name", name),
            ("teacher.model.kwargs", kwargs),
            ("teacher.optim.epochs", epochs),
            ("teacher.optim.decay_epochs", tuple(d for d in decay if d < epochs)),
        )
        teachers.append(Teacher(f"{name}{suffix}_e{epochs}", overrides))
    ids = [t.id for t in teachers]
    if len(set(ids)) != len(ids) or len(ids) < 2:
        raise StudyError(f"--ladder: {spec!r} must name at least 2 distinct teachers, got {ids}")
    return tuple(teachers)


def build_study(name: str, seeds: tuple[int, ...], config, ladder: str = "", ladder_student: str = "mmard") -> Study:
    """The named study's grid for these seeds (no training)."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise StudyError(f"--seeds: {seeds} must name at least one seed, each once")
    if name == "plug_and_play":
        return plug_and_play(seeds)
    if name == "tiny":
        return tiny(seeds)
    if name == "teacher_ladder":
        spec = ladder or DEFAULT_LADDERS.get(config.data.source, "")
        if not spec:
            raise StudyError(f"--ladder: no default ladder for data source {config.data.source!r}; give one")
        return teacher_ladder(seeds, parse_ladder(spec, config), ladder_student, config.method)
    raise StudyError(f"--study: {name!r} is not one of {', '.join(STUDIES)}")


def select(runs: Iterable[Run], only: str) -> tuple[Run, ...]:
    """The runs whose label matches one of the comma-separated glob patterns of ``only`` ('' = all)."""
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    return tuple(r for r in runs if not patterns or any(fnmatch.fnmatchcase(r.label, p) for p in patterns))


# ----------------------------------------------------------------------------------------------------------
# Configs and settings records
# ----------------------------------------------------------------------------------------------------------


def with_overrides(config, overrides: Iterable[tuple[str, Any]]):
    """A copy of ``config`` with each dotted field set (a dict value replaces a whole section)."""
    config = copy.deepcopy(config)
    for field, value in overrides:
        *parents, leaf = field.split(".")
        node = config
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, ml_collections.ConfigDict(value) if isinstance(value, dict) else value)
    return config


def teacher_config(config, teacher: Teacher, teacher_seed: int):
    """The config that trains and evaluates ``teacher`` (its seed fixed, whatever the students' seeds)."""
    return with_overrides(config, (*teacher.overrides, ("stages", "teacher,eval"), ("seed", teacher_seed)))


def student_config(config, run: Run, teacher: Teacher, teacher_dir: epath.Path):
    """The config of one student run: distil from the trained teacher in ``teacher_dir`` and evaluate the student."""
    checkpoint = config.teacher.checkpoint if _given_checkpoint(config, teacher) else os.fspath(teacher_dir / "teacher")
    return with_overrides(
        config,
        (
            *teacher.overrides,
            *run.overrides,
            ("teacher.checkpoint", checkpoint),
            ("stages", "distill,eval"),
            ("baselines", ""),
            ("seed", run.seed),
        ),
    )


def _given_checkpoint(config, teacher: Teacher) -> bool:
    """The base teacher is config.teacher.checkpoint when one is set: loaded, not trained."""
    return teacher.id == BASE_TEACHER and bool(config.teacher.checkpoint)


def flat_settings(config_dict: dict, prefix: str = "") -> dict[str, Any]:
    """{'dotted.field': value} of a config as JSON (tuples as lists), without the volatile fields."""
    flat = {}
    for key, value in config_dict.items():
        field = f"{prefix}{key}"
        if any(field == v or field.startswith(v + ".") for v in VOLATILE_FIELDS):
            continue
        if isinstance(value, dict):
            flat.update(flat_settings(value, field + "."))
        else:
            flat[field] = json.loads(json.dumps(value))
    return flat


def as_json(config) -> dict:
    """A config as the JSON that results.json records."""
    return json.loads(config.to_json_best_effort())


def student_settings(config_json: dict) -> dict[str, Any]:
    """The settings a student run directory is bound to: every non-volatile field."""
    return flat_settings(config_json)


def teacher_settings(config_json: dict) -> dict[str, Any]:
    """The settings a teacher directory is bound to: what its training and evaluation read, and a given checkpoint."""
    flat = flat_settings(config_json)
    kept = {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in TEACHER_FIELDS)}
    return {**kept, "teacher.checkpoint": config_json["teacher"]["checkpoint"]}


def differences(old: dict, new: dict) -> list[str]:
    """'field: was X, now Y' for every field whose value differs (config.changed_settings)."""
    return [f"{k}: was {before!r}, now {after!r}" for k, before, after in config_lib.changed_settings(old, new)]


def read_json(path: epath.Path) -> dict | None:
    """A JSON file's content, or None when it is missing or cut short (a kill during its write)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_atomic(path: epath.Path, data: str | bytes) -> None:
    """Writes a whole file or nothing: a kill mid-write leaves the previous version."""
    tmp = path.parent / f".{path.name}.tmp"
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, encoding="utf-8")
    tmp.replace(path)


def check_directory(directory: epath.Path, what: str, identity: dict, current: dict) -> dict | None:
    """The directory's record if it was made with ``current`` settings; None if it is new; refuses anything else.

    ``identity`` (what it is: variant, seed, teacher) and ``current`` (its settings) must equal the record's.
    """
    record = read_json(directory / RECORD_FILE)
    if record is None:
        if directory.exists() and any(directory.iterdir()):
            raise StudyError(f"{what}: {directory} is not empty but has no {RECORD_FILE}; it was not made by a study")
        return None
    changed = differences(record.get("identity", {}), identity) + differences(record.get("settings", {}), current)
    if changed:
        raise StudyError(
            f"{what}: {directory} was made with other settings; this study would mix them:\n  "
            + "\n  ".join(changed)
            + "\nUse another --workdir, or the settings it was made with."
        )
    return record


def is_finished(directory: epath.Path, current: dict, project=student_settings) -> bool:
    """Its results.json exists, is whole, and was computed with the ``current`` settings (``project`` of its config)."""
    results = read_json(directory / RESULTS_FILE)
    return results is not None and not config_lib.changed_settings(project(results["config"]), current)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Session:
    """What every run of one invocation shares: the data, the mesh, the preemption guard and the directories."""

    config: Any
    workdir: epath.Path
    teachers_dir: epath.Path
    teacher_seed: int
    dataset: Any = None
    mesh: Any = None
    guard: Any = None
    teachers: dict = dataclasses.field(default_factory=dict)  # id -> Teacher

    def load(self) -> None:
        """The dataset and mesh, once (every run of a study reads the same data)."""
        if self.dataset is None:
            self.dataset = load_dataset(self.config.data)
            self.mesh = parallel.make_mesh()


def _update_record(directory: epath.Path, record: dict, **fields) -> dict:
    record = {**record, **fields}
    write_atomic(directory / RECORD_FILE, json.dumps(record, indent=2))
    return record


def _timed(directory: epath.Path, record: dict, work) -> float:
    """Runs ``work()``; adds its wall seconds to the record's, also when it is interrupted; returns them."""
    start = time.perf_counter()
    try:
        work()
    finally:
        seconds = time.perf_counter() - start
        _update_record(directory, record, wall_seconds=record.get("wall_seconds", 0.0) + seconds)
    return seconds


def _teacher_directory(session: Session, teacher: Teacher):
    """(config, directory, identity, settings, record or None, finished) of a teacher; refuses a mismatched one."""
    config = teacher_config(session.config, teacher, session.teacher_seed)
    directory = session.teachers_dir / teacher.id
    identity = {"teacher": teacher.id}
    current = teacher_settings(as_json(config))
    record = check_directory(directory, f"teacher {teacher.id}", identity, current)
    finished = record is not None and is_finished(directory, current, teacher_settings)
    return config, directory, identity, current, record, finished


def teacher_state(session: Session, teacher: Teacher) -> str:
    """'finished' (trained and evaluated), 'partial' or 'new'; refuses a directory made with other settings."""
    _, _, _, _, record, finished = _teacher_directory(session, teacher)
    return "finished" if finished else ("new" if record is None else "partial")


def ensure_teacher(session: Session, teacher: Teacher) -> epath.Path:
    """The teacher's directory, trained and evaluated first if needed (resumed if interrupted)."""
    config, directory, identity, current, record, finished = _teacher_directory(session, teacher)
    if finished:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    record = record or _update_record(directory, {}, identity=identity, settings=current)
    what = "evaluating the given" if _given_checkpoint(session.config, teacher) else "training and evaluating"
    logger.info("teacher %s: %s teacher into %s", teacher.id, what, directory)
    session.load()

    def work():
        plan = config_lib.validate(config, jax.device_count())
        config_lib.check_data(config, plan, session.dataset)
        network = entry.teacher_network(config, plan.teacher, session.dataset, session.mesh, directory, may_train=True)
        teacher_only = dataclasses.replace(plan, students=())
        entry.final_evaluation(config, teacher_only, session.dataset, session.mesh, directory, network, session.guard)

    seconds = _timed(directory, record, work)
    logger.info("teacher %s: done in %.0f s", teacher.id, seconds)
    return directory


def _warnings(config, run: Run) -> list[str]:
    """Settings of a run that make it meaningless in a study, said before it trains."""
    if run.base == "iad" and config.method.iad_warmup_epochs >= config.optim.epochs:
        return [
            f"config.method.iad_warmup_epochs = {config.method.iad_warmup_epochs} >= optim.epochs = "
            f"{config.optim.epochs}: IAD's introspection term never starts (the paper starts it at 30% of training)"
        ]
    return []


def run_student(session: Session, run: Run) -> float:
    """Trains (or resumes) and evaluates one student; returns the wall seconds it took now."""
    teacher = session.teachers[run.teacher]
    teacher_dir = session.teachers_dir / teacher.id
    config = student_config(session.config, run, teacher, teacher_dir)
    directory = session.workdir / run.run_dir
    identity = run_identity(run)
    current = student_settings(as_json(config))
    record = check_directory(directory, run.name, identity, current)
    ensure_teacher(session, teacher)
    directory.mkdir(parents=True, exist_ok=True)
    record = record or _update_record(directory, {}, identity=identity, settings=current)
    session.load()

    def work():
        # main.run's stages, minus the teacher's evaluation: the study evaluates each teacher once, not per student.
        plan = config_lib.validate(config, jax.device_count())
        dataset, mesh, guard = session.dataset, session.mesh, session.guard
        config_lib.check_data(config, plan, dataset)
        network = entry.teacher_network(config, plan.teacher, dataset, mesh, directory, may_train=False)
        entry.train_students(config, plan, dataset, mesh, directory, network, guard)
        entry.final_evaluation(config, plan, dataset, mesh, directory, None, guard)

    return _timed(directory, record, work)


def run_identity(run: Run) -> dict:
    return {
        "variant": run.variant,
        "base": run.base,
        "parts": list(run.parts),
        "seed": run.seed,
        "teacher": run.teacher,
    }


def run_state(session: Session, run: Run) -> str:
    """'finished', 'partial' (a directory to resume) or 'new'; refuses a directory made with other settings."""
    teacher = session.teachers[run.teacher]
    config = student_config(session.config, run, teacher, session.teachers_dir / teacher.id)
    directory = session.workdir / run.run_dir
    current = student_settings(as_json(config))
    record = check_directory(directory, run.name, run_identity(run), current)
    if record is None:
        return "new"
    return "finished" if is_finished(directory, current) else "partial"


def _accuracy_text(accuracy: dict, config) -> str:
    names = metric_names(config)
    return ", ".join(f"{names[k]} {100 * accuracy[k]:.1f}" for k in METRICS if k in accuracy)


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "unknown (no timing for this data source yet)"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def check_grid(session: Session, runs: tuple[Run, ...], device_count: int) -> None:
    """Validates the config of every run and of the teachers they need, before anything trains."""
    checked = set()
    for run in runs:
        teacher = session.teachers[run.teacher]
        try:
            if teacher.id not in checked:
                config_lib.validate(teacher_config(session.config, teacher, session.teacher_seed), device_count)
                checked.add(teacher.id)
            config_lib.validate(student_config(session.config, run, teacher, epath.Path("teacher")), device_count)
        except ValueError as error:
            raise StudyError(f"{run.name} (teacher {teacher.id}): {error}") from None


def execute(session: Session, study: Study, runs: tuple[Run, ...]) -> None:
    """Runs the given runs of ``study`` in order, logging '[i/n] name: ...' with an ETA; finished runs are skipped."""
    check_grid(session, runs, jax.device_count())
    for teacher_id in dict.fromkeys(run.teacher for run in runs):  # refuses mismatched directories before training
        teacher_state(session, session.teachers[teacher_id])
    states = {run: run_state(session, run) for run in runs}
    todo = [run for run in runs if states[run] != "finished"]
    estimate = estimate_seconds(session.config, study, todo, session)
    logger.info(
        "study %s: %d runs selected, %d finished earlier, %d to run (estimated %s)",
        study.name,
        len(runs),
        len(runs) - len(todo),
        len(todo),
        _duration(estimate),
    )
    spent: list[float] = []
    for index, run in enumerate(runs, start=1):
        prefix = f"[{index}/{len(runs)}] {run.variant} seed {run.seed} (teacher {run.teacher})"
        if states[run] == "finished":
            results = read_json(session.workdir / run.run_dir / RESULTS_FILE)
            accuracy = _only_result(results)["accuracy"]
            logger.info("%s: skipped, finished earlier: %s", prefix, _accuracy_text(accuracy, session.config))
            continue
        remaining = len(todo) - len(spent)
        eta = (sum(spent) / len(spent) * remaining) if spent else estimate
        for warning in _warnings(student_config(session.config, run, session.teachers[run.teacher], epath.Path()), run):
            logger.warning("%s: warning: %s", prefix, warning)
        resumed = " (resuming)" if states[run] == "partial" else ""
        logger.info("%s: starting%s; %d runs left, ETA %s", prefix, resumed, remaining, _duration(eta))
        seconds = run_student(session, run)
        spent.append(seconds)
        accuracy = _only_result(read_json(session.workdir / run.run_dir / RESULTS_FILE))["accuracy"]
        logger.info("%s: done in %s: %s", prefix, _duration(seconds), _accuracy_text(accuracy, session.config))


def estimate_seconds(config, study: Study, runs: Iterable[Run], session: Session | None = None) -> float:
    """Wall seconds the runs (and the teachers they need that are not trained yet) should take.

    From the finished runs of this workdir when there are some (their mean wall time), else from the per-epoch
    timings measured on the demo (CPU_SECONDS, 2 CPU cores); NaN when neither applies.
    """
    runs = tuple(runs)
    walls = [r["wall_seconds"] for r in (collect_runs(session.workdir) if session else []) if "wall_seconds" in r]
    timing = CPU_SECONDS.get(config.data.source)
    # The timing table is MNIST-5k's, whose test split has data.mnist5k_test_size digits (num_examples 0 = all).
    aa = (entry.autoattack_examples(config.eval) or config.data.mnist5k_test_size) if config.eval.autoattack else 0
    if walls:
        per_run = float(np.mean(walls))
    elif timing:
        per_run = timing["student_epoch"] * config.optim.epochs + timing["evaluation"]
        per_run += timing["autoattack_example"] * aa
    else:
        return math.nan
    needed = {r.teacher for r in runs}
    teachers = [t for t in study.teachers if t.id in needed]
    if session is not None:
        teachers = [t for t in teachers if teacher_state(session, t) != "finished"]
    teacher_seconds = 0.0
    for t in teachers if timing else ():
        if not _given_checkpoint(config, t):
            teacher_seconds += timing["teacher_epoch"] * teacher_config(config, t, 0).teacher.optim.epochs
        teacher_seconds += timing["teacher_evaluation"] + timing["teacher_autoattack_example"] * aa
    return per_run * len(runs) + teacher_seconds


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def metric_names(config) -> dict[str, str]:
    """Column names of the metrics, with the attack budgets of this config."""
    return {
        "clean": "Clean",
        "fgsm": "FGSM",
        "pgd": f"PGD-{config.eval.pgd_steps}",
        "cw": f"CW∞-{config.eval.cw_steps}",
        "autoattack": "AutoAttack",
    }


def _only_result(results: dict) -> dict:
    """The one student's entry of a study run's results.json."""
    students = [v for k, v in results["results"].items() if k != "teacher"]
    if len(students) != 1:
        raise StudyError(f"results.json: expected one student, found {sorted(results['results'])}")
    return students[0]


def collect_runs(workdir: epath.Path) -> list[dict]:
    """Every finished run under WORKDIR/runs, from its record and results.json: what it is, accuracies, wall time."""
    rows = []
    runs_dir = workdir / "runs"
    if not runs_dir.exists():
        return rows
    for record_path in sorted(runs_dir.glob(f"*/seed*/{RECORD_FILE}")):
        directory = record_path.parent
        record, results = read_json(record_path), read_json(directory / RESULTS_FILE)
        if record is None or results is None:
            continue
        entry_ = _only_result(results)
        row = {
            **record["identity"],
            "label": directory.parent.name,
            "run_dir": f"runs/{directory.parent.name}/{directory.name}",
            "accuracy": entry_["accuracy"],
            "num_examples": entry_["num_examples"],
        }
        if "autoattack" in entry_:
            row["autoattack_examples"] = entry_["autoattack"]["num_examples"]
        if "wall_seconds" in record:
            row["wall_seconds"] = round(record["wall_seconds"], 1)
        rows.append(row)
    return rows


def collect_teachers(teachers_dir: epath.Path, ids: Iterable[str]) -> dict[str, dict]:
    """{id: {'accuracy': ..., 'wall_seconds': ...}} of the evaluated teachers among ``ids``."""
    teachers = {}
    for tid in ids:
        results = read_json(teachers_dir / tid / RESULTS_FILE)
        record = read_json(teachers_dir / tid / RECORD_FILE) or {}
        if results is not None and "teacher" in results.get("results", {}):
            teachers[tid] = {"accuracy": results["results"]["teacher"]["accuracy"]}
            if "wall_seconds" in record:
                teachers[tid]["wall_seconds"] = round(record["wall_seconds"], 1)
    return teachers


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n − 1; None for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def summarize(rows: list[dict]) -> list[dict]:
    """Per run label (variant, teacher): seeds and mean ± std of each metric, in the rows' order."""
    summary = []
    for label in dict.fromkeys(r["label"] for r in rows):
        group = [r for r in rows if r["label"] == label]
        first = group[0]
        stats = {}
        for metric in METRICS:
            values = [r["accuracy"][metric] for r in group if metric in r["accuracy"]]
            if len(values) == len(group):
                mean, std = mean_std(values)
                stats[metric] = {"mean": mean, "std": std}
        walls = [r["wall_seconds"] for r in group if "wall_seconds" in r]
        summary.append(
            {
                "label": label,
                "variant": first["variant"],
                "base": first["base"],
                "parts": first["parts"],
                "teacher": first["teacher"],
                "seeds": sorted(r["seed"] for r in group),
                "metrics": stats,
                "mean_wall_seconds": round(float(np.mean(walls)), 1) if walls else None,
            }
        )
    return summary


def paired(rows: list[dict]) -> list[dict]:
    """Each variant with MMARD parts against its base (same teacher), over the seeds both have: wins and mean Δ."""
    by_key = {(r["variant"], r["teacher"], r["seed"]): r for r in rows}
    pairs = []
    for label in dict.fromkeys(r["label"] for r in rows if r["parts"]):
        group = [r for r in rows if r["label"] == label]
        first = group[0]
        matched = [(r, by_key.get((first["base"], r["teacher"], r["seed"]))) for r in group]
        matched = [(v, b) for v, b in matched if b is not None]
        if not matched:
            continue
        pair = {
            "label": label,
            "variant": first["variant"],
            "base": first["base"],
            "teacher": first["teacher"],
            "seeds": sorted(v["seed"] for v, _ in matched),
        }
        for metric in ROBUST_METRICS:
            if all(metric in v["accuracy"] and metric in b["accuracy"] for v, b in matched):
                deltas = [v["accuracy"][metric] - b["accuracy"][metric] for v, b in matched]
                mean, std = mean_std(deltas)
                pair[metric] = {"wins": sum(d > 0 for d in deltas), "mean_delta": mean, "std_delta": std}
        pairs.append(pair)
    return pairs


def robust_metric(rows: list[dict]) -> str:
    """AutoAttack when every run has it, else PGD: the metric of the ladder."""
    return "autoattack" if rows and all("autoattack" in r["accuracy"] for r in rows) else "pgd"


def ladder(summary: list[dict], teachers: dict[str, dict], metric: str) -> list[dict]:
    """Per variant: its students' mean robust accuracy against each teacher's, the spread and the fitted slope.

    spread = max − min over teachers of the student mean; slope = least-squares d(student) / d(teacher).
    """
    out = []
    for variant in dict.fromkeys(s["variant"] for s in summary):
        points = [
            {
                "teacher": s["teacher"],
                "teacher_accuracy": teachers[s["teacher"]]["accuracy"][metric],
                "mean": s["metrics"][metric]["mean"],
                "std": s["metrics"][metric]["std"],
                "seeds": s["seeds"],
            }
            for s in summary
            if s["variant"] == variant and s["teacher"] in teachers and metric in s["metrics"]
        ]
        points.sort(key=lambda p: p["teacher_accuracy"])
        if not points:
            continue
        means = [p["mean"] for p in points]
        xs = [p["teacher_accuracy"] for p in points]
        slope = float(np.polyfit(xs, means, 1)[0]) if len(set(xs)) > 1 else None
        out.append({"variant": variant, "points": points, "spread": max(means) - min(means), "slope": slope})
    return out


def build_report(workdir: epath.Path, teachers_dir: epath.Path, study: Study, config) -> dict:
    """study.json's content, computed from the run and teacher directories alone (no training, no time stamps)."""
    labels = {r.label for r in study.runs}
    rows = [r for r in collect_runs(workdir) if r["label"] in labels]
    order = {(r.label, r.seed): i for i, r in enumerate(study.runs)}
    rows.sort(key=lambda r: order.get((r["label"], r["seed"]), len(order)))
    teachers = collect_teachers(teachers_dir, [t.id for t in study.teachers])
    for row in rows:
        if row["teacher"] in teachers:
            row["teacher_accuracy"] = teachers[row["teacher"]]["accuracy"]
    summary = summarize(rows)
    report = {
        "study": study.name,
        "kind": study.kind,
        "data": config.data.name,
        "metric_names": metric_names(config),
        "grid_runs": len(study.runs),
        "finished_runs": len(rows),
        "teachers": teachers,
        "runs": rows,
        "summary": summary,
        "pairs": paired(rows),
    }
    if study.kind == "ladder":
        report["ladder_metric"] = robust_metric(rows)
        report["ladder"] = ladder(summary, teachers, report["ladder_metric"])
    return report


def _pct(stats: dict | None) -> str:
    if stats is None:
        return "—"
    if stats["std"] is None:
        return f"{100 * stats['mean']:.1f}"
    return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


def _delta(stats: dict | None, seeds: int) -> tuple[str, str]:
    if stats is None:
        return "—", "—"
    spread = f" ± {100 * stats['std_delta']:.1f}" if stats["std_delta"] is not None else ""
    return f"{stats['wins']}/{seeds}", f"{100 * stats['mean_delta']:+.1f}{spread}"


def report_markdown(report: dict) -> str:
    """study.md: per-variant mean ± std, variant-vs-base seed-paired comparisons, teachers, and the ladder."""
    names = report["metric_names"]
    shown = [m for m in ("clean", "pgd", "cw", "autoattack") if any(m in s["metrics"] for s in report["summary"])]
    examples = sorted({r["num_examples"] for r in report["runs"]})
    aa_examples = sorted({r["autoattack_examples"] for r in report["runs"] if "autoattack_examples" in r})
    lines = [
        f"# Study `{report['study']}` on {report['data']}",
        "",
        f"{report['finished_runs']} of {report['grid_runs']} runs finished. Accuracy (%) on the first "
        f"{', '.join(map(str, examples)) or '—'} test examples"
        + (f" (AutoAttack: the first {', '.join(map(str, aa_examples))})" if aa_examples else "")
        + "; mean ± sample standard deviation (n − 1) over the seeds.",
        "",
        "## Accuracy per variant",
        "",
        "| variant | teacher | seeds | " + " | ".join(names[m] for m in shown) + " | wall (s, mean) |",
        "|---|---|---|" + "---|" * len(shown) + "---|",
    ]
    for s in report["summary"]:
        cells = " | ".join(_pct(s["metrics"].get(m)) for m in shown)
        wall = f"{s['mean_wall_seconds']:.0f}" if s["mean_wall_seconds"] is not None else "—"
        seeds = ",".join(map(str, s["seeds"]))
        lines.append(f"| {s['variant']} | {s['teacher']} | {seeds} | {cells} | {wall} |")
    compared = [m for m in ROBUST_METRICS if any(m in p for p in report["pairs"])]
    if compared:
        lines += [
            "",
            "## Each variant against its base (seed-paired)",
            "",
            "Wins: seeds in which the variant's accuracy is strictly above its base's; Δ: mean (± std) of variant − "
            "base over those seeds, in points.",
            "",
            "| variant | base | teacher | " + " | ".join(f"wins {names[m]} | Δ {names[m]}" for m in compared) + " |",
            "|---|---|---|" + "---|---|" * len(compared),
        ]
        for p in report["pairs"]:
            cells = " | ".join(" | ".join(_delta(p.get(m), len(p["seeds"]))) for m in compared)
            lines.append(f"| {p['variant']} | {p['base']} | {p['teacher']} | {cells} |")
    if report["teachers"]:
        tshown = [m for m in METRICS if any(m in t["accuracy"] for t in report["teachers"].values())]
        lines += [
            "",
            "## Teachers",
            "",
            "| teacher | " + " | ".join(names[m] for m in tshown) + " |",
            "|---|" + "---|" * len(tshown),
        ]
        for tid, t in report["teachers"].items():
            cells = " | ".join(f"{100 * t['accuracy'][m]:.1f}" if m in t["accuracy"] else "—" for m in tshown)
            lines.append(f"| {tid} | {cells} |")
    if report.get("ladder"):
        lines += _ladder_markdown(report["ladder"], names[report["ladder_metric"]])
    return "\n".join(lines) + "\n"


def _ladder_markdown(items: list[dict], metric: str) -> list[str]:
    """The ladder's table: one row per variant, one column per teacher (weakest first), its spread and slope."""
    teachers = {p["teacher"]: p["teacher_accuracy"] for item in items for p in item["points"]}
    order = sorted(teachers, key=teachers.get)
    lines = [
        "",
        f"## Teacher ladder ({metric})",
        "",
        f"Student {metric} accuracy (mean ± std over seeds) per teacher (its own {metric} in parentheses); spread = "
        "max − min of the means over teachers (points); slope = least-squares fit of the student mean against the "
        "teacher's accuracy (points per point).",
        "",
        "| variant | " + " | ".join(f"{t} (T {100 * teachers[t]:.1f})" for t in order) + " | spread | slope |",
        "|---|" + "---|" * (len(order) + 2),
    ]
    for item in items:
        points = {p["teacher"]: p for p in item["points"]}
        cells = " | ".join(_pct(points[t]) if t in points else "—" for t in order)
        slope = f"{item['slope']:.2f}" if item["slope"] is not None else "—"
        lines.append(f"| {item['variant']} | {cells} | {100 * item['spread']:.1f} | {slope} |")
    return lines


def _part_name(parts) -> str:
    return variant_name("", tuple(parts)) or "alone"


def _plot_ladder(ax, report: dict) -> None:
    metric = report["metric_names"][report["ladder_metric"]]
    for item in report["ladder"]:
        xs = [100 * p["teacher_accuracy"] for p in item["points"]]
        ys = [100 * p["mean"] for p in item["points"]]
        errors = [100 * (p["std"] or 0.0) for p in item["points"]]
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=item["variant"])
    ax.set_xlabel(f"teacher {metric} accuracy (%)")
    ax.set_ylabel(f"student {metric} accuracy (%)")
    ax.set_title(f"{report['study']} on {report['data']}")
    ax.legend()


def _plot_bars(ax, report: dict, metric: str) -> None:
    """Bars of the mean (± std) per base (and teacher), one bar per part set: alone, +inner, +outer, +both."""
    stats = {
        (s["base"], s["teacher"], _part_name(s["parts"])): s["metrics"][metric]
        for s in report["summary"]
        if metric in s["metrics"]
    }
    groups = list(dict.fromkeys((base, teacher) for base, teacher, _ in stats))
    parts = list(dict.fromkeys(part for _, _, part in stats))
    width = 0.8 / len(parts)
    for j, part in enumerate(parts):
        found = [(i, stats[(*group, part)]) for i, group in enumerate(groups) if (*group, part) in stats]
        xs = [i + (j - (len(parts) - 1) / 2) * width for i, _ in found]
        ax.bar(
            xs,
            [100 * st["mean"] for _, st in found],
            width,
            yerr=[100 * (st["std"] or 0.0) for _, st in found],
            capsize=3,
            label=part,
        )
    ax.set_xticks(range(len(groups)), [b if len(report["teachers"]) <= 1 else f"{b}@{t}" for b, t in groups])
    ax.set_ylabel(f"{report['metric_names'][metric]} accuracy (%)")
    ax.set_title(f"{report['study']}: {report['metric_names'][metric]}")
    ax.legend(fontsize="small", ncols=len(parts), loc="lower center")


def plot_report(report: dict) -> bytes | None:
    """study.png: grouped bars (mean ± std) per base, or the ladder (student vs teacher robust accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if report.get("ladder"):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        _plot_ladder(ax, report)
    else:
        metrics = [m for m in ROBUST_METRICS if any(m in s["metrics"] for s in report["summary"])]
        if not metrics:
            return None
        fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
        for ax, metric in zip(axes[0], metrics, strict=True):
            _plot_bars(ax, report, metric)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def write_report(workdir: epath.Path, teachers_dir: epath.Path, study: Study, config) -> dict:
    """WORKDIR/study.json, study.md and study.png from the run directories; returns the report."""
    report = build_report(workdir, teachers_dir, study, config)
    workdir.mkdir(parents=True, exist_ok=True)
    write_atomic(workdir / "study.json", json.dumps(report, indent=2))
    write_atomic(workdir / "study.md", report_markdown(report))
    image = plot_report(report) if report["runs"] else None
    if image is not None:
        write_atomic(workdir / "study.png", image)
    return report


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

FLAGS = flags.FLAGS  # --config and --workdir are main's flags (mmard_jax.main defines them on import)
flags.DEFINE_enum("study", None, STUDIES, "The grid to run.")
flags.DEFINE_string("seeds", "0,1,2", "Comma-separated student seeds (config.seed of each run).")
flags.DEFINE_string("only", "", "Run only the runs whose label matches one of these comma-separated globs.")
flags.DEFINE_bool("dry_run", False, "Print the grid, what is finished, and the estimated cost; train nothing.")
flags.DEFINE_bool("report_only", False, "Rewrite study.json/md/png from the run directories; train nothing.")
flags.DEFINE_string("ladder", "", "teacher_ladder rungs: 'base' or MODEL[:KEY=VALUE...]@EPOCHS, comma-separated.")
flags.DEFINE_string("ladder_student", "mmard", "teacher_ladder: the MMARD variant beside RSLAD and AdaAD.")
flags.DEFINE_integer(
    "autoattack_examples", 500, "AutoAttack on the first N test examples (0 = all evaluated ones; < 0 = no AutoAttack)."
)
flags.DEFINE_integer("teacher_seed", 0, "config.seed of every teacher's training (fixed: seeds vary only students).")
flags.DEFINE_string("teachers_dir", "", "Where teachers are trained and shared ('' = WORKDIR/teachers).")


def study_config(config, autoattack_examples: int):
    """The base config with the study's evaluation protocol: AutoAttack on the first N examples (or none)."""
    return with_overrides(
        config,
        (("eval.autoattack", autoattack_examples >= 0), ("eval.autoattack_examples", max(0, autoattack_examples))),
    )


def _parse_seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise StudyError(f"--seeds: {text!r} must be comma-separated integers") from None


def dry_run_text(session: Session, study: Study, runs: tuple[Run, ...]) -> str:
    """The grid, one line per run with its state, and the estimated cost of what is left."""
    check_grid(session, runs, 1)
    lines = [f"study {study.name}: {len(study.runs)} runs in the grid, {len(runs)} selected"]
    for t in study.teachers:
        state = teacher_state(session, t)
        given = " (config.teacher.checkpoint)" if _given_checkpoint(session.config, t) else ""
        lines.append(f"  teacher {t.id}{given}: {state}; {dict(t.overrides) or 'the config teacher'}")
    todo = []
    for index, run in enumerate(runs, start=1):
        state = run_state(session, run)
        if state != "finished":
            todo.append(run)
        lines.append(f"  [{index}/{len(runs)}] {run.name} -> {run.run_dir}: {state}; {dict(run.overrides)}")
        config = student_config(session.config, run, session.teachers[run.teacher], epath.Path())
        lines.extend(f"      warning: {w}" for w in _warnings(config, run))
    seconds = estimate_seconds(session.config, study, todo, session)
    lines.append(f"{len(todo)} runs to do; estimated wall time {_duration(seconds)}")
    return "\n".join(lines)


def run_study(
    config,
    workdir: str,
    study_name: str,
    seeds: tuple[int, ...],
    *,
    only: str = "",
    dry_run: bool = False,
    report_only: bool = False,
    ladder_spec: str = "",
    ladder_student: str = "mmard",
    autoattack_examples: int = 500,
    teacher_seed: int = 0,
    teachers_dir: str = "",
) -> dict | None:
    """Runs (or dry-runs) a study; returns the report written at the end (None for a dry run)."""
    config = study_config(config, autoattack_examples)
    study = build_study(study_name, seeds, config, ladder_spec, ladder_student)
    root = storage.path(workdir)
    session = Session(config, root, storage.path(teachers_dir) if teachers_dir else root / "teachers", teacher_seed)
    session.teachers = {t.id: t for t in study.teachers}
    runs = select(study.runs, only)
    if dry_run:
        print(dry_run_text(session, study, runs), flush=True)
        return None
    parallel.initialize_distributed(config.parallel)
    entry.use_compilation_cache(config, root)
    with preemption.guard() as guard:
        session.guard = guard
        try:
            if not report_only:
                execute(session, study, runs)
        finally:
            with guard.deferred():  # the report is written whole, also after a failure or SIGTERM
                report = write_report(root, session.teachers_dir, study, config)
                logger.info(
                    "study %s: %d of %d runs finished; %s",
                    study.name,
                    report["finished_runs"],
                    report["grid_runs"],
                    root / "study.md",
                )
    return report


def main(argv):
    del argv  # main.parse_flags refused anything but flags
    if FLAGS.study is None or not FLAGS["workdir"].present:
        _exit_usage("--study and --workdir are required, e.g. --study plug_and_play --workdir runs/study")
    entry.configure_logging()
    try:
        entry.use_default_host_devices(FLAGS.config)
        run_study(
            FLAGS.config,
            FLAGS.workdir,
            FLAGS.study,
            _parse_seeds(FLAGS.seeds),
            only=FLAGS.only,
            dry_run=FLAGS.dry_run,
            report_only=FLAGS.report_only,
            ladder_spec=FLAGS.ladder,
            ladder_student=FLAGS.ladder_student,
            autoattack_examples=FLAGS.autoattack_examples,
            teacher_seed=FLAGS.teacher_seed,
            teachers_dir=FLAGS.teachers_dir,
        )
    except train.Preempted as e:
        print(f"{e}. Run the same command again to resume the study.", file=sys.stderr)
        sys.exit(train.PREEMPTED_EXIT_CODE)
    except train.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(entry.EXIT_NONFINITE)
    except (ValueError, FileNotFoundError, ckpt_lib.IncompatibleCheckpointError) as e:
        _exit_usage(str(e))


def _exit_usage(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(entry.EXIT_USAGE)


if __name__ == "__main__":
    app.run(main, flags_parser=entry.parse_flags)
