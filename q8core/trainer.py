"""The backend-neutral trainer: seeded epochs, periodic evaluation, best tracking, checkpoints.

It drives a :class:`q8core.backend.Backend` through NumPy batches and reports through the trainer
events of :mod:`q8core.hookspecs` (progress bar and ``metrics.jsonl`` are such plugins). Nothing is
written to the output folder until the data, tokenizer and model have all loaded.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from . import checkpoints
from .callbacks import METRICS_LOG, MetricsLog, ProgressBar
from .config import RUN_CONFIG_FILE, RunConfig
from .errors import Q8Error
from .evaluation import evaluate, load_eval_sets
from .plugins import Registry
from .tokenization import batches, encode, load_tokenizer

EVAL_RESULTS_FILE = "eval_results.json"
RUN_OUTPUTS = (RUN_CONFIG_FILE, METRICS_LOG, EVAL_RESULTS_FILE, checkpoints.TRAINER_STATE_FILE)


def write_json(path: Path, data: dict) -> None:
    """Write JSON under a temporary name, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class Trainer:
    def __init__(self, config: RunConfig, registry: Registry, progress: bool = True) -> None:
        self.config = config
        self.registry = registry
        self.task = registry.task(config.task)
        self.backend_cls = registry.backend(config.backend)
        self.backend_cls.check_device(config.device)
        self.spec = config.spec
        self.output_dir = Path(config.output_dir)
        self.progress = progress
        self._trim = self.backend_cls.dynamic_shapes and not config.pad_to_max_length
        self.tokenizer = None
        self.step = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.best_checkpoint: Path | None = None
        self.last_checkpoint: Path | None = None
        self.backend = None
        self.total_steps = 0
        self.steps_per_epoch = 1

    # -- set-up --------------------------------------------------------------------------------
    def _check_output_dir(self) -> None:
        out = self.output_dir
        if out.exists() and not out.is_dir():
            raise Q8Error(f"--output-dir {out} is a file, not a folder")
        existing = next(p for p in (out, *out.absolute().parents) if p.exists())
        if not existing.is_dir():
            raise Q8Error(f"--output-dir {out}: {existing} is a file, not a folder")
        if out.is_dir() and any(out.iterdir()) and not self.config.overwrite:
            what = "a previous run" if (out / RUN_CONFIG_FILE).exists() else "other files"
            raise Q8Error(f"--output-dir {out} already holds {what}; pass --overwrite to replace it")

    def _prepare_output_dir(self) -> None:
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        for child in out.iterdir():  # only with --overwrite: remove the old run's outputs
            if checkpoints.CHECKPOINT_RE.match(child.name) and child.is_dir():
                shutil.rmtree(child)
            elif child.name in RUN_OUTPUTS:
                child.unlink()
        self.config.save(out)

    def _load(self):
        cfg = self.config
        data_dir = Path(cfg.data_dir) if cfg.data_dir else None
        train = self.task.read(data_dir, "train")
        tokenizer = load_tokenizer(cfg.model)
        train_arrays = encode(train, tokenizer, self.task, cfg.max_seq_length)
        eval_sets = load_eval_sets(self.task, data_dir, tokenizer, cfg.max_seq_length) if cfg.do_eval else {}
        backend = self.backend_cls.from_pretrained(cfg.model, labels=self.task.labels, spec=self.spec,
                                                   device=cfg.device, seed=cfg.seed)
        return tokenizer, train_arrays, eval_sets, backend

    # -- checkpoints ---------------------------------------------------------------------------
    def _save(self, metrics: dict[str, float] | None) -> Path:
        path = self.output_dir / f"checkpoint-{self.step}"
        info = {"task": self.task.name, "labels": list(self.task.labels) if self.task.labels else None,
                "step": self.step, "max_seq_length": self.config.max_seq_length, "metrics": metrics or {}}
        checkpoints.write_checkpoint(path, self.backend, self.tokenizer, info)
        self.last_checkpoint = path
        self.registry.pm.hook.on_checkpoint_saved(trainer=self, step=self.step, path=path)
        protect = {self.best_checkpoint} if self.best_checkpoint else set()
        checkpoints.rotate(self.output_dir, self.config.max_checkpoints, protect)
        self._write_state()
        return path

    def _write_state(self) -> None:
        write_json(self.output_dir / checkpoints.TRAINER_STATE_FILE, {
            "global_step": self.step, "total_steps": self.total_steps, "main_metric": self.task.main_metric,
            "best_metric": self.best_metric, "best_step": self.best_step,
            "best_checkpoint": self.best_checkpoint.name if self.best_checkpoint else None,
            "last_checkpoint": self.last_checkpoint.name if self.last_checkpoint else None,
        })

    def _evaluate(self, eval_sets) -> dict[str, float]:
        cfg = self.config
        metrics = evaluate(self.backend, self.task, eval_sets, cfg.eval_batch_size, self._trim)
        value = metrics[self.task.main_metric]
        # NaN (e.g. a correlation of constant predictions) never beats a number
        is_best = self.best_metric is None or (not math.isnan(value) and
                                               (math.isnan(self.best_metric) or value > self.best_metric))
        if is_best:
            self.best_metric, self.best_step = value, self.step
        self.registry.pm.hook.on_evaluate(trainer=self, step=self.step, metrics=metrics, is_best=is_best)
        if is_best:
            self.best_checkpoint = self._save(metrics)
        return metrics

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.config
        self._check_output_dir()
        self.tokenizer, train, eval_sets, self.backend = self._load()
        n = len(train["labels"])
        self.steps_per_epoch = math.ceil(n / cfg.train_batch_size)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        eval_every = cfg.eval_steps or self.steps_per_epoch
        self.backend.configure_optimizer(
            learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
            warmup_steps=int(cfg.warmup_ratio * self.total_steps), total_steps=self.total_steps,
            adam_epsilon=cfg.adam_epsilon, max_grad_norm=cfg.max_grad_norm)

        self._prepare_output_dir()
        plugins = [ProgressBar(disable=not self.progress), MetricsLog(self.output_dir)]
        for plugin in plugins:
            self.registry.pm.register(plugin)
        try:
            return self._loop(train, eval_sets, eval_every)
        finally:
            for plugin in plugins:
                self.registry.pm.unregister(plugin)

    def _loop(self, train, eval_sets, eval_every: int) -> dict:
        cfg = self.config
        hook = self.registry.pm.hook
        rng = np.random.default_rng(cfg.seed)
        hook.on_train_start(trainer=self)
        started = last_time = time.perf_counter()
        losses: list[float] = []
        metrics: dict[str, float] = {}
        n = len(train["labels"])
        while self.step < self.total_steps:
            order = rng.permutation(n) if cfg.shuffle else np.arange(n)
            for batch in batches(train, order, cfg.train_batch_size, self._trim):
                lr = self.backend.learning_rate()
                losses.append(self.backend.train_step(batch))
                self.step += 1
                last = self.step == self.total_steps
                if self.step % cfg.logging_steps == 0 or last:
                    now = time.perf_counter()
                    logs = {"epoch": self.step / self.steps_per_epoch, "loss": float(np.mean(losses)),
                            "learning_rate": lr, "sec_per_step": (now - last_time) / len(losses),
                            "elapsed_s": now - started}
                    if self.spec.quantized:
                        logs["ema"] = self.backend.quant_state()
                    hook.on_step_end(trainer=self, step=self.step, logs=logs)
                    losses, last_time = [], now
                if cfg.do_eval and (self.step % eval_every == 0 or last):
                    metrics = self._evaluate(eval_sets)
                if (cfg.save_steps and self.step % cfg.save_steps == 0) or last:
                    if self.last_checkpoint is None or self.last_checkpoint.name != f"checkpoint-{self.step}":
                        self._save(metrics if cfg.do_eval else None)
                if last:
                    break
        elapsed = time.perf_counter() - started
        results = {"task": self.task.name, "mode": self.spec.mode, "backend": self.backend.name,
                   "step": self.step, "epoch": self.step / self.steps_per_epoch, "metrics": metrics,
                   "main_metric": self.task.main_metric, "best_metric": self.best_metric,
                   "best_step": self.best_step, "train_seconds": elapsed,
                   "sec_per_step": elapsed / max(self.step, 1)}
        write_json(self.output_dir / EVAL_RESULTS_FILE, results)
        hook.on_train_end(trainer=self, results=results)
        return results
