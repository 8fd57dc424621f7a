"""The plugin manager: loads the ``q8bert`` entry points and collects backends and tasks.

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
    """Backends and tasks of every loaded plugin, by name."""

    pm: pluggy.PluginManager
    backends: dict[str, Registered] = field(default_factory=dict)
    tasks: dict[str, Registered] = field(default_factory=dict)
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

    def _listing(self, table: dict[str, Registered]) -> str:
        names = ", ".join(sorted(entry.name for entry in table.values())) or "none"
        if self.failures:
            names += f" (failed to load: {', '.join(sorted(self.failures))})"
        return names


def _collect(registry: Registry) -> None:
    pm = registry.pm

    for impl in pm.hook.register_backends.get_hookimpls():
        version = registry.versions.get(impl.plugin_name, getattr(impl.plugin, "__version__", "-"))

        def register_backend(cls: Any, _plugin: str = impl.plugin_name, _version: str = version) -> None:
            name = getattr(cls, "name", None)
            if not isinstance(name, str) or not name:
                raise Q8Error(f"plugin {_plugin}: registered a backend without a name")
            key = name.lower()
            if key in registry.backends or key in registry._aliases:
                first = registry.backends.get(registry._aliases.get(key, key))
                raise Q8Error(f"backend {name!r} is registered twice: by plugin {first.plugin if first else '?'} "
                              f"and by plugin {_plugin}")
            registry.backends[key] = Registered(name, cls, _plugin, _version)
            for alias in getattr(cls, "aliases", ()):
                registry._aliases.setdefault(alias.lower(), key)

        impl.function(register=register_backend)

    for impl in pm.hook.register_tasks.get_hookimpls():
        version = registry.versions.get(impl.plugin_name, getattr(impl.plugin, "__version__", "-"))

        def register_task(task: Task, _plugin: str = impl.plugin_name, _version: str = version) -> None:
            key = normalize_task_name(task.name)
            if key in registry.tasks:
                raise Q8Error(f"task {task.name!r} is registered twice: by plugin "
                              f"{registry.tasks[key].plugin} and by plugin {_plugin}")
            registry.tasks[key] = Registered(task.name, task, _plugin, _version)

        impl.function(register=register_task)


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
            detail = str(exc).splitlines()[0] if str(exc) else ""
            registry.failures[ep.name] = f"{type(exc).__name__}: {detail}".rstrip(": ")
            continue
        if ep.dist is not None:
            registry.versions[ep.name] = f"{ep.dist.name} {ep.dist.version}"
    for plugin in extra_plugins:
        pm.register(plugin)
    _collect(registry)
    return registry
