"""Request bodies of the OpenAI-compatible API. Unknown fields are refused (400), not ignored; so are
numbers outside what the engine accepts and strings that are not valid Unicode (lone surrogates)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from graftlm.engine.engine import MAX_ADAPTER_WEIGHT
from graftlm.errors import ConfigError


def _unicode(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds a lone surrogate (\\ud800-\\udfff): it is not valid Unicode") from None
    return s


Text = Annotated[str, AfterValidator(_unicode)]
Name = Annotated[str, Field(min_length=1, max_length=512), AfterValidator(_unicode)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class AdapterWeight(Strict):
    name: Name
    weight: float = Field(default=1.0, ge=-MAX_ADAPTER_WEIGHT, le=MAX_ADAPTER_WEIGHT)


class JsonSchemaFormat(Strict):
    """OpenAI's structured outputs: the schema the reply must follow (`graftlm.engine.json_schema`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: Name
    schema_: dict[str, Any] = Field(alias="schema")
    description: Text | None = None
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format: json_schema is given exactly when type is 'json_schema'")
        return self


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """The fields both completion endpoints share."""

    model: Name
    max_tokens: int | None = Field(default=None, ge=1, le=2**31)
    temperature: float = Field(default=1.0, ge=0, le=2)  # under 1e-5 it is greedy (sampling.MIN_TEMPERATURE)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, le=2**31)  # an extension, as in vLLM
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # 64 bits, signed or not
    stop: Text | list[Text] | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256), AfterValidator(_unicode)] | None = None  # logged, not trusted
    # graftlm: a weighted mix of adapters, instead of (or on top of) the one `model` names
    adapters: list[AdapterWeight] | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stops) > 4 or any(not s for s in stops):
            raise ConfigError("stop takes up to 4 non-empty strings")
        return stops


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: Text
    name: Name | None = None


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None


class CompletionRequest(Sampling):
    prompt: Text | list[Text]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False


class LoadAdapterRequest(Strict):
    lora_name: Name
    lora_path: Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_unicode)] | None = None
    pin: bool = False


class UnloadAdapterRequest(Strict):
    lora_name: Name
