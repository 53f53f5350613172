"""mmard_jax.models.convolution: the same values and gradients as ``lax.conv_general_dilated`` under autodiff, the
row-dilated (Eigen) form only where it is meant to be (CPU; small output grids; every kernel gradient), and the
plain op, untouched, for what the custom gradient does not cover."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmard_jax.models import convolution

NHWC = ("NHWC", "HWIO", "NHWC")


def _loss(conv):
    def loss(x, kernel, strides, padding):
        # sin makes the output gradient depend on the output, so a wrong forward pass shows in the gradients too
        return jnp.sum(jnp.sin(conv(x, kernel, strides, padding, dimension_numbers=NHWC)))

    return loss


def _value_and_grads(conv, x, kernel, strides, padding):
    fn = jax.value_and_grad(_loss(conv), argnums=(0, 1))
    return jax.jit(fn, static_argnums=(2, 3))(x, kernel, strides, padding)


CASES = [
    # (height, width, in, out, kernel, stride, padding): 32x32 (YNNPACK), <= 16x16 (Eigen gradients), odd sizes, 1x1 strided
    # shortcuts, asymmetric and string padding, a 5x5 kernel, padding wider than the kernel's reach
    (32, 32, 24, 32, 3, 1, ((1, 1), (1, 1))),
    (16, 16, 24, 32, 3, 1, ((1, 1), (1, 1))),
    (16, 16, 24, 40, 3, 2, ((1, 1), (1, 1))),
    (16, 16, 24, 40, 1, 2, ((0, 0), (0, 0))),
    (9, 11, 5, 7, 3, 2, ((1, 1), (1, 1))),
    (7, 6, 20, 20, 3, 1, ((0, 2), (1, 0))),
    (10, 10, 20, 24, 5, 2, ((2, 2), (2, 2))),
    (8, 8, 20, 24, 3, 1, "SAME"),
    (9, 9, 20, 24, 3, 2, "VALID"),
    (6, 6, 20, 24, 3, 1, ((3, 3), (2, 2))),
    # more than 64 channels on a small grid: the forward pass is row-dilated (Eigen) too
    (8, 8, 24, 72, 3, 1, ((1, 1), (1, 1))),
    (9, 9, 72, 24, 3, 2, ((1, 1), (1, 1))),
    # 3x3, stride 1, pad 1, >= 64 channels both sides, even grid up to 16x16: Winograd F(2x2, 3x3) forward and input
    # gradient (odd and 32x32 grids, and 'SAME' padding resolved to 1, on either side of the rule)
    (16, 16, 64, 72, 3, 1, ((1, 1), (1, 1))),
    (4, 6, 96, 64, 3, 1, "SAME"),
    (2, 2, 64, 64, 3, 1, ((1, 1), (1, 1))),
    (7, 7, 64, 64, 3, 1, ((1, 1), (1, 1))),
    (32, 32, 64, 64, 3, 1, ((1, 1), (1, 1))),
    # one input channel (a grayscale first layer): the input gradient is scattered tap by tap
    (28, 28, 1, 16, 5, 1, "VALID"),
    (12, 11, 1, 8, 3, 1, ((1, 1), (1, 1))),
    (13, 12, 1, 8, 3, 2, ((1, 0), (2, 1))),
    (10, 9, 1, 6, 4, 3, ((0, 1), (1, 1))),
    # ... and with 25 taps or more the forward pass is a matrix product of the input's patches
    (13, 12, 1, 8, 5, 2, ((1, 0), (2, 1))),
    (11, 10, 1, 6, 6, 3, ((2, 1), (0, 2))),
]


@pytest.mark.parametrize("height, width, c_in, c_out, size, stride, padding", CASES)
def test_value_and_gradients_match_autodiff(height, width, c_in, c_out, size, stride, padding):
    rng = np.random.default_rng(height * 100 + c_out + stride)
    x = jnp.asarray(rng.standard_normal((3, height, width, c_in)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((size, size, c_in, c_out)) / size, jnp.float32)
    ours = _value_and_grads(convolution.conv_general_dilated, x, kernel, (stride, stride), padding)
    plain = _value_and_grads(jax.lax.conv_general_dilated, x, kernel, (stride, stride), padding)
    value, (dx, dkernel) = ours
    assert dx.shape == x.shape and dkernel.shape == kernel.shape
    np.testing.assert_allclose(value, plain[0], rtol=1e-5, atol=1e-4)
    for got, want in zip(ours[1], plain[1], strict=True):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("dilation", [1, 2])
def test_rows_dilated_is_the_same_convolution(stride, dilation):
    """The identity the module rests on: dilating the input rows by 2, the kernel rows by 2 more and doubling the row
    stride and padding gives the same output, shape and values."""
    rng = np.random.default_rng(stride * 10 + dilation)
    x = jnp.asarray(rng.standard_normal((2, 13, 12, 4)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)
    pads = ((2, 1), (1, 0))
    want = jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), pads, rhs_dilation=(dilation, dilation), dimension_numbers=NHWC
    )
    got = convolution.rows_dilated(x, kernel, (stride, stride), pads, rhs_dilation=(dilation, dilation))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _convolutions(platform, x, kernel):
    """The convolution ops of the exported gradient program for ``platform`` (lowered, not run)."""
    fn = jax.jit(jax.grad(_loss(convolution.conv_general_dilated), argnums=(0, 1)), static_argnums=(2, 3))
    text = jax.export.export(fn, platforms=[platform])(x, kernel, (1, 1), ((1, 1), (1, 1))).mlir_module()
    return [line for line in text.splitlines() if "stablehlo.convolution" in line]


def test_cpu_routes_small_wide_grids_and_kernel_gradients_to_the_row_dilated_form_other_platforms_do_not():
    small = jnp.ones((2, 8, 8, 72)), jnp.ones((3, 3, 72, 72))  # 8x8 output: Winograd forward and input gradient
    large = jnp.ones((2, 32, 32, 72)), jnp.ones((3, 3, 72, 72))  # 32x32 output: only the kernel gradient
    assert [("lhs_dilate" in op) for op in _convolutions("cpu", *small)] == [True]  # the kernel gradient
    odd = jnp.ones((2, 7, 7, 72)), jnp.ones((3, 3, 72, 72))  # no whole 2x2 tiles: forward, input and kernel gradients
    assert [("lhs_dilate" in op) for op in _convolutions("cpu", *odd)] == [True, True, True]
    assert sorted("lhs_dilate" in op for op in _convolutions("cpu", *large)) == [False, False, True]
    # 64 channels or fewer on a small grid: the forward pass stays XLA's, both gradients are row-dilated
    narrow = jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 64))
    assert [("lhs_dilate" in op) for op in _convolutions("cpu", *narrow)] == [False, True, True]
    few_channels = jnp.ones((2, 8, 8, 8)), jnp.ones((3, 3, 8, 16))  # YNNPACK declines it: only the kernel gradient
    assert sorted("lhs_dilate" in op for op in _convolutions("cpu", *few_channels)) == [False, False, True]
    for platform in ("cuda", "tpu"):
        ops = _convolutions(platform, *odd)
        assert len(ops) == 3 and not any("lhs_dilate" in op for op in ops)


def test_one_input_channel_scatters_its_input_gradient_on_cpu_only():
    """No convolution is left for the input gradient of a one-channel layer on CPU (it is a sum over the output
    channels and strided adds); GPU and TPU keep autodiff's three convolutions."""
    grayscale = jnp.ones((2, 12, 12, 1)), jnp.ones((3, 3, 1, 16))
    assert len(_convolutions("cpu", *grayscale)) == 2  # forward and kernel gradient
    assert len(_convolutions("cuda", *grayscale)) == 3
    rgb = jnp.ones((2, 12, 12, 3)), jnp.ones((3, 3, 3, 16))
    assert len(_convolutions("cpu", *rgb)) == 3
    wide = jnp.ones((2, 8, 8, 1)), jnp.ones((3, 3, 1, 32))  # a small grid and 32 channels: the forward pass stays XLA's
    assert sorted("lhs_dilate" in op for op in _convolutions("cpu", *wide)) == [False, True]  # forward, kernel grad.


