"""A BERT sequence classifier as an ONNX graph, in float32 or in Q8BERT's int8 form.

Built node by node from a Hugging Face state dict (NumPy arrays, as any backend's ``hf`` export
writes it) and, for int8, the QAT activation ranges: no framework, no tracing, no calibration.

In both int8 forms every fully connected layer quantizes its input with the static scale ``S_x``
from the layer's EMA of max|x| (symmetric, saturating at +-127 as in the method), holds its weight
as int8 ``W_q`` with scale ``1/S_W`` and its bias as int32 ``b_q`` with scale ``1/(S_W * S_x)``;
``W_q`` and ``b_q`` are computed by :mod:`q8core.reference`, so they are bit for bit the training
backends' int8 values. Embedding tables are stored as int8 and dequantized after the lookup
(``Gather -> DequantizeLinear``); LayerNorm, GELU, Softmax and the two attention matmuls stay in
float32, as in the paper. The two forms:

- ``ort`` (the default, what ``q8 export --format onnx-int8`` writes): the integer kernels and the
  fused float ops of ONNX Runtime's ``com.microsoft`` domain, written out directly:
  ``QuantizeLinear`` (uint8, zero point 128) -> ``MatMulIntegerToFloat`` (int8 weight, bias) per
  layer, ``MultiHeadAttention`` for softmax(Q·Kᵀ/√d + mask)·V and ``Gelu``. What each choice buys
  is said where it is made (:class:`_Builder`). Together, at sequence length 128 on one thread
  (AMD EPYC with AVX-512 VNNI, CPU time per call, ONNX Runtime 1.32), against the ``qdq`` form:
  BERT-base 72 ms instead of 77 at batch 1 and 560 instead of 616 at batch 8, MiniLM-L6 11.8
  instead of 13.2 and 93 instead of 112 (torch FP32 eager: 292 and 2022 ms, 45 and 297 ms; ONNX
  Runtime's own dynamic int8: 84 and 670 ms, 15.3 and 123 ms); and ONNX Runtime runs 339 nodes
  per call instead of 554, each parallel one a synchronisation of its thread pool. The integer
  matmuls are 75% of the time (about 200 GMAC/s per core, against 54 for ONNX Runtime's float32
  MatMul), the float attention 12-15%.
- ``qdq``: standard ONNX only (``QuantizeLinear -> DequantizeLinear -> MatMul <- DequantizeLinear``),
  for any runtime; ONNX Runtime rewrites each pair into ``MatMulIntegerToFloat`` itself.

:func:`integer_kernels` lists the kernels ONNX Runtime actually runs, from the optimized graph.

Where ONNX's arithmetic differs from the reference: ``QuantizeLinear`` divides by ``1/S_x`` instead of
multiplying by ``S_x``; the two can differ in the last bit, which moves a rounding tie on rare values.
The integer kernels scale the int32 accumulator to float32 and then add the dequantized bias
(``acc · (1/S_W)(1/S_x) + b_q · 1/(S_W S_x)``), which can differ from ``(acc + b_q) / (S_W S_x)`` in the
last bit. ``q8 eval`` on the export measures the effect
on a dev set.
"""

from __future__ import annotations

import math

import numpy as np

from . import reference
from .errors import Q8Error
from .spec import QuantSpec

