"""Q8BERT quantized modules for PyTorch, matching :mod:`q8core.reference` bit for bit.

:class:`QuantizedLinear` *is* an ``nn.Linear`` and :class:`QuantizedEmbedding` *is* an
``nn.Embedding``: same parameters, same state-dict names. :func:`quantize_model` swaps them into
any loaded Hugging Face model by walking its modules, so nothing else about the model changes.

The fully quantized linear layer computes in the integer domain on float32 tensors holding
integers: ``acc = x_q · W_qᵀ + b_q``, ``y = acc / (S_W * S_x)``. That is the reference's int8 x
int8 -> int32 layer exactly, as long as the accumulator stays below 2^24 (always when
in_features · 127² < 2^24, i.e. in_features <= 1040, and in practice far beyond). The backward
pass is the straight-through estimator: gradients flow as if ``y = FQ(x) · FQ(W)ᵀ + b``.

In data-parallel training (:func:`sync_ranges`) each EMA update takes the batch max|x| over every
rank's rows (an all-reduce MAX), so all ranks keep the ranges a one-process run over the whole
global batch keeps; without a process group nothing is communicated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from q8core.spec import QuantSpec


def get_scale(threshold: torch.Tensor, qmax: int) -> torch.Tensor:
    """qmax / threshold in float32; 1 where the threshold is 0 (see q8core.reference.get_scale)."""
    threshold = threshold.to(torch.float32)
    safe = torch.where(threshold > 0, threshold, torch.ones_like(threshold))
    return torch.where(threshold > 0, torch.tensor(float(qmax), dtype=torch.float32, device=threshold.device) / safe,
                       torch.ones_like(threshold))


def quantize(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """clamp(round_half_even(x * S), -qmax, qmax), kept as float32 integers."""
    return torch.clamp(torch.round(x * scale), -qmax, qmax)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Dequantize(Quantize(x)) with no gradient of its own."""
    return quantize(x, scale, qmax) / scale


def asymmetric_params(lo: torch.Tensor, hi: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, z) of the uint8 grid over [min(lo, 0), max(hi, 0)], float32 (q8core.reference.asymmetric_params)."""
    lo = torch.clamp(lo.to(torch.float32), max=0.0)
    span = torch.clamp(hi.to(torch.float32), min=0.0) - lo
    scale = torch.where(span > 0, torch.tensor(float(levels), dtype=torch.float32, device=span.device)
                        / torch.where(span > 0, span, torch.ones_like(span)), torch.ones_like(span))
    return scale, torch.clamp(torch.round(-lo * scale), 0, levels)


def quantize_asymmetric(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, levels: int) -> torch.Tensor:
    """clamp(round_half_even(x * S) + z, 0, levels), kept as float32 integers."""
    return torch.clamp(torch.round(x * scale) + zero_point, 0, levels)


class InputGrid:
    """How one layer's input is quantized: ``scale`` and ``zero_point`` (0 on the symmetric grid) and the
    integer range; ``codes(x)`` are the integers, ``centred(x)`` the integers minus the zero point (what
    multiplies the weights), ``fake(x)`` the float32 value they stand for."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor | None, qmax: int) -> None:
        self.scale, self.zero_point, self.qmax = scale, zero_point, qmax

    def centred(self, x: torch.Tensor) -> torch.Tensor:
        if self.zero_point is None:
            return quantize(x, self.scale, self.qmax)
        return quantize_asymmetric(x, self.scale, self.zero_point, 2 * self.qmax + 1) - self.zero_point

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        return self.centred(x) / self.scale


def weight_scale(weight: torch.Tensor, qmax: int, per_channel: bool) -> torch.Tensor:
    """S_W from max|W| of the tensor (a scalar) or of each output row (shape (out, 1), to scale W's rows)."""
    weight = weight.detach()
    if per_channel:
        return get_scale(weight.abs().amax(dim=1, keepdim=True), qmax)
    return get_scale(weight.abs().max(), qmax)