def test_negative_padding_is_left_to_the_plain_op():
    """Negative padding crops the input; the custom gradient does not cover it (XLA:CPU's own results for it were
    wrong when this was written: a forward pass off by 1e33 against cropping the input first, with jax 0.10.2)."""
    x, kernel = jnp.ones((2, 9, 9, 1)), jnp.ones((3, 3, 1, 4))

    def trace(conv):
        loss = lambda x, k: jnp.sum(conv(x, k, (1, 1), ((-1, 1), (0, 0)), dimension_numbers=NHWC))  # noqa: E731
        return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, kernel))

    assert "custom_vjp" not in trace(convolution.conv_general_dilated)
    assert trace(convolution.conv_general_dilated) == trace(jax.lax.conv_general_dilated)


@pytest.mark.parametrize(
    "kwargs, dtype",
    [
        ({"feature_group_count": 4}, jnp.float32),  # depthwise-style groups
        ({"rhs_dilation": (2, 2)}, jnp.float32),
        ({}, jnp.bfloat16),
    ],
)
def test_what_the_custom_gradient_does_not_cover_is_the_plain_op(kwargs, dtype):
    x = jnp.ones((2, 9, 9, 8), dtype)
    kernel = jnp.ones((3, 3, 8 // kwargs.get("feature_group_count", 1), 8), dtype)

    def trace(conv):
        def loss(x, k):
            return jnp.sum(conv(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC, **kwargs).astype(jnp.float32))

        return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, kernel))

    assert "custom_vjp" not in trace(convolution.conv_general_dilated)
    assert trace(convolution.conv_general_dilated) == trace(jax.lax.conv_general_dilated)


