"""The `cdsp` command line: one subcommand per stage, each defined beside its logic.

Every module in SUBCOMMAND_MODULES has `add_subcommand(subparsers)`, which adds its parser
and sets `func` (called with the parsed namespace; returns an exit code or None).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cdsp_core.errors import CdspError

SUBCOMMAND_MODULES = (
    "cdsp_core.synth",
    "cdsp_core.scribbles",
    "cdsp_core.prepare",
    "cdsp_core.datastore",
    "cdsp_core.train",
    "cdsp_core.pseudolabel",
    "cdsp_core.evaluate",
    "cdsp_core.suggest",
    "cdsp_core.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdsp", description="Scribble-supervised semantic segmentation with CDSP.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_subcommand(sub)
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


def configure_logging(level: int, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    logging.basicConfig(level=level, format=fmt)
    for name in ("botocore", "boto3", "s3transfer"):  # -v is for our lines: boto3's debug log
        logging.getLogger(name).setLevel(logging.INFO)  # prints request headers, the access key id among them


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except CdspError as e:
        print(f"cdsp {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cdsp {args.command}: interrupted", file=sys.stderr)
        return 130
