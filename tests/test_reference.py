"""The NumPy reference quantizer against hand-computed values and independent formulas (METHOD.md)."""

from __future__ import annotations

import numpy as np
import pytest

from q8core import reference as ref

F32 = np.float32
INT32_MAX = 2**31 - 1


# -- qmax / max_abs ----------------------------------------------------------------------------

def test_qmax_values():
    assert ref.qmax(8) == 127
    assert ref.qmax(4) == 7
    assert ref.qmax(2) == 1
    assert ref.qmax(32) == 2147483647


def test_max_abs_is_float32_of_largest_magnitude():
    m = ref.max_abs(np.array([[-3.0, 2.0], [0.5, -0.25]]))
    assert type(m) is np.float32
    assert m == F32(3.0)
    assert ref.max_abs(np.array([1.5, 2.75])) == F32(2.75)


def test_max_abs_of_empty_tensor_is_zero():
    m = ref.max_abs(np.zeros((0, 4), dtype=F32))
    assert type(m) is np.float32
    assert m == 0.0


# -- get_scale ---------------------------------------------------------------------------------

@pytest.mark.parametrize("threshold, expected", [
    (2.0, 63.5),     # 127 / 2
    (127.0, 1.0),
    (0.5, 254.0),
    (254.0, 0.5),
    (1.0, 127.0),
])
def test_get_scale_hand_values(threshold, expected):
    s = ref.get_scale(threshold)
    assert type(s) is np.float32
    assert s == F32(expected)


def test_get_scale_is_float32_division_not_float64():
    # 127/3 is not representable; the result must be the float32 nearest to it
    s = ref.get_scale(3.0)
    assert type(s) is np.float32
    assert s == F32(127.0 / 3.0)
    assert abs(float(s) - 127.0 / 3.0) < 4e-6  # float32 ulp at ~42 is 3.8e-6


def test_get_scale_threshold_float64_rounded_to_float32_first():
    t = 0.1  # float64; F32(0.1) != 0.1
    assert ref.get_scale(t) == F32(F32(127.0) / F32(0.1))


def test_get_scale_zero_threshold_gives_one():
    s = ref.get_scale(0.0)
    assert type(s) is np.float32
    assert s == F32(1.0)
    assert ref.get_scale(0.0, bits=4) == F32(1.0)


def test_get_scale_four_bits_uses_qmax_seven():
    assert ref.get_scale(7.0, bits=4) == F32(1.0)
    assert ref.get_scale(3.5, bits=4) == F32(2.0)
    assert ref.get_scale(2.0, bits=4) == F32(3.5)


# -- quantize ----------------------------------------------------------------------------------

def test_quantize_rounds_half_to_even():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 0.49, -0.51], dtype=F32)
    q = ref.quantize(x, 1.0)
    assert q.dtype == np.int8
    np.testing.assert_array_equal(q, np.array([0, 2, 2, 0, -2, -2, 4, 0, -1], dtype=np.int8))


def test_quantize_multiplies_by_scale():
    # scale 63.5 (threshold 2): 0.1*63.5 = 6.35 -> 6; -1*63.5 = -63.5 -> -64 (even); 2*63.5 = 127
    x = np.array([0.1, -1.0, 2.0, 0.0, 1.0], dtype=F32)
    q = ref.quantize(x, 63.5)
    assert q.dtype == np.int8
    np.testing.assert_array_equal(q, np.array([6, -64, 127, 0, 64], dtype=np.int8))


def test_quantize_clamps_symmetric_never_minus_128():
    x = np.array([200.0, -200.0, 127.4, -127.6, -128.0, 1e30, -1e30], dtype=F32)
    q = ref.quantize(x, 1.0)
    assert q.dtype == np.int8
    np.testing.assert_array_equal(q, np.array([127, -127, 127, -127, -127, 127, -127], dtype=np.int8))
    assert q.min() == -127


