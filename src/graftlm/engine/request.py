"""A request in the engine: what the caller asked, the events it gets back, and the engine's state of it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from graftlm.engine.adapter_cache import Entry
from graftlm.engine.adapter_finder import Source
from graftlm.engine.json_mode import Grammar
from graftlm.engine.sampling import SamplingParams
from graftlm.engine.sequence import Decoding


@dataclass
class Output:
    """One event of a request: a token and the text it settled, the finish, or an error."""

    token: int | None
    delta: str
    finish_reason: str | None = None
    error: Exception | None = None


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    adapters: list[tuple[Source, float]]
    sink: Callable[[Output], None]
    finished_at: float | None = None
    token_ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    grammar: Grammar | None = None  # what the output must follow (JSON mode, a JSON schema); None: free text
    tenant: str = ""  # who asked (an API key's tenant): rows are shared fairly between tenants
    # engine-side state
    decoding: Decoding | None = None
    entries: list[Entry] = field(default_factory=list)  # the adapters it holds while it runs
    tried: bool = False  # has admission been tried (cache hits and misses are counted once)
    row: int = -1  # its KV row
    filled: int = 0  # positions of its KV row holding real tokens
    last_token: int = 0
    alone: bool = False  # prefill it by itself: its packed prefill gave non-finite output

    def cancel(self) -> None:
        """Stop generating (client gone): the engine frees the row at its next step."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finished_at is not None
