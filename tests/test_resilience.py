"""Nothing lost, nothing silent: SIGTERM in every phase of a run, resume checks of every training setting, epoch
metrics across a mid-epoch resume, and progress without checkpoints."""

import copy
import json
import os
import signal

import jax
import numpy as np
import pytest
from test_train import assert_trees_close, digits, make_job, tiny_config  # noqa: F401  (digits: a fixture)

from mmard_jax import checkpoint as ckpt_lib
from mmard_jax import evaluate, main, parallel, reporting, train
from mmard_jax.config import model_config
from mmard_jax.networks import Network, build_module, init_variables

TIMING_FIELDS = ("train_seconds", "eval_seconds")


def run_config(cache_dir):
    """The tiny pipeline cut to its bones: a 1-epoch teacher, one 2-epoch MMARD student, final evaluation."""
    config = tiny_config()
    config.baselines = ""
    config.checkpoint.every_steps = 7  # mid-epoch saves (24 steps per epoch)
    config.compilation_cache_dir = str(cache_dir)  # each re-run finds its programs compiled
    return config


def sigterm():
    os.kill(os.getpid(), signal.SIGTERM)


def counting(function, when, action=sigterm):
    """``function`` that runs ``action`` before its call number ``when`` (1-based) and otherwise just calls it."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == when:
            action()
        return function(*args, **kwargs)

    return wrapped


def student_step_hook(monkeypatch, at_call):
    """SIGTERM while the student's step number ``at_call`` is being dispatched."""
    original = parallel.compile_synchronized

    def compile_synchronized(fn, *args, name, **kwargs):
        compiled = original(fn, *args, name=name, **kwargs)
        return counting(compiled, at_call) if name.startswith("mmard") else compiled

    monkeypatch.setattr(parallel, "compile_synchronized", compile_synchronized)


def periodic_save_hook(monkeypatch):
    """SIGTERM inside the student's first mid-epoch save (step 7)."""
    original = ckpt_lib.RunCheckpoints.save

    def save(self, step, state, meta, evaluation=None):
        original(self, step, state, meta, evaluation)
        if meta["job"] == "mmard" and step == 7:
            sigterm()

    monkeypatch.setattr(ckpt_lib.RunCheckpoints, "save", save)


def periodic_eval_hook(monkeypatch):
    """SIGTERM during the teacher's end-of-epoch evaluation (its only epoch: the stop comes after its save)."""
    original = main._periodic_eval

    def periodic_eval(config, dataset, mesh):
        return counting(original(config, dataset, mesh), 1)

    monkeypatch.setattr(main, "_periodic_eval", periodic_eval)


def between_jobs_hook(monkeypatch):
    """SIGTERM right after the teacher is trained and loaded, before the student starts."""
    original = main.teacher_network

    def teacher_network(*args, **kwargs):
        teacher = original(*args, **kwargs)
        sigterm()
        return teacher

    monkeypatch.setattr(main, "teacher_network", teacher_network)


def final_eval_hook(monkeypatch):
    """SIGTERM during the final evaluation of the second model (the student)."""
    original = evaluate.accuracy
    final_calls = []

    def accuracy(*args, **kwargs):
        if "progress" in kwargs:  # the final evaluation's calls (the periodic one passes no progress)
            final_calls.append(1)
            if len(final_calls) == 2:
                sigterm()
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate, "accuracy", accuracy)


def startup_hook(monkeypatch):
    original = main.load_dataset
    monkeypatch.setattr(main, "load_dataset", counting(original, 1))


PHASES = {
    "while starting": startup_hook,
    "during a step": lambda monkeypatch: student_step_hook(monkeypatch, at_call=10),
    "at a save step": periodic_save_hook,
    "during periodic eval": periodic_eval_hook,
    "between teacher and student": between_jobs_hook,
    "during final eval": final_eval_hook,
}


