"""Command-line options made from dataclass fields declared with `graftlm.setting.setting`: the flag,
default, type and help come from the field, and `build` makes the dataclass back from the parsed args."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def add_fields(p: argparse._ActionsContainer, cls: type, names: Iterable[str] | None = None) -> None:
    """Add an option for each named field of `cls` (every field declared with `setting` if None)."""
    hints = typing.get_type_hints(cls)
    chosen = set(names) if names is not None else None
    for f in dataclasses.fields(cls):
        if (chosen is not None and f.name not in chosen) or "help" not in f.metadata:
            continue
        _add(p, f, hints[f.name])


def build(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """`cls` from the parsed args (the fields that have an option) and `given` (the rest)."""
    values = {}
    for f in dataclasses.fields(cls):
        if "help" in f.metadata and hasattr(args, dest(f)):
            values[f.name] = getattr(args, dest(f))
    return cls(**(values | given))


def flag(f: dataclasses.Field) -> str:
    if f.metadata["flag"]:
        return f.metadata["flag"]
    default = _default(f)
    return ("--no-" if default is True else "--") + f.name.replace("_", "-")


def dest(f: dataclasses.Field) -> str:
    """Where the parsed value lands: named after the flag, so that two dataclasses' fields of one name
    (`Calibration.samples` as --calib-samples, `Tuning.samples` as --tune-samples) stay apart."""
    return flag(f).removeprefix("--").replace("-", "_")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _add(p: argparse._ActionsContainer, f: dataclasses.Field, hint: Any) -> None:
    meta, default = f.metadata, _default(f)
    base = _unwrap(hint)
    text, option = meta["help"], flag(f)
    if base is bool:
        action = "store_false" if default else "store_true"
        p.add_argument(option, dest=dest(f), action=action, default=default, help=text)
        return
    parse = meta["parse"] or base
    kwargs: dict[str, Any] = {"dest": dest(f), "type": parse, "default": default}
    kwargs["help"] = text if default is None else f"{text} (default: {_shown(default)})"
    if meta["choices"] is not None:
        kwargs["choices"] = list(meta["choices"])
    else:
        kwargs["metavar"] = meta["metavar"] or dest(f).upper()
    p.add_argument(option, **kwargs)


def _shown(default: Any) -> str:
    if isinstance(default, float):
        return f"{default:g}"
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return str(default)


def _unwrap(hint: Any) -> Any:
    """The type an option's text converts to, for `int`, `int | None`, `Path | None`, ... (else str)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else str
    return hint if hint in (int, float, str, bool, Path) else str
