"""What the SDK tests share: the main suite's server helpers (loaded from tests/conftest.py by path, so both
suites stand up `billing serve` the same way) and a fast retry policy."""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import sys
import threading
import time
from pathlib import Path

import httpx

from billing_client import RetryPolicy

_SUITE_CONFTEST = Path(__file__).resolve().parents[3] / "tests" / "conftest.py"
_spec = importlib.util.spec_from_file_location("billing_service_test_support", _SUITE_CONFTEST)
assert _spec is not None and _spec.loader is not None
suite = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = suite
_spec.loader.exec_module(suite)

SERVICE_TOKEN: str = suite.SERVICE_TOKEN
LiveServer = suite.LiveServer
ledger_state = suite.ledger_state
user_jwt = suite.user_jwt

# Short waits keep the retry tests quick; the number of attempts is the production default.
FAST_RETRY = RetryPolicy(attempts=5, timeout=20.0, wait_initial=0.05, wait_max=0.5, wait_jitter=0.05)


class DroppingProxy:
    """A TCP proxy in front of the real server that, for its first `drop_first` connections, forwards the
    request, waits until the server has answered (so a charge is committed), then closes the client's
    socket without relaying a byte of the answer: a response lost on the way back."""

    def __init__(self, upstream_port: int, *, drop_first: int = 1) -> None:
        self.upstream_port = upstream_port
        self.drop_first = drop_first
        self.connections = 0
        self.dropped = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            drop = self.connections <= self.drop_first
            threading.Thread(target=self._serve, args=(downstream, drop), daemon=True).start()

    def _serve(self, downstream: socket.socket, drop: bool) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        threading.Thread(target=self._pipe, args=(downstream, upstream), daemon=True).start()
        try:
            while chunk := upstream.recv(65536):
                if drop:
                    # The server answered, so the charge is durable; the client never hears of it.
                    self.dropped += 1
                    break
                downstream.sendall(chunk)
        except OSError:
            pass
        finally:
            # shutdown, not just close: the pipe thread is blocked in recv() on these sockets, and on Linux
            # a close() alone would neither wake it nor send the client a FIN.
            for sock in (downstream, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                target.sendall(chunk)
        except OSError:
            pass


class FaultyTransport(httpx.BaseTransport):
    """Answers the first `failures` requests itself with `status` (and `headers`), then forwards to the real
    server. Records every request it saw, so a test can check what each attempt carried."""

    def __init__(self, failures: int, status: int, headers: dict[str, str] | None = None) -> None:
        self.failures = failures
        self.status = status
        self.headers = headers or {}
        self.requests: list[httpx.Request] = []
        self.sent_at: list[float] = []
        self._real = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.sent_at.append(time.monotonic())
        if len(self.requests) <= self.failures:
            body = {"detail": "injected fault", "code": "injected"}
            return httpx.Response(self.status, json=body, headers=self.headers, request=request)
        return self._real.handle_request(request)

    def close(self) -> None:
        self._real.close()
