"""The plugin manager: loads the ``q8bert`` entry points and collects backends, tasks and export formats.

Built-ins and third-party packages come through the same door: an entry point in the ``q8bert``
group pointing at a module with ``@hookimpl`` functions. ``Q8_PLUGINS`` (comma-separated
entry-point names; empty for none) limits which entry points load, so tests do not depend on
whatever else is installed. A plugin that fails to import is recorded in
:attr:`Registry.failures` (named, with its error) and the others keep working.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .errors import Q8Error
from .task import Task, normalize_task_name

ENTRY_POINT_GROUP = "q8bert"
PLUGINS_ENV = "Q8_PLUGINS"


@dataclass(frozen=True)
class Registered:
    """Something a plugin registered, with who registered it."""

    name: str
    obj: Any
    plugin: str
    version: str


@dataclass
class Registry:
    """Backends, tasks and export formats of every loaded plugin, by name."""

    pm: pluggy.PluginManager
    backends: dict[str, Registered] = field(default_factory=dict)
    tasks: dict[str, Registered] = field(default_factory=dict)
    export_formats: dict[str, Registered] = field(default_factory=dict)  # obj: q8core.export.ExportFormat
    options: list = field(default_factory=list)  # q8core.options.BackendOption, from add_backend_options
    failures: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)  # plugin name -> distribution version
    _aliases: dict[str, str] = field(default_factory=dict)

    def backend(self, name: str) -> Any:
        """The backend class called ``name`` (or one of its aliases)."""
        key = self._aliases.get(name.lower(), name.lower())
        if key not in self.backends:
            raise Q8Error(f"unknown backend {name!r}; installed: {self._listing(self.backends)}")
        return self.backends[key].obj

    def task(self, name: str) -> Task:
        """The task called ``name``, case- and hyphen-insensitive (``STS-B``, ``stsb``)."""
        key = normalize_task_name(name)
        if key not in self.tasks:
            raise Q8Error(f"unknown task {name!r}; installed: {self._listing(self.tasks)}")
        return self.tasks[key].obj

    def formats(self) -> dict:
        """The plugins' export formats: name -> :class:`q8core.export.ExportFormat`."""
        return {name: entry.obj for name, entry in self.export_formats.items()}

    def _listing(self, table: dict[str, Registered]) -> str:
        names = ", ".join(sorted(entry.name for entry in table.values())) or "none"
        if self.failures:
            names += f" (failed to load: {', '.join(sorted(self.failures))})"
        return names


def _call_each(registry: Registry, hook, make_register) -> None:
    """Call every implementation of a registration hook with its own ``register`` callback.

    A plugin whose hook raises is recorded in ``registry.failures``; a name clash (Q8Error)
    stops everything, because which plugin should win is the user's decision.
    """
    for impl in hook.get_hookimpls():
        version = registry.versions.get(impl.plugin_name, getattr(impl.plugin, "__version__", "-"))
        try:
            impl.function(register=make_register(impl.plugin_name, version))
        except Q8Error:
            raise
        except Exception as exc:
            registry.failures[impl.plugin_name] = _describe(exc)


def _backend_registrar(registry: Registry):
    def make_register(plugin: str, version: str):
        def register(cls: Any) -> None:
            name = getattr(cls, "name", None)
            if not isinstance(name, str) or not name:
                raise Q8Error(f"plugin {plugin}: registered a backend without a name")
            names = [name, *getattr(cls, "aliases", ())]
            for spelled in names:
                owner = registry.backends.get(registry._aliases.get(spelled.lower(), spelled.lower()))
                if owner is not None:
                    raise Q8Error(f"backend {spelled!r} is registered twice: by plugin {owner.plugin} "
                                  f"and by plugin {plugin}")
            registry.backends[name.lower()] = Registered(name, cls, plugin, version)
            for alias in names[1:]:
                registry._aliases[alias.lower()] = name.lower()
        return register
    return make_register


def _task_registrar(registry: Registry):
    def make_register(plugin: str, version: str):
        def register(task: Task) -> None:
            key = normalize_task_name(task.name)
            if key in registry.tasks:
                raise Q8Error(f"task {task.name!r} is registered twice: by plugin "
                              f"{registry.tasks[key].plugin} and by plugin {plugin}")
            registry.tasks[key] = Registered(task.name, task, plugin, version)
        return register
    return make_register


def _format_registrar(registry: Registry):
    from .export import ONNX_FORMATS, ExportFormat

    def make_register(plugin: str, version: str):
        def register(fmt: ExportFormat) -> None:
            if not isinstance(fmt, ExportFormat) or not fmt.name:
                raise Q8Error(f"plugin {plugin}: registered an export format that is no named ExportFormat")
            if fmt.name in ONNX_FORMATS:
                raise Q8Error(f"export format {fmt.name!r} is built in; plugin {plugin} cannot register it")
            if fmt.name in registry.export_formats:
                raise Q8Error(f"export format {fmt.name!r} is registered twice: by plugin "
                              f"{registry.export_formats[fmt.name].plugin} and by plugin {plugin}")
            registry.export_formats[fmt.name] = Registered(fmt.name, fmt, plugin, version)
        return register
    return make_register


def _describe(exc: BaseException) -> str:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {detail}".rstrip(": ")


def load_registry(extra_plugins: tuple[object, ...] = ()) -> Registry:
    """A fresh plugin manager with the selected entry points (and ``extra_plugins``) loaded."""
    pm = pluggy.PluginManager("q8bert")
    pm.add_hookspecs(hookspecs)
    registry = Registry(pm)

    selected = os.environ.get(PLUGINS_ENV)
    wanted = None if selected is None else {n.strip() for n in selected.split(",") if n.strip()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if wanted is not None and ep.name not in wanted:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the others down
            registry.failures[ep.name] = _describe(exc)
            continue
        if ep.dist is not None:
            registry.versions[ep.name] = f"{ep.dist.name} {ep.dist.version}"
    for plugin in extra_plugins:
        pm.register(plugin)
    _call_each(registry, pm.hook.register_backends, _backend_registrar(registry))
    _call_each(registry, pm.hook.register_tasks, _task_registrar(registry))
    _call_each(registry, pm.hook.register_export_formats, _format_registrar(registry))
    _add_options(registry)
    return registry


def _add_options(registry: Registry) -> None:
    """Every plugin's ``add_backend_options``; a plugin whose hook fails is recorded like a broken plugin."""
    from .options import OptionParser

    parser = OptionParser()
    for impl in registry.pm.hook.add_backend_options.get_hookimpls():
        try:
            impl.function(parser=parser)
        except Q8Error:
            raise
        except Exception as exc:
            registry.failures[impl.plugin_name] = _describe(exc)
    registry.options = parser.options
