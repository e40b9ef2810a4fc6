"""Options shared by the commands that load a model and generate."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from graftlm.engine.sampling import SamplingParams
from graftlm.loading.catalog import CATALOG, DEFAULT_MODEL, ModelSource, Placement
from graftlm.loading.merged import load_merged
from graftlm.model.llama import Llama
from graftlm.model.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model(p: argparse.ArgumentParser, runtime: bool = True, merge: bool = True) -> None:
    """`-m/--model`; with `runtime` the dtype and device to run it in, and with `merge` an adapter to merge."""
    p.add_argument(
        "-m",
        "--model",
        default=DEFAULT_MODEL,
        help=f"base model: catalog name ({', '.join(CATALOG)}), checkpoint directory or .gguf file "
        f"(default: {DEFAULT_MODEL})",
    )
    if not runtime:
        return
    if merge:
        p.add_argument("--adapter", type=Path, default=None, help="adapter folder to apply (merged into the weights)")
    p.add_argument("--force", action="store_true", help="apply adapters trained on another base model")
    add_placement(p)


def add_placement(p: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype`: where the model runs and its weights' dtype (adapters stay float32)."""
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="base weights' dtype (default: float32)")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device: cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)",
    )


def placement_from(args: argparse.Namespace) -> Placement:
    return Placement(args.device, DTYPES[args.dtype])


def add_sampling(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument(
        "-n", "--max-tokens", type=int, default=max_tokens, help=f"most new tokens per answer (default: {max_tokens})"
    )
    g.add_argument("-t", "--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when this text appears (repeatable); it is not included in the answer",
    )


def sampling_from(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def load_model(args: argparse.Namespace) -> tuple[Llama, Tokenizer, ModelSource]:
    """The model that `add_model`'s options name, with its adapter merged in if one was given."""
    place = placement_from(args)
    return load_merged(args.model, args.adapter, args.force, place.dtype, place.device)
