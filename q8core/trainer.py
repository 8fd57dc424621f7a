"""The backend-neutral trainer: seeded epochs, periodic evaluation, best tracking, checkpoints.

It drives a :class:`q8core.backend.Backend` through NumPy batches and reports through the trainer
events of :mod:`q8core.hookspecs` (progress bar and ``metrics.jsonl`` are such plugins). Nothing is
written to the output folder until the data, tokenizer and model have all loaded.

Started by a launcher as several processes (``torchrun``, see :mod:`q8core.distributed`), it trains
data-parallel: every rank draws the same global batches and trains on its slice of each; rank 0
alone evaluates, writes the run folder and fires the trainer events, while the others wait for it
at a barrier after each evaluation or checkpoint. Every decision (when to evaluate, save, stop)
follows from the step count, so all ranks take it together.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from . import checkpoints, distillation, distributed, modelzoo, options, records
from .callbacks import METRICS_LOG, MetricsLog, ProgressBar
from .config import RUN_CONFIG_FILE, RunConfig
from .errors import Q8Error
from .evaluation import evaluate, load_eval_sets
from .plugins import Registry
from .tokenization import batches, encode, load_tokenizer

EVAL_RESULTS_FILE = "eval_results.json"
RESUME_STATE_FILE = "resume_state.json"
RUN_OUTPUTS = (RUN_CONFIG_FILE, METRICS_LOG, EVAL_RESULTS_FILE, checkpoints.TRAINER_STATE_FILE)


def write_text(path: Path, text: str) -> None:
    """Write under a temporary name, then rename into place: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


class _Silent:
    """Trainer events on ranks other than 0: nothing happens."""

    def __getattr__(self, name):
        return lambda **kwargs: None


