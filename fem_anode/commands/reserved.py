"""Subcommands whose names are reserved for models still to come (listed, but refuse to run)."""

from __future__ import annotations

import argparse

from fem_anode.errors import UsageError

_PLANNED: dict[str, str] = {}


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    what = _PLANNED[name]
    parser = subparsers.add_parser(name, help=f"(not available yet) {what}", description=f"Reserved: {what}. Not available in this version.")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.set_defaults(func=lambda args: _refuse(name))


def _refuse(name: str) -> int:
    raise UsageError(f"'{name}' ({_PLANNED[name]}) is not available in this version of fem_anode")
