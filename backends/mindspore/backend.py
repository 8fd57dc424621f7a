"""The MindSpore backend: the hand-written BERT of :mod:`.bert` with Q8BERT cells, trained with AdamW.

Execution mode: **graph by default**. The train step (forward, backward, clipping, AdamW) and the predict
step are each compiled once with ``mindspore.jit`` under ``mindspore.enable_dynamic`` (batch and sequence
axes ``None``), so one compilation serves every batch shape and ``dynamic_shapes`` is True: the trainer
may trim batches to their longest row. Measured on the 2-layer hidden-32 test model, batch 16, on this
2-core CPU (shared with other jobs): graph 0.09-0.11 s/step after a one-off 6-10 s compilation, PyNative
2.7 s/step (0.5-3 s, op-by-op dispatch dominates), predict 0.01-0.02 s vs 0.5-0.7 s per batch. Set
``Q8_MS_MODE=pynative`` to run op by op (debugging).

Checkpoint folder: ``model.ckpt`` (``mindspore.save_checkpoint``: weights under their Hugging Face
names plus every quantized cell's ``input_ema`` / ``steps``) and an HF-style ``config.json``.
Exports: ``hf`` (``model.safetensors`` + ``config.json``, loads in transformers), ``mindir``
(``model.mindir``, the inference graph for a fixed input shape, see :data:`EXPORT_SHAPE`) and ``air``
(Ascend only).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import Tensor

from q8core.backend import Backend
from q8core.distributed import SINGLE
from q8core.errors import Q8Error
from q8core.spec import QuantSpec

from . import cpu_kernels
from . import device as devices
from . import parallel
from . import sink
from .bert import BertConfig, BertForSequenceClassification, DropoutMasks, LossCell
from .optim import AdamW, linear_schedule, no_weight_decay
from .quantization import QuantDense, QuantEmbedding, quantized_cells, set_phase
from .weights import CONFIG_FILE, load_weights, read_config, read_state_dict, resolve_folder, save_hf, write_config

CHECKPOINT_FILE = "model.ckpt"
#: What ``--resume`` needs beyond ``model.ckpt``: AdamW moments (float32 tensors) and, in the metadata, the
#: optimizer and schedule step counts and the dropout generator's state.
TRAINING_STATE_FILE = "training_state.safetensors"
MINDIR_FILE = "model.mindir"
#: ``--mode`` of execution: ``graph`` compiles the train and predict steps with ``mindspore.jit``,
#: ``pynative`` runs them op by op. Override with the environment variable ``Q8_MS_MODE``.
DEFAULT_EXECUTION_MODE = "graph"
EXECUTION_MODE_ENV = "Q8_MS_MODE"
#: The fixed input shape of an exported MINDIR graph: (batch, sequence); the sequence length is capped at
#: the model's ``max_position_embeddings``. Inputs are int32; pad a batch to this shape to run it.
EXPORT_SHAPE = (1, 128)
FEATURES = ("input_ids", "attention_mask", "token_type_ids")
MASKS = (("hidden_masks", 4), ("probs_masks", 5), ("classifier_mask", 2))  # DropoutMasks.draw, with ranks


def execution_mode() -> str:
    mode = os.environ.get(EXECUTION_MODE_ENV, DEFAULT_EXECUTION_MODE).strip().lower()
    if mode not in ("graph", "pynative"):
        raise Q8Error(f"{EXECUTION_MODE_ENV}={mode!r}: expected graph or pynative")
    return mode


class InferenceCell(ms.nn.Cell):
    """The model in inference mode, int32 inputs -> logits: what ``predict`` runs and ``export`` writes."""

    def __init__(self, model: BertForSequenceClassification) -> None:
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids, attention_mask, token_type_ids)


class MindSporeBackend(Backend):
    name = "mindspore"
    aliases = ("ms",)
    devices = ("cpu", "gpu", "ascend")
    dynamic_shapes = True
    export_formats = ("mindir", "air", "hf")
    resumable = True
    distributed = True  # under msrun (see .parallel)

    def __init__(self, model: BertForSequenceClassification, hf_config: dict, spec: QuantSpec, device: str,
                 seed: int = 0) -> None:
        self.model = model
        self.hf_config = hf_config
        self.spec = spec
        self.device = device
        self.mode = execution_mode()
        self.regression = model.regression
        self.optimizer = None
        self._step = 0
        self._predict_fn = None
        self._update_fn = None
        self._make_grad_step = None  # a new (uncompiled) gradient step function per call
        self._step_fns = {}  # ("grad" | "shard", quantization phase) -> the compiled gradient step
        self._data_parallel = False
        self.dropout = DropoutMasks(model.config, seed)

    @classmethod
    def check_options(cls, options):
        sink.check(options)

    def set_options(self, options):
        super().set_options(options)
        message = sink.note(options, devices.parse(self.device)[0])
        if message:
            print(f"q8: note: {message}", file=sys.stderr)

    @classmethod
    def framework_version(cls) -> str:
        return f"mindspore {ms.__version__}"

    @classmethod
    def check_device(cls, device: str) -> None:
        super().check_device(device)
        devices.check(device)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def _build(cls, hf_config: dict, spec: QuantSpec, device: str, where: str) -> BertForSequenceClassification:
        if devices.select(device) == "CPU":
            cpu_kernels.load()
        return BertForSequenceClassification(BertConfig.from_dict(hf_config, where), spec)

    @classmethod
    def from_pretrained(cls, source, *, labels, spec, device, seed):
        folder = resolve_folder(str(source))
        hf_config = read_config(folder)
        if labels is None:
            hf_config.update(num_labels=1, problem_type="regression", id2label={"0": "LABEL_0"},
                             label2id={"LABEL_0": 0})
        else:
            hf_config.update(num_labels=len(labels), problem_type="single_label_classification",
                             id2label={str(i): label for i, label in enumerate(labels)},
                             label2id={label: i for i, label in enumerate(labels)})
        hf_config["architectures"] = ["BertForSequenceClassification"]
        model = cls._build(hf_config, spec, device, str(folder / CONFIG_FILE))
        load_weights(model, read_state_dict(folder), seed=seed,
                     initializer_range=float(hf_config.get("initializer_range", 0.02)), where=str(folder))
        return cls(model, hf_config, spec, device, seed)

    @classmethod
    def from_checkpoint(cls, path, *, spec, device):
        path = Path(path)
        hf_config = read_config(path)
        model = cls._build(hf_config, spec, device, str(path / CONFIG_FILE))
        file = path / CHECKPOINT_FILE
        if not file.is_file():
            raise Q8Error(f"{path}: no {CHECKPOINT_FILE} (not a MindSpore checkpoint)")
        try:
            stored = ms.load_checkpoint(str(file))
        except (RuntimeError, ValueError, OSError) as exc:
            raise Q8Error(f"{file}: unreadable MindSpore checkpoint ({type(exc).__name__})") from None
        for name, param in model.parameters_and_names():
            if name in stored:
                value = stored[name].asnumpy()
                if tuple(value.shape) != tuple(param.shape):
                    raise Q8Error(f"{file}: parameter {name} has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(param.shape)}")
                param.set_data(Tensor(value, param.dtype))
            elif param.requires_grad:
                raise Q8Error(f"{file}: missing weight {name}")
            elif spec.mode == "qat" and name.endswith(".input_ema"):  # dq measures every batch instead
                raise Q8Error(f"{path}: no QAT activation ranges in {CHECKPOINT_FILE}; "
                              f"a checkpoint trained without QAT evaluates with --mode fp32 or dq")
        return cls(model, hf_config, spec, device)

    # -- compiled (or not) steps -------------------------------------------------------------------
    def _compile(self, fn, labels_dtype=None):
        """``fn`` as a graph (in graph mode) whose batch and sequence axes are dynamic: one compilation
        serves every batch shape."""
        if self.mode != "graph":
            return fn
        compiled = ms.jit(fn)
        dims = {name: Tensor(shape=[None, None], dtype=ms.int32) for name in FEATURES}
        if labels_dtype is not None:
            dims["labels"] = Tensor(shape=[None], dtype=labels_dtype)
            dims.update((name, Tensor(shape=[None] * rank, dtype=ms.float32)) for name, rank in MASKS)
        return ms.enable_dynamic(**dims)(compiled)

    def _inputs(self, batch: dict[str, np.ndarray]) -> list[Tensor]:
        return [Tensor(np.ascontiguousarray(batch[name], dtype=np.int32)) for name in FEATURES]

    # -- training ----------------------------------------------------------------------------
    def configure_optimizer(self, *, learning_rate, weight_decay, warmup_steps, total_steps, adam_epsilon,
                            max_grad_norm):
        named = [(name, p) for name, p in self.model.parameters_and_names() if p.requires_grad]
        params = [p for _, p in named]
        self.optimizer = AdamW(params, [not no_weight_decay(name) for name, _ in named], eps=adam_epsilon,
                               max_grad_norm=max_grad_norm)
        self.base_lr, self.weight_decay = float(learning_rate), float(weight_decay)
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)
        self._step = 0
        loss_cell = LossCell(self.model)
        grad_fn = ms.value_and_grad(loss_cell, None, self.optimizer.params, has_aux=True)
        optimizer = self.optimizer

        embeddings = [cell for _, cell in quantized_cells(self.model) if isinstance(cell, QuantEmbedding)]

        hidden_on, probs_on, classifier_on = self.dropout.active

        def make_grad_step():
            # a fresh function object for each compilation: MindSpore keys compiled graphs by the function
            def grad_step(input_ids, attention_mask, token_type_ids, labels, hidden_masks, probs_masks,
                          classifier_mask):
                for cell in embeddings:
                    cell.refresh_scale()
                (loss, _), grads = grad_fn(input_ids, attention_mask, token_type_ids, labels,
                                           hidden_masks if hidden_on else None, probs_masks if probs_on else None,
                                           classifier_mask if classifier_on else None)
                return loss, optimizer.pack(grads)

            return grad_step

        def update_step(grads, *scalars):
            return optimizer(grads, *scalars)

        self._make_grad_step = make_grad_step
        self._step_fns = {}
        self._update_fn = ms.jit(update_step) if self.mode == "graph" else update_step

    def _phase(self) -> str | None:
        """Which side of the spec's quantization delay (``--quant-delay``) the next training step is on:
        ``"delay"`` (float32 layers, step counting only) or ``"active"`` (quantized); ``None`` without a delay.

        Each side gets its own compiled gradient step (:func:`.quantization.set_phase`): one graph that
        selected between the two per step would compute both, doubling a QAT step for the whole run."""
        if self.spec.mode != "qat" or not self.spec.start_step:
            return None
        return "delay" if self._step < self.spec.start_step else "active"

    def _gradient_step(self, kind: str):
        """The compiled gradient step (``"grad"``, or ``"shard"`` under msrun) for the next step's phase;
        compiled on first use, with the quantized cells set to that phase."""
        phase = self._phase()
        set_phase(self.model, phase)
        fn = self._step_fns.get((kind, phase))
        if fn is None:
            step = self._make_grad_step()
            if kind == "shard":
                step = parallel.shard_step(step)
            fn = self._step_fns[kind, phase] = self._compile(step, ms.float32 if self.regression else ms.int32)
        return fn

    def train_step(self, batch):
        if self.optimizer is None:
            raise RuntimeError("configure_optimizer() must be called before train_step()")
        return self._train(self._gradient_step("grad"), batch)

    def _train(self, grad_fn, batch, *extra):
        """One optimizer step: ``grad_fn`` (features, labels, dropout masks, ``*extra``) -> (loss, packed
        gradients), then the update."""
        self.model.set_train(True)
        labels = np.asarray(batch["labels"])
        labels = Tensor(labels.astype(np.float32) if self.regression else labels.astype(np.int32))
        masks = [Tensor(mask) for mask in self.dropout.draw(*np.shape(batch["input_ids"]))]
        loss, grads = grad_fn(*self._inputs(batch), labels, *masks, *extra)
        self._update_fn(ms.mutable(grads), *self.optimizer.scalars(self.learning_rate(), self.weight_decay))
        self._step += 1
        return float(loss.asnumpy())

    def learning_rate(self):
        if self.optimizer is None:
            return 0.0
        return self.base_lr * linear_schedule(self._step, self.warmup_steps, self.total_steps)

    # -- data parallelism (msrun; the collectives are in .parallel) -----------------------------
    @classmethod
    def rank_device(cls, device, env):
        return parallel.rank_device(device, env)

    @classmethod
    def init_distributed(cls, env, device):
        return parallel.join(env, device)

    @classmethod
    def shutdown_distributed(cls):
        parallel.leave()

    @classmethod
    def barrier(cls):
        parallel.barrier()

    @classmethod
    def broadcast_object(cls, obj, src=0):
        return parallel.broadcast_object(obj, src)

    def enable_data_parallel(self, env):
        """Rank 0's weights, moments and dropout state everywhere; the quantized Dense cells take the
        all-rank batch max|x|; each rank its own dropout masks; the data-parallel gradient step (compiled
        on its first call) sums the share-weighted gradients over ranks."""
        if self.optimizer is None:
            raise RuntimeError("configure_optimizer() must be called before enable_data_parallel()")
        self.dist = env
        parallel.replicate(self)
        parallel.sync_ranges(self.model)
        self.dropout.rank = env.rank
        self._data_parallel = True

    def disable_data_parallel(self):
        parallel.sync_ranges(self.model, False)
        self.dropout.rank = None
        self._data_parallel = False
        self.dist = SINGLE

    def train_step_shard(self, batch, *, weight):
        if not self._data_parallel:
            raise RuntimeError("enable_data_parallel() must be called before train_step_shard()")
        return self._train(self._gradient_step("shard"), batch, Tensor(np.float32(weight)))

    # -- inference ---------------------------------------------------------------------------
    def predict(self, batch):
        self.model.set_train(False)
        if self._predict_fn is None:
            model = self.model

            def predict_fn(input_ids, attention_mask, token_type_ids):
                return model(input_ids, attention_mask, token_type_ids)

            self._predict_fn = self._compile(predict_fn)
        return self._predict_fn(*self._inputs(batch)).asnumpy().astype(np.float32)

    def quant_state(self):
        return {name: (float(cell.input_min.asnumpy()), float(cell.input_max.asnumpy())) if cell.asymmetric
                else float(cell.input_ema.asnumpy()) for name, cell in quantized_cells(self.model)
                if isinstance(cell, QuantDense) and int(cell.steps.asnumpy()) > self.spec.start_step}

    # -- resume --------------------------------------------------------------------------------
    def save_training_state(self, directory):
        """AdamW's moments and step count, the schedule position and the dropout generator's state."""
        from safetensors.numpy import save_file

        if self.optimizer is None:
            raise RuntimeError("configure_optimizer() must be called before save_training_state()")
        tensors = {}
        for param, m, v in zip(self.optimizer.params, self.optimizer.exp_avg, self.optimizer.exp_avg_sq):
            tensors[f"exp_avg.{param.name}"] = np.ascontiguousarray(m.asnumpy())
            tensors[f"exp_avg_sq.{param.name}"] = np.ascontiguousarray(v.asnumpy())
        state = {"step": self._step, "optimizer_step": self.optimizer.step_count,
                 "dropout_rng": self.dropout.state}
        save_file(tensors, str(Path(directory) / TRAINING_STATE_FILE), metadata={"state": json.dumps(state)})
        return [TRAINING_STATE_FILE]

    def load_training_state(self, directory):
        from safetensors import safe_open

        if self.optimizer is None:
            raise RuntimeError("configure_optimizer() must be called before load_training_state()")
        path = Path(directory) / TRAINING_STATE_FILE
        if not path.is_file():
            raise Q8Error(f"{directory}: no {TRAINING_STATE_FILE}; this checkpoint cannot be resumed")
        try:  # one read: the metadata and the moments from the same open file
            with safe_open(str(path), framework="numpy") as fh:
                state = json.loads((fh.metadata() or {})["state"])
                tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        except Exception as exc:  # truncated, not safetensors, no metadata
            raise Q8Error(f"{path}: unreadable training state ({type(exc).__name__})") from None
        moments = []
        for param, m, v in zip(self.optimizer.params, self.optimizer.exp_avg, self.optimizer.exp_avg_sq):
            for key, target in ((f"exp_avg.{param.name}", m), (f"exp_avg_sq.{param.name}", v)):
                value = tensors.get(key)
                if value is None or tuple(value.shape) != tuple(target.shape):
                    raise Q8Error(f"{path}: optimizer state does not fit the model ({key})")
                moments.append((target, value))
        for target, value in moments:
            target.set_data(Tensor(value, ms.float32))
        self._step = int(state["step"])
        self.optimizer.step_count = int(state["optimizer_step"])
        self.dropout.state = state["dropout_rng"]

    # -- persistence -------------------------------------------------------------------------
    def save(self, directory):
        directory = Path(directory)
        ms.save_checkpoint(self.model, str(directory / CHECKPOINT_FILE))
        write_config(directory, self.hf_config)
        return sorted(p.name for p in directory.iterdir())

    def export(self, directory, fmt):
        self.check_export_format(fmt)
        directory = Path(directory)
        if fmt == "hf":
            save_hf(self.model, directory, self.hf_config)
        else:
            target = devices.parse(self.device)[0]
            if fmt == "air" and target != "Ascend":
                raise Q8Error(f"export format 'air' needs an Ascend device (this model runs on {target}); "
                              f"use mindir elsewhere")
            self.model.set_train(False)
            length = min(EXPORT_SHAPE[1], int(self.hf_config.get("max_position_embeddings", 512)))
            example = [Tensor(np.zeros((EXPORT_SHAPE[0], length), np.int32)) for _ in FEATURES]
            example[1] = Tensor(np.ones((EXPORT_SHAPE[0], length), np.int32))
            with cpu_kernels.standard_ops():  # the file must not need this machine's kernel library
                ms.export(InferenceCell(self.model), *example, file_name=str(directory / "model"),
                          file_format=fmt.upper())
            write_config(directory, self.hf_config)
        return sorted(p.name for p in directory.iterdir())
