"""The serving part of `graftlm demo`: start the OpenAI-compatible server with the example adapters and
send it concurrent requests that name different adapters, through the official `openai` client."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from graftlm.engine.engine import Engine, EngineConfig
from graftlm.loading import catalog

console = Console(highlight=False)


def _requests(examples: Path, tasks: list[str], per_task: int) -> list[dict[str, Any]]:
    """Test-split questions of every task, each sent to that task's adapter and some to the base model."""
    out = []
    for task in tasks:
        lines = (examples / task / "test.jsonl").read_text().splitlines()[:per_task]
        spec = json.loads((examples / task / "task.json").read_text())
        for i, line in enumerate(lines):
            messages = [m for m in json.loads(line)["messages"] if m["role"] != "assistant"]
            out.append(
                {
                    "model": task,
                    "messages": messages,
                    "max_tokens": int(spec.get("max_new_tokens", 64)),
                    "json": task == "extract",
                }
            )
            if i == 0:
                out.append({**out[-1], "model": None, "json": False})  # the base model on the same question
    return out


def serve_part(model_name: str, examples: Path, adapters: Path, tasks: list[str], per_task: int = 3) -> None:
    import openai

    from graftlm.server.app import create_app
    from graftlm.server.run import free_port, http_server

    console.rule("serving: one base model, every adapter, one batch")
    model, tok, source = catalog.load(model_name)
    engine = Engine(model, tok, EngineConfig(max_batch=16, max_len=1024), adapters)
    port = free_port()
    reqs = _requests(examples, tasks, per_task)
    for r in reqs:
        r["model"] = r["model"] or source.name
    results: list[tuple[dict[str, Any], Any, float]] = []
    failed: list[BaseException] = []
    done = threading.Event()

    def client_side() -> None:  # the HTTP clients run on other threads; the engine keeps this one
        try:
            url = f"http://127.0.0.1:{port}/v1"
            client = openai.OpenAI(base_url=url, api_key="not-needed", max_retries=0, timeout=600)
            console.print(f"server on {url}; models: {', '.join(m.id for m in client.models.list())}")

            def send(r: dict[str, Any]) -> tuple[dict[str, Any], Any, float]:
                t0 = time.perf_counter()
                extra = {"response_format": {"type": "json_object"}} if r["json"] else {}
                resp = client.chat.completions.create(
                    model=r["model"], messages=r["messages"], max_tokens=r["max_tokens"], temperature=0, **extra
                )
                return r, resp, time.perf_counter() - t0

            n_models = len({r["model"] for r in reqs})
            console.print(f"sending {len(reqs)} requests at once, naming {n_models} models ...")
            t0 = time.perf_counter()
            with ThreadPoolExecutor(len(reqs)) as pool:
                results.extend(pool.map(send, reqs))
            results.append(({}, None, time.perf_counter() - t0))
        except BaseException as e:  # reported on the main thread
            failed.append(e)
        finally:
            done.set()

    with http_server(create_app(engine, source.name), "127.0.0.1", port):
        threading.Thread(target=client_side, daemon=True).start()
        try:
            engine.run_forever(until=done.is_set)
        finally:
            engine.stop()
    if failed:
        raise failed[0]
    wall = results.pop()[2]
    table = Table(show_lines=True)
    for col in ("model", "question (start)", "answer", "s"):
        table.add_column(col, overflow="fold")
    tokens = 0
    for r, resp, secs in results:
        tokens += resp.usage.completion_tokens
        question = r["messages"][-1]["content"].split("\n\n")[-1][:80]
        table.add_row(r["model"], question, resp.choices[0].message.content.strip(), f"{secs:.1f}")
    console.print(table)
    console.print(
        f"[bold]{len(reqs)} concurrent requests, {tokens} tokens in {wall:.1f} s: {tokens / wall:.1f} tokens/s[/] "
        f"(peak batch {engine.peak_batch}; adapters loaded: "
        f"{', '.join(f'{n} {s.loads}x' for n, s in sorted(engine.cache.stats.items()) if s.loads)})"
    )
