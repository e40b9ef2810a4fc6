"""Request bodies of the OpenAI-compatible API. Unknown fields are refused (400), not ignored."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterWeight(Strict):
    name: str
    weight: float = 1.0


class ResponseFormat(Strict):
    type: Literal["text", "json_object"] = "text"


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """The fields both completion endpoints share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # an extension, as in vLLM
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # graftlm: a weighted mix of adapters, instead of (or on top of) the one `model` names
    adapters: list[AdapterWeight] | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False


class LoadAdapterRequest(Strict):
    lora_name: str
    lora_path: str | None = None
    pin: bool = False


class UnloadAdapterRequest(Strict):
    lora_name: str
