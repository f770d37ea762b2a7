"""The fast lane: the hot routes (charge, credit, balance, capture) served without the framework.

Every agent step pays for a charge, so these routes skip FastAPI's routing, dependency injection and response
models. The edge matches the path, validates the body in one pass with the route's own pydantic model
(`model_validate_json`: Rust, no intermediate dict), calls the same function the FastAPI route calls, and
writes its pre-encoded `Answer`.

The lane only takes what it expects. A query string, an id that is not a canonical UUID, a malformed
Idempotency-Key or a body that does not validate falls through to the FastAPI route of the same path, which
is the reference implementation of the contract: it answers the exact 422 it always did, and /docs is
generated from the same types. The lane has no error dialect of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ValidationError

from billing_service.edge.codec import Answer

# (app state, the path's id, the validated body, the Idempotency-Key, the Caller) -> the answer
FastCall = Callable[[Any, Any, Any, str | None, Any], Awaitable[Answer]]
_UUID_LENGTH = 36


@dataclass(frozen=True)
class FastRoute:
    """One hot route. `template` is the FastAPI route's path; `access` names the check the route needs."""

    method: Literal["GET", "POST"]
    template: str
    access: Literal["service", "reader"]
    call: FastCall
    body: type[BaseModel] | None = None
    prefix: str = field(init=False)
    suffix: str = field(init=False)

    def __post_init__(self) -> None:
        prefix, brace, rest = self.template.partition("{")
        object.__setattr__(self, "prefix", prefix)
        object.__setattr__(self, "suffix", rest.partition("}")[2] if brace else "")

    @property
    def has_id(self) -> bool:
        return self.prefix != self.template

    def path_id(self, path: str) -> UUID | None:
        """The UUID in the path, or None when this route's template does not match it exactly."""
        if len(path) != len(self.prefix) + _UUID_LENGTH + len(self.suffix):
            return None
        if not (path.startswith(self.prefix) and path.endswith(self.suffix)):
            return None
        try:
            return UUID(path[len(self.prefix) : len(self.prefix) + _UUID_LENGTH])
        except ValueError:
            return None

    def parse(self, body: bytes) -> BaseModel | None:
        """The validated body, or None: the FastAPI route then answers the 422 with its usual detail."""
        assert self.body is not None
        try:
            return self.body.model_validate_json(body)
        except ValidationError:
            return None


class FastLane:
    """Finds the hot route for a request, in a dict lookup for fixed paths and a prefix test for the others."""

    def __init__(self, routes: list[FastRoute]) -> None:
        self._fixed: dict[tuple[str, str], FastRoute] = {
            (route.method, route.template): route for route in routes if not route.has_id
        }
        self._with_id = [route for route in routes if route.has_id]

    def match(self, method: str, path: str) -> tuple[FastRoute, UUID | None] | None:
        route = self._fixed.get((method, path))
        if route is not None:
            return route, None
        for route in self._with_id:
            if route.method == method and path.startswith(route.prefix):
                path_id = route.path_id(path)
                if path_id is not None:
                    return route, path_id
        return None
