"""Request and response bodies of the token routes."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class CreateTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="Unique across env and database tokens; never reused.")
    scopes: list[str] = Field(min_length=1, max_length=4, description="Of: charge, credit, read, admin.")


class TokenResponse(BaseModel):
    name: str
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class CreatedTokenResponse(TokenResponse):
    token: str = Field(description="The secret: shown in this answer only, never stored.")
