"""frozen_jit: inference calls of NNX modules must not copy the weights (the reason it exists)."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_impl.frozen_jit import frozen_jit


def _kernel_pointer(m: nnx.Linear) -> int:
    return m.kernel[...].unsafe_buffer_pointer()


def test_weights_stay_in_place_and_result_matches():
    m = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    x = jnp.arange(3 * 64, dtype=jnp.float32).reshape(3, 64) / 100
    call = frozen_jit(lambda m, x: m(x))
    before = _kernel_pointer(m)
    y = call(m, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ m.kernel[...] + m.bias[...]), rtol=1e-6)
    assert _kernel_pointer(m) == before, "the weights were replaced by a copy"
    out = call.lower(m, x).compile().memory_analysis()
    if out is not None:  # the compiled program outputs the prediction only, not the 64x32 weights
        assert out.output_size_in_bytes == y.size * y.dtype.itemsize


def test_static_argnames_are_passed():
    m = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    call = frozen_jit(lambda m, x, *, double: m(x) * (2 if double else 1), static_argnames=("double",))
    x = jnp.ones((1, 4))
    np.testing.assert_allclose(np.asarray(call(m, x, double=True)), 2 * np.asarray(call(m, x, double=False)), rtol=1e-6)


def test_static_argument_given_by_position():
    m = nnx.Linear(4, 4, rngs=nnx.Rngs(0))

    def f(m, x, double=False):
        return m(x) * (2 if double else 1)  # a Python branch: traced `double` would raise

    call = frozen_jit(f, static_argnames=("double",))
    x = jnp.ones((1, 4))
    np.testing.assert_allclose(np.asarray(call(m, x, True)), 2 * np.asarray(call(m, x)), rtol=1e-6)