def outcome(workdir):
    """What an uninterrupted run leaves: final weights of both jobs, epoch metrics (without timings), results."""
    found = {}
    for run in ("teacher", os.path.join("students", "mmard")):
        found[run] = ckpt_lib.load_variables(os.path.join(workdir, run, "checkpoints"), "last")[0]
        found[f"{run} epochs"] = [
            {k: v for k, v in record.items() if k not in TIMING_FIELDS}
            for record in reporting.read_metrics(os.path.join(workdir, run, reporting.METRICS_FILE), "epoch")
        ]
        found[f"{run} steps"] = reporting.read_metrics(os.path.join(workdir, run, reporting.METRICS_FILE), "step")
    with open(os.path.join(workdir, "results.json")) as f:
        found["results"] = {name: row["accuracy"] for name, row in json.load(f)["results"].items()}
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    main.run(run_config(root / "xla_cache"), str(root / "run"))
    return root


@pytest.mark.parametrize("phase", list(PHASES))
def test_sigterm_in_any_phase_exits_75_and_the_rerun_ends_bit_identical(phase, reference, monkeypatch, tmp_path):
    config = run_config(reference / "xla_cache")
    workdir = str(tmp_path / "run")
    with monkeypatch.context() as patch:
        PHASES[phase](patch)
        with pytest.raises(train.Preempted):
            main.run(copy.deepcopy(config), workdir)
    assert train.PREEMPTED_EXIT_CODE == 75  # what main() exits with on Preempted
    main.run(copy.deepcopy(config), workdir)
    expected, found = outcome(str(reference / "run")), outcome(workdir)
    assert found.keys() == expected.keys()
    for key in expected:
        if key.endswith(("epochs", "steps")) or key == "results":
            assert found[key] == expected[key], key
        else:
            assert_trees_close(found[key], expected[key], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Resume checks: every setting that changes training is compared with the checkpoint's


def one_epoch(tmp_path, digits, teacher=None, method="pgd_at", **changes):  # noqa: F811
    config = tiny_config()
    config.optim.epochs = 1
    config.optim.decay_epochs = ()
    for field, value in changes.items():
        section, _, name = field.rpartition(".")
        target = config
        for part in section.split(".") if section else ():
            target = target[part]
        target[name] = value
    return train.train(make_job(config, tmp_path, method, teacher), config, digits, parallel.make_mesh())


@pytest.mark.parametrize(
    "field, value, shown",
    [
        ("optim.lr", 0.01, "config.optim.lr: checkpoint 0.05, this run 0.01"),
        ("attack.eps", 0.2, "config.attack.eps"),
        ("method.kl_reduction", "sum", "config.method.kl_reduction: checkpoint 'batchmean', this run 'sum'"),
        ("dtype", "bfloat16", "config.dtype"),
        ("data.flip", True, "config.data.flip"),
        ("optim.weight_decay", 0.0, "config.optim.weight_decay"),
    ],
)
def test_a_resume_with_a_training_setting_changed_is_refused_naming_it(field, value, shown, digits, tmp_path):  # noqa: F811
    one_epoch(tmp_path, digits, method="rslad", teacher=random_teacher(digits))
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError) as error:
        one_epoch(tmp_path, digits, method="rslad", teacher=random_teacher(digits), **{"optim.epochs": 2, field: value})
    assert shown in str(error.value)


def random_teacher(dataset, seed=1):
    module = build_module(model_config("cnn", widths=(8,), hidden=0), dataset.num_classes)
    return Network(module, init_variables(module, jax.random.PRNGKey(seed), dataset.image_shape))


def test_a_resume_with_another_teacher_is_refused(digits, tmp_path):  # noqa: F811
    one_epoch(tmp_path, digits, method="rslad", teacher=random_teacher(digits, seed=1))
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match="the teacher's weights"):
        one_epoch(tmp_path, digits, method="rslad", teacher=random_teacher(digits, seed=2), **{"optim.epochs": 2})


