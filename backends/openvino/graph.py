"""A BERT sequence classifier as an OpenVINO model, in float32 or in Q8BERT's int8 form.

Built op by op with OpenVINO's opset from a Hugging Face state dict (NumPy arrays, as any backend's
``hf`` export writes it) and, for int8, the QAT activation ranges: no tracing, no calibration.

In the int8 form every fully connected layer is written the way OpenVINO's low-precision
transformations expect a quantized layer, and its CPU plugin then runs it as one int8 primitive:

- the input is clamped to ``[-127/S_x, 127/S_x]`` and passes a ``FakeQuantize`` onto the int8 grid: the
  method's ``clamp(round(x * S_x), -127, 127)``, with ``S_x`` from the layer's EMA of max|x|;
- the weight is the reference's int8 ``W_q`` as an int8 constant, ``Convert`` to float and
  ``Multiply`` by ``1/S_W`` (one value per output row, so layers can share one matmul);
- the bias is the reference's int32 ``b_q`` dequantized, ``b_q / (S_W * S_x)``, added after the matmul.

Q, K and V read the same input, so their EMA ranges are equal: they become one matmul with a
``[3H, H]`` int8 weight and per-row scales (the three ``1/S_W``), split after the bias. That is the
same arithmetic as three layers, in one larger integer GEMM. Attention is one
``ScaledDotProductAttention`` op (float: the paper keeps the two attention matmuls, softmax,
LayerNorm and GELU in float). Embedding tables are int8 constants, dequantized after the lookup.

The float32 form (``ranges=None``) is the same graph with float weights.
"""

from __future__ import annotations

