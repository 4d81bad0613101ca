"""A local HTTP server that speaks the OpenAI chat completions wire format, replaying scripted answers.

It stands in for the remote LLM (which tests cannot reach): the real `openai`
SDK talks to it over HTTP, so retries, status codes and parsing are exercised.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeLLM:
    def __init__(self) -> None:
        self.replies: deque[dict[str, Any]] = deque()
        self.requests: list[dict[str, Any]] = []
        self.default: dict[str, Any] | None = None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeLLM:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reply_json(self, value: Any, *, prompt_tokens: int = 11, completion_tokens: int = 7) -> None:
        self.reply_text(json.dumps(value), prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    def reply_text(self, text: str, *, prompt_tokens: int = 11, completion_tokens: int = 7) -> None:
        self.replies.append({"content": text, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens})

    def reply_status(self, status: int, message: str = "upstream trouble") -> None:
        self.replies.append({"status": status, "message": message})

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                fake.requests.append(body)
                reply = fake.replies.popleft() if fake.replies else fake.default
                if reply is None:
                    self._send(500, {"error": {"message": "no scripted reply left", "type": "server_error"}})
                    return
                if "status" in reply:
                    self._send(reply["status"], {"error": {"message": reply["message"], "type": "server_error"}})
                    return
                self._send(200, {
                    "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body.get("model", "m"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": reply["content"]}}],
                    "usage": {"prompt_tokens": reply["prompt_tokens"], "completion_tokens": reply["completion_tokens"],
                              "total_tokens": reply["prompt_tokens"] + reply["completion_tokens"]},
                })

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
