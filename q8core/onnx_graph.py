"""A BERT sequence classifier as an ONNX graph, in float32 or in Q8BERT's int8 (QDQ) form.

Built node by node from a Hugging Face state dict (NumPy arrays, as any backend's ``hf`` export
writes it) and, for int8, the QAT activation ranges: no framework, no tracing, no calibration.

The int8 graph is the standard QDQ representation of Q8BERT's arithmetic (METHOD.md), which ONNX
Runtime turns into integer kernels (it rewrites each ``DequantizeLinear -> MatMul <-
DequantizeLinear`` pair into ``MatMulIntegerToFloat``; :func:`integer_kernels` checks that from the
optimized graph):

- every fully connected layer: ``x_q = QuantizeLinear(x, 1/S_x)`` with ``S_x`` from the layer's EMA
  of max|x| (static, symmetric, zero point 0), the weight stored as int8 ``W_q`` with scale ``1/S_W``,
  the bias as int32 ``b_q`` with scale ``1/(S_W * S_x)``; ``W_q`` and ``b_q`` are computed by
  :mod:`q8core.reference`, so they are bit for bit the training backends' int8 values;
- embedding tables stored as int8 and dequantized after the lookup (``Gather -> DequantizeLinear``);
- LayerNorm, GELU, Softmax and the two attention matmuls in float32, as in the paper.

Where ONNX's arithmetic differs from the reference: ``QuantizeLinear`` divides by ``1/S_x`` instead of
multiplying by ``S_x``; the two can differ in the last bit, which moves a rounding tie on rare values.
(Its saturation to -128 is avoided: a ``Clip`` to the EMA range comes first, costing a few percent of
latency, so out-of-range inputs clamp to -127 as in the method.) ``q8 eval`` on the export measures
the effect on a dev set.
"""

from __future__ import annotations

import math

import numpy as np

from . import reference
from .errors import Q8Error

OPSET = 17  # LayerNormalization
IR_VERSION = 9
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: ``hidden_act`` values the graph implements (Hugging Face's names).
ACTIVATIONS = ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh")
#: Ops ONNX Runtime runs an int8 fully connected layer with, after its QDQ rewrite.
INTEGER_OPS = ("MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul",
               "QGemm", "QAttention")


class _Graph:
    """Nodes and initializers under construction, with unique names."""

    def __init__(self) -> None:
        from onnx import helper

        self.helper = helper
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0
        self._shared: set[str] = set()

    def shared(self, name: str, value) -> str:
        """A scalar constant used by many nodes, added once."""
        if name not in self._shared:
            self._shared.add(name)
            self.const(name, value)
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        self._count += 1
        out = name or f"{op_type.lower()}_{self._count}"
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=f"{out}_node", **attrs))
        return out