def test_quantize_clamps_after_scaling():
    # scale 63.5: 2.1 * 63.5 = 133.35 -> 127; -3 * 63.5 -> -127
    q = ref.quantize(np.array([2.1, -3.0], dtype=F32), 63.5)
    np.testing.assert_array_equal(q, np.array([127, -127], dtype=np.int8))


def test_quantize_four_bits_clamps_to_seven():
    x = np.array([10.0, -10.0, 3.4, -6.5, 7.5], dtype=F32)
    q = ref.quantize(x, 1.0, bits=4)
    # -6.5 -> -6 (half to even), 7.5 -> 8 -> clamped 7
    np.testing.assert_array_equal(q, np.array([7, -7, 3, -6, 7]))
    assert q.max() == 7 and q.min() == -7


def test_quantize_keeps_shape():
    x = np.arange(24, dtype=F32).reshape(2, 3, 4) - 12
    q = ref.quantize(x, 1.0)
    assert q.shape == (2, 3, 4)
    np.testing.assert_array_equal(q, (np.arange(24) - 12).reshape(2, 3, 4))


# -- dequantize / fake_quantize ----------------------------------------------------------------

def test_dequantize_hand_values():
    q = np.array([127, -64, 0, 1], dtype=np.int8)
    y = ref.dequantize(q, 2.0)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, np.array([63.5, -32.0, 0.0, 0.5], dtype=F32))


def test_dequantize_divides_in_float32():
    y = ref.dequantize(np.array([127, -64], dtype=np.int8), 63.5)
    assert y.dtype == np.float32
    assert y[0] == F32(2.0)
    # float64 division rounded once to float32 equals the correctly rounded float32 division
    assert y[1] == F32(-64.0 / 63.5)


def test_fake_quantize_hand_values():
    # scale 2: 0.3*2=0.6 -> 1 -> 0.5; 0.75*2=1.5 -> 2 -> 1.0; -1.2*2=-2.4 -> -2 -> -1.0;
    # 100*2 = 200 -> 127 -> 63.5; 0.25*2 = 0.5 -> 0 -> 0.0
    x = np.array([0.3, 0.75, -1.2, 100.0, 0.25], dtype=F32)
    y = ref.fake_quantize(x, 2.0)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, np.array([0.5, 1.0, -1.0, 63.5, 0.0], dtype=F32))


def test_fake_quantize_four_bits():
    y = ref.fake_quantize(np.array([1.3, -9.0], dtype=F32), 2.0, bits=4)
    # 2.6 -> 3 -> 1.5; -18 -> -7 -> -3.5
    np.testing.assert_array_equal(y, np.array([1.5, -3.5], dtype=F32))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fake_quantize_error_bound_in_range(seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(1000) * (seed + 1) * 3).astype(F32)
    scale = F32(127.0) / F32(np.max(np.abs(x)))
    y = ref.fake_quantize(x, scale)
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    bound = 0.5 / float(scale)
    assert err.max() <= bound * (1 + 1e-5)
    # and it actually quantizes: at most 255 distinct values
    assert len(np.unique(y)) <= 255


def test_fake_quantize_is_idempotent_on_grid():
    scale = F32(4.0)
    grid = np.arange(-127, 128, dtype=F32) / scale
    np.testing.assert_array_equal(ref.fake_quantize(grid, scale), grid)


# -- ema_update --------------------------------------------------------------------------------

def test_ema_update_none_initialises_to_value():
    e = ref.ema_update(None, 3.25, 0.9999)
    assert type(e) is np.float32
    assert e == F32(3.25)


def test_ema_update_hand_step_decay_09():
    decay = 0.9
    e = ref.ema_update(2.0, 4.0, decay)
    # METHOD.md: decay * ema + (1 - decay) * value, with float32 constants and arithmetic
    expected = F32(F32(decay) * F32(2.0) + F32(1.0 - decay) * F32(4.0))
    assert type(e) is np.float32
    assert e == expected
    assert abs(float(e) - 2.2) < 1e-6


