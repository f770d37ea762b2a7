"""A real HTTP receiver for webhook tests: records every request, and can be told to fail, stall or be down."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    path: str
    at: float


@dataclass
class Receiver:
    """`status` answers every request (200 by default); `plan` answers the next requests first, in order:
    an int status, ("retry-after", status, seconds), or ("sleep", seconds)."""

    port: int = 0
    requests: list[Received] = field(default_factory=list)
    status: int = 200
    plan: list[Any] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.lock:
                    receiver.requests.append(
                        Received({k.lower(): v for k, v in self.headers.items()}, body, self.path, time.monotonic())
                    )
                    step = receiver.plan.pop(0) if receiver.plan else receiver.status
                headers = {}
                if isinstance(step, tuple) and step[0] == "sleep":
                    time.sleep(step[1])
                    step = 200
                elif isinstance(step, tuple) and step[0] == "retry-after":
                    headers["Retry-After"] = str(step[2])
                    step = step[1]
                try:
                    self.send_response(step)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def for_user(self, user_id: object) -> list[Received]:
        import json

        with self.lock:
            return [r for r in self.requests if json.loads(r.body)["data"].get("user_id") == str(user_id)]