import math

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from q8core import reference
from q8core.errors import Q8Error
from q8core.spec import QuantSpec

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: ``hidden_act`` values the graph implements (Hugging Face's names) -> OpenVINO's GELU mode
ACTIVATIONS = {"gelu": "erf", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "relu": None}
F32 = np.float32


def _const(value) -> ov.Node:
    return ops.constant(np.asarray(value))


class _Builder:
    def __init__(self, weights: dict[str, np.ndarray], config: dict, ranges: dict | None,
                 quantize_embeddings: bool, float_inputs: tuple[str, ...], per_channel: bool = False) -> None:
        self.w = weights
        self.per_channel = per_channel
        self.config = config
        self.ranges = ranges  # None: float32 graph
        self.float_spec = QuantSpec(float_inputs=float_inputs if ranges is not None else ())
        self.quantize_embeddings = quantize_embeddings and ranges is not None
        self.prefix = "bert." if any(k.startswith("bert.") for k in weights) else ""
        self.used: set[str] = set()

    def weight(self, name: str) -> np.ndarray:
        if name not in self.w:
            raise Q8Error(f"OpenVINO export: the model has no weight {name!r} (not a BERT sequence classifier?)")
        self.used.add(name)
        return np.asarray(self.w[name], dtype=F32)

    # -- layers --------------------------------------------------------------------------------
    def embedding(self, module: str, ids) -> ov.Node:
        table = self.weight(f"{module}.weight")
        if not self.quantize_embeddings:
            return ops.gather(_const(table), ids, _const(np.int64(0)))
        scale = reference.get_scale(reference.max_abs(table))
        rows = ops.gather(_const(reference.quantize(table, scale)), ids, _const(np.int64(0)))
        return ops.divide(ops.convert(rows, "f32"), _const(scale))  # the reference's q / S

    def input_params(self, module: str) -> tuple[np.float32, int | None]:
        """(S_x, z) of a fully connected layer's input, from its EMA range: z ``None`` on the symmetric grid."""
        if module not in self.ranges:
            raise Q8Error(f"OpenVINO int8 export: layer {module} has no QAT activation range (EMA); was the "
                          f"checkpoint trained past its quantization delay?")
        return reference.input_params(self.ranges[module])

    def quantized(self, module: str) -> bool:
        return self.ranges is not None and not self.float_spec.float_input(module)

    def linear(self, modules: list[str], x, name: str) -> ov.Node:
        """One matmul for ``modules`` (layers reading the same input, stacked along their outputs)."""
        weights = [self.weight(f"{m}.weight") for m in modules]
        biases = [self.weight(f"{m}.bias") for m in modules]
        if self.ranges is None:
            w = _const(np.concatenate(weights))
            bias = np.concatenate(biases)
        else:
            quantized = [reference.quantize_weight(w, per_channel=self.per_channel) for w in weights]
            s_w = [s for _, s in quantized]
            rows = np.concatenate([np.broadcast_to(F32(1) / s, (len(w),)).astype(F32)[:, None]
                                   for w, s in zip(weights, s_w)])
            w_q = np.concatenate([q for q, _ in quantized])
            w = ops.multiply(ops.convert(ops.constant(w_q, name=f"{name}.weight_int8"), "f32"), _const(rows))
            if self.quantized(modules[0]):
                s_x, zero_point = self.input_params(modules[0])
                x = self.fake_quantize(x, s_x, zero_point)
                bias = np.concatenate([reference.quantize_bias(b, s, s_x).astype(F32) / reference.bias_scale(s, s_x)
                                       for b, s in zip(biases, s_w)]).astype(F32)
            else:  # a float_inputs layer: int8 weight, float input and bias
                bias = np.concatenate(biases)
        y = ops.matmul(x, w, transpose_a=False, transpose_b=True, name=f"{name}/matmul")
        return ops.add(y, _const(bias), name=name)

    @staticmethod
    def fake_quantize(x, s_x: np.float32, zero_point: int | None = None) -> ov.Node:
        """``clamp(round(x * S_x), -127, 127) / S_x``: a ``Clamp`` to the method's range, then a 256-level
        ``FakeQuantize`` over ``[-128/S_x, 127/S_x]`` (the int8 grid). The one-op form, 255 levels over
        ``[-127/S_x, 127/S_x]``, is the same arithmetic on paper, but the CPU plugin's int8 kernels then
        shift the grid (logits 0.8% off on the tiny test model); this form matches the reference to
        float32 rounding and the ``Clamp`` fuses into the quantization.

        On the asymmetric grid (``zero_point`` z): a 256-level ``FakeQuantize`` over ``[-z/S_x, (255-z)/S_x]``,
        which clamps by itself: the uint8 grid."""
        if zero_point is not None:
            low, high = _const(F32(-zero_point) / s_x), _const(F32(reference.levels(8) - zero_point) / s_x)
            return ops.fake_quantize(x, low, high, low, high, reference.levels(8) + 1)
        q = reference.qmax(8)
        x = ops.clamp(x, -float(F32(q) / s_x), float(F32(q) / s_x))
        low, high = _const(F32(-(q + 1)) / s_x), _const(F32(q) / s_x)
        return ops.fake_quantize(x, low, high, low, high, 2 * (q + 1))

    def dense(self, module: str, x) -> ov.Node:
        return self.linear([module], x, name=module)

    def layer_norm(self, module: str, x) -> ov.Node:
        eps = float(self.config.get("layer_norm_eps", 1e-12))
        normed = ops.mvn(x, _const(np.array([-1], np.int64)), True, eps, "inside_sqrt")
        return ops.add(ops.multiply(normed, _const(self.weight(f"{module}.weight"))),
                       _const(self.weight(f"{module}.bias")))

    def activation(self, x) -> ov.Node:
        mode = ACTIVATIONS[self.config.get("hidden_act", "gelu")]
        return ops.relu(x) if mode is None else ops.gelu(x, mode)

    def attention(self, prefix: str, x, mask) -> ov.Node:
        cfg = self.config
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = hidden // heads
        names = [f"{prefix}.self.{name}" for name in ("query", "key", "value")]
        if self.fusable(names):
            qkv = ops.variadic_split(self.linear(names, x, name=f"{prefix}.self.qkv"), _const(np.int64(-1)),
                                     _const(np.array([hidden] * 3, np.int64)))
            q, k, v = (qkv.output(i) for i in range(3))
        else:
            q, k, v = (self.dense(name, x) for name in names)
        split = _const(np.array([0, 0, heads, head_dim], np.int64))

        def heads_first(t):
            return ops.transpose(ops.reshape(t, split, special_zero=True), _const(np.array([0, 2, 1, 3], np.int64)))

        context = ops.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), mask,
                                                   _const(F32(1 / math.sqrt(head_dim))), causal=False)
        merged = ops.reshape(ops.transpose(context, _const(np.array([0, 2, 1, 3], np.int64))),
                             _const(np.array([0, 0, hidden], np.int64)), special_zero=True)
        out = self.dense(f"{prefix}.output.dense", merged)
        return self.layer_norm(f"{prefix}.output.LayerNorm", ops.add(out, x))

    def fusable(self, names: list[str]) -> bool:
        """Whether Q, K and V can be one matmul: all float, or all quantized with one input scale."""
        if self.ranges is None:
            return True
        kinds = {self.quantized(n) for n in names}
        return kinds == {False} or (kinds == {True} and len({self.input_params(n) for n in names}) == 1)

    # -- the model -----------------------------------------------------------------------------
    def build(self) -> ov.Model:
        cfg, p = self.config, self.prefix
        act = cfg.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise Q8Error(f"OpenVINO export: hidden_act {act!r} is not supported "
                          f"(supported: {', '.join(ACTIVATIONS)})")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise Q8Error(f"OpenVINO export: position_embedding_type {cfg['position_embedding_type']!r} "
                          f"is not supported")
        params = [ops.parameter([-1, -1], np.int64, name=name) for name in INPUTS]
        for param, name in zip(params, INPUTS):
            param.output(0).set_names({name})
        ids, mask, types = params
        seq = ops.gather(ops.shape_of(ids), _const(np.int64(1)), _const(np.int64(0)))
        positions = ops.range(_const(np.int64(0)), seq, _const(np.int64(1)), "i64")
        e = f"{p}embeddings"
        h = ops.add(ops.add(self.embedding(f"{e}.word_embeddings", ids),
                            self.embedding(f"{e}.position_embeddings", positions)),
                    self.embedding(f"{e}.token_type_embeddings", types))
        h = self.layer_norm(f"{e}.LayerNorm", h)
        # additive key mask (batch, 1, 1, seq): 0 where attended, the float32 minimum where padded
        keep = ops.convert(ops.unsqueeze(mask, _const(np.array([1, 2], np.int64))), "f32")
        additive = ops.multiply(ops.subtract(_const(F32(1)), keep), _const(np.finfo(F32).min))
        for i in range(int(cfg["num_hidden_layers"])):
            layer = f"{p}encoder.layer.{i}"
            h = self.attention(f"{layer}.attention", h, additive)
            inner = self.activation(self.dense(f"{layer}.intermediate.dense", h))
            h = self.layer_norm(f"{layer}.output.LayerNorm", ops.add(self.dense(f"{layer}.output.dense", inner), h))
        first = ops.gather(h, _const(np.int64(0)), _const(np.int64(1)))
        logits = self.dense("classifier", ops.tanh(self.dense(f"{p}pooler.dense", first)))
        logits.output(0).set_names({"logits"})
        unused = sorted(set(self.w) - self.used - {f"{e}.position_ids", f"{e}.token_type_ids"})
        if unused:
            raise Q8Error(f"OpenVINO export: weight {unused[0]!r} has no place in a BERT sequence classifier")
        return ov.Model([ops.result(logits)], params, "q8bert")


