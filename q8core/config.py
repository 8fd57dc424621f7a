"""The run configuration: every setting of ``q8 run``, stored as ``run_config.json``."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Q8Error
from .records import TSV, check_dataset_type
from .spec import QuantSpec

RUN_CONFIG_FILE = "run_config.json"


@dataclass(frozen=True)
class RunConfig:
    task: str
    model: str
    data_dir: str | None  # None: the task's default source (GLUE from the Hugging Face hub)
    output_dir: str
    dataset_type: str = "tsv"  # tsv: the task's own reader; tfrecord / mindrecord: see q8core.records
    backend: str = "torch"
    device: str = "cpu"
    spec: QuantSpec = field(default_factory=QuantSpec)
    recipe: str | None = None  # the q8core.recipes preset the spec started from (None: a --spec file)
    #: QAT starts after this fraction of the run's steps (the recipe's; the trainer writes the step into
    #: ``spec.start_step``); None: ``spec.start_step`` as given (--quant-delay)
    quant_delay_ratio: float | None = None
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    train_batch_size: int = 16
    eval_batch_size: int = 32
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    adam_epsilon: float = 1e-6
    max_grad_norm: float = 1.0
    max_seq_length: int = 128
    pad_to_max_length: bool = False  # else each batch is trimmed to its longest row
    eval_steps: int | None = None  # None: evaluate at the end of every epoch
    save_steps: int | None = None  # None: save when the main metric improves, and at the end
    max_checkpoints: int = 3  # periodic checkpoints kept, besides the best
    logging_steps: int = 50
    shuffle: bool = True
    do_eval: bool = True
    seed: int = 42
    overwrite: bool = False
    backend_options: dict = field(default_factory=dict)  # the backend's own options (q8core.options)
    teacher: str | None = None  # distillation (q8core.distillation): the FP32 teacher's folder
    distill_weight: float = 0.5  # the loss is (1 - w) * task loss + w * distillation term
    distill_temperature: float = 1.0

    def __post_init__(self) -> None:
        positive = ("train_batch_size", "eval_batch_size", "max_seq_length", "logging_steps", "max_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise Q8Error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_steps", "save_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise Q8Error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.max_steps is None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise Q8Error(f"--epochs must be a positive number, got {self.epochs}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise Q8Error(f"--learning-rate must be a positive number, got {self.learning_rate}")
        for name in ("weight_decay", "max_grad_norm", "adam_epsilon"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise Q8Error(f"--{name.replace('_', '-')} must be a non-negative number, got {value}")
        if not (math.isfinite(self.distill_weight) and 0 < self.distill_weight <= 1):
            raise Q8Error(f"--distill-weight must be in (0, 1], got {self.distill_weight}")
        if not (math.isfinite(self.distill_temperature) and self.distill_temperature > 0):
            raise Q8Error(f"--distill-temperature must be a positive number, got {self.distill_temperature}")
        if self.quant_delay_ratio is not None and not 0 <= self.quant_delay_ratio < 1:
            raise Q8Error(f"quant_delay_ratio must be in [0, 1), got {self.quant_delay_ratio}")
        if not 0 <= self.warmup_ratio < 1:
            raise Q8Error(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        check_dataset_type(self.dataset_type)
        if self.dataset_type != TSV and not self.data_dir:
            raise Q8Error(f"--dataset-type {self.dataset_type} reads the files of the ModelZoo's data pipeline; "
                          f"pass --data-dir with their folder (see README, 'ModelZoo records')")
        if self.max_seq_length > 512:
            raise Q8Error(f"--max-seq-length {self.max_seq_length} exceeds BERT's 512 positions")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["spec"] = self.spec.to_dict()
        return data

    def save(self, directory: Path) -> Path:
        path = Path(directory) / RUN_CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = RUN_CONFIG_FILE) -> "RunConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise Q8Error(f"{where}: unknown key(s) {', '.join(unknown)}")
        data["spec"] = QuantSpec.from_dict(data.get("spec", {}), where=f"{where}: spec")
        try:
            return cls(**data)
        except TypeError as exc:
            raise Q8Error(f"{where}: {exc}") from None

    @classmethod
    def load(cls, directory: Path) -> "RunConfig":
        path = Path(directory) / RUN_CONFIG_FILE
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), where=str(path))
        except (OSError, json.JSONDecodeError) as exc:
            raise Q8Error(f"{path}: cannot read run config ({exc})") from None
