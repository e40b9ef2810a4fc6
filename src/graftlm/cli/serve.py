"""`graftlm serve`: the OpenAI-compatible server, one base model and every adapter in a folder."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from graftlm.cli.options import DTYPES, add_model
from graftlm.engine.adapter_finder import AdapterFinder
from graftlm.engine.scheduler import Engine, EngineConfig
from graftlm.errors import GraftlmError
from graftlm.model import catalog
from graftlm.registry import Registry
from graftlm.registry.serving import RegistryFinder

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    d = EngineConfig()
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
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--name", default=None, help="the base model's name in the API (default: the --model value)")
    g = p.add_argument_group("engine")
    g.add_argument("--max-batch", type=int, default=d.max_batch, help=f"rows decoded together (default: {d.max_batch})")
    g.add_argument(
        "--max-len", type=int, default=d.max_len, help=f"prompt + answer tokens per request (default: {d.max_len})"
    )
    g.add_argument(
        "--prefill-tokens",
        type=int,
        default=d.prefill_tokens,
        help=f"prompt tokens per prefill step; bounds the stall of running requests (default: {d.prefill_tokens})",
    )
    g.add_argument(
        "--adapter-cache-mb",
        type=float,
        default=d.adapter_cache_mb,
        help=f"MB for resident adapters, least recently used evicted (default: {d.adapter_cache_mb:g})",
    )
    g.add_argument("--max-rank", type=int, default=d.max_rank, help=f"largest adapter rank (default: {d.max_rank})")
    g.add_argument(
        "--adapter-dtype",
        choices=("bfloat16", "float32"),
        default=d.adapter_dtype,
        help="how resident adapters are held; bfloat16 is exact for adapters stored in bf16 (default)",
    )
    g.add_argument("--pin", action="append", default=[], metavar="NAME", help="keep this adapter resident (repeatable)")
    p.set_defaults(run=run)


def build_engine(args: argparse.Namespace) -> tuple[Engine, str]:
    if args.adapters is not None and not args.adapters.is_dir():
        raise GraftlmError(f"--adapters {args.adapters} is not a directory")
    finder: AdapterFinder | Path | None = args.adapters
    if args.registry is not None:
        finder = RegistryFinder(Registry(args.registry, create=False))
    model, tok, source = catalog.load(args.model, DTYPES[args.dtype], args.device)
    config = EngineConfig(
        max_batch=args.max_batch,
        max_len=args.max_len,
        prefill_tokens=args.prefill_tokens,
        adapter_cache_mb=args.adapter_cache_mb,
        max_rank=args.max_rank,
        adapter_dtype=args.adapter_dtype,
    )
    engine = Engine(model, tok, config, finder, force=args.force)
    for name in args.pin:
        engine.cache.pin(name)
    return engine, args.name or source.name


def run(args: argparse.Namespace) -> int:
    from graftlm.server.app import create_app, serve

    engine, name = build_engine(args)
    adapters = engine.cache.names()
    log.info("serving %s with %d adapters on http://%s:%d/v1", name, len(adapters), args.host, args.port)
    serve(engine, create_app(engine, name), args.host, args.port)
    return 0
