"""Every bad input of ``python -m mmard_jax.main`` is refused before anything runs: one ``error:`` line naming the
field, flag or path, exit status 2, no traceback, and no checkpoint folder in the workdir (issue #12, items 5 and 7).

Each case runs the entry point in a subprocess, as a user would; all but the few that need the data are refused
before the dataset loads, so each costs about the import time.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mmard_jax import config as config_lib
from mmard_jax import evaluate
from mmard_jax.checks import InvalidValue
from mmard_jax.data import Dataset, load_dataset, make_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
USAGE_EXIT = 2

# Config files that cannot give a usable config, by name.
BAD_CONFIG_FILES = {
    "syntax_error.py": "def get_config(:\n    pass\n",
    "raises.py": "def get_config():\n    raise RuntimeError('no such setup')\n",
    # ml_collections re-raises a ValueError with the traceback pasted into its message: the original is reported
    "raises_value_error.py": (
        "def get_config():\n    try:\n        return {}['dataset']\n    except KeyError:\n"
        "        raise ValueError('pick a dataset')\n"
    ),
    "no_get_config.py": "CONFIG = {'seed': 0}\n",
    "returns_dict.py": "def get_config():\n    return {'seed': 0}\n",
    "unknown_kwarg.py": (
        f"import runpy\n\n\ndef get_config():\n    config = runpy.run_path({TINY!r})['get_config']()\n"
        "    config.student.model.kwargs.depth = 3  # not a kwarg of 'cnn'\n    return config\n"
    ),
}


def run_main(workdir, *args: str, config: str | None = TINY, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m mmard_jax.main [--config CONFIG] --workdir WORKDIR ARGS`` from the repository root, on the CPU."""
    command = [sys.executable, "-m", "mmard_jax.main"]
    command += ["--config", config] if config is not None else []
    command += ["--workdir", str(workdir), *args]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_refused(result: subprocess.CompletedProcess, workdir, expected: str) -> str:
    """Exit 2 with exactly one ``error:`` line, which contains ``expected``; no traceback; no checkpoint written."""
    output = result.stdout + result.stderr
    assert result.returncode == USAGE_EXIT, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert expected in errors[0], output
    assert "Traceback" not in output
    if os.path.isdir(workdir):
        assert not [d for d, _, _ in os.walk(workdir) if os.path.basename(d) == "checkpoints"], output
    return errors[0]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    expected: str  # text of the error line; '{config}' stands for the config file's path
    config: str | None = None  # a name of BAD_CONFIG_FILES; None = configs/tiny.py
    loads_data: bool = False  # refused once the data loader has looked (after the workdir is created)


