"""`graftlm` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys

from rich.console import Console
from rich.logging import RichHandler

from graftlm import __version__
from graftlm.cli import (
    chat,
    demo,
    evaluate,
    generate,
    info,
    merge,
    palettize,
    pipeline,
    recover,
    registry,
    report,
    rl,
    serve,
    synth,
    train,
)
from graftlm.errors import GraftlmError

err = Console(stderr=True)

COMMANDS = (
    generate,
    chat,
    train,
    synth,
    rl,
    evaluate,
    report,
    merge,
    palettize,
    recover,
    registry,
    pipeline,
    serve,
    info,
    demo,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graftlm",
        description="One small language model, many small task adapters.",
        epilog="Run `graftlm COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"graftlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens in detail")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def _configure_logging(level: int) -> None:
    """Rich on a terminal; plain timestamped lines when stderr is a file, a pipe or a job runner's log."""
    if err.is_terminal:
        handler: logging.Handler = RichHandler(console=err, show_path=False, show_time=False)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%Y-%m-%d %H:%M:%S", handlers=[handler])
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per judge request is noise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.run(args) or 0)
    except GraftlmError as e:  # the user's input; anything else is a bug and keeps its traceback
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
