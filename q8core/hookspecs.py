"""Every extension point of q8bert, on one screen.

Plugins are modules (or objects) with functions marked ``@hookimpl``, found through the
``q8bert`` entry-point group; the built-in PyTorch backend and GLUE tasks register the same way a
third-party package does. Registration hooks receive a ``register`` callback so the host keeps
control of names, duplicates and error messages. Trainer events are called for every plugin,
in registration order; their return values are ignored.
"""

import pluggy

hookspec = pluggy.HookspecMarker("q8bert")
hookimpl = pluggy.HookimplMarker("q8bert")


@hookspec
def register_backends(register):
    """Call ``register(backend_class)`` for each :class:`q8core.backend.Backend` subclass."""


@hookspec
def register_tasks(register):
    """Call ``register(task)`` for each :class:`q8core.task.Task` instance."""


@hookspec
def register_export_formats(register):
    """Call ``register(export_format)`` for each :class:`q8core.export.ExportFormat`: a ``q8 export
    --format`` built on any backend's ``hf`` export, with the backend that runs what it writes."""


@hookspec
def add_backend_options(parser):
    """Add a backend's own ``q8 run`` / ``q8 eval`` options: ``parser.group(backend_name).add(name,
    type=int, default=1, help=...)`` (see :mod:`q8core.options`)."""


@hookspec
def on_train_start(trainer):
    """Training is about to start; ``trainer.config``, ``trainer.total_steps`` are set."""


@hookspec
def on_step_end(trainer, step, logs):
    """A logging step ended; ``logs`` holds loss, learning rate, epoch, timing (and EMA ranges)."""


@hookspec
def on_evaluate(trainer, step, metrics, is_best):
    """The dev set was evaluated at ``step``; ``is_best`` when the main metric improved."""


@hookspec
def on_checkpoint_saved(trainer, step, path):
    """A complete checkpoint folder was written at ``path``."""


@hookspec
def on_train_end(trainer, results):
    """Training finished; ``results`` is what ``eval_results.json`` holds."""
