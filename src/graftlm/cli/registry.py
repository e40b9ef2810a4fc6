"""`graftlm registry`: publish adapter versions, move aliases, inspect lineage, sync bundles to devices."""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from graftlm.cli.verbs import Verbs
from graftlm.eval.report import read_run
from graftlm.eval.suite import flat_figures
from graftlm.registry import PROD, Registry, signing
from graftlm.registry.bundle import add_bundle, check_bundle, export
from graftlm.registry.records import EVALUATION_FILE, RegistryError, Version, diff

console = Console(highlight=False)
DEFAULT_ROOT = "registry"


def add_registry(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry",
        type=Path,
        default=Path(os.environ.get("GRAFTLM_REGISTRY", DEFAULT_ROOT)),
        metavar="DIR",
        help=f"registry folder (default: $GRAFTLM_REGISTRY or ./{DEFAULT_ROOT})",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "registry",
        help="versioned adapters: publish, alias, roll back, diff, export",
        description=(
            "An adapter registry: immutable versions (every file stored once by sha256) with lineage (base "
            "fingerprint, data sha256, training settings, code version, parent adapter) and metrics, aliases "
            "such as prod and staging with their history, and bundles for devices. A reference is NAME "
            "(its prod alias, else its latest version), NAME@VERSION or NAME@ALIAS."
        ),
    )
    verb = Verbs(p, add_registry).add

    v = verb("publish", "store an adapter folder as a new version", _publish)
    v.add_argument("folder", type=Path, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    v.add_argument("--name", default=None, help="adapter name (default: the folder's name)")
    v.add_argument("--alias", action="append", default=[], help="point this alias at the new version (repeatable)")
    v.add_argument("--metric", action="append", default=[], metavar="KEY=VALUE", help="record a metric (repeatable)")
    v.add_argument("--note", default="", help="a line about this version")
    v.add_argument(
        "--eval",
        type=Path,
        default=None,
        metavar="EVAL.json",
        help="store this evaluation (graftlm eval --out) with the version; its figures become metrics",
    )
    v.add_argument("--eval-model", default=None, metavar="LABEL", help="whose figures, when it grades several")

    v = verb("list", "list adapters, or one adapter's versions", _list)
    v.add_argument("name", nargs="?", default=None)
    v = verb("show", "show one version: files, lineage, metrics, aliases", _show)
    v.add_argument("ref")
    v.add_argument("--json", action="store_true", help="print it as JSON")
    v = verb("diff", "what changed between two versions", _diff)
    v.add_argument("a")
    v.add_argument("b")
    v = verb("promote", "point an alias (default prod) at a version", _promote)
    v.add_argument("ref")
    v.add_argument("--alias", default=PROD)
    v = verb("rollback", "point an alias back where it was before its last move", _rollback)
    v.add_argument("name")
    v.add_argument("--alias", default=PROD)
    v = verb("history", "every move of an alias", _history)
    v.add_argument("name")
    v.add_argument("--alias", default=PROD)
    v = verb("delete", "delete one version (NAME@VERSION)", _delete)
    v.add_argument("ref")
    v.add_argument("--force", action="store_true", help="delete it even if an alias points at it (drops the alias)")
    verb("gc", "remove files no version references and leftovers of interrupted writes", _gc)
    v = verb("verify", "check every file against its sha256, every alias and every built folder", _verify)
    v.add_argument("--quick", action="store_true", help="check presence and sizes only, do not rehash")
    v = verb("keygen", "make an ed25519 key pair for signing bundles", _keygen)
    v.add_argument("--out", type=Path, required=True, metavar="KEY", help="private key to write (and KEY.pub)")
    v = verb("export", "write a bundle (manifest + files) for devices", _export)
    v.add_argument("refs", nargs="+", help="versions to include")
    v.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    v.add_argument("--since", action="append", default=[], metavar="REF", help="leave out files this version has")
    v.add_argument("--sign", type=Path, default=None, metavar="KEY", help="sign the bundle with this private key")
    v = verb("import", "add a bundle's versions and aliases, checking every hash", _import)
    v.add_argument("bundle", type=Path)
    v.add_argument(
        "--trust",
        type=Path,
        action="append",
        default=[],
        metavar="KEY.pub",
        help="accept the bundle only if this public key signed it (repeatable: any one of them)",
    )


def _open(args: argparse.Namespace, create: bool = False) -> Registry:
    return Registry(args.registry, create=create)


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def _metric_pairs(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise RegistryError(f"--metric {p!r}: write KEY=VALUE")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def _publish(args: argparse.Namespace) -> int:
    reg = _open(args, create=True)
    name = args.name or args.folder.resolve().name
    metrics = _metric_pairs(args.metric)
    if args.eval is not None:
        metrics = _eval_figures(args.eval, args.folder, args.eval_model) | metrics
    v = reg.publish(args.folder, name, metrics=metrics, note=args.note, aliases=args.alias, evaluation=args.eval)
    aliases = f" ({', '.join(args.alias)})" if args.alias else ""
    console.print(f"published [bold]{v.ref}[/]{aliases}: {len(v.files)} files, {v.nbytes / 2**20:.1f} MiB")
    return 0


def _eval_figures(path: Path, folder: Path, label: str | None) -> dict[str, Any]:
    """The figures of the graded model that is this adapter folder (or `label`) in an evaluation."""
    doc = read_run(path).doc
    if label is None:
        here = folder.resolve()
        found = [k for k, p in doc.get("adapters", {}).items() if p is not None and Path(p).resolve() == here]
        if len(found) != 1:
            graded = ", ".join(doc["contestants"])
            raise RegistryError(f"{path} does not grade {folder} (it grades {graded}); name one with --eval-model")
        label = found[0]
    if label not in doc["contestants"]:
        raise RegistryError(f"{path} grades no model {label!r}; it grades {', '.join(doc['contestants'])}")
    return {k: v for k, v in flat_figures(doc, label).items() if "." not in k}


def _list(args: argparse.Namespace) -> int:
    reg = _open(args)
    held = reg.aliases(args.name)
    table = Table()
    for col in ("adapter", "version", "created", "aliases", "base", "metrics", "MiB"):
        table.add_column(col, justify="right" if col in ("version", "MiB") else "left")
    for v in reg.versions(args.name):
        aliases = ", ".join(sorted(a for (n, a), num in held.items() if n == v.name and num == v.version))
        metrics = ", ".join(f"{k}={_short(x)}" for k, x in v.metrics.items() if not isinstance(x, dict))
        base = str(v.lineage.get("base_fingerprint") or "")[:12]
        table.add_row(v.name, str(v.version), _when(v.created), aliases, base, metrics, f"{v.nbytes / 2**20:.1f}")
    console.print(table)
    return 0


def _short(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _show(args: argparse.Namespace) -> int:
    reg = _open(args)
    v = reg.resolve(args.ref)
    d = v.as_dict() | {"aliases": sorted(a for (n, a), num in reg.aliases(v.name).items() if num == v.version)}
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    console.print(f"[bold]{v.ref}[/]  created {_when(v.created)}  aliases: {', '.join(d['aliases']) or '-'}")
    if v.note:
        console.print(f"note: {v.note}")
    for rel, f in sorted(v.files.items()):
        console.print(f"  {rel:32} {f.size:>12,} B  {f.sha256[:16]}")
    console.print("lineage: " + json.dumps(v.lineage, indent=2))
    console.print("metrics: " + json.dumps(v.metrics, indent=2))
    doc = reg.evaluation(v)
    if doc is not None:
        when = f"{doc.get('created')}, judge {doc['judge']['model']}" if doc.get("judge") else doc.get("created")
        console.print(f"evaluation ({EVALUATION_FILE}, {when}; graftlm report --adapter {v.name} draws it):")
        for label, c in doc.get("contestants", {}).items():
            for name, g in c.get("graders", {}).items():
                shown = ", ".join(
                    f"{k}={_short(x)}" for k, x in g.get("figures", {}).items() if not k.endswith(("_low", "_high"))
                )
                console.print(f"  {label} {name}: {shown}", soft_wrap=True)
    return 0


def _diff(args: argparse.Namespace) -> int:
    reg = _open(args)
    a, b = reg.resolve(args.a), reg.resolve(args.b)
    d = diff(a, b)
    console.print(f"[bold]{a.ref} -> {b.ref}[/]")
    for kind in ("added", "removed", "changed"):
        for p in d["files"][kind]:
            console.print(f"  file {kind}: {p}")
    for section in ("lineage", "metrics"):
        for key, (x, y) in d[section].items():
            console.print(f"  {section}.{key}: {x!r} -> {y!r}")
    if not any(d["files"].values()) and not d["lineage"] and not d["metrics"]:
        console.print("  identical")
    return 0


def _promote(args: argparse.Namespace) -> int:
    v, previous = _open(args).promote(args.ref, args.alias)
    was = f" (was {previous})" if previous is not None else ""
    console.print(f"{v.name}@{args.alias} -> {v.version}{was}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    old, new = _open(args).rollback(args.name, args.alias)
    console.print(f"{args.name}@{args.alias}: {old} -> {new}")
    return 0


def _history(args: argparse.Namespace) -> int:
    for m in _open(args).history(args.name, args.alias):
        console.print(f"{_when(m['at'])}  {m['previous']} -> {m['version']}  {m['reason']}")
    return 0


def _delete(args: argparse.Namespace) -> int:
    v = _open(args).delete(args.ref, args.force)
    console.print(f"deleted {v.ref} (run `graftlm registry gc` to free its files)")
    return 0


def _gc(args: argparse.Namespace) -> int:
    r = _open(args).gc()
    console.print(
        f"removed {r.blobs} unreferenced files ({r.bytes / 2**20:.1f} MiB), {r.trees} stale folders, "
        f"{r.temporary} leftovers"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    reg = _open(args)
    problems = reg.verify(rehash=not args.quick)
    for p in problems:
        console.print(f"[red]{p}[/]")
    n = len(reg.versions())
    console.print(f"{n} versions checked: " + ("all good" if not problems else f"{len(problems)} problems"))
    return 1 if problems else 0


def _keygen(args: argparse.Namespace) -> int:
    private, public = signing.keygen(args.out)
    key = signing.load_public_key(public)
    console.print(f"wrote {private} (keep it secret) and {public} (key {signing.fingerprint(key)})")
    return 0


def _export(args: argparse.Namespace) -> int:
    key = signing.load_private_key(args.sign) if args.sign is not None else None  # before any work
    m = export(_open(args), args.refs, args.out, args.since, sign_with=key)
    size = sum(m["files"].values())
    refs = ", ".join(f"{a['name']}@{a['version']}" for a in m["adapters"])
    signed = f"; signed by key {signing.fingerprint(key)}" if key is not None else ""
    console.print(f"wrote {args.out}: {refs}; {len(m['files'])} files, {size / 2**20:.1f} MiB{signed}")
    return 0


def _import(args: argparse.Namespace) -> int:
    trust = [signing.load_public_key(p) for p in args.trust]
    checked = check_bundle(args.bundle, trust)  # all of it before the registry is opened, or made
    added: list[Version] = add_bundle(_open(args, create=True), args.bundle, checked)
    if checked.signed_by is not None:
        how = f"signed by trusted key {checked.signed_by}"
    elif checked.signed:
        how = "signed, but the signature was not checked (pass --trust KEY.pub)"
    else:
        how = "unsigned (pass --trust KEY.pub to require a signature)"
    console.print(f"imported {', '.join(v.ref for v in added) or 'nothing new'} from {args.bundle}; {how}")
    return 0
