"""Progress bars for the commands' long steps, and the model writing its own text under one."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from graftlm.model.llama import Llama
from graftlm.model.tokenizer import Tokenizer
from graftlm.train.synthetic import self_generated


def bar() -> Progress:
    """A transient bar that counts items (sequences, tensors) and the time so far."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    )


def written(model: Llama, tokenizer: Tokenizer, samples: int, length: int, seed: int, use: str) -> list[list[int]]:
    """`samples` texts the model writes itself (`graftlm.train.synthetic`), for `use`, with a progress bar."""
    with bar() as b:
        task = b.add_task(f"the model writes {use} text", total=samples)
        return self_generated(model, tokenizer, samples, length, seed, lambda n: b.advance(task, n))
