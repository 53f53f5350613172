"""Remote workdirs: the whole pipeline on gs:// (served offline from a local folder), and the helpers under it."""

import json
import os
import subprocess
import sys

import pytest

from mmard_jax import storage

ROOT = os.path.join(os.path.dirname(__file__), "..")
FAKE_GCS = os.path.join(os.path.dirname(__file__), "fake_gcs.py")


def run_on_fake_gcs(bucket_root, cwd, *args, code=None):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "PYTHONPATH": os.path.abspath(ROOT),
    }
    command = (
        [sys.executable, FAKE_GCS, str(bucket_root), "--", *args] if code is None else [sys.executable, "-c", code]
    )
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_pipeline_runs_with_its_workdir_on_gcs_and_resumes_there(tmp_path):
    """Teacher, two students, evaluation, curves, TensorBoard and the compilation cache all land in the bucket; no
    path reaches the OS as a local 'gs:' folder (the guards would fail the run); a second run finds everything done."""
    bucket, cwd = tmp_path / "gcs", tmp_path / "cwd"
    bucket.mkdir()
    cwd.mkdir()
    args = [
        "--config",
        os.path.join(os.path.abspath(ROOT), "configs", "tiny.py"),
        "--workdir",
        "gs://bucket/run",
        "--config.teacher.optim.epochs=1",
        "--config.optim.epochs=1",
        "--config.compilation_cache_dir={workdir}/xla_cache",
    ]
    first = run_on_fake_gcs(bucket, cwd, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    run = bucket / "bucket" / "run"
    for name in (
        "results.json",
        "results.md",
        "curves.png",
        "teacher/metrics.jsonl",
        "students/mmard/metrics.jsonl",
        "students/rslad/checkpoints",
        "teacher/checkpoints",
    ):
        assert (run / name).exists(), name
    assert any(f.stat().st_size > 0 for f in (run / "students" / "mmard" / "tensorboard").iterdir())
    assert any((run / "xla_cache").iterdir())
    assert os.listdir(cwd) == []  # nothing written to a local folder named after the URI
    results = json.loads((run / "results.json").read_text())["results"]

    second = run_on_fake_gcs(bucket, cwd, *args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "epoch 1" not in second.stderr  # every run was complete: nothing retrained
    assert json.loads((run / "results.json").read_text())["results"] == results


def test_the_guard_fails_a_gs_path_that_skips_epath(tmp_path):
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(FAKE_GCS)!r}); import fake_gcs; "
        f"fake_gcs.install({str(tmp_path)!r}); open('gs://bucket/results.json', 'w')"
    )
    done = run_on_fake_gcs(tmp_path, tmp_path, code=code)
    assert done.returncode != 0 and "StrayPathError" in done.stderr
    assert not (tmp_path / "gs:").exists()


def test_local_paths_are_absolute_and_remote_ones_kept():
    assert str(storage.path("gs://bucket/run/x")) == "gs://bucket/run/x"
    assert storage.is_remote("gs://b") and not storage.is_remote("runs/x")
    local = storage.path("runs/x")
    assert local.is_absolute() and str(local).endswith(os.path.join("runs", "x"))


def test_line_appender_appends_and_starts_on_a_new_line_after_a_cut(tmp_path):
    file = storage.path(tmp_path / "m.jsonl")
    file.write_text('{"a": 1}\n{"b": 2', encoding="utf-8")  # a kill cut the last record short
    assert storage.ends_mid_line(file)
    log = storage.LineAppender(file)
    log.write('{"c": 3}\n')
    log.close()
    assert file.read_text(encoding="utf-8").splitlines() == ['{"a": 1}', '{"b": 2', '{"c": 3}']
    assert not storage.ends_mid_line(file)


@pytest.mark.parametrize("remote", [False, True])
def test_line_appender_remote_mode_rewrites_the_whole_object(tmp_path, monkeypatch, remote):
    """Object stores cannot append: remote mode keeps every line and rewrites the object at each flush."""
    monkeypatch.setattr(storage, "is_remote", lambda location: remote)
    file = storage.path(tmp_path / "m.jsonl")
    file.write_text("old\n", encoding="utf-8")
    log = storage.LineAppender(file)
    log.write("one\n")
    log.flush()
    assert file.read_text(encoding="utf-8") == "old\none\n"
    log.write("two\n")
    log.close()
    assert file.read_text(encoding="utf-8") == "old\none\ntwo\n"
