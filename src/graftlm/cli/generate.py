"""`graftlm generate PROMPT...`: answer one or more prompts (several run as one batch)."""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console

from graftlm.cli.options import add_model, add_sampling, load_model, placement_from, sampling_from
from graftlm.engine.generate import Generator
from graftlm.engine.speculate import (
    MAX_SPEC_TOKENS,
    SPEC_TOKENS,
    Drafter,
    ModelDrafter,
    NgramDrafter,
    SpecStats,
    check_draft,
    check_spec_tokens,
    speculative_steps,
)
from graftlm.errors import GraftlmError

err = Console(stderr=True)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="answer prompts",
        description=(
            "Answer one or more prompts. With a chat model each prompt is sent as a user message through "
            "its chat template, unless --raw. One prompt streams its answer; several run as one batch."
        ),
    )
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text ('-' reads it from stdin)")
    p.add_argument("--raw", action="store_true", help="continue the text as is, without the chat template")
    p.add_argument("--system", default=None, help="system message for chat models")
    add_model(p)
    add_sampling(p)
    g = p.add_argument_group("speculation")
    g.add_argument(
        "--speculate",
        choices=["ngram", "draft"],
        default=None,
        help="draft tokens by prompt lookup (ngram: copy what followed the text's last words earlier on) or "
        "with a smaller model of the same tokenizer (draft, with --draft) and verify them in one forward; the "
        "output is what plain decoding gives (one prompt at a time)",
    )
    g.add_argument(
        "--draft",
        default=None,
        metavar="MODEL",
        help="--speculate draft: the draft model, named as -m names one (e.g. a palettized copy of the base)",
    )
    g.add_argument(
        "--spec-tokens",
        type=int,
        default=SPEC_TOKENS,
        metavar="K",
        help=f"most tokens drafted a step, 1-{MAX_SPEC_TOKENS} (default: {SPEC_TOKENS})",
    )
    p.set_defaults(run=run)


def encode(gen: Generator, text: str, raw: bool, system: str | None) -> list[int]:
    tok = gen.tokenizer
    if raw or not tok.chat_template:
        return tok.encode(text)
    messages = [{"role": "system", "content": system}] if system else []
    return tok.encode_chat([*messages, {"role": "user", "content": text}])


def run(args: argparse.Namespace) -> int:
    params = sampling_from(args)
    texts = [sys.stdin.read() if p == "-" else p for p in args.prompts]
    if args.draft is not None and args.speculate != "draft":
        raise GraftlmError("--draft names the draft model of --speculate draft")
    if args.speculate == "draft" and args.draft is None:
        raise GraftlmError("--speculate draft needs --draft MODEL")
    if args.speculate:
        check_spec_tokens(args.spec_tokens)
        if len(texts) > 1:
            raise GraftlmError("--speculate decodes one prompt at a time; give one prompt")
    model, tok, _ = load_model(args)
    gen = Generator(model, tok)
    prompts = [encode(gen, t, args.raw, args.system) for t in texts]
    stats = SpecStats()
    drafter: Drafter | None = NgramDrafter() if args.speculate else None
    if args.speculate == "draft":
        draft, draft_tok, _ = placement_from(args).load(args.draft)
        check_draft(model, tok, draft, draft_tok)
        drafter = ModelDrafter(draft)
    t0 = time.perf_counter()
    if len(prompts) == 1:
        events = (
            speculative_steps(model, tok, prompts[0], params, args.spec_tokens, stats, drafter)
            if drafter is not None
            else gen.steps(prompts, params)
        )
        count = 0
        for count, ev in enumerate(events, 1):  # noqa: B007 (count is used after)
            print(ev.delta, end="", flush=True)
        print()
    else:
        outs = gen.generate(prompts, params)
        for text, out in zip(texts, outs, strict=True):
            print(f"### {text}\n{out.text}\n")
        count = sum(len(o.token_ids) for o in outs)
    dt = time.perf_counter() - t0
    err.print(f"[dim]{count} tokens in {dt:.2f} s ({count / dt:.1f} tokens/s)[/]")
    if args.speculate and args.verbose:
        err.print(
            f"[dim]speculation: {stats.accepted} of {stats.drafted} drafted tokens accepted "
            f"({stats.acceptance:.0%}), {stats.tokens_per_forward:.2f} tokens per forward[/]"
        )
    return 0
