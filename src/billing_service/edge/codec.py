"""JSON out: one encoder for every answer the fast lane writes, and the error body's one shape.

msgspec encodes dicts, UUIDs and aware datetimes (as RFC 3339, `Z` for UTC, like pydantic's JSON mode)
straight to bytes, with no intermediate model: an answer costs a microsecond or two, not a model round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.responses import Response

_encoder = msgspec.json.Encoder()
encode = _encoder.encode

JSON_CONTENT_TYPE = (b"content-type", b"application/json")
REPLAYED_HEADER = (b"idempotent-replayed", b"true")


@dataclass(frozen=True, slots=True)
class Answer:
    """A finished JSON answer: what the fast lane writes as is, and a FastAPI route returns as a Response."""

    status: int
    body: bytes
    replayed: bool = False
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        headers = [JSON_CONTENT_TYPE, (b"content-length", str(len(self.body)).encode()), *self.headers]
        if self.replayed:
            headers.append(REPLAYED_HEADER)
        return headers

    def response(self) -> Response:
        response = Response(self.body, status_code=self.status, media_type="application/json")
        if self.replayed:
            response.headers["Idempotent-Replayed"] = "true"
        for name, value in self.headers:
            response.headers[name.decode("latin-1")] = value.decode("latin-1")
        return response


def answer(body: Any, *, status: int = 200, replayed: bool = False) -> Answer:
    return Answer(status, encode(body), replayed)


def error_body(detail: str, code: str) -> bytes:
    return encode({"detail": detail, "code": code})
