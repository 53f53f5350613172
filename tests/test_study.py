"""The study runner (mmard_jax/study.py): grids, resumable runs, refusals, and reports computed from the run dirs."""

import importlib.util
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mmard_jax import config as config_lib
from mmard_jax import main as entry
from mmard_jax import study
from mmard_jax.storage import path as epath_of

ROOT = os.path.join(os.path.dirname(__file__), "..")
SEEDS = (0, 1)
# One epoch, no FGSM, CW or AutoAttack: the cheapest run that still has a periodic and a final PGD evaluation.
OVERRIDES = {"optim.epochs": 1, "optim.decay_epochs": (), "eval.fgsm": False, "eval.cw_steps": 0}


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config():
    return study.with_overrides(load_config("tiny"), OVERRIDES.items())


# ---------------------------------------------------------------------------------------------------------
# Grids (no training)


def test_plug_and_play_grid_has_every_base_with_each_part_set_for_every_seed():
    grid = study.build_study("plug_and_play", (0, 1, 2), load_config("mnist5k"))
    assert len(grid.runs) == 4 * 4 * 3 and [t.id for t in grid.teachers] == ["base"]
    assert [r.seed for r in grid.runs] == [0] * 16 + [1] * 16 + [2] * 16  # seed-major: whole seeds finish first
    assert len({r.run_dir for r in grid.runs}) == 48
    variants = {r.variant: r for r in grid.runs if r.seed == 0}
    assert sorted(variants) == sorted(
        f"{b}{s}" for b in ("ard", "iad", "rslad", "adaad") for s in ("", "+inner", "+outer", "+both")
    )
    for name, inner, outer in (("iad", False, False), ("ard+inner", True, False), ("rslad+outer", False, True)):
        run = variants[name]
        assert dict(run.overrides) == {
            "method.name": name.split("+")[0],
            "method.mmard_inner": inner,
            "method.mmard_outer": outer,
        }
    both = variants["adaad+both"]
    assert (both.base, both.parts, both.label, both.run_dir) == (
        "adaad",
        ("inner", "outer"),
        "adaad+both",
        "runs/adaad+both/seed0",
    )
    # --only keeps the runs whose label matches a glob
    assert {r.variant for r in study.select(grid.runs, "adaad*,ard")} == {
        "ard",
        "adaad",
        "adaad+inner",
        "adaad+outer",
        "adaad+both",
    }


def test_teacher_ladder_grid_and_ladder_spec():
    config = load_config("mnist5k")
    grid = study.build_study("teacher_ladder", (3, 4), config, ladder_student="adaad+outer")
    ids = [t.id for t in grid.teachers]
    assert ids == ["cnn_widths8-16_e2", "cnn_widths16-32_e4", "cnn_widths32-64_e8", "base"]
    assert len(grid.runs) == 4 * 3 * 2 and grid.kind == "ladder"
    assert {r.variant for r in grid.runs} == {"rslad", "adaad", "adaad+outer"}
    assert {r.seed for r in grid.runs} == {3, 4}
    assert grid.runs[2].label == "adaad+outer@cnn_widths8-16_e2" and grid.runs[2].base == "adaad"
    # a rung keeps the config teacher's other kwargs and scales its decay epochs (12 of 15) to its own epochs
    overrides = dict(grid.teachers[2].overrides)
    assert overrides["teacher.model.kwargs"] == {
        "widths": (32, 64),
        "hidden": 128,
        "downsample": "stride",
        "use_bn": False,
    }
    assert overrides["teacher.optim.epochs"] == 8 and overrides["teacher.optim.decay_epochs"] == (6,)
    teacher_cfg = study.teacher_config(config, grid.teachers[0], teacher_seed=7)
    assert teacher_cfg.teacher.model.kwargs.widths == (8, 16) and teacher_cfg.seed == 7
    assert teacher_cfg.teacher.optim.epochs == 2 and tuple(teacher_cfg.teacher.optim.decay_epochs) == ()
    mmard = study.build_study("teacher_ladder", (0,), config).runs[2]  # the config's MMARD: IAD + outer as shipped
    assert (mmard.variant, mmard.base, mmard.parts, dict(mmard.overrides)) == (
        "mmard",
        "iad",
        ("outer",),
        {"method.name": "mmard"},
    )
    config.method.mmard_base, config.method.mmard_parts = "rslad", "both"
    mmard = study.build_study("teacher_ladder", (0,), config).runs[2]
    assert (mmard.base, mmard.parts) == ("rslad", ("inner", "outer"))
    # a CIFAR-style rung of another model starts from that model's defaults
    (rung, _) = study.parse_ladder("wrn-34-10@30,base", load_config("cifar10"))
    assert rung.id == "wrn-34-10_e30" and dict(rung.overrides)["teacher.optim.decay_epochs"] == (22, 27)
    with pytest.raises(study.StudyError, match="--ladder: rung 'cnn:8-16'"):
        study.parse_ladder("cnn:8-16,base", config)
    with pytest.raises(study.StudyError, match=r"--ladder_student: 'adaad\+middle'"):
        study.build_study("teacher_ladder", (0,), config, ladder_student="adaad+middle")
    with pytest.raises(study.StudyError, match="--seeds"):
        study.build_study("tiny", (1, 1), config)