OPSET = 17  # LayerNormalization
IR_VERSION = 9
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: ``hidden_act`` values the graph implements (Hugging Face's names).
ACTIVATIONS = ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh")
#: The int8 forms :func:`build_model` writes (see the module docstring).
FORMS = ("ort", "qdq")
#: Ops ONNX Runtime runs an int8 fully connected layer with (the ``ort`` form writes
#: ``MatMulIntegerToFloat``; the ``qdq`` form becomes it in ONNX Runtime's QDQ rewrite).
INTEGER_OPS = ("MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul",
               "QGemm", "QAttention")
#: A lower bound of GELU over the reals (its minimum is -0.16997 at x = -0.7518; the tanh
#: approximation's is -0.17004): the FFN output layer's input cannot quantize below the method's
#: -127 when -0.171 * S_x >= -127 (an EMA range above 0.171), so that layer needs no clamp.
GELU_MIN = -0.171


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
        """A constant used by many nodes, added once."""
        if name not in self._shared:
            self._shared.add(name)
            self.const(name, value)
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        """A standard ONNX node; its output's name."""
        self._count += 1
        out = name or f"{op_type.lower()}_{self._count}"
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=f"{out}_node", **attrs))
        return out

    def ms(self, op_type: str, inputs: list[str], **attrs) -> str:
        """An ONNX Runtime contrib node (``com.microsoft`` domain)."""
        out = self.op(op_type, inputs, **attrs)
        self.nodes[-1].domain = MS_DOMAIN
        return out