CASES = [
    # flags and the config file
    Case("unknown_field", ("--config.nope=1",), "--config.nope"),
    Case("unknown_nested_field", ("--config.optim.lrr=0.1",), "--config.optim.lrr"),
    Case("missing_config_file", (), "--config={config}", config="missing.py"),
    Case("syntax_error", (), "--config={config}", config="syntax_error.py"),
    Case(
        "config_file_raises", (), "--config={config}: the config file failed: RuntimeError: no such setup", "raises.py"
    ),
    Case(
        "config_file_raises_value_error",
        (),
        "--config={config}: the config file failed: ValueError: pick a dataset",
        config="raises_value_error.py",
    ),
    Case("no_get_config", (), "--config={config}", config="no_get_config.py"),
    Case("get_config_returns_a_dict", (), "--config={config}", config="returns_dict.py"),
    Case("stray_argument", ("extra",), "unexpected arguments"),
    # types
    Case("decay_epochs_not_numbers", ("--config.optim.decay_epochs=abc",), "config.optim.decay_epochs"),
    Case("epochs_not_int", ("--config.optim.epochs=1.5",), "--config.optim.epochs"),
    Case("lr_not_number", ("--config.optim.lr=abc",), "--config.optim.lr"),
    # values
    Case("every_epochs_zero", ("--config.eval.every_epochs=0",), "config.eval.every_epochs"),
    Case("log_every_steps_zero", ("--config.log.every_steps=0",), "config.log.every_steps"),
    Case("pgd_steps_negative", ("--config.eval.pgd_steps=-1",), "config.eval.pgd_steps"),
    Case("periodic_pgd_steps_zero", ("--config.eval.periodic_pgd_steps=0",), "config.eval.periodic_pgd_steps"),
    Case("momentum_negative", ("--config.optim.momentum=-0.1",), "config.optim.momentum"),
    Case("decay_factor_negative", ("--config.optim.decay_factor=-0.1",), "config.optim.decay_factor"),
    Case("warmup_negative", ("--config.optim.warmup_epochs=-1",), "config.optim.warmup_epochs"),
    Case("grad_clip_negative", ("--config.optim.grad_clip_norm=-1",), "config.optim.grad_clip_norm"),
    Case("cw_kappa_negative", ("--config.eval.cw_kappa=-1",), "config.eval.cw_kappa"),
    Case("lr_nan", ("--config.optim.lr=nan",), "config.optim.lr"),
    Case("lr_zero", ("--config.optim.lr=0",), "config.optim.lr"),
    Case("teacher_lr_negative", ("--config.teacher.optim.lr=-0.1",), "config.teacher.optim.lr"),
    Case("epochs_zero", ("--config.optim.epochs=0",), "config.optim.epochs"),
    Case("step_size_nan", ("--config.attack.step_size=nan",), "config.attack.step_size"),
    Case("seed_negative", ("--config.seed=-1",), "config.seed"),
    Case("eval_unroll_negative", ("--config.eval.unroll=-1",), "config.eval.unroll"),
    Case("no_stages", ("--config.stages=",), "config.stages"),
    Case("unknown_stage", ("--config.stages=teacher,train",), "config.stages"),
    Case("unknown_data_source", ("--config.data.source=imagenet",), "config.data.source"),
    Case("unknown_dtype", ("--config.dtype=float16",), "config.dtype"),
    Case("cache_dir_placeholder", ("--config.compilation_cache_dir={run}/cache",), "config.compilation_cache_dir"),
    # several processes
    Case(
        "processes_without_coordinator", ("--config.parallel.num_processes=2",), "config.parallel.coordinator_address"
    ),
    Case(
        "coordinator_without_port",
        ("--config.parallel.num_processes=2", "--config.parallel.coordinator_address=localhost"),
        "config.parallel.coordinator_address",
    ),
    Case(
        "process_id_out_of_range",
        (
            "--config.parallel.num_processes=2",
            "--config.parallel.process_id=2",
            "--config.parallel.coordinator_address=localhost:1234",
        ),
        "config.parallel.process_id",
    ),
    Case("timeout_zero", ("--config.parallel.initialization_timeout_s=0",), "config.parallel.initialization_timeout_s"),
    # networks: the digits of configs/tiny.py have 1 channel
    Case(
        "mean_per_channel",
        ("--config.student.model.mean=(0.5, 0.5, 0.5)", "--config.student.model.std=(0.25, 0.25, 0.25)"),
        "config.student.model.mean",
    ),
    Case(
        "teacher_mean_per_channel",
        ("--config.teacher.model.mean=(0.5, 0.5)", "--config.teacher.model.std=(0.25, 0.25)"),
        "config.teacher.model.mean",
    ),
    Case("widths_not_ints", ("--config.student.model.kwargs.widths=abc",), "config.student.model.kwargs"),
    Case("unknown_model_kwarg", (), "config.student.model.kwargs", config="unknown_kwarg.py"),
    # paths
    Case(
        "teacher_checkpoint_missing", ("--config.teacher.checkpoint=/nonexistent/teacher",), "config.teacher.checkpoint"
    ),
    Case(
        "archive_dir_is_a_file",
        (
            "--config.data.source=cifar_archive",
            "--config.data.name=cifar10",
            f"--config.data.archive_dir={TINY}",
            "--config.data.download=False",
        ),
        "config.data.archive_dir",
        loads_data=True,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_refused_before_anything_runs(case, tmp_path):
    config = TINY
    if case.config is not None:
        config = str(tmp_path / case.config)
        if case.config in BAD_CONFIG_FILES:
            with open(config, "w") as f:
                f.write(BAD_CONFIG_FILES[case.config])
    workdir = tmp_path / "run"
    assert_refused(run_main(workdir, *case.args, config=config), workdir, case.expected.format(config=config))
    assert case.loads_data or not workdir.exists()  # refused before the workdir was created


def test_missing_config_flag_is_refused(tmp_path):
    assert_refused(run_main(tmp_path / "run", config=None), tmp_path / "run", "--config is required")


@pytest.mark.parametrize("below", ["", "run"])
def test_workdir_that_is_a_file_is_refused(tmp_path, below):
    file = tmp_path / "file"
    file.write_text("not a folder")
    workdir = file / below if below else file
    assert_refused(run_main(workdir), tmp_path, f"--workdir: {file} is a file")
    assert file.read_text() == "not a folder"


def _read_only_mount_command(folder) -> list[str] | None:
    """As root (who writes into any folder whatever its mode), a command prefix that runs a command with a read-only
    tmpfs mounted on ``folder`` in a private mount namespace; None where that is not possible."""
    if shutil.which("unshare") is None:
        return None
    prefix = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"', str(folder)]
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
    return prefix if probe.returncode == 0 else None


def test_read_only_workdir_is_refused(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    workdir = folder / "run"
    if os.geteuid() != 0:
        folder.chmod(0o500)
        try:
            result = run_main(workdir)
        finally:
            folder.chmod(0o700)
    else:
        prefix = _read_only_mount_command(folder)
        if prefix is None:
            pytest.skip("running as root, which ignores folder permissions, and no read-only mount is possible")
        command = [*prefix, sys.executable, "-m", "mmard_jax.main", "--config", TINY, "--workdir", str(workdir)]
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert_refused(result, workdir, f"--workdir: cannot create or write in {folder}")
    assert not workdir.exists()


def test_batch_larger_than_the_training_set_is_refused_before_any_job(tmp_path):
    """The training set's size is known once the data is loaded; the check comes right after, before the teacher
    trains (the student's batch is the bad one here, the teacher would train first)."""
    workdir = tmp_path / "run"
    assert_refused(run_main(workdir, "--config.optim.batch_size=4096"), workdir, "config.optim.batch_size: 4096")
    assert not (workdir / "teacher").exists()


def test_garbage_teacher_checkpoint_is_refused_and_left_alone(tmp_path):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "weights.bin").write_bytes(os.urandom(256))
    (garbage / "notes.txt").write_text("not a checkpoint")
    workdir = tmp_path / "run"
    result = run_main(workdir, f"--config.teacher.checkpoint={garbage}", "--config.stages=distill")
    assert_refused(result, workdir, "config.teacher.checkpoint")
    assert sorted(os.listdir(garbage)) == ["notes.txt", "weights.bin"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def test_unreachable_coordinator_fails_within_the_timeout(tmp_path):
    """Process 1 of 2 with no process 0 listening: one error naming the address once
    config.parallel.initialization_timeout_s has passed, not JAX's abort (or a hang) much later."""
    address = f"localhost:{_closed_port()}"
    workdir = tmp_path / "run"
    start = time.monotonic()
    result = run_main(
        workdir,
        "--config.parallel.num_processes=2",
        "--config.parallel.process_id=1",
        f"--config.parallel.coordinator_address={address}",
        "--config.parallel.initialization_timeout_s=3",
        timeout=60,
    )
    elapsed = time.monotonic() - start
    assert_refused(result, workdir, f"config.parallel.coordinator_address: no coordinator answered at {address}")
    assert 3 <= elapsed < 3 + 20  # the timeout, plus the imports
    assert not workdir.exists()


@pytest.mark.parametrize("source", ["digits", "mnist5k"])
def test_known_data_shapes_match_the_loaded_data(source):
    """validate checks the networks against these shapes before loading: they must be the loaded data's."""
    config = config_lib.base_config()
    config.data.source = config.data.name = source
    dataset = load_dataset(config.data)
    assert config_lib.known_data_shape(config.data) == (dataset.image_shape, dataset.num_classes)


def test_pgd_steps_zero_means_no_pgd_in_the_final_evaluation():
    config = config_lib.base_config()
    config.eval.pgd_steps = 0
    config_lib.validate(config)
    assert [spec.name for spec in evaluate.final_attacks(config.eval)] == ["clean", "fgsm", "cw"]


def test_validate_starts_no_jax_backend():
    """main validates before jax.distributed.initialize, which must come before any backend starts."""
    code = (
        "import runpy\n"
        "from jax._src import xla_bridge\n"
        "from mmard_jax import config\n"
        f"config.validate(runpy.run_path({TINY!r})['get_config']())\n"
        f"config.validate(config.cifar_config('cifar10'))\n"
        "assert not xla_bridge.backends_are_initialized()\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _tfds_config(*overrides: tuple[str, object]):
    """Small networks on a TFDS source, whose image shape is unknown until the data loads; batches of 64."""
    config = config_lib.base_config()
    settings = {"data.source": "tfds", "data.name": "some_tfds_set", "optim.batch_size": 64}
    config.update_from_flattened_dict({**settings, "teacher.optim.batch_size": 64, **dict(overrides)})
    config.student.model = config_lib.model_config("cnn", widths=(8,), hidden=0)
    config.teacher.model = config_lib.model_config("cnn", widths=(8,), hidden=0)
    return config


def _dataset(num_train: int, image_shape: tuple[int, int, int]) -> Dataset:
    images = np.zeros((num_train, *image_shape), np.uint8)
    split = make_source(images, np.arange(num_train) % 10)
    return Dataset(train=split, test=split, num_classes=10, image_shape=image_shape)


@pytest.mark.parametrize(
    "overrides, num_train, field",
    [
        ((), 64, None),
        ((("optim.batch_size", 128),), 64, "config.optim.batch_size: 128 exceeds the 64 training examples"),
        ((("teacher.optim.batch_size", 128),), 64, "config.teacher.optim.batch_size"),
        ((("teacher.optim.batch_size", 128), ("stages", "distill,eval")), 64, None),  # no teacher training
    ],
)
def test_check_data_refuses_a_batch_larger_than_the_training_set(overrides, num_train, field):
    config = _tfds_config(*overrides)
    plan = config_lib.validate(config)
    dataset = _dataset(num_train, (8, 8, 3))
    if field is None:
        config_lib.check_data(config, plan, dataset)
    else:
        with pytest.raises(InvalidValue, match=re.escape(field)):
            config_lib.check_data(config, plan, dataset)


def test_check_data_refuses_a_mean_that_does_not_match_the_loaded_channels():
    """A TFDS source's channels are known only once loaded: validate lets the mean pass, check_data refuses it."""
    config = _tfds_config()
    config.student.model.mean, config.student.model.std = (0.5,), (0.25,)
    plan = config_lib.validate(config)
    config_lib.check_data(config, plan, _dataset(64, (8, 8, 1)))
    with pytest.raises(InvalidValue, match=re.escape("config.student.model.mean: (0.5,) has 1 entries")):
        config_lib.check_data(config, plan, _dataset(64, (8, 8, 3)))
