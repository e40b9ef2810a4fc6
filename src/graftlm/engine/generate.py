"""Offline generation: batched prompts of any lengths (left-padded), greedy or sampled, streamed or not.

Each prompt in a batch yields the same tokens it would alone: padding is masked out of attention and
every row's rotary positions start at 0 at its first real token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from graftlm.engine.kv_cache import KVCache
from graftlm.engine.native_step import NativeStep
from graftlm.engine.sampling import SamplingParams
from graftlm.engine.sequence import Decoding, check_prompt
from graftlm.errors import ConfigError
from graftlm.model.llama import Llama
from graftlm.model.tokenizer import Tokenizer


@dataclass
class Completion:
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"


@dataclass
class StepEvent:
    """One row's new token and the text it settled (streaming)."""

    row: int
    token: int
    delta: str
    finish_reason: str | None


class Generator:
    def __init__(self, model: Llama, tokenizer: Tokenizer, native: bool = True):
        self.model = model
        # one sequence decodes through `NativeStep` where it applies (False: always through the forward)
        self.native = native
        self.tokenizer = tokenizer
        self.stop_ids = tokenizer.stop_ids(model.config.eos_token_id)
        self.pad_id = tokenizer.pad_id

    @property
    def context_window(self) -> int:
        return self.model.config.max_position_embeddings

    def check_prompt(self, ids: Sequence[int]) -> None:
        check_prompt(ids, self.context_window, "the model's context window")

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        """Generate for every prompt in one batch; `params` is shared or one per prompt."""
        out = [Completion(prompt_tokens=len(p)) for p in prompts]
        for ev in self.steps(prompts, params):
            c = out[ev.row]
            c.token_ids.append(ev.token)
            c.text += ev.delta
            c.finish_reason = ev.finish_reason
        for c in out:
            if c.token_ids and c.token_ids[-1] in self.stop_ids and c.finish_reason == "stop":
                c.token_ids.pop()  # the EOS token is not part of the answer
        return out

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[str]:
        """Yield text deltas for one prompt as tokens are produced."""
        for ev in self.steps([prompt], params):
            if ev.delta:
                yield ev.delta

    @torch.inference_mode()
    def steps(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> Iterator[StepEvent]:
        """Run the batch to completion, yielding each row's tokens as they come."""
        b = len(prompts)
        per_row = [params] * b if isinstance(params, SamplingParams) else list(params)
        if len(per_row) != b:
            raise ConfigError(f"{b} prompts but {len(per_row)} sampling settings")
        for p in prompts:
            self.check_prompt(p)
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        budget = [min(sp.max_new_tokens, self.context_window - n) for sp, n in zip(per_row, lengths, strict=True)]
        total = width + max(budget)
        device = self.model.device

        tokens = torch.full((b, width), self.pad_id, dtype=torch.long, device=device)
        valid = torch.zeros((b, total), dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            tokens[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            valid[i, width - len(p) :] = True
        pad = torch.tensor([width - n for n in lengths], device=device)
        positions = (torch.arange(width, device=device)[None, :] - pad[:, None]).clamp(min=0)  # [B, S]
        cache = KVCache(self.model.config, b, total, self.model.dtype, device)
        rows = [Decoding(sp, self.tokenizer, self.stop_ids, n, device) for sp, n in zip(per_row, budget, strict=True)]
        done = [False] * b

        logits = self.model(tokens, positions, cache, 0, valid[:, :width], last_only=True)[:, -1]  # [B, V]
        native = NativeStep.build(self.model, cache) if b == 1 and self.native else None
        start = width
        for _ in range(max(budget)):
            next_ids = [self.pad_id] * b
            for i in range(b):
                if done[i]:
                    continue
                got = rows[i].accept(rows[i].choose(logits[i]))
                next_ids[i] = got.token
                done[i] = got.finish_reason is not None
                yield StepEvent(i, got.token, got.delta, got.finish_reason)
            if all(done):
                return
            if native is not None:  # one sequence: the whole stack of layers in one native call
                logits = native([next_ids[0]], start)
                start += 1
                continue
            valid[:, start] = True
            step_tokens = torch.tensor(next_ids, device=device)[:, None]  # [B, 1]
            step_pos = (start - pad)[:, None]  # [B, 1]
            logits = self.model(step_tokens, step_pos, cache, start, valid[:, : start + 1], last_only=True)[:, -1]
            start += 1
