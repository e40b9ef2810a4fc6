"""An LLM judge behind any OpenAI-compatible endpoint (graftlm's own server, vLLM, a hosted API).

Every reply is parsed strictly against the fields the question asks for: one JSON object and nothing
else (a Markdown code fence around it is allowed), every field present, every verdict one of its
allowed words. A reply that fails is asked again with the parse error quoted (`reply_tries` in all);
after that it is a failure, which graders never count as a pass. An endpoint that is down, slow or
overloaded (connection errors, timeouts, 429 and 5xx) is retried with exponential back-off, then
`JudgeUnavailableError` names it; other HTTP errors (a wrong key, an unknown model) stop at once.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from graftlm.errors import ConfigError, GraftlmError
from graftlm.progress import progress
from graftlm.setting import setting

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
FENCE = re.compile(r"^```(?:json)?\s*\n(.*?)\n?```$", re.DOTALL | re.IGNORECASE)
RESPONSE_FORMATS = ("json_schema", "json_object", "none")
TEXT_CHARS = 400  # a reason longer than this is cut by the schema (a small judge rambles until max_tokens)


class JudgeUnavailableError(GraftlmError):
    """The judge endpoint did not answer (after retries), or refused the request."""


class PartialResults(JudgeUnavailableError):
    """The judge went away part way: the results made before, and the error that stopped the rest."""

    def __init__(self, results: list[Any], error: JudgeUnavailableError):
        super().__init__(str(error))
        self.results = results


class MalformedReplyError(GraftlmError):
    """A judge reply that is not the JSON object asked for."""


@dataclass(frozen=True)
class JudgeConfig:
    url: str = setting("", "the judge's OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1", flag="--judge-url")
    model: str = setting("", "the judge's model name at that endpoint", flag="--judge-model")
    api_key: str = setting("", "bearer key for the endpoint (default: $GRAFTLM_JUDGE_KEY)", flag="--judge-key")
    timeout: float = setting(120.0, "seconds to wait for one judge reply", flag="--judge-timeout")
    tries: int = setting(4, "tries per request when the endpoint is down, slow or busy", flag="--judge-tries")
    backoff: float = setting(1.0, "seconds before the first retry, doubled after each", flag="--judge-backoff")
    reply_tries: int = setting(3, "asks per judgment when its reply does not parse", flag="--judge-reply-tries")
    max_tokens: int = setting(256, "most tokens in one judge reply", flag="--judge-max-tokens")
    response_format: str = setting(
        "json_schema",
        "how to ask for JSON: json_schema (structured output), json_object (JSON mode) or none (the prompt only)",
        choices=RESPONSE_FORMATS,
        flag="--judge-format",
    )
    concurrency: int = setting(
        8, "judge requests in flight at once (a batching server answers them together)", flag="--judge-concurrency"
    )

    def __post_init__(self) -> None:
        if not self.url or not self.model:
            raise ConfigError("a judge needs --judge-url and --judge-model")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"--judge-url {self.url!r} is not an http(s) URL")
        if self.response_format not in RESPONSE_FORMATS:
            raise ConfigError(f"response_format is one of {', '.join(RESPONSE_FORMATS)}")
        if self.tries < 1 or self.reply_tries < 1 or self.concurrency < 1:
            raise ConfigError("judge tries, reply tries and concurrency are at least 1")


@dataclass(frozen=True)
class Reply:
    """The fields a judge must answer with: each either a verdict from fixed words or free text."""

    name: str  # names the JSON schema sent to endpoints with structured output
    verdicts: dict[str, tuple[str, ...]]  # field -> allowed words
    text: tuple[str, ...] = ("reason",)  # free-text fields

    def json_schema(self) -> dict[str, Any]:
        props: dict[str, Any] = {k: {"type": "string", "enum": list(v)} for k, v in self.verdicts.items()}
        props |= {k: {"type": "string", "maxLength": TEXT_CHARS} for k in self.text}
        return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}

    def example(self) -> str:
        """How the reply must look, for the prompt."""
        parts = [f'"{k}": "{"|".join(v)}"' for k, v in self.verdicts.items()]
        parts += [f'"{k}": "<one sentence>"' for k in self.text]
        return "{" + ", ".join(parts) + "}"

    def parse(self, text: str) -> dict[str, str]:
        """The reply's fields, verdicts lower-cased; MalformedReplyError says what is wrong."""
        body = text.strip()
        if m := FENCE.match(body):
            body = m.group(1).strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            raise MalformedReplyError(f"not one JSON object ({e.msg} at character {e.pos})") from None
        if not isinstance(obj, dict):
            raise MalformedReplyError(f"a JSON {type(obj).__name__}, not an object")
        missing = [k for k in (*self.verdicts, *self.text) if k not in obj]
        if missing:
            raise MalformedReplyError(f"missing {', '.join(missing)}")
        out = {}
        for k, allowed in self.verdicts.items():
            v = obj[k]
            if not isinstance(v, str) or v.strip().lower() not in {a.lower() for a in allowed}:
                raise MalformedReplyError(f"{k} is {v!r}, not one of {', '.join(allowed)}")
            out[k] = v.strip().lower()
        for k in self.text:
            if not isinstance(obj[k], str):
                raise MalformedReplyError(f"{k} is {obj[k]!r}, not text")
            out[k] = obj[k].strip()
        return out


