"""Metrics files, result tables and curves: what a user reads after a run."""

import os

from mmard_jax import reporting


def test_metrics_log_keeps_the_last_record_per_step_and_skips_a_cut_line(tmp_path):
    log = reporting.MetricsLog(str(tmp_path), tensorboard=True)
    log.write("epoch", 10, {"train_loss": 2.0, "pgd_acc": 0.1})
    log.write("epoch", 20, {"train_loss": 1.0, "pgd_acc": 0.2})
    log.write("step", 5, {"loss": 3.0})
    log.close()
    with open(tmp_path / reporting.METRICS_FILE, "a", encoding="utf-8") as f:
        f.write('{"kind": "epoch", "step": 30, "train_lo')  # a line cut short by SIGKILL
    resumed = reporting.MetricsLog(str(tmp_path), tensorboard=False)  # a resumed run logs step 20 again
    resumed.write("epoch", 20, {"train_loss": 0.9, "pgd_acc": 0.25})
    resumed.close()
    epochs = reporting.read_metrics(str(tmp_path / reporting.METRICS_FILE), "epoch")
    assert [r["step"] for r in epochs] == [10, 20]
    assert epochs[1]["train_loss"] == 0.9
    assert [r["loss"] for r in reporting.read_metrics(str(tmp_path / reporting.METRICS_FILE), "step")] == [3.0]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))


def test_results_table_has_one_row_per_model_in_percent():
    results = {
        "teacher": {"accuracy": {"clean": 0.95, "pgd": 0.8123}},
        "mmard": {"accuracy": {"clean": 0.9, "fgsm": 0.7, "pgd": 0.6}},
    }
    table = reporting.results_markdown(results, title="T", notes=["n1"])
    lines = table.splitlines()
    assert lines[2] == "| model | Clean | FGSM | PGD |"
    assert lines[4] == "| teacher | 95.00 |  | 81.23 |"
    assert lines[5] == "| mmard | 90.00 | 70.00 | 60.00 |"
    assert "- n1" in lines


def test_curves_png_is_written(tmp_path):
    histories = {
        "a": [{"epoch": 1, "train_loss": 2.0, "clean_acc": 0.5, "pgd_acc": 0.2}, {"epoch": 2, "train_loss": 1.5}]
    }
    path = tmp_path / "curves.png"
    reporting.plot_curves(histories, str(path))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_attack_keys_are_identical_across_processes():
    """Evaluation keys must not depend on Python's per-process string hashing (PYTHONHASHSEED)."""
    import subprocess
    import sys

    script = (
        "from mmard_jax import evaluate; import numpy as np; print(np.asarray(evaluate.attack_key(0, 'pgd')).tolist())"
    )
    outputs = set()
    for hash_seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "JAX_PLATFORMS": "cpu"}
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        outputs.add(result.stdout.strip().splitlines()[-1])
    assert len(outputs) == 1, outputs


def test_a_run_starts_without_importing_pytorch_or_scikit_learn(tmp_path):
    """Both cost seconds at every start (tensorboardX imports torch when it is installed; sklearn imports SciPy and
    pandas); a run on the digits with TensorBoard events needs neither."""
    import subprocess
    import sys

    import pytest

    pytest.importorskip("torch")  # installed, so tensorboardX would import it
    pytest.importorskip("sklearn")
    script = (
        "import sys; from mmard_jax import reporting; from mmard_jax.config import base_config;"
        "from mmard_jax.data import sources; config = base_config().data; config.source = config.name = 'digits';"
        "assert sources.load_dataset(config).train.num_examples > 0;"
        f"log = reporting.MetricsLog({str(tmp_path)!r}); log.write('epoch', 1, {{'loss': 1.0}}); log.close();"
        "print(sorted(name for name in ('torch', 'sklearn') if name in sys.modules))"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))
