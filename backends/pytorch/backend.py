"""The PyTorch backend: a Hugging Face ``transformers`` sequence classifier with Q8BERT modules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from q8core.backend import Backend
from q8core.distributed import SINGLE, DistributedEnv
from q8core.errors import Q8Error, load_error
from q8core.heads import new_parameter
from q8core.spec import QuantSpec

from .quantization import quantize_model, quantized_modules, sync_ranges

QUANT_STATE_FILE = "quant_state.safetensors"
#: ``model_type`` values this backend fine-tunes: encoders whose fully connected layers are
#: ``nn.Linear`` and whose embeddings are ``nn.Embedding`` (the ONNX int8 export is BERT's graph).
ENCODERS = ("bert", "roberta", "xlm-roberta", "electra", "distilbert")
TRAINING_STATE_FILE = "training_state.safetensors"


def torch_device(device: str) -> torch.device:
    """``cpu``, ``gpu`` / ``gpu:N`` / ``cuda:N`` -> a torch device that exists here."""
    kind, _, index = device.lower().partition(":")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise Q8Error(f"--device {device}: PyTorch sees no CUDA GPU on this machine")
    number = int(index) if index.isdigit() else 0
    if number >= torch.cuda.device_count():
        raise Q8Error(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    return torch.device("cuda", number)


def _load_hf_model(source: str, *, seed: int | None = None, **config_kwargs):
    """The sequence classifier of ``source``; with ``seed``, the parameters the checkpoint lacks (a new
    task head) take the core's seeded starting values, the numbers every backend starts from."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(source, **config_kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise load_error(source, exc) from None
    if config.model_type not in ENCODERS:
        raise Q8Error(f"{source}: a {config.model_type!r} model; Q8BERT fine-tunes BERT-family encoders "
                      f"({', '.join(ENCODERS)})")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(source, config=config,
                                                                         output_loading_info=True)
    except (OSError, ValueError, KeyError) as exc:
        raise load_error(source, exc) from None
    except RuntimeError as exc:  # transformers: weights whose shapes do not fit the config
        if "mismatched" not in str(exc):
            raise
        raise Q8Error(f"{source}: its weights do not fit its config.json "
                      f"({_first_mismatch(source, config) or 'tensor shapes differ'})") from None
    if seed is not None:
        _init_new_parameters(model, set(info["missing_keys"]), seed, getattr(config, "initializer_range", 0.02))
    return model


def _init_new_parameters(model: torch.nn.Module, names: set[str], seed: int, initializer_range: float) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in names:
                param.copy_(torch.from_numpy(new_parameter(name, tuple(param.shape), seed=seed,
                                                           initializer_range=initializer_range)))


def _first_mismatch(source: str, config) -> str | None:
    """'NAME has shape A, config.json says B' for the first weight of a local folder that does not fit."""
    from transformers import AutoModelForSequenceClassification

    weights = Path(source) / "model.safetensors"
    if not weights.is_file():
        return None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoModelForSequenceClassification.from_config(config).state_dict().items()}
    prefix = f"{config.model_type}."
    with safe_open(str(weights), framework="pt") as fh:
        for name in fh.keys():
            shape = tuple(fh.get_slice(name).get_shape())
            want = expected.get(name, expected.get(prefix + name))
            if want is not None and want != shape:
                return f"{name} has shape {shape}, config.json says {want}"
    return None


