"""benchmarks/step_speed.py and xla_cpu_conv_paths.py at test sizes: the PyTorch twin computes the train step, the
accelerator mode's code path runs on CPU (the CI smoke test of what a GPU/TPU run executes), and both XLA:CPU
convolution paths stay within float32 rounding of float64."""

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import step_speed  # noqa: E402


@pytest.mark.parametrize("method", ["mmard", "rslad"])
def test_the_pytorch_twin_computes_the_same_train_step(method, tmp_path):
    """Same weights, batch and PGD start: the JAX step and the twin's agree in loss and parameter update."""
    report = tmp_path / "check.md"
    results = step_speed.main(["--check", "--tiny", "--setting", "cifar", "--method", method, "--output", str(report)])
    result = results[f"cifar/{method}"]
    assert results["passed"], result
    assert step_speed.within(result, step_speed.EXACT)
    assert result["update_norm"] > 1e-4  # the step moved the parameters: the comparison is not vacuous
    assert "| yes |" in report.read_text()


@pytest.mark.slow
def test_accelerator_mode_runs_tiny_on_cpu(tmp_path):
    """What ``--platform gpu`` runs, at test sizes on CPU: timing, MFU, memory and the largest-batch search."""
    report = tmp_path / "accelerator.md"
    argv = ["--platform", "cpu", "--tiny", "--method", "mmard", "--dtype", "float32", "--steps", "1"]
    results = step_speed.main([*argv, "--output", str(report)])
    assert results["mmard/float32"]["img_s"] > 0
    assert 0 < results["mmard/float32"]["mfu"] < 1
    assert results["largest_batch/float32"] == 16  # doubling from 8, capped at twice the batch on CPU
    text = report.read_text()
    assert "MFU" in text and "Largest batch" in text


def test_contention_rule_separates_other_processes_from_our_own_threads():
    def round_(cpu_seconds, wait_seconds):  # one second of wall time
        return step_speed.Round([1.0], cpu_seconds, wait_seconds, peak_rss=0, start_rss=0, ended=1.0)

    quiet, busy_elsewhere, own_threads = round_(1.2, 0.02), round_(1.0, 0.8), round_(1.95, 0.5)
    cores = 2
    idle = 0.1 + step_speed.os.cpu_count() - cores  # load before: nothing else runs

    def verdict(load_before, load_after, side_round):
        own = step_speed.recent_busy_cores([side_round])
        return step_speed.contention((load_before,) * 3, (load_after,) * 3, own, {"JAX": [side_round]}, cores)

    assert verdict(idle, 1.3, quiet) is None
    assert verdict(idle, 2.0, own_threads) is None  # waits behind its own threads, but keeps its cores busy
    assert "during the JAX rounds" in verdict(idle, 1.0, busy_elsewhere)
    assert "load before" in verdict(idle + 1.0, 1.3, quiet)
    assert "load after" in verdict(idle, idle + 3.0, quiet)


def test_steal_share_counts_the_hypervisors_share_of_cpu_time():
    """/proc/stat ticks by hand: 40 user + 20 idle + 25 steal (+ 15 guest, already inside user) -> 25 / 85."""
    import benchmark_report

    before = (100, 0, 10, 500, 0, 0, 0, 30, 5, 0)
    after = (140, 0, 10, 520, 0, 0, 0, 55, 20, 0)
    assert benchmark_report.steal_share(before, after) == pytest.approx(25 / 85)
    assert benchmark_report.steal_share(before, before) is None  # no time passed
    assert benchmark_report.steal_share(None, after) is None
    assert "29.4 %" in benchmark_report.format_steal(before, after)
    now = benchmark_report.cpu_times()
    if now is not None:  # Linux: a real reading parses and gives a share in [0, 1]
        share = benchmark_report.steal_share(now, benchmark_report.cpu_times())
        assert share is None or 0 <= share <= 1


def test_the_conv_paths_benchmark_times_single_programs_with_threaded_eigen():
    """Parts 1-2 run on one device: the product's options there lose only the single-threaded Eigen option (which
    this 8-device test session's programs get), XLA's paths keep theirs."""
    import xla_cpu_conv_paths

    from mmard_jax import compilations

    product = compilations.compiler_options()
    key = compilations.ONE_EIGEN_THREAD_PER_DEVICE[0]
    assert key in product
    assert xla_cpu_conv_paths.one_device_options(None) == {k: v for k, v in product.items() if k != key}
    assert xla_cpu_conv_paths.one_device_options(xla_cpu_conv_paths.EIGEN) == xla_cpu_conv_paths.EIGEN


