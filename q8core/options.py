"""Backend options: settings a backend adds to ``q8 run`` / ``q8 eval`` through ``add_backend_options``.

In the spirit of pytest's ``pytest_addoption``: a plugin's hook receives a parser and adds options
under its backend's own group::

    @hookimpl
    def add_backend_options(parser):
        group = parser.group("mindspore")
        group.add("enable_data_sink", type=bool, default=False, help="...")
        group.add("data_sink_steps", type=int, default=1, help="...")

They show in ``--help`` under the backend's heading, are accepted only with that backend, reach the
backend through :meth:`q8core.backend.Backend.set_options` (after :meth:`Backend.check_options`
validated them), and are stored in ``run_config.json`` and in every checkpoint's manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import Q8Error

TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class BackendOption:
    backend: str
    name: str  # a Python identifier: the key in run_config.json's backend_options
    type: type
    default: Any
    help: str
    commands: tuple[str, ...] = ("run", "eval")

    @property
    def flag(self) -> str:
        """``--data-sink-steps``; for a bool ``--enable-data-sink/--no-enable-data-sink``."""
        flag = "--" + self.name.replace("_", "-")
        return f"{flag}/--no-{flag[2:]}" if self.type is bool else flag


class OptionGroup:
    """The options of one backend; :meth:`add` declares one."""

    def __init__(self, backend: str, parser: "OptionParser") -> None:
        self.backend = backend
        self._parser = parser

    def add(self, name: str, *, type: type, default: Any, help: str,
            commands: tuple[str, ...] = ("run", "eval")) -> None:
        if not name.isidentifier():
            raise Q8Error(f"backend {self.backend}: option name {name!r} is not an identifier")
        if type not in TYPES:
            raise Q8Error(f"backend {self.backend}: option {name} has type {type!r}; use bool, int, float or str")
        self._parser._add(BackendOption(self.backend, name, type, default, help, tuple(commands)))


class OptionParser:
    """What ``add_backend_options(parser)`` receives."""

    def __init__(self) -> None:
        self.options: list[BackendOption] = []

    def group(self, backend: str) -> OptionGroup:
        return OptionGroup(backend.lower(), self)

    def _add(self, option: BackendOption) -> None:
        for other in self.options:
            if other.name == option.name:
                raise Q8Error(f"option --{option.name.replace('_', '-')} is added twice: by backend "
                              f"{other.backend} and by backend {option.backend}")
        self.options.append(option)


def for_backend(options: list[BackendOption], backend: str, command: str = "run") -> list[BackendOption]:
    return [o for o in options if o.backend == backend.lower() and command in o.commands]


def check_stored(options: dict[str, Any], declared: list[BackendOption], backend: str, where: str) -> dict[str, Any]:
    """Stored ``backend_options`` (run_config.json, a manifest) checked against what ``backend`` declares;
    declared options missing from them get their defaults."""
    known = {o.name: o for o in declared}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise Q8Error(f"{where}: backend option {unknown[0]!r} is not an option of backend {backend!r}")
    values = {}
    for name, option in known.items():
        value = options.get(name, option.default)
        if option.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, option.type) or (option.type is int and isinstance(value, bool)):
            raise Q8Error(f"{where}: backend option {name} must be {option.type.__name__}, got {value!r}")
        values[name] = value
    return values