def test_ema_update_sequence_exact():
    # decay 0.5 keeps every step exact: 1 -> (1+3)/2=2 -> (2+2)/2=2 -> (2+5)/2=3.5 -> (3.5+0.5)/2=2
    ema = None
    seen = []
    for v in [1.0, 3.0, 2.0, 5.0, 0.5]:
        ema = ref.ema_update(ema, v, 0.5)
        assert type(ema) is np.float32
        seen.append(float(ema))
    assert seen == [1.0, 2.0, 2.0, 3.5, 2.0]


def test_ema_update_sequence_decay_09_matches_float32_recurrence():
    values = [1.0, 2.0, 0.5, 4.0, 3.0]
    d, one_minus = F32(0.9), F32(1.0 - 0.9)
    expected = F32(values[0])
    ema = ref.ema_update(None, values[0], 0.9)
    for v in values[1:]:
        expected = F32(d * expected + one_minus * F32(v))
        ema = ref.ema_update(ema, v, 0.9)
        assert ema == expected
    # the float64 recurrence agrees to float32 precision
    e64 = values[0]
    for v in values[1:]:
        e64 = 0.9 * e64 + 0.1 * v
    assert abs(float(ema) - e64) < 1e-6


def test_ema_update_high_decay_barely_moves():
    e = ref.ema_update(1.0, 101.0, 0.9999)
    # 0.9999 * 1 + 0.0001 * 101 = 1.01
    assert abs(float(e) - 1.01) < 1e-6


# -- bias --------------------------------------------------------------------------------------

def test_bias_scale_is_float32_product():
    s = ref.bias_scale(63.5, 2.0)
    assert type(s) is np.float32
    assert s == F32(127.0)
    assert ref.bias_scale(2.0, 4.0) == F32(8.0)


def test_quantize_bias_hand_values():
    # S_W * S_x = 2 * 4 = 8
    b = np.array([0.1, -0.25, 1.0, 0.0625, 0.1875, -0.3125, 0.0], dtype=F32)
    q = ref.quantize_bias(b, 2.0, 4.0)
    assert q.dtype == np.int32
    # 0.8 -> 1; -2; 8; 0.5 -> 0; 1.5 -> 2; -2.5 -> -2; 0
    np.testing.assert_array_equal(q, np.array([1, -2, 8, 0, 2, -2, 0], dtype=np.int32))


def test_quantize_bias_beyond_int8_range():
    q = ref.quantize_bias(np.array([100.0, -50.0], dtype=F32), 63.5, 2.0)  # scale 127
    np.testing.assert_array_equal(q, np.array([12700, -6350], dtype=np.int32))


def test_quantize_bias_clamps_huge_values_to_int32_range():
    q = ref.quantize_bias(np.array([1e10, -1e10, 3e9], dtype=F32), 1.0, 1.0)
    assert q.dtype == np.int32
    np.testing.assert_array_equal(q, np.array([INT32_MAX, -INT32_MAX, INT32_MAX], dtype=np.int32))
    assert q.min() == -INT32_MAX  # never -2^31


def test_quantize_bias_clamps_huge_product_of_scales():
    q = ref.quantize_bias(np.array([1.0, -1.0], dtype=F32), 1e6, 1e6)
    np.testing.assert_array_equal(q, np.array([INT32_MAX, -INT32_MAX], dtype=np.int32))


def test_quantize_bias_custom_bits():
    q = ref.quantize_bias(np.array([300.0, -300.0, 5.0], dtype=F32), 1.0, 1.0, bits=8)
    np.testing.assert_array_equal(q, np.array([127, -127, 5]))


# -- quantized_linear --------------------------------------------------------------------------

X_Q = np.array([[1, -2, 3]], dtype=np.int8)
W_Q = np.array([[4, 5, -6], [-1, 0, 2]], dtype=np.int8)
B_Q = np.array([10, -3], dtype=np.int32)


