"""Settings dataclasses and their command-line flags, declared once, in the dataclass.

A field declared with ``option(...)`` is a flag: its help text, its flag name (default
``--field-name``) and any argparse keyword sit next to the field. ``add_arguments`` puts a
dataclass's flags on a parser; ``from_args`` builds the dataclass from the parsed values, and
the dataclass validates itself in ``__post_init__``, raising ``ConfigError`` through
``invalid`` so that the message names the flag::

    @dataclass
    class RunLength:
        max_steps: int = option(40, help="optimizer steps")

        def __post_init__(self):
            if self.max_steps < 1:
                invalid(self, "max_steps", "must be at least 1")

    add_arguments(parser, RunLength, "length")      # --max-steps
    run_length = from_args(RunLength, parser.parse_args())
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING
from typing import Any

from ngdiff_ds.errors import ConfigError

_TYPES = {"int": int, "float": float, "str": str}


def option(default: Any = MISSING, *, help: str, flag: str | None = None,
           default_factory: Any = MISSING, **argparse_keywords) -> Any:
    """A dataclass field that is also a command-line flag."""
    metadata = {"help": help, "flag": flag, "argparse": argparse_keywords}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(settings, name: str) -> str:
    """The command-line flag of field ``name`` (of a dataclass or its instance)."""
    cls = settings if isinstance(settings, type) else type(settings)
    for f in dataclasses.fields(cls):
        if f.name == name and "help" in f.metadata:
            return f.metadata["flag"] or "--" + name.replace("_", "-")
    return name


def invalid(settings, name: str, requirement: str):
    """Raise ``ConfigError``: '<flag> <requirement>, got <value>'."""
    raise ConfigError(f"{flag_of(settings, name)} {requirement}, got {getattr(settings, name)!r}")


def _flag_fields(cls):
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _dest(cls, f) -> str:
    return f"{cls.__name__}.{f.name}"  # one namespace per dataclass: field names may repeat


def add_arguments(parser: argparse.ArgumentParser, cls, title: str | None = None) -> None:
    """Add one flag per ``option`` field of ``cls`` (in a group called ``title``)."""
    group = parser.add_argument_group(title) if title else parser
    for f in _flag_fields(cls):
        default = f.default_factory() if f.default is MISSING else f.default
        keywords = dict(f.metadata["argparse"])
        keywords["help"] = f.metadata["help"]
        if isinstance(default, bool) and "action" not in keywords:
            keywords["action"] = "store_false" if default else "store_true"
        elif "type" not in keywords and "action" not in keywords:
            field_type = _TYPES.get(str(f.type).split(" |")[0].split("[")[0])
            if isinstance(default, (tuple, list)):
                field_type = type(default[0]) if default else str
                keywords.setdefault("nargs", "+")
                default = list(default)
            if field_type is not None:
                keywords["type"] = field_type
        if "action" not in keywords and "choices" not in keywords:
            keywords.setdefault("metavar", f.name.upper())
        group.add_argument(flag_of(cls, f.name), dest=_dest(cls, f), default=default, **keywords)


def from_args(cls, args: argparse.Namespace, **values):
    """``cls`` from the parsed flags; ``values`` set the fields that are not flags."""
    for f in _flag_fields(cls):
        value = getattr(args, _dest(cls, f))
        if isinstance(f.default, tuple) and isinstance(value, list):
            value = tuple(value)  # argparse's nargs gives a list
        values.setdefault(f.name, value)
    return cls(**values)