@dataclass
class Judge:
    config: JudgeConfig
    client: httpx.Client | None = None
    sleep: Callable[[float], None] = time.sleep
    calls: int = field(default=0, init=False)  # HTTP requests made, retries included

    def __post_init__(self) -> None:
        if self.client is None:
            self.client = httpx.Client(timeout=self.config.timeout)

    @property
    def endpoint(self) -> str:
        return self.config.url.rstrip("/") + "/chat/completions"

    def ask(self, system: str, user: str, reply: Reply) -> dict[str, str]:
        """The judge's parsed answer; MalformedReplyError after `reply_tries` unreadable replies."""
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        error = MalformedReplyError("no reply")
        for _ in range(self.config.reply_tries):
            text = self._complete(messages, reply)
            try:
                return reply.parse(text)
            except MalformedReplyError as e:
                error = e
                log.debug("judge reply did not parse (%s): %r", e, text[:200])
                messages = [
                    *messages[:2],
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": f"That reply is not valid: {e}. Reply with only {reply.example()}"},
                ]
        raise MalformedReplyError(f"{error} (after {self.config.reply_tries} tries)")

    def map(self, fn: Callable[[T], R], items: Sequence[T], label: str = "judging") -> list[R]:
        """`fn` over `items`, `concurrency` at a time, in order, with a progress bar. When the judge becomes
        unavailable, PartialResults carries the results so far (later items are not asked)."""
        results: list[R] = []
        with ThreadPoolExecutor(self.config.concurrency) as pool, progress(label, len(items), "judged") as bar:
            futures = [pool.submit(fn, x) for x in items]
            for f in futures:
                try:
                    results.append(f.result())
                except JudgeUnavailableError as e:
                    for rest in futures:
                        rest.cancel()
                    raise PartialResults(results, e) from e
                bar.advance(1)
        return results

    def chat(self, messages: list[dict[str, str]], **sampling: Any) -> tuple[str, str]:
        """The endpoint's answer to a chat and why it ended ("stop", "length", ...), with sampling settings
        (temperature, top_p, max_tokens, seed) as the OpenAI API names them; `graftlm synth` asks teachers so."""
        data = self._post({"model": self.config.model, "messages": messages, **sampling})
        text = self._content(data)
        return text, str(data["choices"][0].get("finish_reason") or "")

    def _complete(self, messages: list[dict[str, str]], reply: Reply) -> str:
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": messages,
            "temperature": 0.0,
            "max_tokens": self.config.max_tokens,
        }
        if self.config.response_format == "json_schema":
            schema = {"name": reply.name, "schema": reply.json_schema(), "strict": True}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif self.config.response_format == "json_object":
            body["response_format"] = {"type": "json_object"}
        return self._answer(body)

    def _answer(self, body: dict[str, Any]) -> str:
        return self._content(self._post(body))

    def _content(self, data: dict[str, Any]) -> str:
        try:
            return str(data["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise MalformedReplyError(f"the endpoint's answer has no choices[0].message: {str(data)[:200]}") from None

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        key = self.config.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        where = f"judge {self.config.model!r} at {self.endpoint}"
        wait, last = self.config.backoff, ""
        assert self.client is not None
        for attempt in range(1, self.config.tries + 1):
            self.calls += 1
            try:
                r = self.client.post(self.endpoint, json=body, headers=headers)
            except httpx.TransportError as e:  # refused, reset, timed out
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    try:
                        return r.json()
                    except json.JSONDecodeError:
                        last = f"HTTP 200 with a body that is not JSON: {r.text[:120]!r}"
                elif r.status_code == 429 or r.status_code >= 500:
                    last = f"HTTP {r.status_code}: {r.text[:200]}"
                else:
                    hint = ""
                    if r.status_code == 400 and self.config.response_format == "json_schema":
                        hint = " (an endpoint without structured output takes --judge-format json_object)"
                    raise JudgeUnavailableError(
                        f"{where} refused the request: HTTP {r.status_code}: {r.text[:300]}{hint}"
                    )
            if attempt < self.config.tries:
                log.warning("%s: %s; retrying in %.1f s (try %d of %d)", where, last, wait, attempt, self.config.tries)
                self.sleep(wait)
                wait *= 2
        raise JudgeUnavailableError(f"{where} did not answer after {self.config.tries} tries: {last}")