def test_quantized_linear_hand_example_with_bias():
    # acc row 0: 1*4 + (-2)*5 + 3*(-6) = 4 - 10 - 18 = -24, + 10 = -14
    # acc row 1: 1*(-1) + (-2)*0 + 3*2 = 5, - 3 = 2
    # S_W * S_x = 2 * 4 = 8 -> y = [-14/8, 2/8]
    y = ref.quantized_linear(X_Q, W_Q, B_Q, 2.0, 4.0)
    assert y.dtype == np.float32
    assert y.shape == (1, 2)
    np.testing.assert_array_equal(y, np.array([[-1.75, 0.25]], dtype=F32))


def test_quantized_linear_hand_example_without_bias():
    y = ref.quantized_linear(X_Q, W_Q, None, 2.0, 4.0)
    np.testing.assert_array_equal(y, np.array([[-3.0, 0.625]], dtype=F32))


def test_quantized_linear_accumulates_in_int32_not_int8():
    x_q = np.full((1, 1000), 127, dtype=np.int8)
    w_q = np.full((2, 1000), -127, dtype=np.int8)
    w_q[1] = 127
    y = ref.quantized_linear(x_q, w_q, None, 1.0, 1.0)
    # 127 * 127 * 1000 = 16_129_000 (< 2^24, exactly representable in float32)
    np.testing.assert_array_equal(y, np.array([[-16129000.0, 16129000.0]], dtype=F32))


def test_quantized_linear_batched_leading_dims():
    x_q = np.array([[[1, -2, 3], [0, 1, 0]], [[2, 2, 2], [-1, -1, -1]]], dtype=np.int8)
    y = ref.quantized_linear(x_q, W_Q, B_Q, 1.0, 1.0)
    assert y.shape == (2, 2, 2)
    # rows: [1,-2,3] -> [-14, 2]; [0,1,0] -> [5+10, 0-3]; [2,2,2] -> [6+10, 2-3]; [-1,-1,-1] -> [-3+10, -1-3]
    np.testing.assert_array_equal(y, np.array([[[-14, 2], [15, -3]], [[16, -1], [7, -4]]], dtype=F32))


def _independent_linear(x, w, b, threshold):
    """FQ(x) @ FQ(W).T + FQ_bias, written out from METHOD.md, accumulated in float64."""
    s_w = F32(127.0) / F32(np.abs(w).max())
    s_x = F32(127.0) / F32(threshold)
    fx = np.clip(np.round(x * s_x), -127, 127).astype(np.float64) / float(s_x)
    fw = np.clip(np.round(w * s_w), -127, 127).astype(np.float64) / float(s_w)
    y = fx @ fw.T
    if b is not None:
        sb = float(F32(s_w * s_x))
        y = y + np.round(b.astype(np.float64) * sb) / sb
    return y


@pytest.mark.parametrize("seed, with_bias, threshold_factor", [
    (0, True, 1.0), (1, False, 1.0), (2, True, 0.6), (3, True, 1.7),
])
def test_linear_forward_matches_fake_quantized_float_linear(seed, with_bias, threshold_factor):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((5, 16)).astype(F32)
    w = (rng.standard_normal((8, 16)) * 0.2).astype(F32)
    b = (rng.standard_normal(8) * 0.1).astype(F32) if with_bias else None
    threshold = F32(np.abs(x).max() * threshold_factor)
    y = ref.linear_forward(x, w, b, threshold)
    assert y.dtype == np.float32
    assert y.shape == (5, 8)
    expected = _independent_linear(x, w, b, threshold)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # and it is not just the float linear layer
    exact = x.astype(np.float64) @ w.astype(np.float64).T + (0 if b is None else b)
    assert np.abs(y - exact).max() > 0


