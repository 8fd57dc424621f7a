"""The interface between the backend-neutral trainer and a deep-learning framework.

A backend is a class registered through the ``register_backends`` hook. An instance holds one
model on one device. Everything crossing this interface is NumPy: batches are dicts of int64
arrays ``input_ids``, ``attention_mask``, ``token_type_ids`` (shape ``(batch, seq)``) plus
``labels`` (int64 class indices, or float32 scores for regression) when training; predictions
come back as float32 logits ``(batch, num_labels)``.

A checkpoint folder is written in two parts: the backend writes its weights, model config and
quantizer state (:meth:`Backend.save`); the core writes the tokenizer, the spec and the manifest
(:mod:`q8core.checkpoints`). :meth:`Backend.from_checkpoint` reads back what ``save`` wrote.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import ClassVar

import numpy as np

from .distributed import SINGLE, DistributedEnv
from .errors import Q8Error
from .spec import QuantSpec


class Backend(abc.ABC):
    """One model on one device; subclass it, set ``name``, register the class."""

    #: The ``--backend`` name; ``aliases`` are accepted too.
    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    #: ``--device`` values this backend understands.
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    #: Whether batches may be trimmed to their longest row (graph compilers prefer static shapes).
    dynamic_shapes: ClassVar[bool] = True
    #: ``q8 export --format`` values this backend writes.
    export_formats: ClassVar[tuple[str, ...]] = ()
    #: Whether the backend implements the training-state methods that ``q8 run --resume`` needs.
    resumable: ClassVar[bool] = False

    spec: QuantSpec

    # -- construction ------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def from_pretrained(cls, source: str, *, labels: tuple[str, ...] | None, spec: QuantSpec,
                        device: str, seed: int) -> "Backend":
        """A sequence classifier from a pretrained BERT (hub id or local folder), quantized per
        ``spec``; ``labels=None`` means one regression output. The new classifier head is
        initialised from ``seed``."""

    @classmethod
    @abc.abstractmethod
    def from_checkpoint(cls, path: Path, *, spec: QuantSpec, device: str) -> "Backend":
        """The model exactly as :meth:`save` wrote it into ``path`` (weights and EMA ranges)."""

    @classmethod
    def framework_version(cls) -> str:
        """Name and version of the framework behind the backend, for ``q8 plugins``."""
        return "-"

    @classmethod
    def check_device(cls, device: str) -> None:
        """Raise :class:`Q8Error` (one line) when ``device`` is unknown or absent here."""
        kind = device.split(":")[0].lower()
        if kind not in cls.devices:
            raise Q8Error(f"backend {cls.name!r} does not support device {device!r} "
                          f"(supported: {', '.join(cls.devices)})")

    # -- backend options (see q8core.options) ------------------------------------------------
    @classmethod
    def check_options(cls, options: dict) -> None:
        """Raise :class:`Q8Error` (one line) for values of this backend's options it cannot use; ``options``
        holds those of the current command (``q8 run`` or ``q8 eval``), defaults filled in."""

    #: Whether ``train_step`` takes a batch's ``teacher_logits`` into the loss (:meth:`set_distillation`).
    distills = False

    def set_distillation(self, weight: float, temperature: float) -> None:
        """Train on ``(1 - weight) * task loss + weight * distillation term`` (:mod:`q8core.distillation`)
        whenever a batch carries ``teacher_logits``."""
        raise NotImplementedError

    @classmethod
    def check_spec(cls, spec: QuantSpec) -> None:
        """Raise :class:`Q8Error` (one line) for a quantizer spec this backend cannot run (it runs every
        spec unless it says otherwise)."""

    def set_options(self, options: dict) -> None:
        """Receive this backend's options (declared through ``add_backend_options``), once, after
        construction and before training or prediction."""
        self.options = dict(options)

    # -- training ----------------------------------------------------------------------------
    @abc.abstractmethod
    def configure_optimizer(self, *, learning_rate: float, weight_decay: float, warmup_steps: int,
                            total_steps: int, adam_epsilon: float, max_grad_norm: float) -> None:
        """AdamW with decoupled weight decay (none on biases and LayerNorm), linear warm-up then
        linear decay to zero over ``total_steps``; gradients clipped to ``max_grad_norm``."""

    @abc.abstractmethod
    def train_step(self, batch: dict[str, np.ndarray]) -> float:
        """One optimizer step on ``batch``; returns the loss (float)."""

    @abc.abstractmethod
    def learning_rate(self) -> float:
        """The learning rate the next step will use."""

    # -- data parallelism (optional; the defaults are one process) --------------------------
    #: Whether the backend trains data-parallel under a launcher (``torchrun``, ``msrun``): it then
    #: overrides the methods of this section. The trainer calls them only when the launcher started
    #: more than one process (see :mod:`q8core.distributed`); a one-process run never does.
    distributed: ClassVar[bool] = False
    #: This process's rank and the world size, set by :meth:`enable_data_parallel`.
    dist: DistributedEnv = SINGLE

    @property
    def rank(self) -> int:
        return self.dist.rank or 0

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @classmethod
    def rank_device(cls, device: str, env: DistributedEnv) -> str:
        """The device this rank uses for ``--device device`` (``gpu`` -> ``gpu:LOCAL_RANK``)."""
        return device

    @classmethod
    def init_distributed(cls, env: DistributedEnv, device: str) -> DistributedEnv:
        """Join the framework's process group for ``env`` (rank and world size from the launcher) on
        ``device`` (from :meth:`rank_device`), once per process, before any model is built; return
        ``env`` with what only the group knows filled in (``rank``, ``local_rank`` under msrun)."""
        raise Q8Error(f"backend {cls.name!r} does not train data-parallel; {env.launcher} started "
                      f"{env.world_size} processes: run one process")

    @classmethod
    def shutdown_distributed(cls) -> None:
        """Leave the process group that :meth:`init_distributed` joined (at the end of the run)."""

    @classmethod
    def barrier(cls) -> None:
        """Wait until every rank gets here (rank 0 evaluates and writes while the others wait)."""

    @classmethod
    def broadcast_object(cls, obj, src: int = 0):
        """``obj`` as rank ``src`` has it (a small JSON-like value), on every rank."""
        return obj

    def enable_data_parallel(self, env: DistributedEnv) -> None:
        """Replicate this model across the ranks of ``env`` (called after :meth:`configure_optimizer`
        and, when resuming, :meth:`load_training_state`; before the first :meth:`train_step_shard`):
        weights as rank 0 has them, gradients averaged over ranks,
        activation ranges (EMA of max|x|) updated with the maximum over all ranks' rows so they stay
        identical everywhere, and a different dropout stream on every rank."""
        raise Q8Error(f"backend {self.name!r} does not train data-parallel")

    def disable_data_parallel(self) -> None:
        """Undo :meth:`enable_data_parallel` (the trainer calls it at the end of a data-parallel run,
        before :meth:`shutdown_distributed`): drop every reference to the process group, so the model
        predicts and saves alone afterwards."""

    def train_step_shard(self, batch: dict[str, np.ndarray], *, weight: float) -> float:
        """One optimizer step on a global batch of which ``batch`` is this rank's part, holding the
        fraction ``weight`` of its rows (0 for a stand-in row, see :func:`q8core.distributed.shard`).
        The gradient is ``sum over ranks of weight * (gradient of the rank's mean loss)``, i.e. the
        global batch's mean, identical on every rank; returns the global batch's mean loss (the
        same on every rank)."""
        raise NotImplementedError(f"{type(self).__name__} does not train data-parallel")

    # -- inference ---------------------------------------------------------------------------
    @abc.abstractmethod
    def predict(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Logits for ``batch`` in inference mode (no dropout, EMA ranges frozen)."""

    def quant_state(self) -> dict[str, float]:
        """EMA of max|x| per quantized layer input, by module name (empty when not quantized)."""
        return {}

    # -- persistence -------------------------------------------------------------------------
    @abc.abstractmethod
    def save(self, directory: Path) -> list[str]:
        """Write weights, model config and quantizer state into ``directory`` (which exists);
        return the names of the files written."""

    def save_training_state(self, directory: Path) -> list[str]:
        """Write what an exact resume needs beyond :meth:`save`: optimizer moments, learning-rate
        schedule position, the framework's RNG state. Only called when ``resumable``."""
        raise NotImplementedError

    def load_training_state(self, directory: Path) -> None:
        """Read back :meth:`save_training_state` (after :meth:`configure_optimizer`)."""
        raise Q8Error(f"backend {self.name!r} cannot resume a run")

    @classmethod
    def check_export_format(cls, fmt: str) -> None:
        """Raise :class:`Q8Error` (one line) unless ``fmt`` is one of ``export_formats``."""
        if fmt not in cls.export_formats:
            raise Q8Error(f"backend {cls.name!r} cannot export {fmt!r}; it exports: "
                          f"{', '.join(cls.export_formats) or 'nothing'}")

    def export(self, directory: Path, fmt: str) -> list[str]:
        """Write the model in ``fmt`` (one of ``export_formats``) into ``directory`` (which exists);
        the core adds the tokenizer and ``q8_spec.json``. Returns the names of the files written."""
        self.check_export_format(fmt)
        raise NotImplementedError(f"{type(self).__name__} lists {fmt!r} but does not export it")


def unavailable_backend(name: str, reason: str) -> type[Backend]:
    """A stand-in for a backend whose framework is not installed.

    ``q8 plugins`` lists it with ``reason``; any attempt to use it fails with ``reason`` in one line.
    """

    def refuse(*args, **kwargs):
        raise Q8Error(f"backend {name!r} is not usable here: {reason}")

    namespace = {
        "name": name, "devices": (),
        "framework_version": classmethod(lambda cls: f"unavailable: {reason}"),
        "check_device": classmethod(lambda cls, device: refuse()),
        "from_pretrained": classmethod(refuse), "from_checkpoint": classmethod(refuse),
        **{method: refuse for method in ("configure_optimizer", "train_step", "learning_rate", "predict", "save")},
    }
    return type(f"Unavailable_{name}", (Backend,), namespace)
