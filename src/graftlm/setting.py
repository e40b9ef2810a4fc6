"""One source per setting: a dataclass field that carries its own help text, so that a command takes the
flag, the default and the help from the field (`graftlm.cli.fields`) and nothing is written twice."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    metavar: str | None = None,
    choices: Sequence[Any] | None = None,
    parse: Callable[[str], Any] | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its command-line help.

    flag: the option's name when it is not `--field-name` (`--no-...` for a True boolean);
    parse: turns the option's text into the value when the field's type cannot (e.g. "0-11,20" to layers).
    """
    meta = {"help": help, "flag": flag, "metavar": metavar, "choices": choices, "parse": parse}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)