def test_linear_forward_hand_example():
    # max|W| = 127 -> S_W = 1; threshold 127 -> S_x = 1: integers pass through unchanged
    x = np.array([[1.0, -2.0, 3.0]], dtype=F32)
    w = np.array([[4.0, 5.0, -6.0], [-1.0, 0.0, 127.0]], dtype=F32)
    b = np.array([10.4, -2.5], dtype=F32)  # -> [10, -2]
    y = ref.linear_forward(x, w, b, 127.0)
    # [4 - 10 - 18 + 10, -1 + 381 - 2]
    np.testing.assert_array_equal(y, np.array([[-14.0, 378.0]], dtype=F32))


def test_linear_forward_clamps_inputs_above_threshold():
    # threshold 1 -> S_x = 127; x = 5 clamps to 127 -> FQ(x) = 1.0; W = [[1]] -> S_W = 127
    y = ref.linear_forward(np.array([[5.0]], dtype=F32), np.array([[1.0]], dtype=F32), None, 1.0)
    np.testing.assert_array_equal(y, np.array([[1.0]], dtype=F32))


# -- embedding_forward -------------------------------------------------------------------------

def test_embedding_forward_scale_one_hand_example():
    # max|table| = 127 -> scale 1 -> plain half-even rounding of the rows
    table = np.array([[0.4, -2.5], [127.0, 3.5], [-1.5, 0.6]], dtype=F32)
    ids = np.array([[2, 0], [1, 1]])
    y = ref.embedding_forward(ids, table)
    assert y.dtype == np.float32
    assert y.shape == (2, 2, 2)
    np.testing.assert_array_equal(y, np.array([[[-2, 1], [0, -2]], [[127, 4], [127, 4]]], dtype=F32))


def test_embedding_forward_uses_table_wide_scale():
    # max|table| = 2 (in row 1) -> scale 63.5 even when only rows 0 and 2 are looked up
    table = np.array([[0.5, -1.0], [2.0, 0.3], [-0.1, 1.0]], dtype=F32)
    y = ref.embedding_forward(np.array([2, 0]), table)
    # row 2: -6.35 -> -6, 63.5 -> 64; row 0: 31.75 -> 32, -63.5 -> -64
    q = np.array([[-6, 64], [32, -64]], dtype=F32)
    np.testing.assert_array_equal(y, q / F32(63.5))
    # a per-row scale would have represented row 0's -1.0 exactly; the table scale does not
    assert y[1, 1] != F32(-1.0)


# -- zero tensors ------------------------------------------------------------------------------

def test_zero_tensor_quantizes_to_zero_without_nan():
    x = np.zeros((3, 4), dtype=F32)
    t = ref.max_abs(x)
    assert t == 0.0
    s = ref.get_scale(t)
    assert s == F32(1.0)
    q = ref.quantize(x, s)
    assert q.dtype == np.int8
    np.testing.assert_array_equal(q, np.zeros((3, 4), dtype=np.int8))
    fq = ref.fake_quantize(x, s)
    assert not np.isnan(fq).any()
    np.testing.assert_array_equal(fq, np.zeros((3, 4), dtype=F32))


def test_zero_weight_and_zero_threshold_linear_gives_bias_only():
    # both scales 1 -> bias quantized with scale 1: [0.4, 2.6] -> [0, 3]
    x = np.zeros((2, 3), dtype=F32)
    w = np.zeros((2, 3), dtype=F32)
    y = ref.linear_forward(x, w, np.array([0.4, 2.6], dtype=F32), 0.0)
    assert not np.isnan(y).any()
    np.testing.assert_array_equal(y, np.array([[0.0, 3.0], [0.0, 3.0]], dtype=F32))


def test_zero_embedding_table():
    y = ref.embedding_forward(np.array([0, 1]), np.zeros((2, 3), dtype=F32))
    assert not np.isnan(y).any()
    np.testing.assert_array_equal(y, np.zeros((2, 3), dtype=F32))