class _Builder:
    def __init__(self, weights: dict[str, np.ndarray], config: dict, ranges: dict[str, float] | None,
                 quantize_embeddings: bool) -> None:
        self.w = weights
        self.config = config
        self.ranges = ranges  # None: float32 graph
        self.quantize_embeddings = quantize_embeddings and ranges is not None
        self.g = _Graph()
        self.prefix = "bert." if any(k.startswith("bert.") for k in weights) else ""
        self.used: set[str] = set()

    def weight(self, name: str) -> np.ndarray:
        if name not in self.w:
            raise Q8Error(f"ONNX export: the model has no weight {name!r} (not a BERT sequence classifier?)")
        self.used.add(name)
        return np.asarray(self.w[name], dtype=np.float32)

    # -- layers --------------------------------------------------------------------------------
    def embedding(self, module: str, ids: str) -> str:
        table = self.weight(f"{module}.weight")
        if not self.quantize_embeddings:
            return self.g.op("Gather", [self.g.const(f"{module}.weight", table), ids])
        scale = reference.get_scale(reference.max_abs(table))
        rows = self.g.op("Gather", [self.g.const(f"{module}.weight_int8", reference.quantize(table, scale)), ids])
        return self.g.op("DequantizeLinear", [rows, self.g.const(f"{module}.weight_scale", np.float32(1 / scale)),
                                              self.g.const(f"{module}.weight_zero", np.int8(0))])

    def linear(self, module: str, x: str) -> str:
        g = self.g
        weight, bias = self.weight(f"{module}.weight"), self.weight(f"{module}.bias")
        if self.ranges is None:
            y = g.op("MatMul", [x, g.const(f"{module}.weight_t", np.ascontiguousarray(weight.T))])
            return g.op("Add", [y, g.const(f"{module}.bias", bias)])
        if module not in self.ranges:
            raise Q8Error(f"ONNX int8 export: layer {module} has no QAT activation range (EMA); was the "
                          f"checkpoint trained past its quantization delay?")
        s_x = reference.get_scale(self.ranges[module])
        s_w = reference.get_scale(reference.max_abs(weight))
        w_q = reference.quantize(weight, s_w)
        b_q = reference.quantize_bias(bias, s_w, s_x)
        x_scale = g.const(f"{module}.input_scale", np.float32(1 / s_x))
        zero8 = g.const(f"{module}.input_zero", np.int8(0))
        # a Q -> DQ pair per layer, even where layers share an input (Q, K, V): ONNX Runtime rewrites
        # DQ -> MatMul into an integer kernel only when each node of the pair has one consumer
        # clamp to the EMA range first: QuantizeLinear alone would saturate to -128, the method to -127
        limit = np.float32(reference.qmax(8)) / s_x
        x = g.op("Clip", [x, g.const(f"{module}.input_min", -limit), g.const(f"{module}.input_max", limit)])
        x_dq = g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, x_scale, zero8]), x_scale, zero8])
        w_dq = g.op("DequantizeLinear", [g.const(f"{module}.weight_int8", np.ascontiguousarray(w_q.T)),
                                         g.const(f"{module}.weight_scale", np.float32(1 / s_w)),
                                         g.const(f"{module}.weight_zero", np.int8(0))])
        b_dq = g.op("DequantizeLinear", [g.const(f"{module}.bias_int32", b_q),
                                         g.const(f"{module}.bias_scale", np.float32(1 / reference.bias_scale(s_w, s_x))),
                                         g.const(f"{module}.bias_zero", np.int32(0))])
        return g.op("Add", [g.op("MatMul", [x_dq, w_dq]), b_dq])

    def layer_norm(self, module: str, x: str) -> str:
        eps = float(self.config.get("layer_norm_eps", 1e-12))
        return self.g.op("LayerNormalization", [x, self.g.const(f"{module}.weight", self.weight(f"{module}.weight")),
                                                self.g.const(f"{module}.bias", self.weight(f"{module}.bias"))],
                         axis=-1, epsilon=eps)

    def activation(self, x: str) -> str:
        g, act = self.g, self.config.get("hidden_act", "gelu")
        if act == "relu":
            return g.op("Relu", [x])
        if act == "gelu":  # exact: 0.5 x (1 + erf(x / sqrt 2)); ONNX Runtime fuses it into Gelu
            inner = g.op("Erf", [g.op("Div", [x, g.shared("sqrt2", np.float32(math.sqrt(2)))])])
        else:  # tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            cubic = g.op("Mul", [g.op("Pow", [x, g.shared("three", np.float32(3.0))]),
                                 g.shared("gelu_k", np.float32(0.044715))])
            inner = g.op("Tanh", [g.op("Mul", [g.op("Add", [x, cubic]),
                                               g.shared("gelu_c", np.float32(math.sqrt(2 / math.pi)))])])
        return g.op("Mul", [g.op("Mul", [x, g.shared("half", np.float32(0.5))]),
                            g.op("Add", [inner, g.shared("one", np.float32(1.0))])])

    def attention(self, prefix: str, x: str, mask: str) -> str:
        g, cfg = self.g, self.config
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg["hidden_size"]) // heads
        split = g.const(f"{prefix}.split_shape", np.array([0, 0, heads, head_dim], np.int64))
        merge = g.const(f"{prefix}.merge_shape", np.array([0, 0, heads * head_dim], np.int64))

        def heads_first(name, perm):
            return g.op("Transpose", [g.op("Reshape", [self.linear(f"{prefix}.self.{name}", x), split])], perm=perm)

        q = heads_first("query", [0, 2, 1, 3])
        k = heads_first("key", [0, 2, 3, 1])
        v = heads_first("value", [0, 2, 1, 3])
        scores = g.op("Mul", [g.op("MatMul", [q, k]), g.const(f"{prefix}.scale", np.float32(1 / math.sqrt(head_dim)))])
        probs = g.op("Softmax", [g.op("Add", [scores, mask])], axis=-1)
        context = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3]), merge])
        out = self.linear(f"{prefix}.output.dense", context)
        return self.layer_norm(f"{prefix}.output.LayerNorm", g.op("Add", [out, x]))

    # -- the model -----------------------------------------------------------------------------
    def build(self, num_labels: int):
        from onnx import TensorProto, helper

        g, cfg, p = self.g, self.config, self.prefix
        act = cfg.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise Q8Error(f"ONNX export: hidden_act {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise Q8Error(f"ONNX export: position_embedding_type {cfg['position_embedding_type']!r} is not supported")
        ids, mask, types = INPUTS
        # position ids 0..seq-1
        seq = g.op("Gather", [g.op("Shape", [ids]), g.const("one_index", np.int64(1))], axis=0)
        positions = g.op("Range", [g.const("zero_i64", np.int64(0)), seq, g.const("one_i64", np.int64(1))])
        e = f"{p}embeddings"
        h = g.op("Add", [g.op("Add", [self.embedding(f"{e}.word_embeddings", ids),
                                      self.embedding(f"{e}.position_embeddings", positions)]),
                         self.embedding(f"{e}.token_type_embeddings", types)])
        h = self.layer_norm(f"{e}.LayerNorm", h)
        # additive mask (batch, 1, 1, seq): 0 where attended, the float32 minimum where padded
        keep = g.op("Cast", [g.op("Unsqueeze", [mask, g.const("mask_axes", np.array([1, 2], np.int64))])],
                    to=TensorProto.FLOAT)
        additive = g.op("Mul", [g.op("Sub", [g.const("mask_one", np.float32(1.0)), keep]),
                                g.const("mask_min", np.float32(np.finfo(np.float32).min))])
        for i in range(int(cfg["num_hidden_layers"])):
            layer = f"{p}encoder.layer.{i}"
            h = self.attention(f"{layer}.attention", h, additive)
            inner = self.activation(self.linear(f"{layer}.intermediate.dense", h))
            h = self.layer_norm(f"{layer}.output.LayerNorm", g.op("Add", [self.linear(f"{layer}.output.dense", inner), h]))
        first = g.op("Gather", [h, g.const("first_token", np.int64(0))], axis=1)
        pooled = g.op("Tanh", [self.linear(f"{p}pooler.dense", first)])
        self.linear("classifier", pooled)
        g.nodes[-1].output[0] = "logits"  # the classifier's last node is the graph's output
        unused = sorted(set(self.w) - self.used - {f"{e}.position_ids", f"{e}.token_type_ids"})
        if unused:
            raise Q8Error(f"ONNX export: weight {unused[0]!r} has no place in a BERT sequence classifier")
        batch_seq = ["batch", "sequence"]
        graph = helper.make_graph(
            g.nodes, "q8bert", [helper.make_tensor_value_info(name, TensorProto.INT64, batch_seq) for name in INPUTS],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_labels])], g.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="q8bert")
        model.ir_version = IR_VERSION
        return model


def build_model(weights: dict[str, np.ndarray], config: dict, ranges: dict[str, float] | None = None,
                quantize_embeddings: bool = True):
    """The ONNX model (``onnx.ModelProto``) of a BERT sequence classifier.

    ``weights``: a Hugging Face ``BertForSequenceClassification`` state dict; ``config``: its
    ``config.json`` as a dict; ``ranges``: the EMA of max|x| per fully connected layer (by module
    name) for the int8 graph, ``None`` for float32.
    """
    num_labels = int(np.asarray(weights.get("classifier.weight", np.zeros((0, 0)))).shape[0])
    if not num_labels:
        raise Q8Error("ONNX export: the model has no classifier.weight (not a sequence classifier)")
    return _Builder(weights, config, ranges, quantize_embeddings).build(num_labels)


def integer_kernels(model_path: str) -> dict[str, int]:
    """Op types ONNX Runtime actually runs for the model, after its graph optimizations, with counts."""
    import os
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        counts: dict[str, int] = {}
        for node in onnx.load(options.optimized_model_filepath).graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
