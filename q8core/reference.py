"""NumPy reference quantizer: the single source of truth for Q8BERT arithmetic.

One short function per formula of METHOD.md. Every backend is tested against these functions
bit for bit: the same float32 input gives the same int8 values, the same float32 scales and the
same float32 fake-quantized output. All arithmetic is float32 (scales, products, EMA) except the
integer matmul, which accumulates in int32 exactly as int8 hardware does.

Rules fixed here for every backend:

- ``scale = qmax / threshold`` in float32, where ``qmax = 2^(bits-1) - 1``; a zero threshold
  (an all-zero tensor) gives scale 1, so zeros quantize to zero instead of NaN.
- ``quantize(x) = clamp(round_half_even(x * scale), -qmax, qmax)``: multiply by the scale
  (never divide by its inverse), round half to even, clamp.
- ``dequantize(q) = q / scale`` (division, float32).
- EMA of max|x|: the first training batch sets it; afterwards
  ``ema = decay * ema + (1 - decay) * max|x|`` with ``decay`` and ``1 - decay`` (computed in
  float64, then rounded) as float32 constants, two float32 products and one float32 sum.
- Bias: ``b_q = clamp(round(b * (S_W * S_x)), -(2^31 - 1), 2^31 - 1)`` with the product of the
  two scales rounded to float32 first.
- Quantized linear: ``y = (x_q · W_qᵀ + b_q) / (S_W * S_x)``.

Beyond the paper (each a field of the quantizer spec, off by default):

- **Per-channel weights**: one threshold max|W_row| and one scale per output row (``max_abs(w, axis=1)``);
  bias and accumulator scales become per output column, ``S_W[j] * S_x``.
- **Asymmetric inputs** (uint8): the range ``[lo, hi]`` is widened to hold 0, ``S = (2^bits - 1) / (hi - lo)``
  (1 when ``hi == lo``), zero point ``z = clamp(round(-lo * S), 0, 2^bits - 1)``;
  ``quantize(x) = clamp(round(x * S) + z, 0, 2^bits - 1)`` (round first, then add ``z``: ONNX's
  QuantizeLinear order), ``dequantize(q) = (q - z) / S``. In training ``lo`` and ``hi`` are EMAs of the
  batch min and max (the same recurrence as max|x|). The integer layer subtracts ``z`` before the
  product: ``acc = (x_q - z) · W_qᵀ + b_q``.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def qmax(bits: int) -> int:
    """Largest magnitude of the symmetric signed range: 2^(bits-1) - 1."""
    return 2 ** (bits - 1) - 1


def levels(bits: int) -> int:
    """Largest code of the unsigned (asymmetric) range [0, 2^bits - 1]."""
    return 2 ** bits - 1


def max_abs(x: np.ndarray, axis: int | None = None) -> np.float32 | np.ndarray:
    """max|x| of a tensor (the per-tensor threshold), as float32; with ``axis=1`` one per row of a
    weight (the per-channel thresholds)."""
    x = np.asarray(x, dtype=F32)
    if axis is not None:
        return np.max(np.abs(x), axis=axis).astype(F32) if x.size else np.zeros(x.shape[0], F32)
    return F32(np.max(np.abs(x))) if x.size else F32(0.0)


def min_max(x: np.ndarray) -> tuple[np.float32, np.float32]:
    """(min x, max x) of a tensor, as float32 (0, 0 for an empty one): an asymmetric input's batch range."""
    x = np.asarray(x, dtype=F32)
    return (F32(np.min(x)), F32(np.max(x))) if x.size else (F32(0.0), F32(0.0))


def get_scale(threshold: float | np.ndarray, bits: int = 8) -> np.float32 | np.ndarray:
    """S = (2^(M-1) - 1) / threshold, float32; 1 when the threshold is 0 (element-wise for per-channel
    thresholds)."""
    t = np.asarray(threshold, dtype=F32)
    safe = np.where(t == 0, F32(1.0), t)
    scale = np.where(t == 0, F32(1.0), F32(qmax(bits)) / safe).astype(F32)
    return F32(scale) if scale.ndim == 0 else scale


def asymmetric_params(lo: float, hi: float, bits: int = 8) -> tuple[np.float32, int]:
    """(S, z) of the uint8 grid over ``[min(lo, 0), max(hi, 0)]``: S = (2^bits - 1) / (hi - lo) in
    float32 (1 when the range is empty), z = clamp(round(-lo * S), 0, 2^bits - 1)."""
    lo, hi = min(F32(lo), F32(0.0)), max(F32(hi), F32(0.0))
    span = F32(hi - lo)
    if span == 0:
        return F32(1.0), 0
    scale = F32(F32(levels(bits)) / span)
    return scale, int(np.clip(np.rint(F32(-lo) * scale), 0, levels(bits)))


def quantize_asymmetric(x: np.ndarray, scale: float, zero_point: int, bits: int = 8) -> np.ndarray:
    """clamp(round(x * S) + z, 0, 2^bits - 1) as uint8."""
    rounded = np.rint(np.asarray(x, dtype=F32) * F32(scale)) + F32(zero_point)
    return np.clip(rounded, 0, levels(bits)).astype(np.uint8 if bits <= 8 else np.int32)