def test_evaluation_and_logging_settings_may_change_and_epochs_may_grow(digits, tmp_path):  # noqa: F811
    first = one_epoch(tmp_path / "a", digits)
    changes = {"eval.pgd_steps": 7, "log.every_steps": 3, "checkpoint.keep": 3, "eval.batch_size": 32}
    again = one_epoch(tmp_path / "a", digits, **changes)  # finished: nothing retrained, nothing refused
    assert again.steps == first.steps
    longer = one_epoch(tmp_path / "a", digits, **{"optim.epochs": 2, **changes})
    assert longer.steps == 2 * first.steps
    straight = one_epoch(tmp_path / "b", digits, **{"optim.epochs": 2})  # the same 2 epochs without a stop
    assert_trees_close(longer.network.variables, straight.network.variables, rtol=0, atol=0)


def test_fewer_epochs_than_trained_and_a_cosine_length_change_are_refused(digits, tmp_path):  # noqa: F811
    one_epoch(tmp_path / "a", digits, **{"optim.epochs": 2})
    with pytest.raises(
        ckpt_lib.IncompatibleCheckpointError, match=r"optim.epochs: .* at step 48, beyond this run's 24 steps"
    ):
        one_epoch(tmp_path / "a", digits)
    one_epoch(tmp_path / "b", digits, **{"optim.schedule": "cosine"})
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match="config.optim.epochs: checkpoint 1, this run 2"):
        one_epoch(tmp_path / "b", digits, **{"optim.schedule": "cosine", "optim.epochs": 2})


def test_deleted_checkpoints_do_not_restart_a_run_from_step_zero(digits, tmp_path):  # noqa: F811
    import shutil

    one_epoch(tmp_path, digits)
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match="no checkpoint; refusing to restart from step 0"):
        one_epoch(tmp_path, digits)


def test_epoch_metrics_after_a_mid_epoch_resume_cover_the_whole_epoch(digits, tmp_path):  # noqa: F811
    """SIGTERM at step 10 of 24: the resumed run's record of epoch 1 averages all 24 steps, equal to a straight run."""
    config = tiny_config()
    config.optim.epochs = 1
    config.optim.decay_epochs = ()
    mesh = parallel.make_mesh()
    straight = train.train(make_job(config, tmp_path / "straight", "pgd_at", None), config, digits, mesh)
    job = make_job(config, tmp_path / "stopped", "pgd_at", None)
    original = parallel.compile_synchronized
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parallel, "compile_synchronized", lambda *a, **k: counting(original(*a, **k), 10))
        with pytest.raises(train.Preempted, match="at step 10"):
            train.train(job, config, digits, mesh)
    resumed = train.train(job, config, digits, mesh)
    [expected], [found] = straight.epoch_records, resumed.epoch_records
    for name in expected:
        if name not in TIMING_FIELDS:
            assert found[name] == expected[name], name
    assert np.isfinite(found["train_grad_norm"]) and found["train_param_norm"] > 0


def test_a_full_disk_during_a_save_is_reported_as_the_save_not_as_the_log_closing_after_it(digits, tmp_path):  # noqa: F811
    """The save at step 7 fails with ENOSPC; closing the metrics log then fails too. The error that comes out is the
    save's, and the checkpoint manager and log are still closed."""
    import errno

    from mmard_jax import storage

    config = tiny_config()
    config.optim.epochs = 1
    config.checkpoint.every_steps = 7

    disk_full = []
    original_flush = storage.LineAppender.flush

    def full_disk(*args, **kwargs):
        disk_full.append(1)
        raise OSError(errno.ENOSPC, "No space left on device (saving)")

    def full_disk_flush(self):
        if disk_full:
            raise OSError(errno.ENOSPC, "No space left on device (flushing the log)")
        original_flush(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ckpt_lib.RunCheckpoints, "save", full_disk)
        patch.setattr(storage.LineAppender, "flush", full_disk_flush)
        with pytest.raises(OSError, match=r"\(saving\)"):
            train.train(make_job(config, tmp_path, "pgd_at", None), config, digits, parallel.make_mesh())
    assert disk_full  # the save failed, and the log's close failed after it
