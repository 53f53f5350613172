"""Model zoo: registry, shapes, exact parameter counts, BatchNorm modes, normalisation, dtypes."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mmard_jax.models import MODEL_NAMES, count_params, create_model
from mmard_jax.models.small_cnn import flatten_channel_major, max_pool_2x2

CIFAR = (32, 32, 3)
MNIST = (28, 28, 1)

# (name, kwargs) of every architecture; these are only traced (jax.eval_shape), never run.
ALL_MODELS = [
    ("resnet18", {}),
    ("preact_resnet18", {}),
    ("wide_resnet", {"depth": 10, "widen_factor": 2}),
    ("wrn-34-10", {}),
    ("dm_wide_resnet", {"depth": 10, "widen_factor": 2, "activation": "relu"}),
    ("dm_preact_resnet", {}),
    ("mobilenet_v2", {}),
    ("small_cnn", {}),
    ("cnn", {}),
    ("cnn", {"widths": (4, 8), "hidden": 0, "use_bn": True}),
    ("mlp", {}),
    ("mlp", {"hidden": ()}),
]
BN_MODELS = [
    ("resnet18", {}),
    ("preact_resnet18", {}),
    ("wide_resnet", {"depth": 10, "widen_factor": 1}),
    ("mobilenet_v2", {}),
    ("cnn", {"widths": (4, 8), "use_bn": True}),
]


def abstract_init(model, input_shape, batch=2):
    """Variables as ShapeDtypeStructs (nothing is computed)."""
    x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
    return jax.eval_shape(lambda key, x: model.init(key, x, train=False), jax.random.key(0), x)


def abstract_logits(model, input_shape, batch=2):
    variables = abstract_init(model, input_shape, batch)
    x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
    return jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)


def random_images(seed, shape):
    return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def fake_variables(model, input_shape, seed=0):
    """Variables of the model's shapes filled by NumPy (skips the slow-to-compile random init):
    fan-in scaled kernels, scales near 1, small biases and means, variances in [0.5, 1.5]."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        kind = path[-1].key
        if kind == "kernel":
            return rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        if kind == "scale":
            return 1.0 + 0.1 * rng.normal(size=leaf.shape)
        if kind == "var":
            return rng.uniform(0.5, 1.5, size=leaf.shape)
        return 0.1 * rng.normal(size=leaf.shape)

    filled = jax.tree_util.tree_map_with_path(fill, abstract_init(model, input_shape))
    return jax.tree_util.tree_map(lambda v: np.asarray(v, np.float32), filled)


def jit_apply(model):
    return jax.jit(model.apply, static_argnames=("train", "mutable", "capture_intermediates"))


def fast_key(seed):
    """A key whose generator compiles quickly on CPU, for tests that need the real initialisers."""
    return jax.random.key(seed, impl="unsafe_rbg")


