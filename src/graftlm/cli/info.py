"""`graftlm info MODEL`: what a model is, how big, and where it was loaded from."""

from __future__ import annotations

import argparse
import itertools
import json

from rich.console import Console
from rich.table import Table

from graftlm.loading import catalog

console = Console(highlight=False)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="describe a model",
        description=("Show a model's architecture, parameter count, size and where it was loaded from."),
    )
    p.add_argument(
        "model",
        nargs="?",
        default=catalog.DEFAULT_MODEL,
        help=f"catalog name, checkpoint directory or .gguf file (default: {catalog.DEFAULT_MODEL})",
    )
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.set_defaults(run=run)


def describe(name: str) -> dict[str, object]:
    model, tok, source = catalog.load(name)
    c = model.config
    params = model.num_parameters()
    tensors = itertools.chain(model.parameters(), model.buffers())  # buffers: palettized indices and tables
    unique = {id(t): t for t in tensors}.values()
    origin_bytes = (
        source.origin.stat().st_size
        if source.origin.is_file()
        else sum(f.stat().st_size for f in source.origin.glob("*.safetensors"))
    )
    return {
        "name": source.name,
        "architecture": f"{c.model_type} (LlamaForCausalLM)",
        "layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "attention_heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "context_window": c.max_position_embeddings,
        "rope": f"theta {c.rope_theta:g}, scaling {c.rope_scaling.rope_type}",
        "tied_embeddings": c.tie_word_embeddings,
        "parameters": params,
        "weights_in_memory_mib": round(sum(t.nbytes for t in unique) / 2**20, 1),
        "bits_per_weight": round(8 * sum(t.nbytes for t in unique) / params, 3),
        "origin_file_mib": round(origin_bytes / 2**20, 1),
        "chat_template": bool(tok.chat_template),
        "loaded_from": str(source.origin),
        "checkpoint": str(source.checkpoint),
    }


def run(args: argparse.Namespace) -> int:
    facts = describe(args.model)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    table = Table(title=str(facts["name"]), show_header=False)
    for key, value in facts.items():
        shown = f"{value:,} ({value / 1e6:.1f}M)" if key == "parameters" else str(value)
        table.add_row(key.replace("_", " "), shown)
    console.print(table)
    return 0