@pytest.mark.slow
def test_the_xla_conv_paths_benchmark_runs_tiny_and_its_three_xla_paths_agree(tmp_path, monkeypatch):
    """benchmarks/xla_cpu_conv_paths.py at test sizes, without its train-step part: every pass timed on all four
    sides (XLA default, XLA Eigen, the product's convolutions, PyTorch), and every XLA path's float32 results within
    float32 rounding of the float64 run of the same program."""
    import xla_cpu_conv_paths

    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # main() may add a device count: restored after
    report = tmp_path / "paths.md"
    argv = ["--tiny", "--repeats", "1", "--step_method", "", "--settle", "0", "--out", str(report)]
    rows = xla_cpu_conv_paths.main(argv)
    assert len(rows) == 2 * 3 + 2 + 4  # two conv stages x three passes, a grayscale layer x two passes, four networks
    assert all(len(row.ms) == 4 and value > 0 for row in rows for value in row.ms.values())
    assert all(len(row.errors) == 3 and error < 1e-4 for row in rows for error in row.errors.values())
    assert "## 3." not in report.read_text()  # the train step part was left out (step_speed's tests run that step)


def test_the_compile_options_benchmark_runs_tiny_and_the_products_options_change_at_most_rounding(
    tmp_path, monkeypatch
):
    """benchmarks/step_compile_options.py at test sizes: both variants compiled and timed, and the product's first
    update within float32 rounding of the one compiled with XLA's default options (LLVM level 1 vs 3, YNNPACK's share)."""
    import step_compile_options

    from mmard_jax import compilations

    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # main() may add a device count: restored after
    report = tmp_path / "options.md"
    argv = ["--tiny", "--method", "rslad", "--variants", "XLA defaults,product", "--pairs", "1", "--rounds", "1"]
    results = step_compile_options.main([*argv, "--steps", "1", "--output", str(report)])["mnist/rslad"]
    product, defaults = results["product"], results["XLA defaults"]
    assert product.options == compilations.compiler_options() and defaults.options == {}
    assert all(seconds > 0 for seconds in product.compile_seconds + defaults.compile_seconds + product.step_seconds)
    assert len(product.first_update) == len(defaults.first_update) > 3
    assert step_compile_options.largest_difference(defaults.first_update, product.first_update) < 1e-6
    assert f"| product ({step_compile_options.format_options(compilations.compiler_options())}) |" in report.read_text()


def test_the_compile_options_benchmarks_other_variants_drop_the_eigen_option_and_reruns_are_compared(
    tmp_path, monkeypatch
):
    """The "threaded Eigen" variant compiles with the product's options less the single-threaded Eigen one, "YNNPACK
    convolutions only" with matrix products taken from YNNPACK, "no Winograd" with the product's own; each variant's
    first update is run twice and the two compared."""
    import step_compile_options

    from mmard_jax import compilations

    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    variants = "threaded Eigen,YNNPACK convolutions only,no Winograd,product"
    argv = ["--tiny", "--method", "rslad", "--variants", variants, "--pairs", "1"]
    argv += ["--rounds", "1", "--reruns", "2", "--steps", "1", "--output", str(tmp_path / "variants.md")]
    results = step_compile_options.main(argv)["mnist/rslad"]
    product = compilations.compiler_options()
    eigen_option = compilations.ONE_EIGEN_THREAD_PER_DEVICE[0]
    assert results["threaded Eigen"].options == {k: v for k, v in product.items() if k != eigen_option}
    assert results["no Winograd"].options == product
    fusion_option = compilations.YNNPACK_CONVOLUTIONS_AND_DOTS[0]
    assert results["YNNPACK convolutions only"].options == {
        **product,
        fusion_option: "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
    }
    assert (
        step_compile_options.largest_difference(
            results["YNNPACK convolutions only"].first_update, results["product"].first_update
        )
        < 1e-6
    )
    assert all(len(result.rerun_updates) == 1 for result in results.values())
    # the tiny student's 64 -> 64 layers take Winograd's form in the product: the same update up to float32 rounding
    assert (
        0
        < step_compile_options.largest_difference(results["no Winograd"].first_update, results["product"].first_update)
        < 1e-6
    )
    assert "reruns of the first update" in (tmp_path / "variants.md").read_text()


