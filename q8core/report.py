"""``q8 report``: figures and a Markdown summary of one run folder, or of several side by side.

Reads only what ``q8 run`` writes beside its checkpoints — ``run_config.json``, ``metrics.jsonl``
(see :class:`q8core.callbacks.MetricsLog` for the records), ``eval_results.json`` and
``trainer_state.json`` — and never loads a model. A run that is still going (or was killed) has no
``eval_results.json`` yet; it is reported from its log, marked unfinished.

The report folder holds PNG figures drawn with matplotlib's Agg canvas (no display, no pyplot
state) and ``report.md``, which embeds them by relative path. Every input is read and checked
before anything is written; the folder is then assembled under a temporary name and renamed into
place (each file inside it written under a temporary name too), so a report is never seen
half-written, and a failed run of ``q8 report`` leaves the previous report as it was.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .callbacks import METRICS_LOG
from .checkpoints import TRAINER_STATE_FILE, atomic_dir
from .config import RUN_CONFIG_FILE
from .errors import Q8Error

EVAL_RESULTS_FILE = "eval_results.json"  # as q8core.trainer writes it (not imported: it pulls in tokenizers)
REPORT_DIR = "report"  # default output: RUN_DIR/report for a single run
REPORT_FILE = "report.md"
FIGURE_FILES = {"loss": "loss.png", "metrics": "metrics.png", "learning_rate": "learning_rate.png",
                "ema": "ema.png"}
REPORT_FILES = frozenset({REPORT_FILE, *FIGURE_FILES.values()})
MAX_EMA_LAYERS = 6
_NOT_METRICS = {"type", "step", "epoch", "is_best"}
_LAYER_RE = re.compile(r"(?:^|\.)layer\.(\d+)\.(.+)$")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- reading a run folder --------------------------------------------------------------------------
@dataclass
class RunLog:
    """What one run folder says: settings, log records and (when finished) its results."""

    path: Path
    config: dict
    train: list[dict]
    evals: list[dict]
    results: dict | None = None  # eval_results.json; None while the run is unfinished
    state: dict | None = None  # trainer_state.json
    label: str = field(default="")

    @property
    def name(self) -> str:
        return self.path.resolve().name or str(self.path)

    @property
    def spec(self) -> dict:
        spec = self.config.get("spec")
        return spec if isinstance(spec, dict) else {}

    @property
    def mode(self) -> str:
        return str((self.results or {}).get("mode") or self.spec.get("mode") or "qat")

    @property
    def task(self) -> str:
        return str((self.results or {}).get("task") or self.config.get("task") or "?")

    @property
    def finished(self) -> bool:
        return self.results is not None

    @property
    def main_metric(self) -> str | None:
        for source in (self.results, self.state):
            if source and isinstance(source.get("main_metric"), str):
                return source["main_metric"]
        names = self.metric_names
        return names[0] if names else None

    @property
    def metric_names(self) -> list[str]:
        """Dev metrics in the order they were logged (the task's main metric comes first)."""
        names: dict[str, None] = {}
        for record in self.evals:
            names.update(dict.fromkeys(k for k in record if k not in _NOT_METRICS))
        for name in (self.results or {}).get("metrics") or {}:
            names.setdefault(name)
        return list(names)

    @property
    def steps(self) -> int:
        if self.results and _is_number(self.results.get("step")):
            return int(self.results["step"])
        return max((r["step"] for r in self.train + self.evals), default=0)

    @property
    def epoch(self) -> float | None:
        if self.results and _is_number(self.results.get("epoch")):
            return float(self.results["epoch"])
        last = max(self.train + self.evals, key=lambda r: r["step"])
        return float(last["epoch"]) if _is_number(last.get("epoch")) else None

    @property
    def total_steps(self) -> int | None:
        total = (self.state or {}).get("total_steps")
        return int(total) if _is_number(total) else None

    def best(self) -> tuple[float | None, int | None]:
        """Best main metric and its step: eval_results.json, else trainer_state.json, else the log."""
        for source in (self.results, self.state):
            if source and "best_step" in source:
                return source.get("best_metric"), source.get("best_step")
        main, best = self.main_metric, (None, None)
        for record in self.evals:
            if record.get("is_best") and main in record:
                best = (record[main], record["step"])
        return best

    def final_metrics(self) -> dict[str, float]:
        """The last evaluation: eval_results.json's metrics, else the last eval record."""
        if self.results and isinstance(self.results.get("metrics"), dict):
            return dict(self.results["metrics"])
        if not self.evals:
            return {}
        return {k: v for k, v in self.evals[-1].items() if k not in _NOT_METRICS}

    def sec_per_step(self) -> float | None:
        if self.results and _is_number(self.results.get("sec_per_step")):
            return float(self.results["sec_per_step"])
        last = next((r for r in reversed(self.train) if _is_number(r.get("elapsed_s"))), None)
        return last["elapsed_s"] / last["step"] if last and last["step"] else None

    def train_seconds(self) -> float | None:
        if self.results and _is_number(self.results.get("train_seconds")):
            return float(self.results["train_seconds"])
        last = next((r for r in reversed(self.train) if _is_number(r.get("elapsed_s"))), None)
        return float(last["elapsed_s"]) if last else None

    def ema_records(self) -> list[dict]:
        """Train records that carry activation ranges (QAT; none before ``--quant-delay`` ends)."""
        return [r for r in self.train if r.get("ema")]


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise Q8Error(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise Q8Error(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    if not text.strip():
        raise Q8Error(f"{path}: empty file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Q8Error(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise Q8Error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_metrics_log(path: Path) -> tuple[list[dict], list[dict]]:
    """The train and eval records of ``metrics.jsonl``, checked line by line (other types skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Q8Error(f"{path}: missing; the run has logged nothing yet") from None
    except UnicodeDecodeError:
        raise Q8Error(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise Q8Error(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    if not text.strip():
        raise Q8Error(f"{path}: empty; the run has logged nothing yet")
    train, evals = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise Q8Error(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("type"), str):
            raise Q8Error(f"{where}: not a q8 log record (a JSON object with a 'type')")
        kind, step = record["type"], record.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise Q8Error(f"{where}: {kind} record without a valid 'step' (got {step!r})")
        if kind == "train":
            for key in ("loss", "learning_rate"):
                if not _is_number(record.get(key)):
                    raise Q8Error(f"{where}: train record without a numeric {key!r}")
            ema = record.get("ema", {})
            if not isinstance(ema, dict) or not all(_is_range(v) for v in ema.values()):
                raise Q8Error(f"{where}: 'ema' is not an object of ranges (numbers, or [min, max] pairs)")
            train.append(record)
        elif kind == "eval":
            values = {k: v for k, v in record.items() if k not in _NOT_METRICS}
            if not values:
                raise Q8Error(f"{where}: eval record without metrics")
            bad = next((k for k, v in values.items() if not _is_number(v)), None)
            if bad is not None:
                raise Q8Error(f"{where}: eval metric {bad!r} is not a number")
            evals.append(record)
        # checkpoint records (and any later kind) say nothing the figures need
    if not train and not evals:
        raise Q8Error(f"{path}: no train or eval records yet")
    return train, evals


def load_run(path: Path) -> RunLog:
    """Read and check one run folder; a problem is a one-line :class:`Q8Error` naming the file."""
    path = Path(path)
    if not path.exists():
        raise Q8Error(f"{path}: no such run folder")
    if not path.is_dir():
        raise Q8Error(f"{path} is a file, not a run folder")
    if not (path / RUN_CONFIG_FILE).is_file():
        raise Q8Error(f"{path}: not a q8 run folder (no {RUN_CONFIG_FILE})")
    config = _read_json(path / RUN_CONFIG_FILE)
    train, evals = read_metrics_log(path / METRICS_LOG)
    results = _read_json(path / EVAL_RESULTS_FILE) if (path / EVAL_RESULTS_FILE).exists() else None
    state = _read_json(path / TRAINER_STATE_FILE) if (path / TRAINER_STATE_FILE).exists() else None
    return RunLog(path=path, config=config, train=train, evals=evals, results=results, state=state)


def _label_runs(runs: Sequence[RunLog]) -> None:
    """Legend and column labels: the folder name, plus the mode where the name does not say it."""
    names = [run.name for run in runs]
    for run in runs:
        name = run.name
        if names.count(name) > 1:  # runs/a/qat and runs/b/qat
            parent = run.path.resolve().parent.name
            name = f"{parent}/{name}" if parent else str(run.path)
        run.label = name if run.mode.lower() in name.lower() else f"{name} ({run.mode})"


# -- figures -------------------------------------------------------------------------------------
def _figure(panels: int, max_cols: int = 3):
    """A Figure on an Agg canvas with ``panels`` axes (no pyplot: nothing global, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cols = min(panels, max_cols)
    rows = math.ceil(panels / cols)
    width = 7.0 if panels == 1 else 4.2 * cols
    fig = Figure(figsize=(width, 3.3 * rows + (0.6 if panels > 1 else 0.5)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[panels:]:
        fig.delaxes(ax)
    for ax in axes[:panels]:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
    return fig, list(axes[:panels])


def _style(n_points: int) -> dict:
    return {"marker": "o", "markersize": 3} if n_points <= 30 else {}


def _legend(fig, axes) -> None:
    """One legend: in the axes for a single panel, above the panels for several."""
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if not handles:
        return
    if len(axes) == 1:
        axes[0].legend(handles, labels, fontsize=8)
    else:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=8)


def loss_figure(runs: Sequence[RunLog]):
    """Training loss (mean over each logging interval) against the step; None without train records."""
    if not any(run.train for run in runs):
        return None
    fig, (ax,) = _figure(1)
    for i, run in enumerate(runs):
        if run.train:
            ax.plot([r["step"] for r in run.train], [r["loss"] for r in run.train], color=f"C{i}",
                    label=run.label, **_style(len(run.train)))
        start = run.spec.get("start_step")
        if run.mode != "fp32" and _is_number(start) and start > 0:
            ax.axvline(start, color=f"C{i}", linestyle=":", linewidth=1, label=f"{run.label}: quantization starts")
    ax.set(title="Training loss", xlabel="step", ylabel="loss (mean since the previous log)")
    _legend(fig, [ax])
    return fig


def learning_rate_figure(runs: Sequence[RunLog]):
    if not any(run.train for run in runs):
        return None
    fig, (ax,) = _figure(1)
    for i, run in enumerate(runs):
        if run.train:
            ax.plot([r["step"] for r in run.train], [r["learning_rate"] for r in run.train], color=f"C{i}",
                    label=run.label, **_style(len(run.train)))
    ax.set(title="Learning rate", xlabel="step", ylabel="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    _legend(fig, [ax])
    return fig


def metric_panels(runs: Sequence[RunLog]) -> list[str]:
    """Every dev metric of the runs, main metrics first."""
    names: dict[str, None] = {}
    for run in runs:
        if run.main_metric and run.evals:
            names.setdefault(run.main_metric)
    for run in runs:
        names.update(dict.fromkeys(n for n in run.metric_names if any(n in r for r in run.evals)))
    return list(names)


def metrics_figure(runs: Sequence[RunLog]):
    """One panel per dev metric over the steps; a star marks each run's best main metric."""
    names = metric_panels(runs)
    if not names:
        return None
    fig, axes = _figure(len(names))
    for ax, name in zip(axes, names):
        for i, run in enumerate(runs):
            points = [(r["step"], r[name]) for r in run.evals if name in r]
            if not points:
                continue
            ax.plot(*zip(*points), color=f"C{i}", label=run.label, marker="o", markersize=4)
            value, step = run.best()
            if name == run.main_metric and _is_number(value) and _is_number(step):
                ax.plot([step], [value], color=f"C{i}", marker="*", markersize=13, linestyle="none")
        main = all(run.main_metric == name for run in runs if run.evals)
        ax.set(title=f"dev {name}" + (" (main metric; ★ best)" if main else ""), xlabel="step", ylabel=name)
    _legend(fig, axes)
    return fig


def select_ema_layers(runs: Sequence[RunLog], limit: int = MAX_EMA_LAYERS) -> list[str]:
    """A handful of representative quantized layers: the first and the last encoder layer's query
    (its input is the embeddings' output in layer 0) and output dense, the pooler and the classifier.
    Layers whose names do not follow BERT's get an even spread instead."""
    keys: dict[str, None] = {}
    for run in runs:
        for record in run.ema_records():
            keys.update(dict.fromkeys(record["ema"]))
    if not keys:
        return []
    layered = {key: (int(m.group(1)), m.group(2)) for key in keys if (m := _LAYER_RE.search(key))}
    chosen: list[str] = []
    if layered:
        first, last = min(i for i, _ in layered.values()), max(i for i, _ in layered.values())
        for index in (first, last):
            for suffix in ("attention.self.query", "output.dense"):
                chosen += [k for k, v in layered.items() if v == (index, suffix) and k not in chosen]
        others = [k for k in keys if k not in layered]
        chosen += [k for k in others if k.endswith("pooler.dense")][:1]
        chosen += [k for k in others if "classifier" in k][-1:]
    if not chosen:
        ordered = list(keys)
        count = min(limit, len(ordered))
        chosen = [ordered[round(j * (len(ordered) - 1) / max(count - 1, 1))] for j in range(count)]
    return list(dict.fromkeys(chosen))[:limit]


def ema_figure(runs: Sequence[RunLog]):
    """EMA of max|input| of the selected layers over the steps; None without QAT records."""
    layers = select_ema_layers(runs)
    if not layers:
        return None
    fig, axes = _figure(len(layers))
    for ax, layer in zip(axes, layers):
        for i, run in enumerate(runs):
            points = [(r["step"], r["ema"][layer]) for r in run.ema_records() if layer in r["ema"]]
            if points and isinstance(points[0][1], list):  # asymmetric grid: max solid, min dashed
                ax.plot([s for s, _ in points], [v[1] for _, v in points], color=f"C{i}", label=run.label,
                        **_style(len(points)))
                ax.plot([s for s, _ in points], [v[0] for _, v in points], color=f"C{i}", linestyle="--")
            elif points:
                ax.plot(*zip(*points), color=f"C{i}", label=run.label, **_style(len(points)))
        ax.set_title(layer.removeprefix("bert."), fontsize=9)
        ax.set(xlabel="step", ylabel="EMA of max|input| (or min, max)")
        ax.ticklabel_format(axis="y", useOffset=False)  # with decay 0.9999 the ranges barely move
    fig.suptitle("Activation ranges (EMA of the input's max |x|; 8-bit scale = 127 / EMA)", fontsize=10)
    _legend(fig, axes)
    return fig


def build_figures(runs: Sequence[RunLog]) -> dict[str, Any]:
    """The report's figures by key of :data:`FIGURE_FILES`; those without data are left out."""
    figures = {"loss": loss_figure(runs), "metrics": metrics_figure(runs),
               "learning_rate": learning_rate_figure(runs), "ema": ema_figure(runs)}
    return {key: fig for key, fig in figures.items() if fig is not None}


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


# -- report.md -----------------------------------------------------------------------------------
def _is_range(value: Any) -> bool:
    """An activation range as the trainer logs it: max|x|, or [min x, max x] on the asymmetric grid."""
    return _is_number(value) or (isinstance(value, list) and len(value) == 2 and all(map(_is_number, value)))


def _cell(value: Any, digits: int | None = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, list) and digits is not None and _is_range(value):
        return f"{value[0]:.{digits}f} .. {value[1]:.{digits}f}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and digits is not None:
        return f"{value:.{digits}f}"
    if isinstance(value, (dict, list)):
        value = json.dumps(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align_right: bool = True) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|---|" + "|".join("---:" if align_right else "---" for _ in header[1:]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _seconds(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f} s"


def render_markdown(runs: Sequence[RunLog], figures: Sequence[str]) -> str:
    header = [""] + [_cell(run.label) for run in runs]
    several = len(runs) > 1
    title = runs[0].label if not several else " vs ".join(run.label for run in runs)
    lines = [f"# Run report: {_cell(title)}", "",
             f"Written by `q8 report` from {len(runs)} run folder{'s' if several else ''}; "
             "numbers with 4 decimals, times in seconds.", ""]

    # summary
    rows = [["run folder"] + [f"`{_cell(str(run.path))}`" for run in runs],
            ["task"] + [_cell(run.task) for run in runs],
            ["mode"] + [_cell(run.mode) for run in runs],
            ["backend"] + [_cell((run.results or {}).get("backend") or run.config.get("backend")) for run in runs],
            ["status"] + ["finished" if run.finished else
                          f"unfinished (no {EVAL_RESULTS_FILE}; logged up to step {run.steps}"
                          + (f" of {run.total_steps})" if run.total_steps else ")") for run in runs],
            ["steps"] + [str(run.steps) for run in runs],
            ["epochs"] + [_cell(run.epoch, 2) for run in runs]]
    mains = {run.main_metric for run in runs}
    main_label = next(iter(mains)) if len(mains) == 1 and None not in mains else "main metric"
    rows.append(["main metric"] + [_cell(run.main_metric) for run in runs])
    rows.append([f"best {main_label}"] + [_cell(run.best()[0]) for run in runs])
    rows.append(["best step"] + [_cell(run.best()[1]) for run in runs])
    rows.append(["best checkpoint"] + [_cell((run.state or {}).get("best_checkpoint")) for run in runs])
    finals = [run.final_metrics() for run in runs]
    names = list(dict.fromkeys(name for run in runs for name in ([run.main_metric] if run.main_metric else [])
                               + run.metric_names))
    for name in names:
        rows.append([f"final {name}"] + [_cell(final.get(name)) for final in finals])
    rows.append(["final loss"] + [f"{run.train[-1]['loss']:.4f} (step {run.train[-1]['step']})" if run.train
                                  else "—" for run in runs])
    rows.append(["logged train steps"] + [str(len(run.train)) for run in runs])
    rows.append(["evaluations"] + [str(len(run.evals)) for run in runs])
    rows.append(["training time"] + [_seconds(run.train_seconds(), 1) for run in runs])
    rows.append(["time per step"] + [_seconds(run.sec_per_step(), 3) for run in runs])
    lines += ["## Summary", ""] + _table(header, rows) + [""]
    lines += ["Time per step is the run's wall time over its steps, evaluations and checkpoints included "
              "(`eval_results.json`).", ""]

    # figures
    alt = {"loss": "training loss", "metrics": "dev metrics", "learning_rate": "learning rate",
           "ema": "activation ranges"}
    captions = {"loss": "Training loss (mean over each logging interval)",
                "metrics": "Dev metrics at each evaluation (★: best main metric, the checkpoint kept as best)",
                "learning_rate": "Learning rate (linear warm-up, then linear decay)",
                "ema": "QAT activation ranges of a few layers: the EMA of each input's max |x|, whose 8-bit "
                       "scale is 127 / EMA (on the asymmetric grid the EMAs of max x, solid, and min x, dashed; "
                       "embeddings quantize only their weights: their inputs are token ids)"}
    if figures:
        lines += ["## Figures", ""]
        for key in figures:
            lines += [f"{captions[key]}:", "", f"![{alt[key]}]({FIGURE_FILES[key]})", ""]

    # activation ranges at the end
    layers = select_ema_layers(runs)
    if layers:
        lasts = [run.ema_records()[-1] if run.ema_records() else None for run in runs]
        rows = [[f"`{_cell(layer)}`"] + [_cell(last["ema"].get(layer)) if last else "—" for last in lasts]
                for layer in layers]
        rows.append(["quantized layers with a range"] + [str(len(last["ema"])) if last else "—" for last in lasts])
        rows.append(["at step"] + [str(last["step"]) if last else "—" for last in lasts])
        lines += ["## Activation ranges at the last logged step", ""] + _table(header, rows) + [""]

    # settings
    flats = [_flat(run.config) for run in runs]
    keys = list(dict.fromkeys(key for flat in flats for key in flat))
    rows = []
    for key in keys:
        values = [_cell(flat.get(key), None) if key in flat else "—" for flat in flats]
        differs = several and len(set(values)) > 1
        rows.append([f"**{key}**" if differs else key] + values)
    lines += ["## Settings", "", f"From `{RUN_CONFIG_FILE}`; `spec.*` is the quantizer spec"
              + ("; settings that differ between the runs are in bold." if several else "."), ""]
    lines += _table(header, rows) + [""]
    return "\n".join(lines)


# -- writing ---------------------------------------------------------------------------------------
def _write_bytes(path: Path, data: bytes) -> None:
    """Under a temporary name, then renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _check_output(output: Path) -> None:
    """The report folder may be new, empty, or a previous report (only report files in it)."""
    existing = next(p for p in (output, *output.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise Q8Error(f"report folder {output}: {existing} is a file, not a folder")
    if output.is_dir():
        foreign = sorted(p.name for p in output.iterdir() if p.name not in REPORT_FILES)
        if foreign:
            raise Q8Error(f"report folder {output} holds other files ({foreign[0]}); "
                          f"give a new folder or a previous report's")


def default_output(run_dirs: Sequence[Path]) -> Path:
    if len(run_dirs) != 1:
        raise Q8Error(f"{len(run_dirs)} runs: pass --output DIR for their combined report")
    return Path(run_dirs[0]) / REPORT_DIR


def write_report(run_dirs: Sequence[Path], output: Path | None = None) -> tuple[Path, list[str]]:
    """Read every run, draw, and write the report folder; returns it and the files written."""
    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise Q8Error("give at least one run folder")
    seen: set[Path] = set()
    for path in run_dirs:
        if path.resolve() in seen:
            raise Q8Error(f"{path}: the same run folder is given twice")
        seen.add(path.resolve())
    output = Path(output) if output is not None else default_output(run_dirs)
    runs = [load_run(path) for path in run_dirs]
    _label_runs(runs)
    _check_output(output)
    figures = build_figures(runs)
    files = {FIGURE_FILES[key]: _png(fig) for key, fig in figures.items()}
    files[REPORT_FILE] = render_markdown(runs, list(figures)).encode("utf-8")
    try:
        with atomic_dir(output) as tmp:
            for name, data in files.items():
                _write_bytes(tmp / name, data)
    except OSError as exc:
        raise Q8Error(f"report folder {output}: cannot write it ({exc.strerror or type(exc).__name__})") from None
    return output, [REPORT_FILE] + [FIGURE_FILES[key] for key in figures]
