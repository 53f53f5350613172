"""Entry point: ``python -m mmard_jax.main --config configs/cifar10.py --workdir runs/cifar10``.

Runs the configured stages in order:
- ``teacher``: load ``config.teacher.checkpoint``, or adversarially train a teacher into ``WORKDIR/teacher``
  (TRADES / PGD-AT; resumed if interrupted, reused once complete);
- ``distill``: train one student per method of ``config.baselines`` + ``config.method.name`` into
  ``WORKDIR/students/<method>``, each resumable;
- ``eval``: the final evaluation of the teacher and every student: ``WORKDIR/results.{json,md}``, ``curves.png``.
Any config field can be overridden: ``--config.optim.epochs=10``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mmard_jax import checkpoint as ckpt_lib
from mmard_jax import config as config_lib
from mmard_jax import evaluate, networks, parallel, reporting, train
from mmard_jax.data import load_dataset
from mmard_jax.attacks.autoattack import run_autoattack
from mmard_jax.methods import build_method

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, metrics and results.")

EXIT_USAGE = 2
EXIT_NONFINITE = 1

logger = logging.getLogger(__name__)


def _periodic_eval(config, dataset, mesh):

    split = dataset.holdout if dataset.holdout is not None else dataset.test
    specs = evaluate.periodic_attacks(config.eval)

    def run(network):
        acc = evaluate.accuracy(
            network,
            split,
            specs,
            mesh,
            batch_size=config.eval.batch_size,
            num_examples=config.eval.num_examples,
            seed=config.seed,
        )
        return {"clean_acc": acc["clean"], "pgd_acc": acc["pgd"]}

    return run


def _train_job(job, config, dataset, mesh):

    return train.train(job, config, dataset, mesh, eval_fn=_periodic_eval(config, dataset, mesh))


def teacher_network(config, dataset, mesh, workdir: str, may_train: bool):
    """The frozen teacher: from config.teacher.checkpoint, or trained (and cached) in WORKDIR/teacher."""
    module = networks.build_module(config.teacher.model, dataset.num_classes, dtype=config.dtype)
    signature = ckpt_lib.shape_signature(networks.abstract_variables(module, dataset.image_shape))
    if config.teacher.checkpoint:
        run_dir = config.teacher.checkpoint
        if os.path.isdir(os.path.join(run_dir, "checkpoints")):
            run_dir = os.path.join(run_dir, "checkpoints")
        try:
            variables, _ = ckpt_lib.load_variables(run_dir, config.eval.checkpoint, signature)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"config.teacher.checkpoint: {e}") from None
        return networks.Network(module, variables)
    teacher_dir = os.path.join(workdir, "teacher")
    if not may_train:
        try:
            variables, _ = ckpt_lib.load_variables(os.path.join(teacher_dir, "checkpoints"), config.eval.checkpoint, signature)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no trained teacher in {teacher_dir}: add 'teacher' to config.stages to train one, "
                "or set config.teacher.checkpoint to a teacher run directory"
            ) from None
        return networks.Network(module, variables)
    job = train.Job(
        name="teacher",
        workdir=teacher_dir,
        model_cfg=config.teacher.model,
        method_cfg=config.teacher.method,
        attack_cfg=config.teacher.attack,
        optim_cfg=config.teacher.optim,
    )
    _train_job(job, config, dataset, mesh)
    # Distil from the checkpoint the evaluation would pick (best by PGD accuracy, or last).
    variables, _ = ckpt_lib.load_variables(os.path.join(teacher_dir, "checkpoints"), config.eval.checkpoint, signature)
    return networks.Network(module, variables)


def train_students(config, dataset, mesh, workdir: str, teacher) -> None:

    for name in config_lib.student_methods(config):
        method_cfg = config_lib.student_method_config(config, name)
        job = train.Job(
            name=name,
            workdir=os.path.join(workdir, "students", name),
            model_cfg=config.student.model,
            method_cfg=method_cfg,
            attack_cfg=config.attack,
            optim_cfg=config.optim,
            teacher=teacher if build_method(method_cfg).needs_teacher else None,
        )
        _train_job(job, config, dataset, mesh)


def final_evaluation(config, dataset, mesh, workdir: str, teacher) -> dict:
    """Evaluates the teacher and each student on the test split; writes results.json, results.md and curves.png."""
    specs = evaluate.final_attacks(config.eval)
    models = {}
    histories = {}
    if teacher is not None:
        models["teacher"] = (teacher, "teacher")
    for name in config_lib.student_methods(config):
        run_dir = os.path.join(workdir, "students", name)
        module = networks.build_module(config.student.model, dataset.num_classes, dtype=config.dtype)
        signature = ckpt_lib.shape_signature(networks.abstract_variables(module, dataset.image_shape))
        variables, meta = ckpt_lib.load_variables(os.path.join(run_dir, "checkpoints"), config.eval.checkpoint, signature)
        models[name] = (networks.Network(module, variables), f"{config.eval.checkpoint} (step {meta.get('step')})")
        histories[name] = reporting.read_metrics(os.path.join(run_dir, reporting.METRICS_FILE), "epoch")
    teacher_metrics = os.path.join(workdir, "teacher", reporting.METRICS_FILE)
    if os.path.exists(teacher_metrics):
        histories = {"teacher": reporting.read_metrics(teacher_metrics, "epoch"), **histories}

    count = evaluate.evaluation_count(dataset.test, config.eval.num_examples)
    results = {}
    for name, (network, which) in models.items():
        acc = evaluate.accuracy(
            network,
            dataset.test,
            specs,
            mesh,
            batch_size=config.eval.batch_size,
            num_examples=config.eval.num_examples,
            seed=config.seed,
            progress=config.log.progress,
        )
        if config.eval.autoattack:
            acc["autoattack"] = _autoattack_accuracy(config, dataset, network)
        results[name] = {"accuracy": acc, "checkpoint": which, "num_examples": count}
        logger.info("%s: %s", name, acc)

    notes = [
        f"{count} test examples of {config.data.name}; ε = {config.eval.eps:g}; "
        f"PGD-{config.eval.pgd_steps} (α = {config.eval.pgd_step_size:g}), CW∞-{config.eval.cw_steps} (κ = {config.eval.cw_kappa:g}).",
        f"students: {config.student.model.name}, {config.optim.epochs} epochs each; checkpoint evaluated: {config.eval.checkpoint}.",
    ]
    if "teacher" in models:
        notes.append(f"teacher: {config.teacher.model.name}, {config.teacher.method.name}.")
    summary = {
        "results": results,
        "notes": notes,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": json.loads(config.to_json_best_effort()),
    }
    table = reporting.results_markdown(results, title=f"Robust accuracy (%) on {config.data.name}", notes=notes)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
            f.write(table)
        if any(histories.values()):
            reporting.plot_curves(histories, os.path.join(workdir, "curves.png"))
        print(table, flush=True)
    return summary


def _autoattack_accuracy(config, dataset, network) -> float:

    images, labels = evaluate.evaluation_arrays(dataset.test, config.eval.num_examples)
    result = run_autoattack(
        networks.logits_function(network),
        images,
        labels,
        eps=config.eval.eps,
        seed=config.seed,
        batch_size=config.eval.batch_size,
        progress=config.log.progress,
        log=logging.info,
    )
    return float(result.robust_accuracy)


def run(config, workdir: str) -> dict | None:
    """Runs the configured stages; returns the final evaluation summary (None without an eval stage)."""
    parallel.initialize_distributed(config.parallel)
    config_lib.validate(config, jax.device_count())
    stages = config_lib.stages(config)
    os.makedirs(workdir, exist_ok=True)
    dataset = load_dataset(config.data)
    mesh = parallel.make_mesh()
    logger.info(
        "data %s: %d train / %d test, %d classes; %d devices",
        config.data.name,
        len(dataset.train.labels),
        len(dataset.test.labels),
        dataset.num_classes,
        jax.device_count(),
    )

    distill_needs_teacher = "distill" in stages and any(
        build_method(config_lib.student_method_config(config, n)).needs_teacher for n in config_lib.student_methods(config)
    )
    teacher = None
    if "teacher" in stages or distill_needs_teacher:
        teacher = teacher_network(config, dataset, mesh, workdir, may_train="teacher" in stages)
    elif "eval" in stages:
        try:
            teacher = teacher_network(config, dataset, mesh, workdir, may_train=False)
        except FileNotFoundError as e:
            logger.info("no teacher to evaluate (%s)", e)
    if "distill" in stages:
        train_students(config, dataset, mesh, workdir, teacher)
    if "eval" in stages:
        return final_evaluation(config, dataset, mesh, workdir, teacher)
    return None


def configure_logging() -> None:
    """Our messages at INFO on stderr; the libraries' (Orbax, absl) only from ERROR up."""
    absl_logging.set_verbosity(absl_logging.ERROR)
    package = logging.getLogger("mmard_jax")
    if not package.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config configs/mnist5k.py")
    configure_logging()

    try:
        run(FLAGS.config, FLAGS.workdir)
    except train.Preempted as e:
        print(f"{e}. Run the same command again to resume.", file=sys.stderr)
        sys.exit(train.PREEMPTED_EXIT_CODE)
    except train.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_NONFINITE)
    except (ValueError, FileNotFoundError, ckpt_lib.IncompatibleCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    app.run(main)