def test_tracing_without_winograd_leaves_a_wide_3x3_layer_to_xla_and_restores_the_routing():
    """Under step_compile_options.without_winograd a 64 -> 64, 8x8 convolution lowers with no matrix product (the
    Winograd form's 16 products), and afterwards with them again."""
    import functools

    import jax
    import numpy as np
    import step_compile_options

    from mmard_jax.models import convolution

    x, kernel = np.zeros((2, 8, 8, 64), np.float32), np.zeros((3, 3, 64, 64), np.float32)

    def lowered_text():
        conv = functools.partial(convolution.conv_general_dilated, window_strides=(1, 1), padding="SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
        return jax.jit(conv).lower(x, kernel).as_text()

    assert "dot_general" in lowered_text()
    with step_compile_options.without_winograd():
        assert "dot_general" not in lowered_text() and "convolution" in lowered_text()
    assert "dot_general" in lowered_text()


def test_the_start_up_benchmark_runs_and_the_one_program_init_gives_the_op_by_op_bits(tmp_path):
    """benchmarks/start_up.py's init case at the demo teacher's size: both ways in fresh processes, same bits."""
    import start_up

    report = tmp_path / "start_up.md"
    results = start_up.main(["--cases", "init", "--models", "cnn", "--pairs", "1", "--output", str(report)])
    result = results["initialise cnn"]
    assert result["comparison"] == "same bits"
    assert all(s > 0 for way in result["ways"] for s in result["seconds"][way])
    assert "| initialise cnn |" in report.read_text()


def test_the_forward_routing_benchmark_runs_tiny_and_only_the_routing_differs(tmp_path):
    """benchmarks/conv_forward_routing.py at test sizes: both thresholds compiled and timed for AutoAttack and the two
    demo steps, the product's programs have fewer row-dilated convolutions (the comparison is not vacuous), and both
    give the same robust accuracy and the same first loss up to float32 rounding."""
    import conv_forward_routing as routing

    report = tmp_path / "routing.md"
    argv = ["--epochs", "0", "--n-examples", "32", "--iterations", "2", "--square-queries", "20", "--tiny"]
    results = routing.main([*argv, "--rounds", "1", "--steps", "1", "--settle", "0", "--output", str(report)])
    assert set(results) == {"autoattack", "mmard", "rslad"}
    for workload, variants in results.items():
        product, before = variants[routing.PRODUCT], variants[routing.BEFORE]
        assert all(seconds > 0 for seconds in product["seconds"] + before["seconds"]), workload
        assert 0 < product["row_dilated"] < before["row_dilated"], workload
        assert abs(product["result"] - before["result"]) <= 1e-5 * max(1.0, abs(before["result"])), workload
    assert report.read_text().count("| before (Eigen above 16 channels) |") == 3


def test_the_autoattack_compile_options_benchmark_runs_tiny_and_level_0_once_per_batch_programs_give_the_same_bits(
    tmp_path,
):
    """benchmarks/autoattack_compile_options.py at test sizes, in fresh processes: the product compiles the
    once-per-batch programs at LLVM level 0 and its loops at level 1, the "one level for all" variant everything at
    level 1, and both give the same adversarial examples and robust mask to the bit (else main exits)."""
    import autoattack_compile_options as compile_options

    report = tmp_path / "compile_options.md"
    argv = ["--epochs", "0", "--n-examples", "32", "--square-queries", "20", "--pairs", "1", "--devices", "1"]
    variants = ["--variants", "one level for all,product", "--settle", "0", "--output", str(report)]
    results = compile_options.main([*argv, *variants])
    assert results["differing"] == {}
    product, one_level = (results["reports"][name][0] for name in ("product", "one level for all"))
    level = "xla_backend_optimization_level"
    assert (product["options"][level], product["one_shot_options"][level]) == (1, 0)
    assert one_level["one_shot_options"] == one_level["options"] == product["options"]
    assert product["robust"] == one_level["robust"]
    first, second = product["rounds"]
    assert first["wall"] > 0 and first["programs"] > 0 and second["programs"] == 0  # the second reuses them all
    assert "| one level for all (" in report.read_text()


def test_the_autoattack_compile_options_benchmark_runs_git_revisions_from_their_own_worktrees(tmp_path):
    """--revisions: each revision's package is imported from its own temporary worktree (two names of one commit:
    two worktrees, the same bits), the report names the commits, and the worktrees are gone afterwards."""
    import subprocess

    import autoattack_compile_options as compile_options

    repository = Path(compile_options.__file__).resolve().parent.parent
    listed = subprocess.run(["git", "-C", str(repository), "worktree", "list"], capture_output=True, text=True).stdout
    report = tmp_path / "revisions.md"
    argv = ["--epochs", "0", "--n-examples", "32", "--square-queries", "20", "--pairs", "1", "--devices", "1"]
    results = compile_options.main(
        [*argv, "--variants", "product", "--revisions", "HEAD~0,HEAD", "--settle", "0", "--output", str(report)]
    )
    assert results["differing"] == {}
    old, new = (results["reports"][f"product @ {revision}"][0] for revision in ("HEAD~0", "HEAD"))
    assert old["package"] != new["package"]
    assert not any(Path(run["package"]).is_relative_to(repository) for run in (old, new))
    assert old["rounds"][0]["programs"] == new["rounds"][0]["programs"] > 0
    head = subprocess.run(["git", "-C", str(repository), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert f"HEAD = {head.stdout.strip()}" in report.read_text()
    after = subprocess.run(["git", "-C", str(repository), "worktree", "list"], capture_output=True, text=True).stdout
    assert after == listed
    with pytest.raises(SystemExit, match="each revision once"):
        compile_options.main([*argv, "--revisions", "HEAD,HEAD", "--settle", "0", "--output", ""])