class Trainer:
    def __init__(self, config: RunConfig, registry: Registry, progress: bool = True) -> None:
        self.config = config
        self.registry = registry
        self.task = registry.task(config.task)
        self.backend_cls = registry.backend(config.backend)
        self.backend_cls.check_device(config.device)
        self.backend_options = options.check_stored(
            config.backend_options, options.for_backend(registry.options, self.backend_cls.name),
            self.backend_cls.name, where=RUN_CONFIG_FILE)
        self.backend_cls.check_options(self.backend_options)
        self.backend_cls.check_spec(config.spec)
        if config.teacher and not self.backend_cls.distills:
            raise Q8Error(f"backend '{self.backend_cls.name}' cannot train with a --teacher yet; use --backend torch")
        self.teacher = None  # the distillation teacher (q8core.distillation), loaded with the data
        self.config = config = dataclasses.replace(config, backend_options=self.backend_options)  # defaults stored too
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
        self._metrics: dict[str, float] = {}  # the latest evaluation
        self._losses: list[float] = []  # training losses since the last log
        self._epoch_rng_state: dict | None = None  # data-order RNG at the start of this epoch
        self._batch_in_epoch: int | None = None  # batches of this epoch already trained
        self._elapsed_before = 0.0  # training seconds of the run before a resume
        self._started = time.perf_counter()
        self.backend = None
        self.eval_sets: dict = {}
        self.num_train = 0
        self.total_steps = 0
        self.steps_per_epoch = 1
        self.dist = distributed.SINGLE  # this process's rank and the world size (run() reads them)
        self.device = config.device  # the device of this rank (gpu:LOCAL_RANK under a launcher)

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

    def _load(self, resume_from: Path | None):
        """Data, tokenizer and model: from the pretrained model, or from the checkpoint resumed."""
        cfg = self.config
        data_dir = Path(cfg.data_dir) if cfg.data_dir else None
        tsv = cfg.dataset_type == records.TSV
        if tsv:
            train = self.task.read(data_dir, "train")
        else:  # pre-tokenized: the files must be there before the model is fetched
            for split in ("train", *(self.task.eval_splits.values() if cfg.do_eval else ())):
                records.split_file(self.task, data_dir, split, cfg.dataset_type)
        source = resume_from or self._model_source()
        tokenizer = load_tokenizer(source)  # also saved in every checkpoint, records or not
        if tsv:
            train_arrays = encode(train, tokenizer, self.task, cfg.max_seq_length)
        else:
            train_arrays = records.load(self.task, data_dir, "train", cfg.dataset_type, cfg.max_seq_length,
                                        vocab_size=len(tokenizer))
        self._schedule(len(train_arrays["labels"]))
        evaluates = cfg.do_eval and self.dist.is_main  # rank 0 evaluates for all
        eval_sets = load_eval_sets(self.task, data_dir, tokenizer, cfg.max_seq_length,
                                   cfg.dataset_type) if evaluates else {}
        if resume_from is not None:
            backend = self.backend_cls.from_checkpoint(resume_from, spec=self.spec, device=self.device)
        else:
            backend = self.backend_cls.from_pretrained(source, labels=self.task.labels, spec=self.spec,
                                                       device=self.device, seed=cfg.seed)
        backend.set_options(self.backend_options)
        if cfg.teacher:
            self.teacher = distillation.open_teacher(cfg.teacher, self.task, self.registry, self.backend_cls,
                                                     self.device, len(tokenizer))
            backend.set_distillation(cfg.distill_weight, cfg.distill_temperature)
        return tokenizer, train_arrays, eval_sets, backend

    def _schedule(self, n: int) -> None:
        """The run's length from its ``n`` training rows, and with it the quantization delay that the recipe
        gives as a fraction of the run (``quant_delay_ratio``), written into the spec before the model is
        built (so ``run_config.json`` and every checkpoint hold the step)."""
        cfg = self.config
        self.num_train = n
        self.steps_per_epoch = math.ceil(n / (cfg.train_batch_size * self.dist.world_size))
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        if cfg.quant_delay_ratio is not None and self.spec.mode == "qat":
            self.spec = dataclasses.replace(self.spec, start_step=int(cfg.quant_delay_ratio * self.total_steps))
            self.config = dataclasses.replace(cfg, spec=self.spec)

    def _model_source(self) -> str:
        """``--model`` as a folder or hub id (a q8 run folder: its best checkpoint; a ModelZoo checkpoint
        converted once, cached). Under a launcher the first process of each machine converts it while
        the others wait, then they find it in the cache."""
        model = checkpoints.model_source(self.config.model)
        prepare = lambda: modelzoo.prepare_model(model, num_labels=self.task.num_labels)  # noqa: E731
        if not self.dist.enabled:
            return prepare()
        first = not self.dist.local_rank
        source = prepare() if first else None
        self.backend_cls.barrier()
        return source if first else prepare()

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoint_path(self) -> Path:
        return self.output_dir / f"checkpoint-{self.step}"

    def _save(self) -> Path:
        path = self._checkpoint_path()
        info = {"task": self.task.name, "labels": list(self.task.labels) if self.task.labels else None,
                "step": self.step, "max_seq_length": self.config.max_seq_length, "metrics": self._metrics,
                "backend_options": self.backend_options}
        self.last_checkpoint = path
        checkpoints.write_checkpoint(path, self.backend, self.tokenizer, info, extra=self._save_resume_state)
        self.registry.pm.hook.on_checkpoint_saved(trainer=self, step=self.step, path=path)
        protect = {self.best_checkpoint} if self.best_checkpoint else set()
        checkpoints.rotate(self.output_dir, self.config.max_checkpoints, protect)
        self._write_state()
        return path

    def _save_resume_state(self, directory: Path) -> None:
        """What ``--resume`` needs beyond the model: data position, RNG, best so far, optimizer."""
        if not self.backend.resumable:
            return
        self.backend.save_training_state(directory)
        (directory / RESUME_STATE_FILE).write_text(json.dumps({
            "step": self.step, "epoch_rng_state": self._epoch_rng_state, "batch_in_epoch": self._batch_in_epoch,
            "pending_losses": self._losses, "metrics": self._metrics, "best_metric": self.best_metric,
            "best_step": self.best_step, "best_checkpoint": self.best_checkpoint.name if self.best_checkpoint else None,
            "elapsed_s": self._elapsed(), "world_size": self.dist.world_size,
        }, indent=2) + "\n", encoding="utf-8")

    def _write_state(self) -> None:
        write_json(self.output_dir / checkpoints.TRAINER_STATE_FILE, {
            "global_step": self.step, "total_steps": self.total_steps, "main_metric": self.task.main_metric,
            "best_metric": self.best_metric, "best_step": self.best_step,
            "best_checkpoint": self.best_checkpoint.name if self.best_checkpoint else None,
            "last_checkpoint": self.last_checkpoint.name if self.last_checkpoint else None,
            "world_size": self.dist.world_size,
        })

    def _evaluate(self, eval_sets) -> None:
        cfg = self.config
        self._metrics = evaluate(self.backend, self.task, eval_sets, cfg.eval_batch_size, self._trim)
        value = self._metrics[self.task.main_metric]
        # NaN (e.g. a correlation of constant predictions) never beats a number; a QAT run's model is not
        # yet quantized during its --quant-delay, so those evaluations cannot be its best checkpoint
        quantizing = self.spec.mode != "qat" or self.step > self.spec.start_step
        is_best = quantizing and (self.best_metric is None or (
            not math.isnan(value) and (math.isnan(self.best_metric) or value > self.best_metric)))
        if is_best:
            self.best_metric, self.best_step = value, self.step
            self.best_checkpoint = self._checkpoint_path()
        self.registry.pm.hook.on_evaluate(trainer=self, step=self.step, metrics=self._metrics, is_best=is_best)
        if is_best:
            self._save()

    # -- the loop ------------------------------------------------------------------------------
    def run(self, resume_from: Path | None = None) -> dict:
        """Train (from the pretrained model, or continuing the checkpoint ``resume_from``)."""
        self.dist = distributed.environment()
        if not self.dist.enabled:
            return self._run(resume_from)
        self.device = self.backend_cls.rank_device(self.config.device, self.dist)
        try:
            self.dist = distributed.check(self.backend_cls.init_distributed(self.dist, self.device))
            return self._run(resume_from)
        finally:
            if self.backend is not None:
                self.backend.disable_data_parallel()
            self.backend_cls.shutdown_distributed()

    def _on_main(self, action) -> None:
        """``action()`` on rank 0 (every rank in a one-process run); a :class:`Q8Error` it raises ends
        every rank, rank 0 with the one-line message, the others silently (exit status 2)."""
        if not self.dist.enabled:
            return action()
        error = None
        if self.dist.is_main:
            try:
                action()
            except Q8Error as exc:
                error = exc
        message = self.backend_cls.broadcast_object(None if error is None else str(error))
        if error is not None:
            raise error
        if message is not None:
            raise SystemExit(2)

    def _run(self, resume_from: Path | None) -> dict:
        if resume_from is None:
            self._on_main(self._check_output_dir)
        elif self.backend_cls.resumable:
            self._on_main(lambda: self._resume_state(resume_from))  # a wrong process count fails before loading
        self.tokenizer, train, eval_sets, self.backend = self._load(resume_from)
        cfg = self.config  # with the quantization delay resolved (_schedule)
        self.eval_sets = eval_sets
        n = self.num_train
        if self.spec.mode == "qat" and self.spec.start_step >= self.total_steps:
            raise Q8Error(f"--quant-delay {self.spec.start_step} is not below the run's {self.total_steps} steps: "
                          f"the QAT run would end unquantized; lower it, or train longer")
        if self.dist.enabled:  # every rank must train on the same rows, or they would wait on each other
            mine = (n, self.total_steps, distributed.fingerprint(train))
            ours = self.backend_cls.broadcast_object(mine)
            if tuple(ours) != mine:
                raise Q8Error(f"rank {self.dist.rank} read other training data than rank 0 ({n} rows, "
                              f"fingerprint {mine[2]}; rank 0: {ours[0]} rows, {ours[2]}): give every "
                              f"process the same --data-dir contents")
        self.backend.configure_optimizer(
            learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
            warmup_steps=int(cfg.warmup_ratio * self.total_steps), total_steps=self.total_steps,
            adam_epsilon=cfg.adam_epsilon, max_grad_norm=cfg.max_grad_norm)
        if resume_from is None:
            if self.dist.is_main:
                self._prepare_output_dir()
        else:
            self._restore(resume_from)
        if self.dist.enabled:
            self.backend.enable_data_parallel(self.dist)

        plugins = [ProgressBar(disable=not self.progress), MetricsLog(self.output_dir)] if self.dist.is_main else []
        for plugin in plugins:
            self.registry.pm.register(plugin)
        try:
            return self._loop(train, eval_sets)
        finally:
            for plugin in plugins:
                self.registry.pm.unregister(plugin)

    def _resume_state(self, checkpoint: Path) -> dict:
        """``resume_state.json`` of ``checkpoint``, after checking this run has its number of processes
        (the global batch is processes x --train-batch-size: another count would be another run)."""
        state_file = checkpoint / RESUME_STATE_FILE
        if not state_file.exists():
            raise Q8Error(f"{checkpoint}: no {RESUME_STATE_FILE}; this checkpoint cannot be resumed")
        state = json.loads(state_file.read_text(encoding="utf-8"))
        trained_with = state.get("world_size", 1)
        if trained_with != self.dist.world_size:
            raise Q8Error(f"{checkpoint} was trained by {trained_with} process(es) (global batch "
                          f"{trained_with} x {self.config.train_batch_size}); resume it with {trained_with}, "
                          f"not {self.dist.world_size}")
        return state

    def _restore(self, checkpoint: Path) -> None:
        """Trainer and backend state of ``checkpoint``; the log is cut back to its step."""
        state = self._resume_state(checkpoint)
        self.backend.load_training_state(checkpoint)
        self.step = state["step"]
        self._epoch_rng_state, self._batch_in_epoch = state["epoch_rng_state"], state["batch_in_epoch"]
        self._losses, self._metrics = state["pending_losses"], state["metrics"]
        self.best_metric, self.best_step = state["best_metric"], state["best_step"]
        self.best_checkpoint = self.output_dir / state["best_checkpoint"] if state["best_checkpoint"] else None
        self.last_checkpoint = checkpoint
        self._elapsed_before = state["elapsed_s"]
        if not self.dist.is_main:  # rank 0 tidies the run folder
            return
        log = self.output_dir / METRICS_LOG
        if log.exists():  # records after the checkpoint are redone by this run
            kept = [line for line in log.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= self.step]
            write_text(log, "".join(line + "\n" for line in kept))
        for stale in self.output_dir.glob(".checkpoint-*.tmp-*"):  # a write the kill interrupted
            shutil.rmtree(stale, ignore_errors=True)

    def _taught(self, batch: dict) -> dict:
        """``batch`` with the teacher's logits on it, when the run distils."""
        if self.teacher is None:
            return batch
        return {**batch, "teacher_logits": self.teacher.predict(batch)}

    def _elapsed(self) -> float:
        return self._elapsed_before + time.perf_counter() - self._started

    def _loop(self, train, eval_sets) -> dict:
        cfg = self.config
        dist = self.dist
        hook = self.registry.pm.hook if dist.is_main else _Silent()
        batch_size = cfg.train_batch_size * dist.world_size  # the global batch, drawn as one process would
        eval_every = cfg.eval_steps or self.steps_per_epoch
        rng = np.random.default_rng(cfg.seed)
        hook.on_train_start(trainer=self)
        self._started = last_time = time.perf_counter()
        n = len(train["labels"])
        while self.step < self.total_steps:
            if self._epoch_rng_state is not None and self._batch_in_epoch is not None:
                rng.bit_generator.state = self._epoch_rng_state  # resuming inside this epoch
                skip = self._batch_in_epoch
            else:
                skip = 0
            self._epoch_rng_state = rng.bit_generator.state
            order = rng.permutation(n) if cfg.shuffle else np.arange(n)
            for index, batch in enumerate(batches(train, order[skip * batch_size:], batch_size, self._trim),
                                          start=skip):
                lr = self.backend.learning_rate()
                if dist.enabled:
                    part, weight = distributed.shard(batch, dist.rank, dist.world_size)
                    self._losses.append(self.backend.train_step_shard(self._taught(part), weight=weight))
                else:
                    self._losses.append(self.backend.train_step(self._taught(batch)))
                self.step += 1
                self._batch_in_epoch = index + 1
                last = self.step == self.total_steps
                if self.step % cfg.logging_steps == 0 or last:
                    now = time.perf_counter()
                    logs = {"epoch": self.step / self.steps_per_epoch, "loss": float(np.mean(self._losses)),
                            "learning_rate": lr, "sec_per_step": (now - last_time) / len(self._losses),
                            "elapsed_s": self._elapsed()}
                    if self.spec.quantized and dist.is_main:
                        logs["ema"] = self.backend.quant_state()
                    hook.on_step_end(trainer=self, step=self.step, logs=logs)
                    self._losses, last_time = [], now
                evaluate_now = cfg.do_eval and (self.step % eval_every == 0 or last)
                save_now = bool(cfg.save_steps and self.step % cfg.save_steps == 0) or last
                if dist.is_main:
                    if evaluate_now:
                        self._evaluate(eval_sets)
                    if save_now and self.last_checkpoint != self._checkpoint_path():
                        self._save()
                if dist.enabled and (evaluate_now or save_now):
                    self.backend_cls.barrier()  # the other ranks wait while rank 0 evaluates and writes
                if last:
                    break
            self._batch_in_epoch = None  # the next epoch draws a fresh order
        elapsed = self._elapsed()
        results = {"task": self.task.name, "mode": self.spec.mode, "backend": self.backend.name,
                   "step": self.step, "epoch": self.step / self.steps_per_epoch, "metrics": self._metrics,
                   "main_metric": self.task.main_metric, "best_metric": self.best_metric,
                   "best_step": self.best_step, "train_seconds": elapsed,
                   "sec_per_step": elapsed / max(self.step, 1)}
        if dist.enabled:
            results["world_size"] = dist.world_size
        if dist.is_main:
            write_json(self.output_dir / EVAL_RESULTS_FILE, results)
        hook.on_train_end(trainer=self, results=results)
        if dist.enabled:  # every rank returns rank 0's results (its metrics, best checkpoint)
            results = self.backend_cls.broadcast_object(results)
        return results