def build_model(weights: dict[str, np.ndarray], config: dict, ranges: dict | None = None,
                quantize_embeddings: bool = True, float_inputs: tuple[str, ...] = (),
                per_channel: bool = False) -> ov.Model:
    """The OpenVINO model of a BERT sequence classifier.

    ``weights``: a Hugging Face ``BertForSequenceClassification`` state dict; ``config``: its
    ``config.json`` as a dict; ``ranges``: the EMA of max|x| per fully connected layer (by module
    name; a ``(min, max)`` pair for an input on the asymmetric grid) for the int8 model, ``None`` for
    float32; ``float_inputs``: the spec's patterns of layers whose inputs stay float (their weights int8,
    dequantized into a float matmul); ``per_channel``: one weight scale per output row.
    """
    if "classifier.weight" not in weights:
        raise Q8Error("OpenVINO export: the model has no classifier.weight (not a sequence classifier)")
    return _Builder(weights, config, ranges, quantize_embeddings, tuple(float_inputs), per_channel).build()


def runtime_precisions(compiled: ov.CompiledModel) -> dict[str, str]:
    """The element type of each fully connected layer's activation input as the compiled model executes
    it (``i8``/``u8``: an integer GEMM; ``f32``/``bf16``: a float one, even where the weight is int8), by
    layer name (the module names :func:`build_model` gives its layers; ``...self.qkv`` for a fused
    Q/K/V), read from the runtime graph."""
    found: dict[str, str] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if not str(info["layerType"].astype(str)).startswith("FullyConnected"):
            continue
        precision = op.input(0).get_element_type().get_type_name()
        for name in str(info["originalLayersNames"].astype(str)).split(","):
            found[name] = precision
    return found
