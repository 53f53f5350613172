"""mmard_jax.compilations: the XLA options the product's programs compile with on CPU, and that the train step and
evaluation programs (parallel.compile_synchronized) are compiled with them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmard_jax import compilations, host_devices, parallel


def test_cpu_programs_compile_at_llvm_level_1_and_options_this_xla_refuses_give_none():
    assert jax.default_backend() == "cpu"
    expected = {
        "xla_backend_optimization_level": 1,
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
    }
    if jax.local_device_count() >= host_devices.usable_cores():  # the test session's devices (conftest) cover the cores
        expected["xla_cpu_multi_thread_eigen"] = False
    assert compilations.compiler_options() == expected
    assert compilations.compiler_options((("xla_no_such_option_for_this_test", 1),)) is None


def test_eigen_runs_single_threaded_only_when_every_core_has_a_device(monkeypatch):
    """With fewer devices than cores a device needs Eigen's threads to use the cores; with one per core it does not."""
    compilations.compiler_options.cache_clear()
    try:
        monkeypatch.setattr(host_devices, "usable_cores", lambda: jax.local_device_count() + 1)
        assert "xla_cpu_multi_thread_eigen" not in compilations.compiler_options()
        compilations.compiler_options.cache_clear()
        monkeypatch.setattr(host_devices, "usable_cores", lambda: jax.local_device_count())
        assert compilations.compiler_options()["xla_cpu_multi_thread_eigen"] is False
    finally:
        compilations.compiler_options.cache_clear()


def _summed_products(dy, kernel):  # scattered_input_gradient's sum over output channels
    return jnp.sum(dy[..., None, :] * kernel.reshape(-1, kernel.shape[-1]), axis=-1)


def _convolution(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("options", ["xla", "product"])
def test_with_the_products_options_ynnpack_keeps_convolutions_but_not_reductions(options):
    """XLA's default hands a reduction fused with its products to YNNPACK; the product's options keep it in XLA's own
    loops while convolutions still go to YNNPACK."""
    options = compilations.compiler_options() if options == "product" else {}

    rng = np.random.default_rng(0)

    def ynnpack_fusions(fn, *shapes):
        args = [rng.standard_normal(shape, np.float32) for shape in shapes]
        compiled = jax.jit(fn).lower(*args).compile(compiler_options=options)
        if fn is _summed_products:  # in float64
            dy, kernel = (a.astype(np.float64) for a in args)
            expected = np.sum(dy[..., None, :] * kernel.reshape(-1, kernel.shape[-1]), axis=-1)
        else:
            expected = jax.jit(fn)(*args)
        np.testing.assert_allclose(compiled(*args), expected, rtol=2e-5, atol=2e-5)
        return compiled.as_text().count("kind=kCustom, calls=")  # YNNPACK's fusions are custom fusions

    assert ynnpack_fusions(_convolution, (8, 14, 14, 32), (3, 3, 32, 32)) >= 1
    assert ynnpack_fusions(_summed_products, (8, 14, 14, 32), (3, 3, 1, 32)) == (0 if options else 1)


def _double_sum(x):
    return jnp.sum(2.0 * x)


def test_compile_synchronized_passes_the_products_options_to_xla(monkeypatch):
    """An option XLA refuses makes the compilation fail, so the options reach XLA; with the product's own the compiled
    program gives the plain jit's value."""
    x = np.arange(6, dtype=np.float32)
    compiled = parallel.compile_synchronized(jax.jit(_double_sum), x, name="test/options")
    assert float(compiled(x)) == float(jax.jit(_double_sum)(x)) == 30.0
    monkeypatch.setattr(compilations, "compiler_options", lambda: {"xla_no_such_option_for_this_test": 1})
    with pytest.raises(jax.errors.JaxRuntimeError):
        parallel.compile_synchronized(jax.jit(_double_sum), x, name="test/refused")


def test_a_product_jit_called_inside_another_transformation_becomes_part_of_it():
    """JAX refuses compiler options on a nested jit; the product's jit then traces as a plain one."""

    @compilations.jit(static_argnames=("power",))
    def scaled(x, power):
        return x**power * 2.0

    x = jnp.arange(3.0)
    np.testing.assert_array_equal(scaled(x, power=2), [0.0, 2.0, 8.0])
    np.testing.assert_array_equal(jax.jit(lambda v: scaled(v, power=2) + 1.0)(x), [1.0, 3.0, 9.0])
    np.testing.assert_array_equal(jax.vmap(lambda v: scaled(v, power=3))(x), [0.0, 2.0, 16.0])
    assert jax.eval_shape(lambda: scaled(jnp.ones((4, 2)), power=1)).shape == (4, 2)
