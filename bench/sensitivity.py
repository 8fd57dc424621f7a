"""Where 8-bit quantization costs accuracy: per layer group, on fine-tuned runs (not a test).

    python bench/sensitivity.py [--task sts-b] [--seeds 42,1,2] [--quant-delay 100] [--runs runs/glue]
                                [--glue ../shared/glue] [--rows 256] [--output docs/sensitivity]

Reads the final checkpoints of the FP32 and QAT runs that `bench/accuracy.py` makes (same folder
names, PyTorch backend) and measures on the task's dev set:

    ranges     for the input of every quantized linear layer, on the first --rows dev rows of the FP32
               model: max|x| (what the quantizer scales by), the 99.9th percentile of |x|, the share of
               inputs that round to 0 at that scale, and the channel that holds the maximum
    DQ, one group quantized
               the FP32 checkpoint with 8-bit post-training (dynamic) quantization in one group of
               layers only -- the embeddings, Q/K/V, the attention output, the FFN intermediate, the
               FFN output, the pooler and classifier; then each encoder layer -- against the float model
    DQ, one group left float
               the same with everything quantized but that group: what keeping it float would buy
    QAT, one group left float
               the QAT checkpoint with that one group's quantization switched off at inference (the rest
               as trained), against the QAT model with everything quantized; and the QAT master weights
               with no quantization at all

The groups are switched through each quantized module's spec (PyTorch backend internals: this is a
diagnostic, not a feature). Evaluations are cached per checkpoint (``sensitivity.json`` in the run
folder), so a rerun or a new seed only evaluates what is missing. Writes ``sensitivity.md``,
``sensitivity.json`` and ``sensitivity.png`` to --output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import DATA, MAIN, run_folder  # noqa: E402  (the run folders bench/accuracy.py makes)

GROUPS = {  # name -> regular expression on the Hugging Face module name
    "embeddings": r"\.embeddings\.",
    "Q, K, V": r"\.attention\.self\.",
    "attention output": r"\.attention\.output\.dense$",
    "FFN intermediate": r"\.intermediate\.dense$",
    "FFN output": r"\.layer\.\d+\.output\.dense$",
    "pooler, classifier": r"pooler|classifier",
}
LAYER = r"\.layer\.{}\."


def final_checkpoint(folder: Path) -> Path:
    results = folder / "eval_results.json"
    if not results.exists():
        raise SystemExit(f"{folder}: no finished run (make it with bench/accuracy.py)")
    return folder / f"checkpoint-{json.loads(results.read_text())['step']}"


class Model:
    """One checkpoint on the PyTorch backend, whose quantized modules can be switched group by group."""

    def __init__(self, checkpoint: Path, mode: str, task, data_dir: Path) -> None:
        from backends.pytorch.backend import TorchBackend
        from backends.pytorch.quantization import quantized_modules
        from q8core.evaluation import load_eval_sets
        from q8core.spec import QuantSpec
        from q8core.tokenization import load_tokenizer

        self.task = task
        spec = dataclasses.replace(QuantSpec.load(checkpoint), mode=mode)
        self.backend = TorchBackend.from_checkpoint(checkpoint, spec=spec, device="cpu")
        self.modules = quantized_modules(self.backend.model)
        self.specs = {name: module.spec for name, module in self.modules}
        self.sets = load_eval_sets(task, data_dir, load_tokenizer(checkpoint), 128, "tsv")
        self.cache_file = checkpoint.parent / "sensitivity.json"
        cache = json.loads(self.cache_file.read_text()) if self.cache_file.exists() else {}
        self.cache = cache.get(checkpoint.name, {})
        self.all_cache, self.checkpoint = cache, checkpoint.name

    def score(self, key: str, quantized) -> float:
        """Main dev metric with ``quantized(name)`` deciding, per module, whether it quantizes."""
        from q8core.evaluation import evaluate

        if key not in self.cache:
            for name, module in self.modules:
                spec = self.specs[name]
                module.spec = spec if quantized(name) else dataclasses.replace(spec, mode="fp32")
            self.cache[key] = evaluate(self.backend, self.task, self.sets, 32, True)[MAIN[self.task.name]]
            self.all_cache[self.checkpoint] = self.cache
            self.cache_file.write_text(json.dumps(self.all_cache, indent=1) + "\n")
            print(f"  {self.checkpoint} {key}: {100 * self.cache[key]:.2f}", file=sys.stderr, flush=True)
        return self.cache[key]


def groups(num_layers: int) -> dict[str, str]:
    return {**GROUPS, **{f"encoder layer {i}": LAYER.format(i) for i in range(num_layers)}}


def sensitivity(fp32: Model, qat: Model, num_layers: int) -> dict[str, dict[str, float]]:
    """Scores (dev metric, not ×100) for one seed."""
    out = {"fp32": fp32.score("fp32", lambda n: False), "dq": fp32.score("dq", lambda n: True),
           "qat": qat.score("qat", lambda n: True), "qat master weights": qat.score("fp32", lambda n: False),
           "dq only": {}, "dq without": {}, "qat without": {}}
    for group, pattern in groups(num_layers).items():
        inside = re.compile(pattern).search
        out["dq only"][group] = fp32.score(f"dq only {group}", lambda n: bool(inside(n)))
        if not group.startswith("encoder layer"):
            out["dq without"][group] = fp32.score(f"dq without {group}", lambda n: not inside(n))
            out["qat without"][group] = qat.score(f"qat without {group}", lambda n: not inside(n))
    return out


def ranges(model: Model, rows: int) -> list[dict]:
    """Input statistics of every quantized linear layer over the first ``rows`` dev rows (float model)."""
    import numpy as np
    import torch

    from backends.pytorch.quantization import QuantizedLinear

    for _, module in model.modules:
        module.spec = dataclasses.replace(module.spec, mode="fp32")
    seen: dict[str, list] = {}
    hooks = [module.register_forward_hook(
        lambda mod, inputs, output, name=name: seen.setdefault(name, []).append(inputs[0].detach()))
        for name, module in model.modules if isinstance(module, QuantizedLinear)]
    arrays = next(iter(model.sets.values()))
    model.backend.model.eval()
    with torch.no_grad():
        for start in range(0, min(rows, len(arrays["input_ids"])), 32):
            batch = {k: torch.from_numpy(np.ascontiguousarray(v[start:start + 32]))
                     for k, v in arrays.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            length = int(batch["attention_mask"].sum(1).max())
            batch = {k: v[:, :length] for k, v in batch.items()}
            real = batch["attention_mask"].reshape(-1).bool()
            model.backend.model(**batch)
            for values in seen.values():  # padded positions out (the pooler sees one row per example)
                if values[-1].dim() == 3:
                    values[-1] = values[-1].reshape(-1, values[-1].shape[-1])[real]
    for hook in hooks:
        hook.remove()
    table = []
    for name, values in seen.items():
        x = torch.cat(values).abs()
        peak = float(x.max())
        sample = x.flatten()[:: max(1, x.numel() // 2_000_000)]
        table.append({"layer": name.removeprefix("bert."), "max": peak,
                      "p99.9": float(torch.quantile(sample, 0.999)),
                      "to zero": float((x < peak / 127 / 2).float().mean()),
                      "channel": int(x.max(0).values.argmax())})
    return table


def report(task: str, seeds: list[int], per_seed: list[dict], table: list[dict], command: str) -> list[str]:
    metric = MAIN[task]
    pct = lambda key: 100 * mean(s[key] for s in per_seed)  # noqa: E731
    lines = [f"# Where 8-bit quantization costs {task} accuracy", "",
             f"Written by `{command}`: all-MiniLM-L6-v2 (PyTorch backend), the final checkpoints of "
             f"`bench/accuracy.py`'s runs, dev {metric} × 100, mean over seeds {', '.join(map(str, seeds))}.", "",
             f"FP32 {pct('fp32'):.2f}, DQ (everything quantized) {pct('dq'):.2f}, QAT {pct('qat'):.2f}, "
             f"QAT master weights run without quantization {pct('qat master weights'):.2f}.", "",
             "## DQ: the FP32 model with one group quantized", "",
             "| group | score | change from FP32 |" + "".join(f" seed {s} |" for s in seeds),
             "|---|---:|---:|" + "---:|" * len(seeds)]
    for group in per_seed[0]["dq only"]:
        deltas = [100 * (s["dq only"][group] - s["fp32"]) for s in per_seed]
        lines.append(f"| {group} | {100 * mean(s['dq only'][group] for s in per_seed):.2f} | {mean(deltas):+.2f} |"
                     + "".join(f" {d:+.2f} |" for d in deltas))
    lines += ["", "## DQ: the FP32 model with everything but one group quantized", "",
              "| group left float | score | change from DQ | / FP32 |" + "".join(f" seed {s} |" for s in seeds),
              "|---|---:|---:|---:|" + "---:|" * len(seeds)]
    for group in per_seed[0]["dq without"]:
        deltas = [100 * (s["dq without"][group] - s["dq"]) for s in per_seed]
        ratio = mean(s["dq without"][group] / s["fp32"] for s in per_seed)
        lines.append(f"| {group} | {100 * mean(s['dq without'][group] for s in per_seed):.2f} | {mean(deltas):+.2f} "
                     f"| {ratio:.3f} |" + "".join(f" {d:+.2f} |" for d in deltas))
    lines += ["", "## QAT: the QAT model with one group left float at inference", "",
              "| group | score | change from QAT |" + "".join(f" seed {s} |" for s in seeds),
              "|---|---:|---:|" + "---:|" * len(seeds)]
    for group in per_seed[0]["qat without"]:
        deltas = [100 * (s["qat without"][group] - s["qat"]) for s in per_seed]
        lines.append(f"| {group} | {100 * mean(s['qat without'][group] for s in per_seed):.2f} | "
                     f"{mean(deltas):+.2f} |" + "".join(f" {d:+.2f} |" for d in deltas))
    lines += ["", f"## Input ranges of the quantized layers (FP32 model, seed {seeds[0]}, first dev rows)", "",
              "max|x| sets the 8-bit step (max/127); \"to 0\" is the share of inputs smaller than half a step, "
              "which quantize to 0; the channel is the input feature that holds the maximum.", "",
              "| layer | max\\|x\\| | 99.9th pct | max / p99.9 | to 0 | channel |", "|---|---:|---:|---:|---:|---:|"]
    for row in table:
        lines.append(f"| {row['layer']} | {row['max']:.2f} | {row['p99.9']:.2f} | {row['max'] / row['p99.9']:.1f} "
                     f"| {100 * row['to zero']:.1f}% | {row['channel']} |")
    return lines + [""]


def plot(per_seed: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    names = list(per_seed[0]["dq only"])
    deltas = [100 * mean(s["dq only"][g] - s["fp32"] for s in per_seed) for g in names]
    bars = ax.barh(names[::-1], deltas[::-1], color="tab:red")
    ax.bar_label(bars, fmt="%+.2f", fontsize=7)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("change in dev metric × 100 when only this group is quantized (DQ, mean over seeds)")
    ax.set_title("all-MiniLM-L6-v2: where 8-bit post-training quantization loses accuracy", fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="sts-b")
    parser.add_argument("--seeds", default="42,1,2")
    parser.add_argument("--quant-delay", type=int, default=100, help="which QAT runs (as bench/accuracy.py)")
    parser.add_argument("--runs", default="runs/glue")
    parser.add_argument("--glue", default="../shared/glue")
    parser.add_argument("--rows", type=int, default=256, help="dev rows for the range statistics")
    parser.add_argument("--output", default="docs/sensitivity")
    args = parser.parse_args(argv)

    from q8core.plugins import load_registry

    task = load_registry().task(args.task)
    data_dir = Path(args.glue) / DATA[args.task]
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed, table = [], None
    for seed in seeds:
        folders = {m: run_folder(Path(args.runs), args.task, m, seed, "torch", args.quant_delay) for m in ("fp32", "qat")}
        fp32 = Model(final_checkpoint(folders["fp32"]), "dq", task, data_dir)
        qat = Model(final_checkpoint(folders["qat"]), "qat", task, data_dir)
        num_layers = fp32.backend.model.config.num_hidden_layers
        per_seed.append(sensitivity(fp32, qat, num_layers))
        if table is None:
            table = ranges(fp32, args.rows)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    delay = "" if args.quant_delay == 100 else f" --quant-delay {args.quant_delay}"
    command = f"python bench/sensitivity.py --task {args.task} --seeds {args.seeds}{delay}"
    lines = report(args.task, seeds, per_seed, table, command)
    (out / "sensitivity.md").write_text("\n".join(lines))
    (out / "sensitivity.json").write_text(json.dumps({"seeds": seeds, "scores": per_seed, "ranges": table},
                                                     indent=1) + "\n")
    plot(per_seed, out / "sensitivity.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
