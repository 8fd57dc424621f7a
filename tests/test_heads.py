"""The core's starting values for a new task head: what both backends load when a checkpoint lacks one."""

from __future__ import annotations

import numpy as np

from q8core.heads import new_parameter


def test_weights_are_normal_with_the_initializer_range_and_biases_and_layernorms_are_constant():
    weight = new_parameter("classifier.weight", (3, 384 * 64), seed=42, initializer_range=0.02)
    assert weight.dtype == np.float32 and weight.shape == (3, 384 * 64)
    assert abs(float(weight.mean())) < 0.02 * 4 / np.sqrt(weight.size)  # within 4 standard errors of 0
    assert abs(float(weight.std()) - 0.02) < 0.0005
    np.testing.assert_array_equal(new_parameter("classifier.bias", (3,), seed=42, initializer_range=0.02), np.zeros(3))
    np.testing.assert_array_equal(new_parameter("classifier.LayerNorm.weight", (4,), seed=42, initializer_range=0.02),
                                  np.ones(4))


def test_values_depend_on_seed_and_name_only_never_on_the_order_of_the_calls():
    first = new_parameter("classifier.weight", (2, 8), seed=1, initializer_range=0.02)
    pooler = new_parameter("bert.pooler.dense.weight", (8, 8), seed=1, initializer_range=0.02)
    again = new_parameter("classifier.weight", (2, 8), seed=1, initializer_range=0.02)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, new_parameter("classifier.weight", (2, 8), seed=2, initializer_range=0.02))
    assert not np.array_equal(first.ravel(), pooler.ravel()[:16])
    np.testing.assert_allclose(new_parameter("classifier.weight", (2, 8), seed=1, initializer_range=0.04), 2 * first,
                               rtol=1e-6)
