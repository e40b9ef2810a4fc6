"""A real HTTP endpoint that speaks OpenAI's chat completions, answering as a test tells it to."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# answer(request body) -> the reply's content, or (HTTP status, body text) for an error
Answer = Callable[[dict[str, Any]], "str | tuple[int, str]"]


class StubJudge:
    def __init__(self, answer: Answer, delay: float = 0.0):
        self.answer, self.delay = answer, delay
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                time.sleep(stub.delay)
                got = stub.answer(body)
                status, text = got if isinstance(got, tuple) else (200, None)
                if text is None:
                    text = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": got}}]})
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> StubJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def user_text(body: dict[str, Any]) -> str:
    """The question a judge request asks (its first user message)."""
    return next(m["content"] for m in body["messages"] if m["role"] == "user")
