"""`graftlm chat`: an interactive conversation that streams each reply and keeps the history."""

from __future__ import annotations

import argparse
import time

from rich.console import Console

from graftlm.cli.options import add_model, add_sampling, load_model, sampling_from
from graftlm.engine.generate import Generator
from graftlm.errors import GraftlmError
from graftlm.model.tokenizer import Message

console = Console(highlight=False)
HELP = "commands: /reset clears the conversation, /exit (or Ctrl-D) quits"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="chat interactively",
        description=(
            "Chat with a model in the terminal. Replies stream as they are generated; the conversation is "
            f"kept until /reset. When it outgrows the context window the oldest turns are dropped. {HELP}."
        ),
    )
    p.add_argument("--system", default=None, help="system message")
    add_model(p)
    add_sampling(p, max_tokens=512)
    p.set_defaults(run=run)


def fit(gen: Generator, messages: list[Message], room: int) -> list[int]:
    """Encode the conversation, dropping the oldest exchanges until it leaves `room` tokens free."""
    while True:
        ids = gen.tokenizer.encode_chat(messages)
        if len(ids) + room <= gen.context_window:
            return ids
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise GraftlmError(
                f"this message alone ({len(ids)} tokens) leaves no room to answer within the "
                f"{gen.context_window}-token context window"
            )
        del messages[first : first + 2]
        console.print("[dim](oldest turn dropped to fit the context window)[/]")


def run(args: argparse.Namespace) -> int:
    params = sampling_from(args)
    model, tok, source = load_model(args)
    if not tok.chat_template:
        raise GraftlmError(f"{args.model} has no chat template; use `graftlm generate --raw`")
    gen = Generator(model, tok)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: list[Message] = list(system)
    console.print(f"[bold]{source.name}[/] — {HELP}")
    while True:
        try:
            text = console.input("[bold green]you>[/] ")
        except EOFError:
            console.print()
            return 0
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            messages = list(system)
            console.print("[dim](conversation cleared)[/]")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        try:
            prompt = fit(gen, messages, room=min(params.max_new_tokens, 64))
        except GraftlmError as e:
            messages.pop()
            console.print(f"[red]{e}[/]")
            continue
        console.print("[bold blue]bot>[/] ", end="")
        reply, count, t0 = "", 0, time.perf_counter()
        for ev in gen.steps([prompt], params):
            console.print(ev.delta, end="", markup=False)
            reply += ev.delta
            count += 1
        dt = time.perf_counter() - t0
        console.print(f"\n[dim](context {len(prompt)} tokens; reply {count} tokens, {count / dt:.1f} tokens/s)[/]")
        messages.append({"role": "assistant", "content": reply})
