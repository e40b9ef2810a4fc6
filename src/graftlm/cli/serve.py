"""`graftlm serve`: the OpenAI-compatible server, one base model and every adapter in a folder."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from pathlib import Path

from graftlm.cli.fields import add_fields, build
from graftlm.cli.options import add_model, placement_from
from graftlm.engine.adapter_finder import AdapterFinder
from graftlm.engine.engine import Engine, EngineConfig
from graftlm.engine.registry_finder import RegistryFinder
from graftlm.errors import GraftlmError
from graftlm.registry import Registry
from graftlm.server.auth import KeyRing
from graftlm.server.settings import ServerSettings, check_host

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the model and many adapters behind an OpenAI-compatible API",
        description=(
            "Serve one base model and every adapter under --adapters (or in --registry) over HTTP, OpenAI-style "
            "(/v1/chat/completions, /v1/completions, /v1/models). A request's `model` names its adapter "
            "(`name`, `name@version`, or a mix `a+b`, `a:0.7+b:0.3`); the base model's name means none. "
            "Requests with different adapters run in one batch."
        ),
    )
    add_model(p, merge=False)
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--adapters", type=Path, default=None, metavar="DIR", help="folder of adapters, one per subfolder"
    )
    where.add_argument(
        "--registry",
        type=Path,
        default=None,
        metavar="DIR",
        help="serve the adapters of this registry: NAME (its prod version), NAME@VERSION, NAME@ALIAS; "
        "a moved alias is picked up by the next request, without a restart",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1); any other than loopback needs keys or --insecure",
    )
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--name", default=None, help="the base model's name in the API (default: the --model value)")
    a = p.add_argument_group("access (see docs/security.md)")
    a.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accept this key with full access, admin included (repeatable; also $GRAFTLM_API_KEY)",
    )
    a.add_argument(
        "--keys",
        type=Path,
        default=None,
        metavar="FILE",
        help="TOML file of keys, each with its tenant, the adapters it may use (globs) and whether it is admin",
    )
    a.add_argument(
        "--insecure", action="store_true", help="listen on a non-loopback address without keys (anyone may call)"
    )
    add_fields(a, ServerSettings)
    g = p.add_argument_group("engine")
    add_fields(g, EngineConfig)
    g.add_argument("--pin", action="append", default=[], metavar="NAME", help="keep this adapter resident (repeatable)")
    r = p.add_argument_group("Ray Serve (pip install 'graftlm[ray]'; docs/scaling.md)")
    r.add_argument("--ray", action="store_true", help="serve engine replicas on Ray Serve, routed by adapter")
    r.add_argument("--replicas", type=int, default=1, help="engine replicas (default: 1)")
    r.add_argument("--address", default=None, help="Ray cluster to join (auto, ray://HOST:10001); default: a new one")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each replica asks Ray for (default: 1)")
    r.add_argument(
        "--adapters-per-replica",
        type=int,
        default=64,
        help="adapters Ray's router counts as held by a replica (its cache's size in adapters) (default: 64)",
    )
    p.set_defaults(run=run)


def build_engine(args: argparse.Namespace) -> tuple[Engine, str]:
    if args.adapters is not None and not args.adapters.is_dir():
        raise GraftlmError(f"--adapters {args.adapters} is not a directory")
    finder: AdapterFinder | Path | None = args.adapters
    if args.registry is not None:
        finder = RegistryFinder(Registry(args.registry, create=False))
    model, tok, source = placement_from(args).load(args.model)
    engine = Engine(model, tok, build(EngineConfig, args), finder, force=args.force)
    for name in args.pin:
        engine.cache.pin(name)
    return engine, args.name or source.name


def settings_from(args: argparse.Namespace, model_name: str) -> ServerSettings:
    plain = list(args.api_key) + ([os.environ["GRAFTLM_API_KEY"]] if os.environ.get("GRAFTLM_API_KEY") else [])
    keys = KeyRing.build(plain, args.keys)
    check_host(args.host, keys, args.insecure)
    return build(
        ServerSettings, args, model_name=model_name, keys=keys, adapter_root=args.adapter_root or args.adapters
    )


def replica_parts(args: argparse.Namespace) -> tuple[Engine, ServerSettings]:
    """One replica's engine and settings (called on each Ray Serve replica). Its graftlm logs go to its
    stderr, which Ray keeps in the replica's log file and shows on the terminal of `serve --ray`."""
    logger = logging.getLogger("graftlm")
    if not logger.handlers:  # the replica's process ran no `main`
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
        logger.propagate = False
    engine, name = build_engine(args)
    return engine, settings_from(args, name)


def run(args: argparse.Namespace) -> int:
    from graftlm.server.app import create_app
    from graftlm.server.run import serve

    settings_from(args, "")  # refuse bad access settings before the model loads
    if args.ray:
        return run_on_ray(args)
    if args.replicas != 1 or args.address:
        raise GraftlmError("--replicas and --address are for --ray")
    engine, name = build_engine(args)
    settings = settings_from(args, name)
    adapters = engine.cache.names()
    access = f"{len(settings.keys)} API keys" if settings.keys else "no API keys (loopback only)"
    log.info("serving %s with %d adapters on http://%s:%d/v1, %s", name, len(adapters), args.host, args.port, access)
    serve(engine, create_app(engine, settings), args.host, args.port)
    return 0


def run_on_ray(args: argparse.Namespace) -> int:
    try:
        from graftlm.server.ray_serve import serve_on_ray
    except ImportError:
        raise GraftlmError("--ray needs Ray Serve: pip install 'graftlm[ray]'") from None
    if args.replicas < 1:
        raise GraftlmError(f"--replicas must be 1 or more, not {args.replicas}")
    factory = functools.partial(replica_parts, args)
    serve_on_ray(
        factory,
        args.host,
        args.port,
        args.replicas,
        adapters_per_replica=args.adapters_per_replica,
        replica_cpus=args.replica_cpus,
        address=args.address,
        max_ongoing=2 * args.max_batch,
    )
    return 0