class _Builder:
    def __init__(self, weights: dict[str, np.ndarray], config: dict, ranges: dict | None,
                 quantize_embeddings: bool, form: str, float_inputs: tuple[str, ...] = (),
                 per_channel: bool = False) -> None:
        self.w = weights
        self.per_channel = per_channel
        self.float_spec = QuantSpec(float_inputs=float_inputs if ranges is not None else ())
        self.config = config
        self.ranges = ranges  # None: float32 graph
        self.quantize_embeddings = quantize_embeddings and ranges is not None
        self.ort = ranges is not None and form == "ort"  # write ONNX Runtime's fused ops
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

    def input_params(self, module: str) -> tuple[np.float32, int | None]:
        """(S_x, z) of a fully connected layer's input, from its EMA range: z ``None`` on the symmetric grid."""
        if module not in self.ranges:
            raise Q8Error(f"ONNX int8 export: layer {module} has no QAT activation range (EMA); was the "
                          f"checkpoint trained past its quantization delay?")
        return reference.input_params(self.ranges[module])

    def input_scale(self, module: str) -> np.float32:
        return self.input_params(module)[0]

    def int8_weight(self, module: str) -> tuple[str, str, str, np.ndarray]:
        """The layer's int8 weight (transposed to [in, out]), its scale(s) 1/S_W and zero point(s), as
        initializers (one per tensor, or one per output column with per-channel weights), and S_W itself."""
        g = self.g
        w_q, s_w = reference.quantize_weight(self.weight(f"{module}.weight"), per_channel=self.per_channel)
        zero = np.zeros(s_w.shape, np.int8) if self.per_channel else np.int8(0)
        return (g.const(f"{module}.weight_int8", np.ascontiguousarray(w_q.T)),
                g.const(f"{module}.weight_scale", (np.float32(1) / s_w).astype(np.float32)),
                g.const(f"{module}.weight_zero", zero), s_w)

    def int8_parameters(self, module: str) -> tuple[str, str, str, str]:
        """:meth:`int8_weight` and the bias dequantized from int32: the reference's values, as initializers."""
        g = self.g
        w_q, w_scale, w_zero, s_w = self.int8_weight(module)
        s_x = self.input_scale(module)
        b_q = reference.quantize_bias(self.weight(f"{module}.bias"), s_w, s_x)
        s_b = reference.bias_scale(s_w, s_x)
        bias_dq = g.op("DequantizeLinear", [g.const(f"{module}.bias_int32", b_q),
                                            g.const(f"{module}.bias_scale", (np.float32(1) / s_b).astype(np.float32)),
                                            g.const(f"{module}.bias_zero", np.zeros(s_b.shape, np.int32))],
                       **({"axis": 0} if self.per_channel else {}))
        return w_q, w_scale, w_zero, bias_dq

    def quantize_input(self, module: str, x: str, lower: float | None = None) -> str:
        """``x_q = clamp(round(x * S_x), -127, 127) + 128`` as uint8 (``ort`` form).

        uint8 with zero point 128 is the same grid as int8 with zero point 0, and the one ONNX
        Runtime's x86 kernels multiply fast (VNNI's u8·s8 dot product): ``MatMulIntegerToFloat`` on
        BERT-base shapes ran at 200 GMAC/s per core with uint8 activations and 16 GMAC/s with int8
        ones. (The ``qdq`` form may use int8: ONNX Runtime converts it to uint8 itself.)
        ``QuantizeLinear`` saturates to [0, 255], i.e. -128; a ``Clip`` of the uint8 result to
        [1, 255] gives the method's -127 (0.04 ms per 1024x768 tensor against 0.22 ms for a float
        ``Clip`` before quantizing). ``lower``: a bound the input cannot go below (GELU's minimum,
        tanh's -1); when it cannot reach -127 the clip is left out.
        """
        g = self.g
        x_q = g.op("QuantizeLinear", [x, *self.input_grid(module)])
        if self.input_params(module)[1] is not None:  # the asymmetric grid: saturating to [0, 255] is its clamp
            return x_q
        if lower is not None and lower * float(self.input_scale(module)) >= -reference.qmax(8):
            return x_q  # x >= lower quantizes to >= -127, half a step to spare for QuantizeLinear's 1/S_x
        return g.op("Clip", [x_q, g.shared("uint8_min", np.uint8(128 - reference.qmax(8)))])

    def input_grid(self, module: str) -> tuple[str, str]:
        """The layer's input scale ``1/S_x`` and uint8 zero point (128 on the symmetric grid, z on the
        asymmetric one), as initializers (added once)."""
        s_x, zero_point = self.input_params(module)
        return (self.g.shared(f"{module}.input_scale", np.float32(1 / s_x)),
                self.g.shared(f"{module}.input_zero", np.uint8(128 if zero_point is None else zero_point)))

    def float_input(self, module: str) -> bool:
        """Whether the spec's ``float_inputs`` keeps this layer's input float32 (weights int8)."""
        return self.float_spec.float_input(module)

    def weight_only_linear(self, module: str, x: str) -> str:
        """A ``float_inputs`` layer: its int8 weight (the reference's values) times 1/S_W, a float32 MatMul
        on the float32 input, the float32 bias.

        Cast and Mul rather than DequantizeLinear: ONNX Runtime fuses DequantizeLinear -> MatMul into
        ``MatMulNBits``, which by default quantizes the input to 8 bits on the fly (logits 1% off on the
        tiny test model) -- the opposite of a float input. Cast and Mul of initializers fold into one
        float32 weight when the session starts; the file keeps the int8 values."""
        from onnx import TensorProto

        g = self.g
        w_q, w_scale, _, _ = self.int8_weight(module)
        w = g.op("Mul", [g.op("Cast", [w_q], to=TensorProto.FLOAT), w_scale])
        return g.op("Add", [g.op("MatMul", [x, w]), g.const(f"{module}.bias", self.weight(f"{module}.bias"))])

    def linear(self, module: str, x: str, x_q: str | None = None, lower: float | None = None) -> str:
        """A fully connected layer: float32, or int8 in the builder's form. ``x_q``: the input
        already quantized (``ort`` form; Q, K and V share one ``QuantizeLinear``); ``lower``: see
        :meth:`quantize_input`."""
        g = self.g
        if self.ranges is None:
            weight, bias = self.weight(f"{module}.weight"), self.weight(f"{module}.bias")
            y = g.op("MatMul", [x, g.const(f"{module}.weight_t", np.ascontiguousarray(weight.T))])
            return g.op("Add", [y, g.const(f"{module}.bias", bias)])
        if self.float_input(module):
            return self.weight_only_linear(module, x)
        if not self.ort:
            return self.qdq_linear(module, x)
        x_q = x_q or self.quantize_input(module, x, lower)
        w_q, w_scale, w_zero, bias = self.int8_parameters(module)
        # the bias goes in as the kernel's bias input, added to each output tile while in cache: the
        # qdq graph's separate Adds (biases and residuals) took 4.6% of the time at batch 8, the
        # residual Adds left here 1.5%. The bias stays int32 in the file, as the method has it: its
        # DequantizeLinear runs on every call (ONNX Runtime does not fold it), about 1% at batch 1
        x_scale, x_zero = self.input_grid(module)
        return g.ms("MatMulIntegerToFloat", [x_q, w_q, x_scale, w_scale, x_zero, w_zero, bias])

    def qdq_linear(self, module: str, x: str) -> str:
        """The layer in standard QDQ form, which ONNX Runtime rewrites into ``MatMulIntegerToFloat``."""
        g = self.g
        s_x, zero_point = self.input_params(module)
        x_scale = g.const(f"{module}.input_scale", np.float32(1 / s_x))
        # a Q -> DQ pair per layer, even where layers share an input (Q, K, V): ONNX Runtime rewrites
        # DQ -> MatMul into an integer kernel only when each node of the pair has one consumer
        if zero_point is None:
            zero = g.const(f"{module}.input_zero", np.int8(0))
            # clamp to the EMA range first: QuantizeLinear alone would saturate to -128, the method to -127
            limit = np.float32(reference.qmax(8)) / s_x
            x = g.op("Clip", [x, g.const(f"{module}.input_min", -limit), g.const(f"{module}.input_max", limit)])
        else:  # uint8: saturating to [0, 255] is the grid's own clamp
            zero = g.const(f"{module}.input_zero", np.uint8(zero_point))
        x_dq = g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, x_scale, zero]), x_scale, zero])
        w_q, w_scale, w_zero, bias = self.int8_parameters(module)
        w_dq = g.op("DequantizeLinear", [w_q, w_scale, w_zero], **({"axis": 1} if self.per_channel else {}))
        return g.op("Add", [g.op("MatMul", [x_dq, w_dq]), bias])

    def layer_norm(self, module: str, x: str) -> str:
        # (ONNX Runtime 1.32's fused SkipLayerNormalization would take the residual Add in, but on
        # CPU it ran 5x slower than Add + LayerNormalization (4.0 against 0.8 ms per 1024x768) and
        # computes the variance in one pass, less accurately; neither form lets ONNX Runtime fuse it)
        eps = float(self.config.get("layer_norm_eps", 1e-12))
        return self.g.op("LayerNormalization", [x, self.g.const(f"{module}.weight", self.weight(f"{module}.weight")),
                                                self.g.const(f"{module}.bias", self.weight(f"{module}.bias"))],
                         axis=-1, epsilon=eps)

    def activation(self, x: str) -> str:
        g, act = self.g, self.config.get("hidden_act", "gelu")
        if act == "relu":
            return g.op("Relu", [x])
        if self.ort:  # ONNX Runtime's own kernel (the qdq graph's ops become BiasGelu there: 7% of the
            return g.ms("Gelu" if act == "gelu" else "FastGelu", [x])  # time, Gelu 4% with the bias moved)
        if act == "gelu":  # exact: 0.5 x (1 + erf(x / sqrt 2)); ONNX Runtime fuses it into Gelu
            inner = g.op("Erf", [g.op("Div", [x, g.shared("sqrt2", np.float32(math.sqrt(2)))])])
        else:  # tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            cubic = g.op("Mul", [g.op("Pow", [x, g.shared("three", np.float32(3.0))]),
                                 g.shared("gelu_k", np.float32(0.044715))])
            inner = g.op("Tanh", [g.op("Mul", [g.op("Add", [x, cubic]),
                                               g.shared("gelu_c", np.float32(math.sqrt(2 / math.pi)))])])
        return g.op("Mul", [g.op("Mul", [x, g.shared("half", np.float32(0.5))]),
                            g.op("Add", [inner, g.shared("one", np.float32(1.0))])])

    def attention(self, prefix: str, x: str, mask) -> str:
        g, cfg = self.g, self.config
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg["hidden_size"]) // heads
        names = [f"{prefix}.self.{name}" for name in ("query", "key", "value")]
        if self.ort:
            # Q, K and V see the same input and so have the same EMA range: one QuantizeLinear feeds
            # the three integer kernels (layers whose ranges differ get their own)
            x_q = {}
            for name in (n for n in names if not self.float_input(n)):
                twin = next((other for other in x_q if self.ranges[other] == self.ranges[name]), None)
                x_q[name] = x_q[twin] if twin else self.quantize_input(name, x)
            q, k, v = (self.linear(name, x, x_q=x_q.get(name)) for name in names)
            context = self.multi_head_attention(q, k, v, mask, heads)
        else:
            split = g.const(f"{prefix}.split_shape", np.array([0, 0, heads, head_dim], np.int64))
            merge = g.const(f"{prefix}.merge_shape", np.array([0, 0, heads * head_dim], np.int64))

            def heads_first(name, perm):
                return g.op("Transpose", [g.op("Reshape", [self.linear(name, x), split])], perm=perm)

            q, k, v = (heads_first(name, perm) for name, perm in zip(names, ([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3])))
            scores = g.op("Mul", [g.op("MatMul", [q, k]), g.const(f"{prefix}.scale", np.float32(1 / math.sqrt(head_dim)))])
            probs = g.op("Softmax", [g.op("Add", [scores, mask])], axis=-1)
            context = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3]), merge])
        out = self.linear(f"{prefix}.output.dense", context)
        return self.layer_norm(f"{prefix}.output.LayerNorm", g.op("Add", [out, x]))

    def multi_head_attention(self, q: str, k: str, v: str, mask: tuple[str, str], heads: int) -> str:
        """softmax(Q·Kᵀ/√d + mask)·V in float32 by ``MultiHeadAttention``, heads split and merged inside.

        One node for the eleven of the standard graph (reshapes, transposes, scale, mask, softmax):
        about as fast on one thread (1% at batch 8), and ten fewer synchronisations of the thread
        pool per layer. Given a key padding mask, ONNX Runtime computes the scores, the softmax and
        the product one after the other; without one, in its flash-attention kernel (blocks kept in
        L2). So an ``If`` on "no key is padded" (batch 1, or rows of equal length) drops the mask:
        the whole model 5% faster on BERT-base and 9% on MiniLM at batch 8, and 1.5% and 6% at
        batch 1, where the ``If`` itself (about 0.07 ms per layer) takes back part of it.
        """
        from onnx import TensorProto, helper

        g = self.g
        padding, none_padded = mask
        out = g.op("If", [none_padded])
        for branch, key_padding in (("then_branch", ""), ("else_branch", padding)):
            node = helper.make_node("MultiHeadAttention", [q, k, v, "", key_padding], [f"{out}_{branch}"],
                                    name=f"{out}_{branch}_node", domain=MS_DOMAIN, num_heads=heads)
            body = helper.make_graph([node], f"{out}_{branch}", [], [
                helper.make_tensor_value_info(f"{out}_{branch}", TensorProto.FLOAT, None)])
            g.nodes[-1].attribute.append(helper.make_attribute(branch, body))
        return out

    def attention_mask(self, mask: str):
        """The mask as the attention takes it. ``ort`` form: the 0/1 key padding mask as int32 for
        ``MultiHeadAttention`` (padded keys get -10000 before the softmax, which underflows to the
        same 0 as below), and whether no key is padded. Else additive (batch, 1, 1, seq): 0 where
        attended, the float32 minimum where padded."""
        from onnx import TensorProto

        g = self.g
        if self.ort:
            none_padded = g.op("Cast", [g.op("ReduceMin", [mask], keepdims=0)], to=TensorProto.BOOL)
            return g.op("Cast", [mask], to=TensorProto.INT32), none_padded
        keep = g.op("Cast", [g.op("Unsqueeze", [mask, g.const("mask_axes", np.array([1, 2], np.int64))])],
                    to=TensorProto.FLOAT)
        return g.op("Mul", [g.op("Sub", [g.const("mask_one", np.float32(1.0)), keep]),
                            g.const("mask_min", np.float32(np.finfo(np.float32).min))])

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
        mask = self.attention_mask(mask)
        # the inputs of the FFN's output layer (GELU's) and of the classifier (tanh's) are bounded below
        act_min = 0.0 if act == "relu" else GELU_MIN
        for i in range(int(cfg["num_hidden_layers"])):
            layer = f"{p}encoder.layer.{i}"
            h = self.attention(f"{layer}.attention", h, mask)
            inner = self.activation(self.linear(f"{layer}.intermediate.dense", h))
            out = self.linear(f"{layer}.output.dense", inner, lower=act_min)
            h = self.layer_norm(f"{layer}.output.LayerNorm", g.op("Add", [out, h]))
        first = g.op("Gather", [h, g.const("first_token", np.int64(0))], axis=1)
        pooled = g.op("Tanh", [self.linear(f"{p}pooler.dense", first)])
        self.linear("classifier", pooled, lower=-1.0)
        g.nodes[-1].output[0] = "logits"  # the classifier's last node is the graph's output
        unused = sorted(set(self.w) - self.used - {f"{e}.position_ids", f"{e}.token_type_ids"})
        if unused:
            raise Q8Error(f"ONNX export: weight {unused[0]!r} has no place in a BERT sequence classifier")
        batch_seq = ["batch", "sequence"]
        graph = helper.make_graph(
            g.nodes, "q8bert", [helper.make_tensor_value_info(name, TensorProto.INT64, batch_seq) for name in INPUTS],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_labels])], g.initializers)
        opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(MS_DOMAIN, 1)] if self.ort else [])
        model = helper.make_model(graph, opset_imports=opsets, producer_name="q8bert")
        model.ir_version = IR_VERSION
        return model


