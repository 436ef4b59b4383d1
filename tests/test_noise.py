"""The one seeded noise function: per-sample streams (sample i independent of the batch size) and the causal
sampler's (block, step) streams folded in after the sample index."""

import numpy as np

from jax_impl.causal import block_noise
from jax_impl.noise import initial_noise, seeded_noise


def test_sample_does_not_depend_on_batch_size():
    one = initial_noise(7, (1, 2, 3, 4, 5))
    three = initial_noise(7, (3, 2, 3, 4, 5))
    np.testing.assert_array_equal(three[:1], one)
    assert one.dtype == np.float32 and three.shape == (3, 2, 3, 4, 5)
    assert not np.allclose(three[0], three[1]) and not np.allclose(three[1], three[2])  # own stream per sample
    assert abs(float(three.std()) - 1.0) < 0.1
    assert not np.allclose(initial_noise(8, (1, 2, 3, 4, 5)), one)  # the seed matters


def test_block_and_step_streams_are_fold_ins():
    shape = (2, 3, 4, 5)
    a = np.asarray(block_noise(3, 2, 1, 2, shape))
    np.testing.assert_array_equal(a, np.asarray(seeded_noise(3, 2, shape, 1, 2)))
    np.testing.assert_array_equal(a[1:], np.asarray(block_noise(3, 3, 1, 2, shape))[1:2])
    others = [block_noise(3, 2, 2, 1, shape), block_noise(3, 2, 1, 0, shape), block_noise(3, 2, 0, 2, shape),
              seeded_noise(3, 2, shape)]
    for b in others:  # (block, step) = (1, 2) is its own stream: not (2, 1), nor another step or block
        assert not np.allclose(a, np.asarray(b))