class TorchBackend(Backend):
    name = "torch"
    aliases = ("pytorch",)
    devices = ("cpu", "gpu", "cuda")
    dynamic_shapes = True
    export_formats = ("hf",)
    resumable = True
    distributed = True
    distills = True
    _owns_process_group = False  # init_distributed created it, so shutdown_distributed destroys it

    def __init__(self, model: torch.nn.Module, spec: QuantSpec, device: torch.device) -> None:
        self.model = model.to(device)
        self.spec = spec
        self.device = device
        self.optimizer = None
        self.scheduler = None
        self.regression = model.config.problem_type == "regression"
        self.ddp = None  # the DistributedDataParallel wrapper training steps run through (data-parallel)
        self.distillation = None  # (weight, temperature) with a --teacher

    @classmethod
    def framework_version(cls) -> str:
        return f"torch {torch.__version__}"

    @classmethod
    def check_device(cls, device: str) -> None:
        super().check_device(device)
        torch_device(device)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, source, *, labels, spec, device, seed):
        torch.manual_seed(seed)
        kwargs = {"num_labels": 1, "problem_type": "regression"} if labels is None else {
            "num_labels": len(labels), "problem_type": "single_label_classification",
            "id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)}}
        model = _load_hf_model(str(source), seed=seed, **kwargs)
        return cls(quantize_model(model, spec), spec, torch_device(device))

    @classmethod
    def from_checkpoint(cls, path, *, spec, device):
        model = quantize_model(_load_hf_model(str(path)), spec)
        backend = cls(model, spec, torch_device(device))
        state_file = Path(path) / QUANT_STATE_FILE
        if spec.mode == "qat":  # dq needs no stored ranges: it measures every batch
            if not state_file.exists():
                raise Q8Error(f"{path}: no {QUANT_STATE_FILE} (QAT activation ranges); "
                              f"a checkpoint trained without QAT evaluates with --mode fp32 or dq")
            backend.load_quant_state(load_file(str(state_file)), where=str(state_file))
        return backend

    # -- training ----------------------------------------------------------------------------
    def configure_optimizer(self, *, learning_rate, weight_decay, warmup_steps, total_steps, adam_epsilon,
                            max_grad_norm):
        from transformers import get_linear_schedule_with_warmup

        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=learning_rate, eps=adam_epsilon, fused=True)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup_steps, total_steps)
        self.max_grad_norm = max_grad_norm

    def set_distillation(self, weight, temperature):
        self.distillation = (float(weight), float(temperature))

    def _loss(self, model, batch: dict[str, np.ndarray]) -> torch.Tensor:
        """The training loss of ``batch``: the task's, mixed with the distillation term when the batch
        carries ``teacher_logits`` (q8core.distillation.loss)."""
        out = model(**self._tensors(batch))
        if "teacher_logits" not in batch or self.distillation is None:
            return out.loss
        weight, temperature = self.distillation
        teacher = torch.from_numpy(np.asarray(batch["teacher_logits"], np.float32)).to(self.device)
        if self.regression:
            kd = F.mse_loss(out.logits.reshape(-1), teacher.reshape(-1))
        else:
            kd = F.kl_div(F.log_softmax(out.logits / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                          reduction="batchmean", log_target=True) * temperature ** 2
        return (1.0 - weight) * out.loss + weight * kd

    def _tensors(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        tensors = {name: torch.from_numpy(np.ascontiguousarray(value)).to(self.device)
                   for name, value in batch.items() if name in ("input_ids", "attention_mask", "token_type_ids")}
        if "labels" in batch:
            tensors["labels"] = torch.from_numpy(np.asarray(batch["labels"])).to(self.device)
        return tensors

    def train_step(self, batch):
        if self.optimizer is None:
            raise RuntimeError("configure_optimizer() must be called before train_step()")
        self.model.train()
        loss = self._loss(self.model, batch)
        loss.backward()
        self._optimizer_step()
        return float(loss.detach())

    def _optimizer_step(self) -> None:
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- data parallelism (torchrun) -----------------------------------------------------------
    @classmethod
    def rank_device(cls, device, env):
        kind, _, index = device.partition(":")
        if kind in ("gpu", "cuda"):
            if index:
                raise Q8Error(f"--device {device}: under {env.launcher} every process takes the GPU of its "
                              f"LOCAL_RANK; pass --device gpu (CUDA_VISIBLE_DEVICES picks the GPUs)")
            return f"gpu:{env.local_rank or 0}"
        return device

    @classmethod
    def init_distributed(cls, env, device):
        """The process group: NCCL on CUDA, gloo on CPU, rendezvous from torchrun's ``MASTER_ADDR``
        and ``MASTER_PORT`` (``env://``)."""
        import os

        import torch.distributed as dist

        if env.launcher != "torchrun":
            raise Q8Error(f"backend 'torch' trains data-parallel under torchrun; {env.launcher} started "
                          f"this process")
        if not dist.is_available():
            raise Q8Error("this PyTorch build has no torch.distributed")
        dev = torch_device(device)
        if dist.is_initialized():  # the caller set it up: use it as it is
            if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
                raise Q8Error(f"the initialised process group (rank {dist.get_rank()} of {dist.get_world_size()}) "
                              f"does not match RANK={env.rank} WORLD_SIZE={env.world_size}")
            return env
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise Q8Error(f"WORLD_SIZE={env.world_size} but {' and '.join(missing)} not set: start the "
                          f"processes with torchrun")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", rank=env.rank, world_size=env.world_size, device_id=dev)
        else:
            dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size)
        cls._owns_process_group = True
        return env

    @classmethod
    def shutdown_distributed(cls):
        import torch.distributed as dist

        if cls._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        cls._owns_process_group = False

    @classmethod
    def barrier(cls):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()

    @classmethod
    def broadcast_object(cls, obj, src=0):
        import torch.distributed as dist

        if not dist.is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def enable_data_parallel(self, env: DistributedEnv) -> None:
        """Wrap the model in DistributedDataParallel (it broadcasts rank 0's weights); the quantized
        layers all-reduce their batch max|x| (MAX) before each EMA update; ranks above 0 reseed their
        RNG (dropout) from the current state plus the rank, so rank 0 keeps a one-process run's stream."""
        from torch.nn.parallel import DistributedDataParallel

        self.dist = env
        sync_ranges(self.model)
        # buffers (EMA ranges, step counts) stay identical without broadcasting them every step
        self.ddp = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                           forward_sync_buffers=False)
        if env.rank:
            torch.manual_seed(int(torch.randint(0, 2 ** 62, (1,))) + env.rank)

    def disable_data_parallel(self):
        """Drop the DDP wrapper (its reducer holds the process group: a group that outlives
        destroy_process_group is torn down with the interpreter, and gloo may then abort the process)."""
        import gc

        if self.ddp is None:
            return
        self.ddp = None
        sync_ranges(self.model, False)
        self.dist = SINGLE
        gc.collect()

    def train_step_shard(self, batch, *, weight):
        import torch.distributed as dist

        if self.optimizer is None or self.ddp is None:
            raise RuntimeError("configure_optimizer() and enable_data_parallel() must come before train_step_shard()")
        self.ddp.train()
        loss = self._loss(self.ddp, batch)
        # DDP averages gradients over ranks: scaled so, the average is the global batch's mean gradient
        scale = weight * self.dist.world_size
        (loss if scale == 1.0 else loss * scale).backward()
        self._optimizer_step()
        total = (loss.detach().float() * weight).reshape(1)
        dist.all_reduce(total)
        return float(total)

    def learning_rate(self):
        return float(self.scheduler.get_last_lr()[0])

    # -- inference ---------------------------------------------------------------------------
    def predict(self, batch):
        self.model.eval()
        inputs = self._tensors({k: v for k, v in batch.items() if k != "labels"})
        with torch.inference_mode():
            return self.model(**inputs).logits.float().cpu().numpy()

    def quant_state(self):
        return {name: module.input_range() for name, module in quantized_modules(self.model)
                if hasattr(module, "ema_ready") and module.ema_ready}

    # -- persistence -------------------------------------------------------------------------
    def save(self, directory):
        self.model.save_pretrained(str(directory), safe_serialization=True)
        if self.spec.quantized:
            state = {}
            for name, module in quantized_modules(self.model):
                for key in module.state_names:
                    state[f"{name}.{key}"] = getattr(module, key).detach().cpu().reshape(1)
            save_file(state, str(Path(directory) / QUANT_STATE_FILE))
        return sorted(p.name for p in Path(directory).iterdir())

    def save_training_state(self, directory):
        """Optimizer moments and step counts, the schedule, the RNG: ``training_state.safetensors``."""
        optimizer = self.optimizer.state_dict()
        tensors = {f"optimizer.{index}.{name}": value.detach().cpu().contiguous()
                   for index, state in optimizer["state"].items() for name, value in state.items()}
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        metadata = {"param_groups": json.dumps(optimizer["param_groups"]),
                    "scheduler": json.dumps(self.scheduler.state_dict())}
        save_file(tensors, str(Path(directory) / TRAINING_STATE_FILE), metadata=metadata)
        return [TRAINING_STATE_FILE]

    def load_training_state(self, directory):
        path = Path(directory) / TRAINING_STATE_FILE
        if not path.exists():
            raise Q8Error(f"{directory}: no {TRAINING_STATE_FILE}; this checkpoint cannot be resumed")
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata()
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value.to(self.device)
        self.optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
        self.scheduler.load_state_dict(json.loads(metadata["scheduler"]))
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)

    def load_quant_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        modules = dict(quantized_modules(self.model))
        expected = {f"{name}.{key}" for name, module in modules.items() for key in module.state_names}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
            raise Q8Error(f"{where}: quantizer state does not fit the model ({detail})")
        for name, module in modules.items():
            for key in module.state_names:
                getattr(module, key).copy_(state[f"{name}.{key}"].reshape(()))

    def export(self, directory, fmt):
        self.check_export_format(fmt)
        # the quantized modules keep nn.Linear / nn.Embedding parameter names: a plain HF folder
        self.model.save_pretrained(str(directory), safe_serialization=True)
        return sorted(p.name for p in Path(directory).iterdir())
