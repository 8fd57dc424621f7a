"""Built-in trainer-event plugins: the console progress bar and the ``metrics.jsonl`` log.

They implement the same hooks a third-party plugin would (see :mod:`q8core.hookspecs`) and are
registered by the trainer for the length of one run.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from .hookspecs import hookimpl

METRICS_LOG = "metrics.jsonl"


def format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{name}={value:.4f}" for name, value in metrics.items())


class ProgressBar:
    """A tqdm bar over the training steps; evaluations are printed above it."""

    def __init__(self, disable: bool = False) -> None:
        self.disable = disable
        self.bar = None

    @hookimpl
    def on_train_start(self, trainer):
        desc = f"{trainer.task.name} {trainer.spec.mode}"
        world = getattr(getattr(trainer, "dist", None), "world_size", 1)
        if world > 1:  # data-parallel: rank 0 shows the one bar
            desc += f" x{world} processes"
        self.bar = tqdm(total=trainer.total_steps, desc=desc,
                        unit="step", dynamic_ncols=True, disable=self.disable)

    @hookimpl
    def on_step_end(self, trainer, step, logs):
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['learning_rate']:.2e}")

    @hookimpl
    def on_evaluate(self, trainer, step, metrics, is_best):
        main = trainer.task.main_metric
        best = (f"best {main} {trainer.best_metric:.4f} at step {trainer.best_step}" if trainer.best_step is not None
                else f"not a QAT model yet (quantization starts after step {trainer.spec.start_step})")
        self.bar.write(f"step {step} (epoch {step / trainer.steps_per_epoch:.2f}): {format_metrics(metrics)} | {best}")

    @hookimpl
    def on_train_end(self, trainer, results):
        self.bar.update(trainer.step - self.bar.n)
        self.bar.close()


class MetricsLog:
    """Appends every logged step and evaluation to ``<output_dir>/metrics.jsonl``."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / METRICS_LOG

    def _write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    @hookimpl
    def on_step_end(self, trainer, step, logs):
        self._write({"type": "train", "step": step, **logs})

    @hookimpl
    def on_evaluate(self, trainer, step, metrics, is_best):
        self._write({"type": "eval", "step": step, "epoch": step / trainer.steps_per_epoch,
                     "is_best": is_best, **metrics})

    @hookimpl
    def on_checkpoint_saved(self, trainer, step, path):
        self._write({"type": "checkpoint", "step": step, "path": Path(path).name})