def test_a_student_run_config_distils_one_variant_from_its_teacher_and_validates():
    config = tiny_config()
    grid = study.build_study("tiny", SEEDS, config)
    run = grid.runs[-1]
    student = study.student_config(config, run, grid.teachers[0], epath_of("/w/teachers/base"))
    assert (student.stages, student.baselines, student.seed) == ("distill,eval", "", 1)
    assert student.teacher.checkpoint == "/w/teachers/base/teacher"
    plan = config_lib.validate(student, 8)
    assert [job.method.name for job in plan.students] == ["rslad+mmard_outer"]
    # the study's protocol: AutoAttack on the first N examples (not all the PGD evaluation reads)
    protocol = study.study_config(config, 16)
    assert protocol.eval.autoattack and entry.autoattack_examples(protocol.eval) == 16
    assert entry.autoattack_examples(study.study_config(config, 0).eval) == config.eval.num_examples
    assert not study.study_config(config, -1).eval.autoattack
    with pytest.raises(ValueError, match="config.eval.autoattack_examples"):
        config_lib.validate(study.with_overrides(config, [("eval.autoattack_examples", -1)]), 8)


# ---------------------------------------------------------------------------------------------------------
# Statistics (synthetic results)


def _row(variant, seed, pgd, aa, teacher="base"):
    base, parts, _ = study.parse_variant(variant)
    label = variant if teacher == "base" else f"{variant}@{teacher}"
    accuracy = {"clean": 0.9, "pgd": pgd, "cw": pgd + 0.01, "autoattack": aa}
    return {
        "variant": variant,
        "base": base,
        "parts": list(parts),
        "seed": seed,
        "teacher": teacher,
        "label": label,
        "accuracy": accuracy,
        "num_examples": 1000,
        "autoattack_examples": 500,
    }


