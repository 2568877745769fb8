"""The `cdsp` command line: one subcommand per stage, each defined beside its logic.

Every module in SUBCOMMAND_MODULES has `add_subcommand(subparsers)`, which adds its parser
and sets `func` (called with the parsed namespace; returns an exit code or None). This module
is the top of the import graph: nothing in cdsp_core imports it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from cdsp_core import bench, config, datastore, evaluate, logs, prepare, pseudolabel, scribbles, suggest, synth, train
from cdsp_core.credentials import redact, secrets_in
from cdsp_core.errors import CdspError

SUBCOMMAND_MODULES = (synth, scribbles, prepare, datastore, train, pseudolabel, evaluate, suggest, bench)


class UsageError(Exception):
    """A command line argparse refuses (an unknown flag, a number that is none), as its one error line."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, `cdsp COMMAND: error: ...`, like every other error
    (argparse prints the usage first), and reaches `main`, which prints it redacted."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="cdsp", description="Scribble-supervised semantic segmentation with CDSP.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMAND_MODULES:
        module.add_subcommand(sub)
    return parser


def one_line(e: CdspError) -> str:
    """The reason of a CdspError in one line.

    Raised in a data-loader worker, it reaches the main process with the worker's traceback in
    front of it (torch re-raises it with that text): the reason is then its last line. Any other
    message that spans lines is joined into one.
    """
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        return lines[-1].removeprefix(f"{CdspError.__module__}.{CdspError.__name__}: ")
    return " ".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The one error boundary: a bad flag, setting or input is one line on stderr, `cdsp COMMAND: error:
    REASON`, with every credential the command line holds masked (`credentials.redact`), and exit 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    known = secrets_in(argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(redact(str(e), known), file=sys.stderr)
        return 2
    logs.configure(logging.DEBUG if args.verbose else logging.INFO)
    try:
        config.check_values(vars(args))  # every setting the command takes, before any work
        return int(args.func(args) or 0)
    except CdspError as e:
        print(redact(f"cdsp {args.command}: error: {one_line(e)}", known), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cdsp {args.command}: interrupted", file=sys.stderr)
        return 130
