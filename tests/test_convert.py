"""PyTorch checkpoints <-> Flax: converted logits equal PyTorch's, export round-trips, bad files are refused."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_twins as twins  # noqa: E402  (tests/ is on sys.path)

from mmard_jax import checkpoint as ckpt_lib  # noqa: E402
from mmard_jax import convert, export_student, import_teacher, networks  # noqa: E402
from mmard_jax.convert import robustbench  # noqa: E402
from mmard_jax.models import count_params, create_model  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
SHAPE = (32, 32, 3)

# name -> (our registry name, our kwargs, normalisation, PyTorch twin factory(num_classes))
ARCHITECTURES = {
    "resnet18": ("resnet18", {}, {}, lambda c: twins.ResNet18(num_classes=c)),
    "preact_resnet18": ("preact_resnet18", {}, {}, lambda c: twins.PreActResNet18(num_classes=c)),
    "preact_resnet18_kuangliu": (
        "preact_resnet18",
        {"final_bn": False},
        {},
        lambda c: twins.PreActResNet18(num_classes=c, final_bn=False),
    ),
    "mobilenet_v2": ("mobilenet_v2", {}, {}, lambda c: twins.MobileNetV2(num_classes=c)),
    "wide_resnet_sub_block1": (
        "wide_resnet",
        {"depth": 16, "widen_factor": 2},
        {},
        lambda c: twins.WideResNet(depth=16, widen_factor=2, num_classes=c, sub_block1=True),
    ),
    "dm_wide_resnet": (
        "dm_wide_resnet",
        {"depth": 16, "widen_factor": 2, "activation": "swish"},
        {"mean": robustbench.CIFAR10_MEAN, "std": robustbench.CIFAR10_STD},
        lambda c: twins.DMWideResNet(num_classes=c, depth=16, width=2, activation="swish"),
    ),
    "dm_preact_resnet": (
        "dm_preact_resnet",
        {"depth": 18, "activation": "swish"},
        {"mean": robustbench.CIFAR100_MEAN, "std": robustbench.CIFAR100_STD},
        lambda c: twins.DMPreActResNet(
            num_classes=c, depth=18, activation="swish", mean=robustbench.CIFAR100_MEAN, std=robustbench.CIFAR100_STD
        ),
    ),
}


def flax_module(arch: str, num_classes: int):
    name, kwargs, normalisation, _ = ARCHITECTURES[arch]
    return create_model(name, num_classes, **normalisation, **kwargs)


def torch_twin(arch: str, num_classes: int, seed: int = 0):
    torch.manual_seed(seed)
    return twins.randomize_batch_stats(ARCHITECTURES[arch][3](num_classes), seed=seed).eval()


def random_images(seed: int = 0, n: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(n, *SHAPE)).astype(np.float32)


def torch_logits(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def flax_logits(module, variables, images: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(networks.logits_function(networks.Network(module, variables)))(images))


def state_dict_numpy(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def save_torch(path, obj) -> str:
    torch.save(obj, path)
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# Parity: the converted network computes what the PyTorch network computes


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_converted_logits_equal_pytorch(arch, num_classes, tmp_path):
    model = torch_twin(arch, num_classes)
    path = save_torch(tmp_path / "model.pt", model.state_dict())
    module = flax_module(arch, num_classes)
    variables, dropped = convert.convert_state_dict(convert.read_state_dict(path), module, SHAPE)
    images = random_images()
    expected = torch_logits(model, images)
    assert np.std(expected) > 0.1  # non-trivial logits: the comparison means something
    np.testing.assert_allclose(flax_logits(module, variables, images), expected, atol=1e-4, rtol=0)
    assert all(key.endswith("num_batches_tracked") or key.startswith("sub_block1.") for key in dropped)
    assert any(key.startswith("sub_block1.") for key in dropped) == (arch == "wide_resnet_sub_block1")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_export_loads_strictly_into_pytorch_and_round_trips_exactly(arch, suffix, tmp_path):
    module = flax_module(arch, 10)
    source = torch_twin(arch, 10, seed=1)
    variables, _ = convert.convert_state_dict(state_dict_numpy(source), module, SHAPE)
    path = str(tmp_path / f"export{suffix}")
    convert.write_state_dict(path, convert.export_state_dict(module, variables))

    if suffix == ".pt":
        state = torch.load(path, weights_only=True)
    else:
        from safetensors.torch import load_file

        state = load_file(path)
    target = ARCHITECTURES[arch][3](10)
    if arch == "wide_resnet_sub_block1":  # the export targets the definition without the unused sub_block1
        target = twins.WideResNet(depth=16, widen_factor=2, num_classes=10)
    target.load_state_dict(state, strict=True)
    images = random_images(1)
    np.testing.assert_allclose(torch_logits(target.eval(), images), torch_logits(source, images), atol=1e-5, rtol=0)

    back, _ = convert.convert_state_dict(convert.read_state_dict(path), module, SHAPE)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, variables))


# ---------------------------------------------------------------------------------------------------------
# Files as they come


def test_wrappers_and_module_prefix_are_unwrapped(tmp_path):
    model = torch_twin("resnet18", 10)
    plain = convert.read_state_dict(save_torch(tmp_path / "plain.pt", model.state_dict()))
    for wrapper in ("state_dict", "model_state_dict", "net", "model"):
        wrapped = {wrapper: {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 76}
        found = convert.read_state_dict(save_torch(tmp_path / f"{wrapper}.pt", wrapped))
        assert found.keys() == plain.keys()
        for key in plain:
            np.testing.assert_array_equal(found[key], plain[key])


def test_wrong_key_names_the_missing_and_the_unexpected_key(tmp_path):
    state = state_dict_numpy(torch_twin("resnet18", 10))
    state["linear.weights"] = state.pop("linear.weight")
    with pytest.raises(convert.ConversionError) as error:
        convert.convert_state_dict(state, flax_module("resnet18", 10), SHAPE)
    message = str(error.value)
    assert "missing key 'linear.weight'" in message and "(10, 512)" in message
    assert "unexpected key 'linear.weights'" in message


def test_wrong_shape_names_the_key_and_both_shapes():
    state = state_dict_numpy(torch_twin("resnet18", 10))
    state["layer2.0.conv1.weight"] = np.zeros((128, 32, 3, 3), np.float32)
    with pytest.raises(
        convert.ConversionError,
        match=r"'layer2\.0\.conv1\.weight' has shape \(128, 32, 3, 3\) in the "
        r"file, the model needs \(128, 64, 3, 3\)",
    ):
        convert.convert_state_dict(state, flax_module("resnet18", 10), SHAPE)


def test_wrong_class_count_is_refused_naming_the_head():
    state = state_dict_numpy(torch_twin("resnet18", 100))
    with pytest.raises(convert.ConversionError, match=r"'linear\.weight' has shape \(100, 512\)"):
        convert.convert_state_dict(state, flax_module("resnet18", 10), SHAPE)


class _RunsCodeWhenUnpickled:
    """A payload whose unpickling would create a marker file (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    model = torch_twin("resnet18", 10)
    path = save_torch(
        tmp_path / "payload.pt", {"state_dict": model.state_dict(), "extra": _RunsCodeWhenUnpickled(marker)}
    )
    with pytest.raises(convert.UnsafeCheckpointError, match="arbitrary code"):
        convert.read_state_dict(path)
    assert not marker.exists()


def test_normalisation_buffers_must_match_the_model():
    state = state_dict_numpy(torch_twin("dm_wide_resnet", 10))
    module = flax_module("dm_wide_resnet", 10)
    ok = {**state, "mu": np.asarray(robustbench.CIFAR10_MEAN), "sigma": np.asarray(robustbench.CIFAR10_STD)}
    assert set(convert.convert_state_dict(ok, module, SHAPE)[1]) >= {"mu", "sigma"}
    with pytest.raises(convert.ConversionError, match="normalisation buffer 'mu'"):
        convert.convert_state_dict({**ok, "mu": np.zeros(3)}, module, SHAPE)


def test_models_without_a_pytorch_counterpart_are_refused():
    with pytest.raises(convert.ConversionError, match="no PyTorch counterpart"):
        convert.export_state_dict(create_model("cnn", 10), {"params": {}})


# ---------------------------------------------------------------------------------------------------------
# The zoo's new architectures: parameter counts equal the PyTorch definitions


@pytest.mark.parametrize(
    "name, kwargs, num_classes, twin, published",
    [  # published: the count of the public PyTorch definition (RobustBench's model zoo), an independent fact
        (
            "dm_wide_resnet",
            {"depth": 28, "widen_factor": 10},
            10,
            lambda: twins.DMWideResNet(depth=28, width=10),
            36_479_194,
        ),
        (
            "dm_wide_resnet",
            {"depth": 70, "widen_factor": 16},
            100,
            lambda: twins.DMWideResNet(depth=70, width=16, num_classes=100),
            266_888_756,
        ),
        ("dm_preact_resnet", {"depth": 18}, 10, lambda: twins.DMPreActResNet(depth=18), 12_548_426),
        ("dm_preact_resnet", {"depth": 34}, 100, lambda: twins.DMPreActResNet(depth=34, num_classes=100), 22_702_756),
        ("wrn-34-10", {}, 100, lambda: twins.WideResNet(depth=34, widen_factor=10, num_classes=100), 46_218_164),
    ],
)
def test_parameter_counts_equal_pytorch(name, kwargs, num_classes, twin, published):
    with torch.device("meta"):
        assert twins.count_parameters(twin()) == published
    abstract = networks.abstract_variables(create_model(name, num_classes, **kwargs), SHAPE)
    assert count_params(abstract["params"]) == published


def test_trades_checkpoint_layout_holds_sub_block1_which_is_dropped():
    """RobustBench's WRN-34-10 files hold 48,262,586 numbers, of which the network uses 46,160,474."""
    with torch.device("meta"):
        stored = twins.WideResNet(depth=34, widen_factor=10, sub_block1=True)
    assert twins.count_parameters(stored) == 48_262_586
    unused = dict(type(create_model("wrn-34-10", 10)).torch_unused)
    assert (
        {k.split(".")[0] + "." for k in stored.state_dict()}
        - {"conv1.", "block1.", "block2.", "block3.", "bn1.", "fc."}
        == set(unused)
        == {"sub_block1."}
    )


# ---------------------------------------------------------------------------------------------------------
# The commands


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_import_a_robustbench_teacher_by_name_then_export_it(tmp_path):
    """Rebuffi2021Fixing_R18_ddpm (CIFAR-100) from where RobustBench keeps it; its logits survive import and export."""
    model = twins.randomize_batch_stats(
        twins.DMPreActResNet(
            num_classes=100, activation="swish", mean=robustbench.CIFAR100_MEAN, std=robustbench.CIFAR100_STD
        ),
        seed=3,
    ).eval()
    name = "Rebuffi2021Fixing_R18_ddpm"
    path = robustbench.robustbench_file(str(tmp_path / "models"), "cifar100", "Linf", name)
    os.makedirs(os.path.dirname(path))
    save_torch(path, {"model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}})
    out = tmp_path / "teacher"
    done = run_module(
        "mmard_jax.import_teacher",
        "--robustbench",
        name,
        "--dataset",
        "cifar100",
        "--threat-model",
        "Linf",
        "--model-dir",
        str(tmp_path / "models"),
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert f"--config.teacher.checkpoint={out}" in done.stdout
    record = json.load(open(out / "import.json"))
    assert record["model"]["name"] == "dm_preact_resnet" and record["num_classes"] == 100
    assert record["sha256"] == convert.file_sha256(path)

    variables, meta = ckpt_lib.load_variables(ckpt_lib.checkpoint_dir(str(out)), "best")
    module = create_model(
        "dm_preact_resnet",
        100,
        depth=18,
        activation="swish",
        mean=robustbench.CIFAR100_MEAN,
        std=robustbench.CIFAR100_STD,
    )
    images = random_images(2)
    np.testing.assert_allclose(flax_logits(module, variables, images), torch_logits(model, images), atol=1e-4, rtol=0)

    exported = str(tmp_path / "student.pt")
    assert export_student.main(["--run", str(out), "--out", exported]) == 0
    again = twins.DMPreActResNet(
        num_classes=100, activation="swish", mean=robustbench.CIFAR100_MEAN, std=robustbench.CIFAR100_STD
    )
    again.load_state_dict(torch.load(exported, weights_only=True), strict=True)
    np.testing.assert_allclose(torch_logits(again.eval(), images), torch_logits(model, images), atol=1e-6, rtol=0)
    assert json.load(open(exported + ".json"))["model"]["mean"] == list(robustbench.CIFAR100_MEAN)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--robustbench", "NoSuchModel2099"], "supported names:\n  Carmon2019Unlabeled"),
        (
            ["--robustbench", "Zhang2019Theoretically", "--model-dir", "/nonexistent"],
            "no file at '/nonexistent/cifar10/Linf/Zhang2019Theoretically.pt'",
        ),
        (["--source", "/nonexistent.pt", "--model", "resnet18", "--num-classes", "10"], "no weights file"),
        (["--source", "x.pt", "--num-classes", "10"], "--model is required"),
        (["--source", "x.pt", "--model", "vgg", "--num-classes", "10"], "unknown model name 'vgg'"),
    ],
)
def test_import_errors_are_one_message_and_exit_2(args, expected, tmp_path, capsys):
    assert import_teacher.main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "Traceback" not in err
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.slow
def test_distillation_from_an_imported_teacher_runs_end_to_end(tmp_path):
    """The tiny config (8x8 digits) distils from a random-weight PyTorch WRN-10-1 imported from a wrapped file."""
    model = twins.randomize_batch_stats(twins.WideResNet(depth=10, widen_factor=1, in_channels=1), seed=4, image_size=8)
    source = save_torch(tmp_path / "wrn.pt", {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}})
    teacher = tmp_path / "teacher"
    assert (
        import_teacher.main(
            [
                "--source",
                source,
                "--model",
                "wide_resnet",
                "--model-kwargs",
                "depth=10,widen_factor=1",
                "--num-classes",
                "10",
                "--image-shape",
                "8,8,1",
                "--out",
                str(teacher),
            ]
        )
        == 0
    )
    done = run_module(
        "mmard_jax.main",
        "--config",
        os.path.join(ROOT, "configs", "tiny.py"),
        "--workdir",
        str(tmp_path / "run"),
        "--config.stages=distill,eval",
        "--config.baselines=",
        f"--config.teacher.checkpoint={teacher}",
        "--config.optim.epochs=1",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "architecture from" in done.stderr  # config.teacher.model (a cnn) gave way to the checkpoint's
    results = json.load(open(tmp_path / "run" / "results.json"))["results"]
    assert set(results) == {"teacher", "mmard"}
    assert 0.0 <= results["mmard"]["accuracy"]["pgd"] <= results["mmard"]["accuracy"]["clean"] <= 1.0
