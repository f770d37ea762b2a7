"""Every setting the service reads, in one place.

Environment variables (no prefix for the seed's `DATABASE_URL`, `BILLING_` for the rest):

| variable                   | meaning                                                              |
|----------------------------|----------------------------------------------------------------------|
| DATABASE_URL               | external PostgreSQL; unset means an embedded one (pgserver)           |
| BILLING_DATA_DIR           | where the embedded PostgreSQL and generated secrets live (./.billing) |
| BILLING_SERVICE_TOKENS     | comma-separated service tokens; several allow rotation                |
| BILLING_JWT_SECRET         | HS256 secret for user JWTs; unset means no user JWT is accepted       |
| BILLING_POOL_MIN_SIZE      | connections each worker keeps open (2)                                |
| BILLING_POOL_MAX_SIZE      | connections each worker may open (16)                                 |
| BILLING_POOL_TIMEOUT       | seconds to wait for a free connection before a 503 (3)                |
| BILLING_STATEMENT_TIMEOUT_MS | PostgreSQL statement_timeout for request statements (5000)          |
| BILLING_REPLICATION_WAIT_MS | beyond statement_timeout, the longest a commit waits for a sync standby (5000) |
| BILLING_MAX_BODY_BYTES     | request bodies above this get 413 (65536)                             |
| BILLING_BATCH_CHARGES      | coalesce concurrent charges into one commit per batch (false)        |
| BILLING_BATCH_MAX_SIZE     | most charges in one batch (256)                                       |
| BILLING_BATCH_MAX_INFLIGHT | batches a worker may have committing at once (2)                      |
| BILLING_LOG_FORMAT         | `json` or `console`; default console when embedded, json otherwise   |
| BILLING_LOG_LEVEL          | root log level: debug, info, warning, error (info)                    |
| BILLING_ACCESS_LOG         | one log line per request, with its request id (true)                  |
| BILLING_METRICS_TOKEN      | if set, GET /metrics needs `Authorization: Bearer <it>`; unset: open  |
| PROMETHEUS_MULTIPROC_DIR   | where workers share metric samples; `billing serve` makes a fresh one |
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BILLING_", extra="ignore")

    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    data_dir: Path = Path(".billing")
    service_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    jwt_secret: SecretStr | None = None

    pool_min_size: int = Field(default=2, ge=1)
    pool_max_size: int = Field(default=16, ge=1)
    pool_timeout: float = Field(default=3.0, gt=0)
    statement_timeout_ms: int = Field(default=5000, ge=0)
    # statement_timeout does not cover a commit's wait for the synchronous standby; this bounds it (client side).
    replication_wait_ms: int = Field(default=5000, ge=100)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    log_format: str | None = None
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    access_log: bool = True
    metrics_token: SecretStr | None = None
    batch_charges: bool = False
    batch_max_size: int = Field(default=256, ge=1, le=10_000)
    batch_max_inflight: int = Field(default=2, ge=1, le=64)

    @field_validator("service_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        # Several tokens at once is how a token is rotated: add the new one, move callers, drop the old.
        if isinstance(value, str):
            return [token.strip() for token in value.split(",") if token.strip()]
        return value

    @field_validator("jwt_secret", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("metrics_token", mode="before")
    @classmethod
    def _empty_metrics_token_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("database_url", mode="before")
    @classmethod
    def _empty_url_is_none(cls, value: object) -> object:
        return None if value == "" else value

    def secret_values(self) -> list[str]:
        """Every configured credential, so the logs can scrub them."""
        secrets = [token.get_secret_value() for token in self.service_tokens]
        secrets += [secret.get_secret_value() for secret in (self.jwt_secret, self.metrics_token) if secret]
        return secrets

    @property
    def embedded(self) -> bool:
        return self.database_url is None


@lru_cache
def get_settings() -> Settings:
    return Settings()