def build_model(weights: dict[str, np.ndarray], config: dict, ranges: dict | None = None,
                quantize_embeddings: bool = True, form: str = "ort", float_inputs: tuple[str, ...] = (),
                per_channel: bool = False):
    """The ONNX model (``onnx.ModelProto``) of a BERT sequence classifier.

    ``weights``: a Hugging Face ``BertForSequenceClassification`` state dict; ``config``: its
    ``config.json`` as a dict; ``ranges``: the EMA of max|x| per fully connected layer (by module
    name; a ``(min, max)`` pair for an input on the asymmetric grid) for the int8 graph, ``None`` for
    float32; ``form``: the int8 graph's form, ``"ort"``
    (ONNX Runtime's fused ops, the fast one) or ``"qdq"`` (standard ONNX), see the module docstring;
    ``float_inputs``: the spec's patterns of layers whose inputs stay float32 (int8 weights dequantized
    into a float32 MatMul); ``per_channel``: one weight scale per output row (the spec's
    ``per_channel_weights``).
    """
    if form not in FORMS:
        raise Q8Error(f"ONNX export: unknown int8 form {form!r} (known: {', '.join(FORMS)})")
    num_labels = int(np.asarray(weights.get("classifier.weight", np.zeros((0, 0)))).shape[0])
    if not num_labels:
        raise Q8Error("ONNX export: the model has no classifier.weight (not a sequence classifier)")
    return _Builder(weights, config, ranges, quantize_embeddings, form, tuple(float_inputs),
                    per_channel).build(num_labels)


def integer_kernels(model_path: str) -> dict[str, int]:
    """Op types ONNX Runtime actually runs for the model, after its graph optimizations, with counts
    (nodes of both branches of an ``If`` counted)."""
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
        graphs = [onnx.load(options.optimized_model_filepath).graph]
        while graphs:  # the main graph and the branches of its If nodes
            for node in graphs.pop().node:
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
                graphs.extend(attr.g for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH)
    return counts
