"""Named registries of methods (forgetting losses, retaining losses, combine rules), each entry
a function with the dataclass of its options.

A method is one function plus one ``register`` line::

    @dataclass(frozen=True)
    class ScaledAscentOptions:
        scale: float = 1.0

    @FORGET_LOSSES.register("scaled_ga", ScaledAscentOptions)
    def scaled_ascent(logits, batch, options):
        return -options.scale * answer_nll(logits, batch["labels"])

and is then reachable from the command line as ``--forget-loss scaled_ga --forget-loss-option
scale=0.5``. ``bind`` turns (name, options) into the callable the loop uses, once per run.
Options dataclasses validate themselves in ``__post_init__`` (raise ``ConfigError``).

A loss that compares with the model before unlearning declares it with ``needs``
(``register("npo", NPOOptions, needs=("reference_logprob",))``); the run then provides that
field in every batch (starting_model.py says which fields exist and how each is made).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from ngdiff_ds.errors import ConfigError


@dataclass(frozen=True)
class NoOptions:
    """The options of a method that has none."""


@dataclass(frozen=True)
class Entry:
    function: Callable
    options: type
    needs: tuple[str, ...] = ()  # batch fields the run must provide (starting_model.py)


class Registry:
    """name -> (function, options dataclass); ``kind`` names the entries in messages."""

    def __init__(self, kind: str, flag: str):
        self.kind = kind
        self.flag = flag  # the command-line flag that picks an entry
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, options: type = NoOptions, needs: tuple[str, ...] = ()):
        """Decorator: register ``function`` under ``name`` with its ``options`` dataclass and
        the batch fields it ``needs`` beyond the collated tokens."""
        if not dataclasses.is_dataclass(options):
            raise TypeError(f"the options of {self.kind} {name!r} must be a dataclass")

        def decorate(function: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(function, options, tuple(needs))
            return function

        return decorate

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            raise ConfigError(f"{self.flag} {name!r} is not a known {self.kind}; known: "
                              f"{', '.join(self.names())}")
        return self._entries[name]

    def options(self, name: str, values: dict[str, Any] | None = None):
        """The options dataclass of ``name`` built from ``values`` (keyword -> value)."""
        options_type = self.entry(name).options
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(options_type)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{self.kind} {name!r} has no option {', '.join(unknown)}; its "
                              f"options: {', '.join(sorted(known)) or '(none)'}")
        return options_type(**values)

    def bind(self, name: str, options=None) -> Callable:
        """The function of ``name`` with its options fixed (default options when None)."""
        entry = self.entry(name)
        options = entry.options() if options is None else options
        if not isinstance(options, entry.options):
            raise TypeError(f"{self.kind} {name!r} takes {entry.options.__name__}, got "
                            f"{type(options).__name__}")
        if entry.options is NoOptions:
            return entry.function
        return functools.partial(entry.function, options=options)


def parse_option_strings(registry: Registry, name: str, pairs: list[str], flag: str):
    """``["beta=0.2", "gamma=1"]`` -> the options dataclass of ``name``, each value converted
    to its field's type (``int``, ``float``, ``bool``, ``str``, or one of them or None); errors
    name ``flag``."""
    options_type = registry.entry(name).options
    types = typing.get_type_hints(options_type)
    values = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} takes KEY=VALUE, got {pair!r}")
        values[key] = _convert(text, types.get(key, str), f"{flag} {pair!r}")
    try:
        return registry.options(name, values)
    except ConfigError as error:
        raise ConfigError(f"{flag}: {error}") from None


def _convert(text: str, field_type, where: str):
    """``text`` as ``field_type``; ``X | None`` accepts ``none`` for None."""
    choices = [t for t in typing.get_args(field_type) if t is not type(None)] \
        if typing.get_origin(field_type) in (typing.Union, types.UnionType) else [field_type]
    if len(choices) != 1 or choices[0] not in (int, float, bool, str):
        raise ConfigError(f"{where}: options of type {field_type} cannot be set from the "
                          "command line")
    if len(typing.get_args(field_type)) > 1 and text.lower() == "none":
        return None
    target = choices[0]
    try:
        if target is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        return target(text)
    except ValueError:
        raise ConfigError(f"{where}: expected a {target.__name__}, got {text!r}") from None


def load_plugin(spec: str) -> None:
    """Import a module that registers methods: a module name (``my_pkg.losses``) or the path of
    a ``.py`` file. Registering happens on import, so nothing else is needed."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(spec)
    if spec.endswith(".py"):
        if not path.is_file():
            raise ConfigError(f"--plugin {spec}: no such file")
        # One module per file: two plugins may share a file name in different folders.
        resolved = path.resolve()
        name = f"ngdiff_ds_plugin_{resolved.stem}_{abs(hash(str(resolved))):x}"
        if name in sys.modules:  # loaded already: registering again would clash
            return
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        return
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as error:
        if error.name and (spec == error.name or spec.startswith(error.name + ".")):
            raise ConfigError(f"--plugin {spec}: no module named {error.name!r} (give a module "
                              "on the Python path or a path to a .py file)") from None
        raise