def tree_allclose(a, b, **tolerances):
    return all(
        np.allclose(x, y, **tolerances)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def test_model_names_are_sorted_and_complete():
    expected = {
        "resnet18",
        "preact_resnet18",
        "wide_resnet",
        "wrn-34-10",
        "wrn-28-10",
        "wrn-70-16",
        "dm_wide_resnet",
        "dm_preact_resnet",
        "mobilenet_v2",
        "small_cnn",
        "cnn",
        "mlp",
    }
    assert MODEL_NAMES == tuple(sorted(MODEL_NAMES))
    assert set(MODEL_NAMES) == expected


@pytest.mark.parametrize("name,kwargs", ALL_MODELS)
@pytest.mark.parametrize("input_shape,num_classes", [(CIFAR, 10), (MNIST, 7)])
def test_output_shape(name, kwargs, input_shape, num_classes):
    logits = abstract_logits(create_model(name, num_classes, **kwargs), input_shape, batch=3)
    assert logits.shape == (3, num_classes)
    assert logits.dtype == jnp.float32


# Hand counts (PyTorch convention: weights + biases, BN scale + shift; running stats excluded).
# ResNet-18: stem 1,728 + bn 128; stages 147,968 / 525,568 / 2,099,712 / 8,393,728 (BN included);
#   linear 5,130.  PreAct: no stem BN, BN on block inputs, shortcut conv without BN, final BN 1,024.
# SmallCNN 28x28x1: convs 320 + 9,248 + 18,496 + 36,928; fc 1024*200+200, 200*200+200, 200*10+10.
#   On 32x32x3 the first conv has 3*32*9+32 = 896 and fc1 sees 64*5*5 = 1,600 features.
# CNN defaults on 28x28x1: conv 16*9+16 = 160, 16*32*9+32 = 4,640, hidden 7*7*32*64+64, head 650.
@pytest.mark.parametrize(
    "name,kwargs,input_shape,expected",
    [
        ("resnet18", {}, CIFAR, 11_173_962),
        ("preact_resnet18", {}, CIFAR, 11_172_170),
        ("preact_resnet18", {"final_bn": False}, CIFAR, 11_171_146),
        ("wrn-34-10", {}, CIFAR, 46_160_474),
        ("mobilenet_v2", {}, CIFAR, 2_296_922),
        ("small_cnn", {}, MNIST, 320 + 9_248 + 18_496 + 36_928 + 205_000 + 40_200 + 2_010),
        ("small_cnn", {}, CIFAR, 896 + 9_248 + 18_496 + 36_928 + 320_200 + 40_200 + 2_010),
        ("cnn", {}, MNIST, 160 + 4_640 + (7 * 7 * 32 * 64 + 64) + 650),
        ("mlp", {"hidden": (128, 32)}, MNIST, (784 * 128 + 128) + (128 * 32 + 32) + (32 * 10 + 10)),
    ],
)
def test_parameter_count(name, kwargs, input_shape, expected):
    variables = abstract_init(create_model(name, 10, **kwargs), input_shape)
    assert count_params(variables["params"]) == expected


def wide_resnet_param_count(depth: int, widen_factor: int, num_classes: int) -> int:
    """Hand count of the TRADES WideResNet (plain arithmetic)."""
    n = (depth - 4) // 6
    total, in_width = 3 * 16 * 9, 16
    for width in (16 * widen_factor, 32 * widen_factor, 64 * widen_factor):
        for block in range(n):
            block_in = in_width if block == 0 else width
            total += 2 * block_in + 9 * block_in * width + 2 * width + 9 * width * width
            total += block_in * width if block_in != width else 0
        in_width = width
    return total + 2 * in_width + in_width * num_classes + num_classes


@pytest.mark.parametrize(
    "name,kwargs",
    [("wrn-34-10", {}), ("wrn-28-10", {}), ("wrn-70-16", {}), ("wide_resnet", {"depth": 16, "widen_factor": 1})],
)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_wide_resnet_count_matches_hand_formula(name, kwargs, num_classes):
    model = create_model(name, num_classes, **kwargs)
    variables = abstract_init(model, CIFAR)
    expected = wide_resnet_param_count(model.depth, model.widen_factor, num_classes)
    assert count_params(variables["params"]) == expected
    assert wide_resnet_param_count(34, 10, 10) == 46_160_474


def test_wide_resnet_naming_scheme():
    params = abstract_init(create_model("wide_resnet", 10, depth=16, widen_factor=2), CIFAR)["params"]
    assert set(params) == {"conv1", "block1", "block2", "block3", "bn1", "fc"}
    assert set(params["block2"]) == {"layer_0", "layer_1"}
    assert set(params["block2"]["layer_0"]) == {"bn1", "conv1", "bn2", "conv2", "convShortcut"}
    assert set(params["block2"]["layer_1"]) == {"bn1", "conv1", "bn2", "conv2"}
    assert params["block2"]["layer_0"]["conv1"]["kernel"].shape == (3, 3, 32, 64)
    assert params["fc"]["bias"].shape == (10,)


@pytest.mark.parametrize(
    "name,penultimate",
    [("resnet18", 512), ("preact_resnet18", 512), ("wrn-34-10", 640), ("mobilenet_v2", 1280), ("small_cnn", 200)],
)
def test_count_grows_by_one_linear_row_per_class(name, penultimate):
    count = {c: count_params(abstract_init(create_model(name, c), CIFAR)["params"]) for c in (10, 100)}
    assert count[100] - count[10] == 90 * (penultimate + 1)


def test_count_params_on_a_hand_made_tree():
    abstract_leaf = jax.ShapeDtypeStruct((2, 2, 2), jnp.float32)
    tree = {"a": np.zeros((3, 4)), "b": {"c": np.zeros(5), "d": abstract_leaf}}
    assert count_params(tree) == 12 + 5 + 8


def test_initialisers_follow_the_references():
    model = create_model("wide_resnet", 10, depth=10, widen_factor=4)
    params = jax.jit(lambda key, x: model.init(key, x, train=False))(fast_key(20), np.zeros((1, *CIFAR), np.float32))[
        "params"
    ]
    kernel = np.asarray(params["block2"]["layer_0"]["conv2"]["kernel"])  # 3x3, 128 -> 128
    np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (9 * 128)), rtol=0.05)  # He fan-out
    fc_kernel = np.asarray(params["fc"]["kernel"])  # PyTorch default: U(+-1/sqrt(fan_in))
    bound = 1.0 / np.sqrt(256)
    assert np.abs(fc_kernel).max() <= bound and np.abs(fc_kernel).max() > 0.9 * bound
    np.testing.assert_allclose(fc_kernel.std(), bound / np.sqrt(3.0), rtol=0.1)
    assert not np.any(np.asarray(params["fc"]["bias"]))
    np.testing.assert_array_equal(params["bn1"]["scale"], np.ones(256))


