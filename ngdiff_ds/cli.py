"""Command-line plumbing of the launch scripts: one parser from the settings dataclasses, and
the launch scripts wrap their work in errors.exit_on_bad_input."""

from __future__ import annotations

import argparse

from ngdiff_ds.settings import add_arguments


def build_parser(description: str, *groups) -> argparse.ArgumentParser:
    """A parser with the flags of each ``(settings dataclass, group title)`` in ``groups``."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # The deepspeed launcher passes --local_rank; -1 by default: under plain mpirun a default
    # of 0 would make every rank claim device 0. The process group is what counts.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    for settings_class, title in groups:
        add_arguments(parser, settings_class, title)
    return parser
