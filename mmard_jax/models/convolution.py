"""``lax.conv_general_dilated`` that picks, per convolution, the faster of XLA:CPU's two convolution libraries.

XLA:CPU hands every convolution it can to YNNPACK and the rest to its Eigen kernels. YNNPACK loses clearly on
two kinds (measured in ``benchmarks/xla_cpu_conv_paths.py``): kernel (weight) gradients, 1.5-3.3x slower (that
gradient is a convolution whose "kernel" is the whole output gradient and whose output is the small tap grid),
and convolutions with a small output grid (ResNet-18's 16x16 to 4x4 stages, 1.3-1.7x slower). YNNPACK declines
any convolution with an input (base) dilation, and any with 16 channels or fewer on both sides; Eigen takes them.
So those passes are written here as the same sum with the input rows dilated by 2, the kernel rows dilated by 2
more and a row stride twice the original (``rows_dilated``): output row ``o`` then reads dilated row
``2(t o + r i - p)``, which is input row ``t o + r i - p``, the original element. Same products, Eigen's kernel.
(Convolutions with 16 channels or fewer run in Eigen as they are, so only their kernel gradients are rewritten.)
The forward pass of a narrow layer on a small grid (64 channels or fewer on both sides) stays with YNNPACK, which
runs those faster; its input gradient still goes to Eigen.
A third kind loses in both libraries: the input gradient of a layer with one input channel (a grayscale image's first
convolution), which XLA runs as a convolution whose patches span every output channel. There it is a sum over the
output channels and one strided add per kernel tap (``scattered_input_gradient``), 3-5.6x faster at stride 1. The
forward pass of such a layer with a 5x5 kernel or larger also suits neither library: it is a matrix product of the
input's patches (``patches_forward``).

Wide 3x3, stride-1 layers on grids up to 16x16 (ResNet-18's and WRN-34-10's later stages) beat both libraries as
Winograd's F(2x2, 3x3) (``winograd_conv``): 16 multiplications per 2x2 output tile instead of 36, as 16 matrix
products over the tiles between cheap element-wise transforms.

Only on CPU (``lax.platform_dependent``); on GPU and TPU every pass is autodiff's own. The custom gradient
covers float32 2-D NHWC / HWIO convolutions without dilation, groups or negative (cropping) padding (every
convolution of the shipped models except MobileNetV2's depthwise ones); anything else is ``lax.conv_general_dilated`` unchanged.
``conv_general_dilated`` has ``lax.conv_general_dilated``'s signature, so Flax's ``nn.Conv`` takes it as its
``conv_general_dilated`` field. Being a ``jax.custom_vjp``, it supports reverse mode (``jax.grad``, also nested) but
not forward mode (``jax.jvp``, ``jax.jacfwd``): for those, trace the models with ``lax.conv_general_dilated``
(``ImageClassifier.conv_op``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

NHWC_HWIO = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
# The kernel gradient as a convolution: the input's channels are its batch, the examples its features, the
# output gradient its kernel; the result comes out as (kh, kw, in, out).
KERNEL_GRADIENT = ("CHWN", "IHWO", "HWNC")
# Output grids up to this many positions (16x16) go to Eigen on CPU. At 32x32 the two libraries are close, and
# sending those to Eigen too made the CIFAR-shaped step slower, not faster.
EIGEN_MAX_OUTPUT_AREA = 256
# XLA:CPU keeps convolutions with at most this many input and output channels away from YNNPACK.
YNNPACK_DECLINES_UP_TO_CHANNELS = 16
# Forward passes on small grids go to Eigen only with more than this many channels on one side (ResNet-18's 16x16 to
# 4x4 stages have 128-512). Narrower ones run faster in YNNPACK: the AutoAttack benchmark's 5x5, 16 -> 32 layer on an
# 8x8 grid (a whole AutoAttack run 2-8 % faster once compiled) and the demo's stride-2 16 -> 32 and 32 -> 64 layers
# (steps 2-9 % faster), both on an AMD EPYC host (AVX-512): benchmarks/results/conv_forward_routing.md. Their input
# gradients stay with Eigen, where they are faster (with YNNPACK's the AutoAttack run took 1.6x as long, ad hoc).
EIGEN_FORWARD_MIN_CHANNELS = 64
# Input gradients of convolutions with this many input channels or fewer (a grayscale image's first layer) are
# scattered tap by tap (``scattered_input_gradient``) on CPU: 3-5.6x faster than XLA:CPU's default at stride 1, up to
# 1.5x at stride 2 (benchmarks/results/xla_cpu_conv_paths.md). RGB first layers stay with XLA: a trial with 2-3 input
# channels found no gain.
SCATTER_MAX_INPUT_CHANNELS = 1
# Forward passes of layers with this many input channels or fewer and at least this many kernel taps are a matrix
# product of the input's patches (``patches_forward``) on CPU. For the AutoAttack benchmark's 5x5, 1 -> 16 first layer
# both of XLA's convolution libraries run at a third of PyTorch's speed; as patches, APGD-CE and Square (whole runs,
# ad hoc) took 27-28 % less time. The demo's 3x3 layers (stride 2) stay with XLA: as patches its train steps were
# 1.2x (MMARD) and 1.5x (RSLAD) slower (ad hoc, interleaved in one process).
PATCHES_MAX_INPUT_CHANNELS = 1
PATCHES_MIN_TAPS = 25

Pads = tuple[tuple[int, int], tuple[int, int]]

# 3x3, stride-1, pad-1 convolutions with at least this many channels on both sides and an even output grid of at most
# WINOGRAD_MAX_OUTPUT_AREA positions run as Winograd's F(2x2, 3x3) on CPU (``winograd_conv``, forward pass and input
# gradient; the kernel gradient stays with Eigen, which was faster there). 2.25x fewer multiplications; on one core,
# batch 16 (a device's share of the CIFAR-shaped step), ResNet-18's 16x16 / 8x8 / 4x4 stages ran their forward passes
# 1.5-1.6x / 1.7x / 1.2x faster and their input gradients 1.6-1.7x / 1.7x / 1.1x (ad hoc, interleaved, before the input
# gradient reused the forward pass's kernel transform); the CIFAR-shaped RSLAD and MMARD steps 1.17x (traced without it
# for comparison: benchmarks/results/step_compile_options_cifar.md, "no Winograd"; compile time about 2x; against
# PyTorch: benchmarks/results/step_speed.md). On 2 devices the steps' reruns can differ by float32 rounding
# (mmard_jax/compilations.py). At 32x32 its 4x larger tiles made it 1.5-1.9x slower
# than the direct convolution there (interleaved with other work; alone, with warm caches, 1.4x faster), so 32x32
# stays direct. Narrower layers (the demo's and AutoAttack's CNNs) stay as they are.
WINOGRAD_MIN_CHANNELS = 64
WINOGRAD_MAX_OUTPUT_AREA = 256
# F(2x2, 3x3)'s transforms (Lavin and Gray, 2016): a 4x4 input tile d gives B^T d B, a 3x3 kernel g gives G g G^T, and
# a 4x4 tile m of products gives the 2x2 outputs A^T m A.
WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
# G g G^T for every tap pair at once: row (a, b) of this 16 x 9 matrix holds G[a, i] G[b, j] at column (i, j).
WINOGRAD_KERNEL_MATRIX = np.einsum("ai,bj->abij", WINOGRAD_G, WINOGRAD_G).reshape(16, 9)


def rows_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    strides: tuple[int, int],
    pads: Pads,
    rhs_dilation: tuple[int, int] = (1, 1),
    dimension_numbers: Any = NHWC_HWIO,
    precision: Any = None,
) -> jax.Array:
    """``lax.conv_general_dilated(lhs, rhs, strides, pads, rhs_dilation=...)`` in a form YNNPACK declines.

    The first spatial axis gets input dilation 2, twice the kernel dilation, twice the stride and twice the
    padding: every output element is the same sum of the same products, and the output has the same size.
    """
    (low, high), cols = pads
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides=(2 * strides[0], strides[1]),
        padding=((2 * low, 2 * high), cols),
        lhs_dilation=(2, 1),
        rhs_dilation=(2 * rhs_dilation[0], rhs_dilation[1]),
        dimension_numbers=dimension_numbers,
        precision=precision,
    )


def _autodiff(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads: Pads, precision: Any) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=NHWC_HWIO, precision=precision)


def prefers_eigen(output_shape: Sequence[int], kernel_shape: Sequence[int]) -> bool:
    """Whether a forward / input-gradient convolution with this NHWC output and HWIO kernel is better written for
    Eigen (on CPU): a small output grid, and more than 16 channels on one side (with fewer, YNNPACK declines it and
    the plain op runs in Eigen already, without the dilated form's overhead). Not for one-channel layers: the forward
    pass of a grayscale 3x3 stride-2 layer, 1 -> 32 channels (the demo teacher's first), took 2.6 ms in Eigen's
    dilated form against 0.8 ms in YNNPACK (benchmarks/results/xla_cpu_conv_paths_grayscale.md)."""
    small_grid = output_shape[1] * output_shape[2] <= EIGEN_MAX_OUTPUT_AREA
    wide = max(kernel_shape[2], kernel_shape[3]) > YNNPACK_DECLINES_UP_TO_CHANNELS
    return small_grid and wide and kernel_shape[2] > SCATTER_MAX_INPUT_CHANNELS


def forward_prefers_eigen(output_shape: Sequence[int], kernel_shape: Sequence[int]) -> bool:
    """Whether a forward pass is better written for Eigen (on CPU): as `prefers_eigen`, and more than
    EIGEN_FORWARD_MIN_CHANNELS channels on one side."""
    wide = max(kernel_shape[2], kernel_shape[3]) > EIGEN_FORWARD_MIN_CHANNELS
    return wide and prefers_eigen(output_shape, kernel_shape)


def patches_forward(x, kernel, strides: tuple[int, int], pads: Pads, precision: Any = None):
    """conv(x, k) as one matrix product: the (padded) input's patches, one strided slice per kernel tap side by side
    on the channel axis, times the kernel as a (taps x in) x out matrix. For one input channel the patches are only
    kh x kw copies of the input, and the product goes to XLA:CPU's matrix library, where the convolution itself
    (25 products per output of a 5x5 layer) suits neither of its convolution libraries."""
    kh, kw, in_channels, out_channels = kernel.shape
    (top, bottom), (left, right) = pads
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    (sh, sw) = strides
    oh, ow = (padded.shape[1] - kh) // sh + 1, (padded.shape[2] - kw) // sw + 1
    taps = [
        padded[:, a : a + sh * (oh - 1) + 1 : sh, b : b + sw * (ow - 1) + 1 : sw, :]
        for a in range(kh)
        for b in range(kw)
    ]
    patches = jnp.concatenate(taps, axis=-1)  # channel index (a * kw + b) * in + i, as the kernel's rows below
    return jnp.dot(patches, kernel.reshape(kh * kw * in_channels, out_channels), precision=precision)


def winograd_applies(input_shape: Sequence[int], kernel_shape: Sequence[int], strides, pads: Pads) -> bool:
    """Whether ``winograd_conv`` computes this NHWC x HWIO convolution (on CPU): a 3x3 kernel, stride 1, padding 1,
    an even grid (whole 2x2 output tiles) of at most WINOGRAD_MAX_OUTPUT_AREA positions and at least
    WINOGRAD_MIN_CHANNELS channels on both sides."""
    kh, kw, in_channels, out_channels = kernel_shape
    return (
        (kh, kw) == (3, 3)
        and tuple(strides) == (1, 1)
        and tuple(map(tuple, pads)) == ((1, 1), (1, 1))
        and input_shape[1] % 2 == 0
        and input_shape[2] % 2 == 0
        and input_shape[1] * input_shape[2] <= WINOGRAD_MAX_OUTPUT_AREA
        and min(in_channels, out_channels) >= WINOGRAD_MIN_CHANNELS
    )


def _input_transform_rows(planes: list[jax.Array]) -> list[jax.Array]:
    """B^T applied to four consecutive rows (or columns) of every tile."""
    d0, d1, d2, d3 = planes
    return [d0 - d2, d1 + d2, d2 - d1, d1 - d3]


def _every_other(x: jax.Array, start: int, tiles: int, axis: int) -> jax.Array:
    """Row (or column) ``start`` of each of ``tiles`` tiles that overlap by 2: ``start, start + 2, ...``."""
    return lax.slice_in_dim(x, start, start + 2 * tiles - 1, 2, axis)


def winograd_input_tiles(x: jax.Array) -> jax.Array:
    """B^T d B for every 4x4 tile d of the padded input, tiles 2 apart: (16, tiles, C), tiles ordered (n, i, j).

    The rows are transformed first, into an array of their own: fused with the columns' transform into one loop,
    XLA:CPU ran the 32x32 stage's 10x slower (ad hoc, one core)."""
    n, h, w, c = x.shape
    th, tw = h // 2, w // 2
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = jnp.stack(_input_transform_rows([_every_other(padded, i, th, 1) for i in range(4)]))  # (4, n, th, w+2, c)
    rows = lax.optimization_barrier(rows)
    columns = _input_transform_rows([_every_other(rows, j, tw, 3) for j in range(4)])  # [b] of (4, n, th, tw, c)
    return jnp.stack(columns, axis=1).reshape(16, n * th * tw, c)


def winograd_kernel(kernel: jax.Array) -> jax.Array:
    """G g G^T of every (input, output) channel pair of a 3x3 HWIO kernel: (16, in, out), one small matrix product."""
    _, _, in_channels, out_channels = kernel.shape
    flat = kernel.reshape(9, in_channels * out_channels)
    return jnp.dot(jnp.asarray(WINOGRAD_KERNEL_MATRIX, kernel.dtype), flat).reshape(16, in_channels, out_channels)


def _output_transform_rows(planes: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """A^T applied to the four rows (or columns) of every product tile: its two output rows."""
    m0, m1, m2, m3 = planes
    return m0 + m1 + m2, m1 - m2 - m3


def winograd_outputs(products: jax.Array, n: int, th: int, tw: int) -> jax.Array:
    """A^T m A of every (16, tiles, out) product tile, laid out as the NHWC output (n, 2 th, 2 tw, out)."""
    m = products.reshape(4, 4, n, th, tw, -1)
    columns = [_output_transform_rows([m[a, b] for a in range(4)]) for b in range(4)]  # [b][u]
    y = [[_output_transform_rows([columns[b][u] for b in range(4)])[v] for v in range(2)] for u in range(2)]
    return jnp.stack([jnp.stack(y[u], axis=3) for u in range(2)], axis=2).reshape(n, 2 * th, 2 * tw, -1)


def _winograd(x: jax.Array, transformed_kernel: jax.Array, contracting: int, precision: Any) -> jax.Array:
    n, h, w, _ = x.shape
    dimensions = (((2,), (contracting,)), ((0,), (0,)))
    products = lax.dot_general(winograd_input_tiles(x), transformed_kernel, dimensions, precision=precision)
    return winograd_outputs(products, n, h // 2, w // 2)


def winograd_conv(x: jax.Array, kernel: jax.Array, precision: Any = None) -> jax.Array:
    """A 3x3, stride-1, pad-1 NHWC x HWIO convolution as Winograd's F(2x2, 3x3): each 2x2 output tile is
    A^T [(G g G^T) * (B^T d B)] A of its 4x4 input tile d, and the 16 elementwise products summed over the input
    channels are 16 matrix products of (tiles x in) by (in x out): 16 multiplications per 4 outputs where the direct
    sum takes 36. Exact in real arithmetic; in float32 its error is of the direct convolution's order (tests)."""
    return _winograd(x, winograd_kernel(kernel), 1, precision)


# G applied to a reversed 3-vector gives G's result in this order: rows 0 and 3 swap, rows 1 and 2 stay.
WINOGRAD_FLIPPED_TAPS = np.array([3, 1, 2, 0])


def winograd_input_gradient(dy: jax.Array, kernel: jax.Array, precision: Any = None) -> jax.Array:
    """d(sum(dy * conv(x, k)))/dx of a stride-1, pad-1 3x3 convolution: ``dy`` convolved (pad 1) with the flipped,
    in/out-swapped kernel, as a Winograd convolution. The flipped kernel's transform is the forward pass's with its
    taps reordered (WINOGRAD_FLIPPED_TAPS), and the swap is a matrix product contracting the kernel's output axis."""
    transformed = winograd_kernel(kernel).reshape(4, 4, *kernel.shape[2:])
    flipped = transformed[WINOGRAD_FLIPPED_TAPS][:, WINOGRAD_FLIPPED_TAPS].reshape(16, *kernel.shape[2:])
    return _winograd(dy, flipped, 2, precision)


def _forward_cpu(x, kernel, strides, pads, precision):
    kh, kw, in_channels, _ = kernel.shape
    if winograd_applies(x.shape, kernel.shape, strides, pads):
        return winograd_conv(x, kernel, precision)
    if in_channels <= PATCHES_MAX_INPUT_CHANNELS and kh * kw >= PATCHES_MIN_TAPS:
        return patches_forward(x, kernel, strides, pads, precision)
    out_shape = lax.conv_general_shape_tuple(x.shape, kernel.shape, strides, pads, ("NHWC", "HWIO", "NHWC"))
    if forward_prefers_eigen(out_shape, kernel.shape):
        return rows_dilated(x, kernel, strides, pads, precision=precision)
    return _autodiff(x, kernel, strides, pads, precision)


def _forward(x, kernel, strides, pads, precision):
    return lax.platform_dependent(
        x,
        kernel,
        cpu=functools.partial(_forward_cpu, strides=strides, pads=pads, precision=precision),
        default=functools.partial(_autodiff, strides=strides, pads=pads, precision=precision),
    )


def kernel_gradient(x, dy, strides: tuple[int, int], pads: Pads, kernel_hw: tuple[int, int], precision: Any = None):
    """d(sum(dy * conv(x, k)))/dk (HWIO) as a convolution that XLA:CPU gives to Eigen.

    Tap (a, b) of the gradient is ``sum_{n,i,j} xpad[n, s_h i + a, s_w j + b, c] * dy[n, i, j, o]``: a
    convolution of ``x`` with ``dy`` (dilated by the stride) over the batch. A strided forward pass can leave a
    partial tap grid beyond the kernel; it is cut off.
    """
    grad = rows_dilated(
        x, dy, (1, 1), pads, rhs_dilation=strides, dimension_numbers=KERNEL_GRADIENT, precision=precision
    )
    return grad[: kernel_hw[0], : kernel_hw[1]]


def input_gradient(dy, kernel, pads: Pads, precision: Any = None):
    """d(sum(dy * conv(x, k)))/dx of a stride-1 convolution, as a convolution that XLA:CPU gives to Eigen: the
    output gradient convolved with the flipped, in/out-swapped kernel, padded by ``k - 1 - p`` on each side."""
    kh, kw = kernel.shape[:2]
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    (top, bottom), (left, right) = pads
    return rows_dilated(
        dy, flipped, (1, 1), ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)), precision=precision
    )


def scattered_input_gradient(dy, kernel, strides: tuple[int, int], pads: Pads, input_hw: tuple[int, int]):
    """d(sum(dy * conv(x, k)))/dx by scattering: a sum over the output channels gives every output
    position's contribution to each of its kernel taps, and each tap adds its plane onto the (padded) input grid at
    its offset, stepping by the stride. For few input channels this moves far less memory than the convolution
    XLA:CPU would run instead (whose patches span all output channels)."""
    kh, kw, in_channels, _ = kernel.shape
    (top, bottom), (left, right) = pads
    (sh, sw), (oh, ow) = strides, dy.shape[1:3]
    # A broadcast product summed over the output channels, not an einsum: XLA:CPU runs the einsum as a matrix product
    # behind a transposing copy that costs more than the product (a jax.profiler trace of APGD-CE: over half of each
    # iteration; benchmarks/results/autoattack_speed.md). compilations.YNNPACK_CONVOLUTIONS_AND_DOTS keeps the sum in
    # XLA's own loop.
    products = dy[..., None, :] * kernel.reshape(kh * kw * in_channels, -1)
    taps = jnp.sum(products, axis=-1).reshape(*dy.shape[:3], kh, kw, in_channels)
    height, width = input_hw[0] + top + bottom, input_hw[1] + left + right
    padded = jnp.zeros((dy.shape[0], height, width, in_channels), dy.dtype)
    for a in range(kh):
        for b in range(kw):
            rows, cols = slice(a, a + sh * (oh - 1) + 1, sh), slice(b, b + sw * (ow - 1) + 1, sw)
            padded = padded.at[:, rows, cols].add(taps[:, :, :, a, b])
    return padded[:, top : height - bottom, left : width - right]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads: Pads, precision: Any = None):
    """An NHWC x HWIO convolution; on CPU each pass takes the faster library (see the module docstring)."""
    return _forward(x, kernel, strides, pads, precision)


def _conv2d_forward(x, kernel, strides, pads, precision):
    return _forward(x, kernel, strides, pads, precision), (x, kernel)


def _conv2d_backward(strides, pads, precision, residuals, dy):
    x, kernel = residuals

    def autodiff_gradients(x, kernel, dy):
        _, vjp = jax.vjp(lambda x_, k_: _autodiff(x_, k_, strides, pads, precision), x, kernel)
        return vjp(dy)

    def cpu_gradients(x, kernel, dy):
        dkernel = kernel_gradient(x, dy, strides, pads, kernel.shape[:2], precision).astype(kernel.dtype)
        if winograd_applies(x.shape, kernel.shape, strides, pads):
            dx = winograd_input_gradient(dy, kernel, precision)
        elif kernel.shape[2] <= SCATTER_MAX_INPUT_CHANNELS:
            dx = scattered_input_gradient(dy, kernel, strides, pads, x.shape[1:3]).astype(x.dtype)
        elif strides == (1, 1) and prefers_eigen(x.shape, kernel.shape):
            dx = input_gradient(dy, kernel, pads, precision)
        else:  # a strided forward pass's input gradient has an input dilation already: Eigen takes it as it is
            _, vjp = jax.vjp(lambda x_: _autodiff(x_, kernel, strides, pads, precision), x)
            (dx,) = vjp(dy)
        return dx, dkernel

    return lax.platform_dependent(x, kernel, dy, cpu=cpu_gradients, default=autodiff_gradients)


conv2d.defvjp(_conv2d_forward, _conv2d_backward)


def _is_unit(values: Sequence[int] | None) -> bool:
    return values is None or all(v == 1 for v in values)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """Drop-in ``lax.conv_general_dilated``: ``conv2d`` where it applies, the plain op otherwise."""
    plain = functools.partial(
        lax.conv_general_dilated,
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    if (
        lhs.ndim != 4
        or lhs.dtype != jnp.float32
        or rhs.dtype != jnp.float32
        or preferred_element_type not in (None, jnp.float32)
        or feature_group_count != 1
        or batch_group_count != 1
        or not (_is_unit(lhs_dilation) and _is_unit(rhs_dilation))
        or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != NHWC_HWIO
    ):
        return plain()
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(low), int(high)) for low, high in padding)
    if min(min(pad) for pad in pads) < 0:  # negative padding crops the input: left to XLA as it is
        return plain()
    return conv2d(lhs, rhs, strides, pads, precision)