def test_init_variables_compiles_one_program_with_the_values_of_op_by_op_initialisation():
    from mmard_jax import compilations, networks

    module = create_model("cnn", 10, widths=(8, 16), hidden=32, use_bn=True)
    key = fast_key(3)
    compilations.compiler_options()  # its once-per-process probe compiles a program of its own
    with compilations.recorded() as compiled:
        variables = networks.init_variables(module, key, (12, 12, 1))
    assert [name for name, _ in compiled] == ["jit(initial_variables)"]
    expected = networks.initial_variables(module, key, (12, 12, 1))  # op by op
    chex.assert_trees_all_equal(variables, expected)
    assert set(variables) == {"params", "batch_stats"} and variables["batch_stats"]


@pytest.mark.parametrize("name,kwargs", BN_MODELS)
def test_batchnorm_train_vs_inference(name, kwargs):
    model = create_model(name, 10, **kwargs)
    apply = jit_apply(model)
    x = random_images(0, (4, 8, 8, 3))
    x_other = x.copy()
    x_other[1:] = random_images(1, (3, 8, 8, 3))  # same first example, other batch mates
    variables = fake_variables(model, x.shape[1:])

    # Inference: each example's logits ignore the batch; running statistics stay as they were.
    eval_logits, eval_updates = apply(variables, x, train=False, mutable=("batch_stats",))
    eval_other, _ = apply(variables, x_other, train=False, mutable=("batch_stats",))
    np.testing.assert_allclose(eval_logits[0], eval_other[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(eval_logits[1], eval_other[1], rtol=1e-4, atol=1e-4)
    assert tree_allclose(eval_updates["batch_stats"], variables["batch_stats"], rtol=0, atol=0)

    # Training: batch statistics, so example 0 depends on its batch mates; running stats move.
    train_logits, train_updates = apply(variables, x, train=True, mutable=("batch_stats",))
    train_other, _ = apply(variables, x_other, train=True, mutable=("batch_stats",))
    assert not np.allclose(train_logits[0], train_other[0], rtol=1e-4, atol=1e-4)
    assert not tree_allclose(train_updates["batch_stats"], variables["batch_stats"])


def conv3x3_same_numpy(x, kernel, bias, stride=1):
    """Cross-correlation with symmetric zero padding 1 (PyTorch ``padding=1``), NHWC / HWIO."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    height = (x.shape[1] - 1) // stride + 1
    width = (x.shape[2] - 1) // stride + 1
    out = np.zeros((x.shape[0], height, width, kernel.shape[-1]))
    for i in range(height):
        for j in range(width):
            patch = padded[:, i * stride : i * stride + 3, j * stride : j * stride + 3, :]
            out[:, i, j, :] = np.einsum("nhwc,hwco->no", patch, kernel)
    return out + bias


def test_batchnorm_matches_pytorch_momentum_and_epsilon():
    model = create_model("cnn", 2, widths=(3,), hidden=0, use_bn=True)
    x = 1e-3 * random_images(3, (4, 6, 6, 1))  # tiny activations: epsilon matters
    variables = fake_variables(model, x.shape[1:])
    variables["batch_stats"]["bn_0"] = {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)}
    variables["params"]["bn_0"] = {"scale": np.ones(3, np.float32), "bias": np.zeros(3, np.float32)}
    (_, state) = model.apply(
        variables, x, train=True, capture_intermediates=True, mutable=["batch_stats", "intermediates"]
    )
    kernel = np.asarray(variables["params"]["conv_0"]["kernel"], np.float64)
    conv_out = conv3x3_same_numpy(np.float64(x), kernel, 0.0)
    batch_mean, batch_var = conv_out.mean(axis=(0, 1, 2)), conv_out.var(axis=(0, 1, 2))

    stats = state["batch_stats"]["bn_0"]
    np.testing.assert_allclose(stats["mean"], 0.9 * 0.0 + 0.1 * batch_mean, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(stats["var"], 0.9 * 1.0 + 0.1 * batch_var, rtol=1e-6)
    expected_bn = (conv_out - batch_mean) / np.sqrt(batch_var + 1e-5)
    bn_output = state["intermediates"]["bn_0"]["__call__"][0]
    np.testing.assert_allclose(bn_output, expected_bn, rtol=2e-3, atol=2e-3)


def test_stride_two_conv_pads_symmetrically_like_pytorch():
    model = create_model("resnet18", 10)
    x = random_images(5, (1, 8, 8, 3))
    variables = fake_variables(model, x.shape[1:])
    _, state = jit_apply(model)(variables, x, train=False, capture_intermediates=True, mutable=("intermediates",))
    block_input = np.asarray(state["intermediates"]["layer1_1"]["__call__"][0], np.float64)
    conv_output = state["intermediates"]["layer2_0"]["conv1"]["__call__"][0]
    kernel = np.asarray(variables["params"]["layer2_0"]["conv1"]["kernel"], np.float64)
    expected = conv3x3_same_numpy(block_input, kernel, 0.0, stride=2)
    assert conv_output.shape == (1, 4, 4, 128)
    np.testing.assert_allclose(conv_output, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "name,mean,std,shape",
    [
        ("cnn", (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), CIFAR),
        ("small_cnn", (0.1307,), (0.3081,), MNIST),
    ],
)
def test_input_normalisation_equals_prenormalised_input(name, mean, std, shape):
    plain = create_model(name, 10)
    normalising = create_model(name, 10, mean=mean, std=std)
    x = random_images(7, (2, *shape))
    variables = fake_variables(plain, shape)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
        abstract_init(normalising, shape)
    )  # mean and std are not parameters
    prenormalised = (x - np.asarray(mean)) / np.asarray(std)
    expected = plain.apply(variables, prenormalised, train=False)
    logits = normalising.apply(variables, x, train=False)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(plain.apply(variables, x, train=False), expected, atol=1e-3)


def test_small_cnn_starts_with_zero_logits_and_flattens_channel_major():
    model = create_model("small_cnn", 10)
    x = random_images(9, (2, *MNIST))
    variables = jax.jit(lambda key, x: model.init(key, x, train=False))(fast_key(10), x)
    assert not np.any(np.asarray(model.apply(variables, x, train=False)))  # TRADES zero-init fc3
    features = np.zeros((1, 2, 2, 2))
    for h in range(2):
        for w in range(2):
            for c in range(2):
                features[0, h, w, c] = 100 * c + 10 * h + w
    expected = [0, 1, 10, 11, 100, 101, 110, 111]  # c, then h, then w
    np.testing.assert_array_equal(flatten_channel_major(features)[0], expected)


def test_small_cnn_dropout_only_in_training():
    model = create_model("small_cnn", 10, dropout_rate=0.5)
    x = random_images(11, (2, *MNIST))
    variables = fake_variables(model, MNIST)
    rngs = {"dropout": fast_key(13)}
    eval_logits = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(eval_logits, model.apply(variables, x, train=False, rngs=rngs))
    assert not np.allclose(model.apply(variables, x, train=True, rngs=rngs), eval_logits)


@pytest.mark.parametrize(
    "call,fragment",
    [
        (lambda: create_model("resnet1000", 10), "resnet18"),
        (lambda: create_model("wide_resnet", 10, depth=33), "depth"),
        (lambda: create_model("wide_resnet", 10, widen_factor=0), "widen_factor"),
        (lambda: create_model("wrn-34-10", 10, depth=28), "depth"),
        (lambda: create_model("dm_wide_resnet", 10, activation="gelu"), "activation"),
        (lambda: create_model("dm_wide_resnet", 10, depth=30), "depth"),
        (lambda: create_model("dm_preact_resnet", 10, depth=50), "depth"),
        (lambda: create_model("resnet18", 10, widths=(8,)), "widths"),
        (lambda: create_model("cnn", 10, widths=()), "widths"),
        (lambda: create_model("cnn", 10, hidden=-1), "hidden"),
        (lambda: create_model("cnn", 10, use_bn="yes"), "use_bn"),
        (lambda: create_model("mlp", 10, hidden=(0,)), "hidden"),
        (lambda: create_model("small_cnn", 10, dropout_rate=1.0), "dropout_rate"),
        (lambda: create_model("mlp", 0), "num_classes"),
        (lambda: create_model("mlp", 10, mean=(0.5,)), "std"),
        (lambda: create_model("mlp", 10, mean=(0.5,), std=(0.0,)), "std"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()


def test_bad_inputs_raise_value_error():
    model = create_model("cnn", 10, mean=(0.5, 0.5), std=(0.2, 0.2))
    with pytest.raises(ValueError, match="channels"):
        abstract_init(model, CIFAR)
    with pytest.raises(ValueError, match="float"):
        create_model("mlp", 10).init(jax.random.key(0), np.zeros((1, *MNIST), np.uint8), train=False)
    with pytest.raises(ValueError, match="16x16"):
        abstract_init(create_model("small_cnn", 10), (12, 12, 1))


@pytest.mark.parametrize("name,kwargs", ALL_MODELS)
def test_bfloat16_compute_keeps_float32_params(name, kwargs):
    model = create_model(name, 10, dtype=jnp.bfloat16, **kwargs)
    variables = abstract_init(model, CIFAR)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    assert abstract_logits(model, CIFAR).dtype == jnp.bfloat16


def test_bfloat16_logits_track_float32_logits():
    x = random_images(14, (4, *MNIST))
    f32 = create_model("cnn", 10, use_bn=True)
    bf16 = create_model("cnn", 10, use_bn=True, dtype=jnp.bfloat16)
    variables = fake_variables(f32, MNIST)
    reference = jit_apply(f32)(variables, x, train=False)
    logits = jit_apply(bf16)(variables, x, train=False)
    assert logits.dtype == jnp.bfloat16
    tolerance = 0.05 * float(jnp.max(jnp.abs(reference)))
    np.testing.assert_allclose(np.float32(logits), reference, atol=tolerance)


def test_bn_axis_name_syncs_batch_statistics_across_devices():
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("data",))
    x = random_images(16, (2 * len(devices), 8, 8, 3))
    local = create_model("cnn", 10, widths=(4,), use_bn=True)
    synced = create_model("cnn", 10, widths=(4,), use_bn=True, bn_axis_name="data")
    variables = fake_variables(local, x.shape[1:])

    def train_forward(variables, x):
        return synced.apply(variables, x, train=True, mutable=["batch_stats"])

    sharded = jax.jit(jax.shard_map(train_forward, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P())))
    logits, updates = sharded(variables, x)
    full_logits, full_updates = local.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(logits, full_logits, rtol=1e-4, atol=1e-5)
    assert tree_allclose(updates, full_updates, rtol=1e-4, atol=1e-6)
    per_device, _ = local.apply(variables, x[:2], train=True, mutable=["batch_stats"])
    assert not np.allclose(per_device, full_logits[:2], atol=1e-4)  # local stats would differ


@pytest.mark.parametrize("shape", [(3, 6, 6, 2), (2, 7, 5, 3), (4, 24, 24, 8)])
def test_max_pool_matches_reduce_window_values_and_gradients_with_ties(shape):
    """The elementwise max-pool gradient routes each window's gradient to its first maximum, bit for bit what
    XLA's select-and-scatter (``nn.max_pool``) does; integer-valued inputs make ties in most windows."""
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(rng.integers(0, 3, size=shape), jnp.float32)

    def reduce_window_pool(x):
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")

    expected, expected_vjp = jax.vjp(reduce_window_pool, x)
    pooled, pooled_vjp = jax.vjp(max_pool_2x2, x)
    np.testing.assert_array_equal(pooled, expected)
    upstream = jnp.asarray(rng.normal(size=expected.shape), jnp.float32)
    (grad,), (expected_grad,) = pooled_vjp(upstream), expected_vjp(upstream)
    np.testing.assert_array_equal(grad, expected_grad)
    ties = np.asarray(pooled_vjp(jnp.ones_like(upstream))[0])
    assert ties.sum() == expected.size and set(np.unique(ties)) == {0.0, 1.0}  # one unit per window, never split