def ste(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the value of ``quantized``, the gradient of ``x``."""
    return x + (quantized - x).detach()


def all_ranks_max(value: torch.Tensor) -> torch.Tensor:
    """``value`` replaced by its maximum over every rank of the process group, in place; as it is when
    no process group is initialised (a one-process run)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def ema_update(ema: torch.Tensor, value: torch.Tensor, decay: float) -> torch.Tensor:
    """decay * ema + (1 - decay) * value, float32, in the reference's order of operations."""
    d = torch.tensor(decay, dtype=torch.float32, device=ema.device)
    one_minus_d = torch.tensor(1.0 - decay, dtype=torch.float32, device=ema.device)
    return torch.add(torch.mul(d, ema), torch.mul(one_minus_d, value.to(torch.float32)))


class _IntegerLinear(torch.autograd.Function):
    """y = ((x_q - z) · W_qᵀ + b_q) / (S_W * S_x) forward; straight-through gradients backward. ``s_w`` is a
    scalar or one scale per output row (shape (out, 1))."""

    @staticmethod
    def forward(ctx, x, weight, bias, grid, s_w, qmax, bias_qmax):
        x_q, s_x = grid.centred(x), grid.scale
        w_q = quantize(weight, s_w, qmax)
        s_b = s_w.reshape(-1) * s_x
        b_q = None if bias is None else torch.clamp(torch.round(bias * s_b), -bias_qmax, bias_qmax)
        ctx.save_for_backward(x_q, w_q, s_x, s_w)
        ctx.has_bias = bias is not None
        return F.linear(x_q, w_q, b_q) / s_b

    @staticmethod
    def backward(ctx, grad):
        x_q, w_q, s_x, s_w = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(w_q / s_w)
        if ctx.needs_input_grad[1]:
            grad_w = grad.reshape(-1, grad.shape[-1]).t().matmul((x_q / s_x).reshape(-1, x_q.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None


class _QuantState:
    """EMA of max|input| and a count of training steps, as non-persistent buffers.

    They are saved separately (``quant_state.safetensors``) so the model's own state dict, and so
    its ``model.safetensors``, stays exactly the Hugging Face one.
    """

    #: Data-parallel training (:func:`sync_ranges`): the batch max|x| of every EMA update is the
    #: maximum over all ranks' rows, so every rank keeps the same ranges a one-process run over the
    #: whole global batch would.
    sync_ranges = False

    #: The buffers that hold the input's range: the EMA of max|x|, or of min x and max x (a linear layer on
    #: the asymmetric grid). Embeddings keep an unused ``input_ema`` so that their state stays as it was.
    range_names: tuple[str, ...] = ("input_ema",)
    #: max|x| known by construction (the spec's ``tanh_range``), which replaces the EMA; ``None``: the EMA
    fixed_range: float | None = None

    def _init_quant_state(self, spec: QuantSpec, device: torch.device) -> None:
        self.spec = spec
        for name in self.range_names:
            self.register_buffer(name, torch.zeros((), dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=device), persistent=False)

    @property
    def state_names(self) -> tuple[str, ...]:
        """What ``quant_state.safetensors`` holds for this module."""
        return (*self.range_names, "steps")

    def _quantizing_now(self) -> bool:
        """In training, count the step; false while the spec's start-step delay lasts (as in
        nlp-architect, the layer is plain float32 then and its EMA starts with the first quantized
        step)."""
        if not self.training:
            return True
        self.steps += 1
        return int(self.steps) > self.spec.start_step


class QuantizedLinear(_QuantState, nn.Linear):
    """``nn.Linear`` with 8-bit weights and inputs and an int32 bias (Q8BERT)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> "QuantizedLinear":
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        module.weight, module.bias = linear.weight, linear.bias
        module.train(linear.training)
        module.range_names = ("input_min", "input_max") if spec.asymmetric else ("input_ema",)
        module._init_quant_state(spec, linear.weight.device)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.mode == "fp32" or (spec.mode == "dq" and self.training) or not self._quantizing_now():
            return F.linear(x, self.weight, self.bias)
        qmax = spec.qmax
        s_w = weight_scale(self.weight, qmax, spec.per_channel_weights)
        if spec.quantize_activations:
            grid = self._input_grid(x)
        if spec.quantize_weights and spec.quantize_activations and (spec.quantize_bias or self.bias is None):
            return _IntegerLinear.apply(x, self.weight, self.bias, grid, s_w, qmax, spec.bias_qmax)
        # partial quantization: fake-quantize what the spec asks for, in float32
        weight = ste(self.weight, fake_quantize(self.weight, s_w, qmax)) if spec.quantize_weights else self.weight
        if spec.quantize_activations:
            x = ste(x, grid.fake(x))
        return F.linear(x, weight, self.bias)

    def _input_grid(self, x: torch.Tensor) -> InputGrid:
        """The input's grid, from its range: the EMA (updated first in training), or the batch's own in
        dynamic quantization and for a QAT layer that has not had a quantized training step."""
        batch = x.detach()
        live = self.spec.mode == "dq" or (not self.training and not self.ema_ready)
        if not self.spec.asymmetric:
            threshold = batch.abs().max() if live else self._track(batch.abs().max())
            return InputGrid(get_scale(threshold, self.spec.qmax), None, self.spec.qmax)
        if live:
            lo, hi = batch.min(), batch.max()
        else:
            lo = self._track(-batch.min(), "input_min", negated=True)
            hi = self._track(batch.max(), "input_max")
        scale, zero_point = asymmetric_params(lo, hi, 2 * self.spec.qmax + 1)
        return InputGrid(scale, zero_point, self.spec.qmax)

    def _track(self, batch_value: torch.Tensor, name: str = "input_ema", negated: bool = False) -> torch.Tensor:
        """In training, update the EMA buffer ``name`` with the batch's value (the first quantized step sets
        it) and return it; at inference, the stored EMA. ``negated``: ``batch_value`` is -min x (a maximum,
        so that data-parallel ranks all-reduce it with MAX), the buffer holds min x."""
        ema = getattr(self, name)
        if self.training and self.fixed_range is not None:  # known by construction: no estimate
            ema.fill_(-self.fixed_range if negated else self.fixed_range)
        elif self.training:
            if self.sync_ranges:
                batch_value = all_ranks_max(batch_value)
            value = -batch_value if negated else batch_value
            first = int(self.steps) == self.spec.start_step + 1  # the first quantized step sets it
            ema.copy_(value if first else ema_update(ema, value, self.spec.ema_decay))
        return ema

    @property
    def ema_ready(self) -> bool:
        return int(self.steps) > self.spec.start_step

    def input_range(self) -> float | tuple[float, float]:
        """The stored input range: the EMA of max|x|, or (EMA of min x, EMA of max x) on the asymmetric grid."""
        if self.spec.asymmetric:
            return float(self.input_min), float(self.input_max)
        return float(self.input_ema)


class QuantizedEmbedding(_QuantState, nn.Embedding):
    """``nn.Embedding`` whose looked-up rows are fake-quantized with the whole table's scale."""

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, spec: QuantSpec) -> "QuantizedEmbedding":
        module = cls(embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx,
                     max_norm=embedding.max_norm, norm_type=embedding.norm_type,
                     scale_grad_by_freq=embedding.scale_grad_by_freq, sparse=embedding.sparse, device="meta")
        module.weight = embedding.weight
        module.train(embedding.training)
        module._init_quant_state(spec, embedding.weight.device)
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = super().forward(ids)
        spec = self.spec
        if spec.mode == "fp32" or (spec.mode == "dq" and self.training) or not self._quantizing_now():
            return rows
        scale = get_scale(self.weight.detach().abs().max(), spec.qmax)
        return ste(rows, fake_quantize(rows.detach(), scale, spec.qmax))


def quantize_model(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Swap every ``nn.Linear`` (and, per the spec, ``nn.Embedding``) for its quantized twin, in place.

    Everything else (LayerNorm, GELU, Softmax, the attention matmuls) stays float32, and so do the
    inputs of the linear layers the spec's ``float_inputs`` names.
    """
    if not spec.quantized:
        return model
    spec.check_float_inputs([name for name, module in model.named_modules() if type(module) is nn.Linear])
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear and (spec.quantize_weights or spec.quantize_activations):
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                module = QuantizedLinear.from_linear(child, spec.for_layer(name))
                module.fixed_range = spec.fixed_range(name, model_type)
                setattr(parent, child_name, module)
            elif type(child) is nn.Embedding and spec.quantize_embeddings:
                setattr(parent, child_name, QuantizedEmbedding.from_embedding(child, spec))
    return model


def quantized_modules(model: nn.Module):
    """(name, module) for every quantized module, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantState)]


def sync_ranges(model: nn.Module, enabled: bool = True) -> None:
    """Make every quantized layer of ``model`` all-reduce (MAX) its batch max|x| across the ranks of
    the initialised process group before each EMA update (data-parallel training)."""
    for _, module in quantized_modules(model):
        module.sync_ranges = enabled