def dequantize_asymmetric(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """(q - z) / S as float32."""
    return ((np.asarray(q).astype(F32) - F32(zero_point)) / F32(scale)).astype(F32)


def fake_quantize_asymmetric(x: np.ndarray, scale: float, zero_point: int, bits: int = 8) -> np.ndarray:
    """The float32 value a uint8 input stands for."""
    return dequantize_asymmetric(quantize_asymmetric(x, scale, zero_point, bits), scale, zero_point)


def quantize(x: np.ndarray, scale: float, bits: int = 8) -> np.ndarray:
    """clamp(round(x * S), -qmax, qmax) as int8 (int32 for more than 8 bits)."""
    q = qmax(bits)
    scaled = np.asarray(x, dtype=F32) * F32(scale)
    rounded = np.clip(np.rint(scaled), -q, q)  # np.rint rounds half to even
    return rounded.astype(np.int8 if bits <= 8 else np.int32)


def dequantize(q: np.ndarray, scale: float) -> np.ndarray:
    """q / S as float32."""
    return (np.asarray(q).astype(F32) / F32(scale)).astype(F32)


def fake_quantize(x: np.ndarray, scale: float, bits: int = 8) -> np.ndarray:
    """Dequantize(Quantize(x)): the float32 value an 8-bit tensor stands for."""
    return dequantize(quantize(x, scale, bits), scale)


def ema_update(ema: float | None, value: float, decay: float) -> np.float32:
    """One EMA step of max|x|; ``ema=None`` means no batch seen yet (the value initialises it)."""
    if ema is None:
        return F32(value)
    return F32(F32(decay) * F32(ema) + F32(1.0 - decay) * F32(value))


def bias_scale(weight_scale: float | np.ndarray, input_scale: float) -> np.float32 | np.ndarray:
    """S_W * S_x rounded to float32: the scale of the int32 bias and of the accumulator (one per output
    column with per-channel weights)."""
    product = (np.asarray(weight_scale, dtype=F32) * F32(input_scale)).astype(F32)
    return F32(product) if product.ndim == 0 else product


def quantize_bias(bias: np.ndarray, weight_scale: float | np.ndarray, input_scale: float,
                  bits: int = 32) -> np.ndarray:
    """b_q = round(b * S_W * S_x) as int32 (clamped to the signed ``bits`` range)."""
    q = qmax(bits)
    scaled = np.asarray(bias, dtype=F32) * bias_scale(weight_scale, input_scale)
    # clip in float64: 2^31 - 1 has no float32 representation
    return np.clip(np.rint(scaled).astype(np.float64), -q, q).astype(np.int32)


def input_params(input_range: float | tuple[float, float], bits: int = 8) -> tuple[np.float32, int | None]:
    """(S_x, z) of a layer input from its range: a threshold max|x| gives the symmetric grid (z ``None``),
    a ``(lo, hi)`` pair the asymmetric one."""
    if isinstance(input_range, (tuple, list)):
        return asymmetric_params(*input_range, bits=bits)
    return get_scale(input_range, bits), None


def quantize_input(x: np.ndarray, scale: float, zero_point: int | None, bits: int = 8) -> np.ndarray:
    """The input's integers on its grid: int8 (``zero_point`` ``None``) or uint8."""
    if zero_point is None:
        return quantize(x, scale, bits)
    return quantize_asymmetric(x, scale, zero_point, bits)


def quantize_weight(weight: np.ndarray, bits: int = 8, per_channel: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(W_q, S_W) of a (out, in) weight: one scale for the tensor, or one per output row."""
    scale = get_scale(max_abs(weight, axis=1 if per_channel else None), bits)
    return quantize(weight, scale[:, None] if per_channel else scale, bits), scale


def quantized_linear(x_q: np.ndarray, w_q: np.ndarray, b_q: np.ndarray | None,
                     weight_scale: float | np.ndarray, input_scale: float, zero_point: int = 0) -> np.ndarray:
    """Integer FC layer: int8 (or uint8 with zero point ``z``) x int8 -> int32 accumulate (+ int32 bias)
    -> float32 y, ``acc = (x_q - z) · W_qᵀ + b_q``.

    ``x_q`` has shape (..., in), ``w_q`` (out, in) as in ``nn.Linear``; ``weight_scale`` a scalar or one
    per output row.
    """
    acc = np.matmul(x_q.astype(np.int32) - np.int32(zero_point), w_q.astype(np.int32).T)
    if b_q is not None:
        acc = acc + b_q.astype(np.int32)
    return (acc.astype(F32) / bias_scale(weight_scale, input_scale)).astype(F32)


def linear_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                   input_range: float | tuple[float, float], bits: int = 8, bias_bits: int = 32,
                   per_channel: bool = False) -> np.ndarray:
    """The whole quantized FC layer from float32 inputs: what a backend's forward must return.

    Weight scale(s) from max|W| (of the tensor or of each row); the input's grid from ``input_range``:
    a threshold max|x| (symmetric int8) or a ``(lo, hi)`` pair (asymmetric uint8) -- the EMA in training
    and inference, the batch's own in dynamic quantization.
    """
    w_q, s_w = quantize_weight(weight, bits, per_channel)
    s_x, zero_point = input_params(input_range, bits)
    b_q = None if bias is None else quantize_bias(bias, s_w, s_x, bias_bits)
    return quantized_linear(quantize_input(x, s_x, zero_point, bits), w_q, b_q, s_w, s_x, zero_point or 0)


def embedding_forward(ids: np.ndarray, table: np.ndarray, bits: int = 8) -> np.ndarray:
    """Quantized embedding lookup: rows of the table fake-quantized with the whole table's scale."""
    s_w = get_scale(max_abs(table), bits)
    return fake_quantize(np.asarray(table, dtype=F32)[np.asarray(ids)], s_w, bits)