def test_summary_pairs_and_ladder_statistics_by_hand():
    rows = [
        _row("adaad", 0, 0.60, 0.50),
        _row("adaad+outer", 0, 0.64, 0.49),
        _row("adaad", 1, 0.62, 0.52),
        _row("adaad+outer", 1, 0.65, 0.55),
        _row("adaad", 2, 0.61, 0.51),
        _row("adaad+outer", 2, 0.60, 0.53),
    ]
    summary = {s["label"]: s for s in study.summarize(rows)}
    pgd = summary["adaad+outer"]["metrics"]["pgd"]
    assert pgd["mean"] == pytest.approx(0.63)
    assert pgd["std"] == pytest.approx(math.sqrt((0.01**2 + 0.02**2 + 0.03**2) / 2))  # sample std, n - 1
    (pair,) = study.paired(rows)
    assert pair["variant"] == "adaad+outer" and pair["base"] == "adaad" and pair["seeds"] == [0, 1, 2]
    assert pair["pgd"]["wins"] == 2 and pair["pgd"]["mean_delta"] == pytest.approx((0.04 + 0.03 - 0.01) / 3)
    assert pair["autoattack"]["wins"] == 2 and pair["autoattack"]["mean_delta"] == pytest.approx(0.04 / 3)

    ladder_rows = [
        _row(v, s, 0.0, aa + 0.01 * s, teacher=t)
        for t, shift in (("weak", 0.0), ("strong", 0.1))
        for v, aa in (("rslad", 0.40 + shift), ("mmard", 0.42 + 2 * shift))
        for s in (0, 1)
    ]
    teachers = {"weak": {"accuracy": {"autoattack": 0.5}}, "strong": {"accuracy": {"autoattack": 0.7}}}
    assert study.robust_metric(ladder_rows) == "autoattack"
    result = {item["variant"]: item for item in study.ladder(study.summarize(ladder_rows), teachers, "autoattack")}
    assert [p["teacher"] for p in result["mmard"]["points"]] == ["weak", "strong"]  # ordered by teacher accuracy
    assert result["rslad"]["spread"] == pytest.approx(0.1) and result["rslad"]["slope"] == pytest.approx(0.5)
    assert result["mmard"]["spread"] == pytest.approx(0.2) and result["mmard"]["slope"] == pytest.approx(1.0)
    report = {
        "study": "teacher_ladder",
        "kind": "ladder",
        "data": "mnist5k",
        "metric_names": study.metric_names(load_config("mnist5k")),
        "grid_runs": 8,
        "finished_runs": 8,
        "teachers": teachers,
        "runs": ladder_rows,
        "summary": study.summarize(ladder_rows),
        "pairs": study.paired(ladder_rows),
        "ladder_metric": "autoattack",
    }
    report["ladder"] = list(result.values())
    text = study.report_markdown(report)
    assert "| variant | weak (T 50.0) | strong (T 70.0) | spread | slope |" in text
    assert "| mmard | 42.5 ± 0.7 | 62.5 ± 0.7 | 20.0 | 1.00 |" in text
    assert "AutoAttack: the first 500" in text
    assert study.plot_report(report)[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------------------
# A tiny study end to end: interrupted after its first run, resumed, reported


def _checkpoint_steps(run_dir):
    """The saved steps of a tiny study run (Orbax names each step's folder by its number)."""
    directory = run_dir / "students" / "rslad" / "checkpoints"
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if directory.exists() else []


@pytest.fixture(scope="module")
def interrupted_and_resumed(tmp_path_factory):
    """Runs the tiny study in a subprocess, SIGTERMs it once the first run has finished and the second has saved a
    checkpoint, and resumes it here."""
    workdir = tmp_path_factory.mktemp("study")
    # a checkpoint every 5 of the 24 steps of an epoch: the second run is stopped well before its end
    overrides = [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + ["--config.checkpoint.every_steps=5"]
    command = [
        sys.executable,
        "-m",
        "mmard_jax.study",
        "--config",
        os.path.join(ROOT, "configs", "tiny.py"),
        "--study",
        "tiny",
        "--workdir",
        str(workdir),
        "--seeds",
        "0,1",
        "--autoattack_examples=-1",
        *overrides,
    ]
    log_path = workdir.parent / f"{workdir.name}.log"
    first, second = workdir / "runs" / "rslad" / "seed0", workdir / "runs" / "rslad+outer" / "seed0"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while not _checkpoint_steps(second) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=300)
    first_output = log_path.read_text()
    before = {
        "results": (first / "results.json").stat().st_mtime_ns,
        "teacher": (workdir / "teachers" / "base" / "results.json").stat().st_mtime_ns,
        "steps": _checkpoint_steps(first),
        "second_steps": _checkpoint_steps(second),
    }

    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("mmard_jax.study")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        report = study.run_study(tiny_config(), str(workdir), "tiny", SEEDS, autoattack_examples=-1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return {
        "workdir": workdir,
        "returncode": returncode,
        "first_output": first_output,
        "before": before,
        "log": records,
        "report": report,
    }


def test_an_interrupted_study_resumes_without_retraining_finished_runs(interrupted_and_resumed):
    result = interrupted_and_resumed
    workdir = result["workdir"]
    assert result["returncode"] == 75, result["first_output"]  # SIGTERM: saved, "run the same command again"
    assert "[1/4] rslad seed 0 (teacher base): done" in result["first_output"]
    assert "[4/4]" not in result["first_output"]
    log = "\n".join(result["log"])
    assert "[1/4] rslad seed 0 (teacher base): skipped, finished earlier" in log
    assert "[2/4] rslad+outer seed 0 (teacher base): starting (resuming)" in log and "[4/4] rslad+outer seed 1" in log
    assert "teacher base:" not in log  # the teacher was trained and evaluated once, by the first invocation
    first = workdir / "runs" / "rslad" / "seed0"
    assert (first / "results.json").stat().st_mtime_ns == result["before"]["results"]
    assert (workdir / "teachers" / "base" / "results.json").stat().st_mtime_ns == result["before"]["teacher"]
    assert _checkpoint_steps(first) == result["before"]["steps"]
    # the second run went on from its saved step (the training log says "resuming at step ...")
    assert (
        0 < max(result["before"]["second_steps"]) < max(_checkpoint_steps(workdir / "runs" / "rslad+outer" / "seed0"))
    )


def test_the_report_is_computed_from_the_run_dirs(interrupted_and_resumed, capsys):
    workdir = interrupted_and_resumed["workdir"]
    written = json.loads((workdir / "study.json").read_text())
    grid = study.build_study("tiny", SEEDS, tiny_config())
    recomputed = study.build_report(epath_of(workdir), epath_of(workdir / "teachers"), grid, tiny_config())
    assert written == json.loads(json.dumps(recomputed)) == json.loads(json.dumps(interrupted_and_resumed["report"]))
    again = study.run_study(tiny_config(), str(workdir), "tiny", SEEDS, autoattack_examples=-1, report_only=True)
    assert json.loads(json.dumps(again)) == written
    study.run_study(tiny_config(), str(workdir), "tiny", SEEDS, autoattack_examples=-1, dry_run=True)
    printed = capsys.readouterr().out
    assert (
        "teacher base: finished" in printed
        and "[4/4] rslad+outer seed 1 -> runs/rslad+outer/seed1: finished" in printed
    )
    assert "0 runs to do" in printed
    assert written["finished_runs"] == written["grid_runs"] == 4
    assert [(r["variant"], r["seed"]) for r in written["runs"]] == [
        ("rslad", 0),
        ("rslad+outer", 0),
        ("rslad", 1),
        ("rslad+outer", 1),
    ]
    teacher = json.loads((workdir / "teachers" / "base" / "results.json").read_text())["results"]["teacher"]
    assert all(r["teacher_accuracy"] == teacher["accuracy"] and r["wall_seconds"] > 0 for r in written["runs"])
    # mean and std of one variant, by hand from its two results.json files
    accuracies = [
        json.loads((workdir / "runs" / "rslad" / f"seed{s}" / "results.json").read_text())["results"]["rslad"][
            "accuracy"
        ]
        for s in SEEDS
    ]
    by_hand = {
        m: (np.mean([a[m] for a in accuracies]), abs(accuracies[0][m] - accuracies[1][m]) / math.sqrt(2))
        for m in ("clean", "pgd")
    }
    (rslad,) = [s for s in written["summary"] if s["label"] == "rslad"]
    assert rslad["metrics"]["pgd"]["mean"] == pytest.approx(by_hand["pgd"][0])
    assert rslad["metrics"]["pgd"]["std"] == pytest.approx(by_hand["pgd"][1])
    cells = " | ".join(f"{100 * mean:.1f} ± {100 * std:.1f}" for mean, std in by_hand.values())
    assert f"| rslad | base | 0,1 | {cells} | " in (workdir / "study.md").read_text()
    (pair,) = written["pairs"]
    assert (pair["variant"], pair["base"], pair["seeds"]) == ("rslad+outer", "rslad", [0, 1])
    assert (workdir / "study.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_dir_made_with_other_settings_is_refused(interrupted_and_resumed, tmp_path):
    workdir = interrupted_and_resumed["workdir"]
    changed = study.with_overrides(tiny_config(), [("method.mi_beta", 0.5)])
    with pytest.raises(
        study.StudyError, match=r"rslad seed 0: .* other settings(.|\n)*method.mi_beta: was 1.0, now 0.5"
    ):
        study.run_study(changed, str(workdir), "tiny", SEEDS, autoattack_examples=-1)
    stranger = tmp_path / "runs" / "rslad" / "seed0"
    stranger.mkdir(parents=True)
    (stranger / "results.json").write_text("{}")
    with pytest.raises(study.StudyError, match="not made by a study"):
        study.run_study(tiny_config(), str(tmp_path), "tiny", SEEDS, dry_run=True)