def test_nchw_dimension_numbers_fall_back_to_the_plain_op():
    x, kernel = jnp.ones((2, 8, 9, 9)), jnp.ones((8, 8, 3, 3))
    numbers = ("NCHW", "OIHW", "NCHW")
    got = convolution.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=numbers)
    want = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=numbers)
    np.testing.assert_array_equal(got, want)


def test_flax_conv_takes_it_and_keeps_its_parameters():
    layer = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)), conv_general_dilated=convolution.conv_general_dilated)
    plain = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 20)), jnp.float32)
    variables = layer.init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(variables) == jax.tree.structure(plain.init(jax.random.PRNGKey(0), x))
    np.testing.assert_allclose(layer.apply(variables, x), plain.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_gradient_of_gradient_matches_autodiff():
    """Reverse over reverse (e.g. a gradient-norm penalty) goes through the custom backward pass's own ops."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 20)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 20, 24)) / 3, jnp.float32)

    def penalty(conv):
        def input_gradient_norm(kernel):
            dx = jax.grad(lambda x: _loss(conv)(x, kernel, (1, 1), ((1, 1), (1, 1))))(x)
            return jnp.sum(dx**2)

        return jax.jit(jax.grad(input_gradient_norm))(kernel)

    want = penalty(jax.lax.conv_general_dilated)
    np.testing.assert_allclose(penalty(convolution.conv_general_dilated), want, rtol=0, atol=1e-4 * jnp.abs(want).max())


def test_a_one_channel_layer_with_25_taps_or_more_runs_its_forward_pass_as_a_product_of_patches_on_cpu_only():
    """A 5x5 one-channel layer keeps only its kernel gradient as a convolution on CPU (forward: patches times the
    kernel matrix; input gradient: scattered); 3x3 keeps its forward convolution; GPU keeps all three."""
    five = jnp.ones((2, 12, 12, 1)), jnp.ones((5, 5, 1, 16))
    assert len(_convolutions("cpu", *five)) == 1
    assert len(_convolutions("cuda", *five)) == 3
    three = jnp.ones((2, 12, 12, 1)), jnp.ones((3, 3, 1, 16))
    assert len(_convolutions("cpu", *three)) == 2


@pytest.mark.parametrize("stride, pads", [((1, 1), ((0, 0), (0, 0))), ((2, 3), ((2, 1), (0, 3)))])
def test_patches_forward_is_the_convolution(stride, pads):
    """`patches_forward` against the plain op: one and several input channels, unequal strides, asymmetric padding."""
    rng = np.random.default_rng(7)
    for c_in in (1, 3):
        x = rng.standard_normal((2, 11, 13, c_in)).astype(np.float32)
        kernel = rng.standard_normal((5, 4, c_in, 6)).astype(np.float32)
        want = jax.lax.conv_general_dilated(x, kernel, stride, pads, dimension_numbers=NHWC)
        got = convolution.patches_forward(jnp.asarray(x), jnp.asarray(kernel), stride, pads)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("height, width", [(2, 2), (4, 6), (16, 16)])
def test_winograd_is_the_convolution_and_its_input_gradient_is_the_transposed_one(height, width):
    """F(2x2, 3x3) against the direct sum in float64 (numpy), and its input gradient against autodiff's of the plain
    op: both within float32 rounding of a 3x3 x 64-channel sum."""
    rng = np.random.default_rng(height * 10 + width)
    x = rng.standard_normal((2, height, width, 64)).astype(np.float32)
    kernel = (rng.standard_normal((3, 3, 64, 72)) / 24).astype(np.float32)
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = sum(
        np.einsum("nhwc,co->nhwo", padded[:, a : a + height, b : b + width], kernel[a, b].astype(np.float64))
        for a in range(3)
        for b in range(3)
    )
    got = np.asarray(jax.jit(convolution.winograd_conv)(x, kernel), np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-6
    dy = rng.standard_normal(want.shape).astype(np.float32)
    _, vjp = jax.vjp(
        lambda x_: jax.lax.conv_general_dilated(x_, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC), x
    )
    (want_dx,) = vjp(dy)
    got_dx = jax.jit(convolution.winograd_input_gradient)(dy, kernel)
    assert np.linalg.norm(got_dx - want_dx) / np.linalg.norm(want_dx) < 2e-6


def test_winograd_takes_3x3_stride_1_pad_1_wide_even_grids_up_to_16x16_only():
    kernel = (3, 3, 64, 64)
    assert convolution.winograd_applies((8, 16, 16, 64), kernel, (1, 1), ((1, 1), (1, 1)))
    assert convolution.winograd_applies((8, 2, 4, 64), kernel, (1, 1), ((1, 1), (1, 1)))
    assert not convolution.winograd_applies((8, 32, 32, 64), kernel, (1, 1), ((1, 1), (1, 1)))  # a 32x32 grid
    assert not convolution.winograd_applies((8, 7, 8, 64), kernel, (1, 1), ((1, 1), (1, 1)))  # odd rows
    assert not convolution.winograd_applies((8, 8, 8, 64), kernel, (2, 2), ((1, 1), (1, 1)))  # strided
    assert not convolution.winograd_applies((8, 8, 8, 64), kernel, (1, 1), ((0, 2), (1, 1)))  # other padding
    assert not convolution.winograd_applies((8, 8, 8, 32), (3, 3, 32, 64), (1, 1), ((1, 1), (1, 1)))  # narrow
    assert not convolution.winograd_applies((8, 8, 8, 64), (5, 5, 64, 64), (1, 1), ((2, 2), (2, 2)))  # 5x5
