"""Commands made of verbs (`graftlm registry publish`, `graftlm pipeline run`): one shared way to add them."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


class Verbs:
    """The verbs of one command; every verb gets the options `common` adds and runs `fn`."""

    def __init__(self, command: argparse.ArgumentParser, common: Callable[[argparse.ArgumentParser], None]):
        self.parsers = command.add_subparsers(dest="verb", required=True, metavar="VERB")
        self.common = common

    def add(self, name: str, help: str, fn: Callable[[argparse.Namespace], Any]) -> argparse.ArgumentParser:
        v = self.parsers.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        self.common(v)
        v.set_defaults(run=fn)
        return v
