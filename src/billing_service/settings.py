"""Every setting the service reads, in one place.

Environment variables (no prefix for the seed's `DATABASE_URL`, `BILLING_` for the rest):

| variable                   | meaning                                                              |
|----------------------------|----------------------------------------------------------------------|
| DATABASE_URL               | external PostgreSQL; unset means an embedded one (pgserver)           |
| BILLING_DATA_DIR           | where the embedded PostgreSQL and generated secrets live (./.billing) |
| BILLING_SERVICE_TOKENS     | comma-separated `name:scope1+scope2:token` or bare tokens (all scopes) |
| BILLING_JWT_SECRET         | HS256 secret for user JWTs; unset means no HS256 JWT is accepted      |
| BILLING_JWKS_URL           | JWKS of the identity provider: RS256/EdDSA/ES256 user JWTs by `kid`     |
| BILLING_JWT_ISSUER         | if set, JWKS-verified JWTs must carry this `iss`                      |
| BILLING_JWT_AUDIENCE       | if set, JWKS-verified JWTs must carry this `aud`                      |
| BILLING_RATE_LIMIT_TOKEN_RATE / _BURST | writes per second per token, bucket size (2000 / 4000; 0: off) |
| BILLING_RATE_LIMIT_USER_RATE / _BURST  | writes per second per account, bucket size (1000 / 2000; 0: off) |
| BILLING_POOL_MIN_SIZE      | connections each worker keeps open (2)                                |
| BILLING_POOL_MAX_SIZE      | connections each worker may open (16)                                 |
| BILLING_POOL_TIMEOUT       | seconds to wait for a free connection before a 503 (3)                |
| BILLING_STATEMENT_TIMEOUT_MS | PostgreSQL statement_timeout for request statements (5000)          |
| BILLING_REPLICATION_WAIT_MS | beyond statement_timeout, the longest a commit waits for a sync standby (5000) |
| BILLING_MAX_BODY_BYTES     | request bodies above this get 413 (65536)                             |
| BILLING_BATCH_CHARGES      | coalesce concurrent charges into one commit per batch (true)         |
| BILLING_BATCH_MAX_SIZE     | most charges, captures or balance reads in one batch (256)            |
| BILLING_BATCH_MAX_INFLIGHT | batches a worker may have committing at once (1)                      |
| BILLING_BATCH_READS        | coalesce concurrent balance reads into one statement per batch (true) |
| BILLING_READ_BATCH_MAX_INFLIGHT | read batches a worker may have at the database at once (1)       |
| BILLING_BATCH_CAPTURES     | coalesce concurrent hold captures into one commit per batch (true)    |
| BILLING_EVENTS             | write the events outbox with every change (true)                      |
| BILLING_LOW_BALANCE_THRESHOLD | threshold new accounts get for balance.low; unset: no alert        |
| BILLING_DISPATCHER         | run the webhook dispatcher in `billing serve` (true)                  |
| BILLING_WEBHOOKS_ALLOW_INSECURE | allow http:// and private/loopback webhook addresses (false)     |
| BILLING_WEBHOOK_RETRY_SCHEDULE | seconds between attempts, comma-separated (about a day)           |
| BILLING_WEBHOOK_TIMEOUT    | seconds a receiver gets to answer (10)                                |
| BILLING_WEBHOOK_RETRY_AFTER_MAX | longest Retry-After honoured, seconds (3600)                     |
| BILLING_WEBHOOK_SECRET_GRACE_HOURS | how long a rotated-out secret still signs (24)                |
| BILLING_EVENTS_RETENTION_DAYS | delivered events older than this are pruned (30)                   |
| BILLING_HOLD_SWEEP_INTERVAL | seconds between the dispatcher's expiry sweeps (5)                   |
| BILLING_HOLD_SWEEP_DELAY   | a hold is swept this many seconds after it expired (5)                |
| BILLING_ALLOWANCE_GRANT_INTERVAL | seconds between the dispatcher's grants of allowance periods (5) |
| BILLING_LOG_FORMAT         | `json` or `console`; default console when embedded, json otherwise   |
| BILLING_LOG_LEVEL          | root log level: debug, info, warning, error (info)                    |
| BILLING_ACCESS_LOG         | one log line per request, with its request id (true)                  |
| BILLING_ACCESS_LOG_SAMPLE  | share of 2xx/3xx access lines kept (1.0); 4xx and 5xx always logged   |
| BILLING_FAST_LANE          | serve charge/credit/balance/capture without the framework (true)      |
| BILLING_METRICS_TOKEN      | if set, GET /metrics needs `Authorization: Bearer <it>`; unset: open  |
| BILLING_CONSOLE           | serve the web console at /console (true)                              |
| BILLING_CONSOLE_SESSION_SECONDS | lifetime of a console sign-in, seconds (1800)                   |
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
    jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    # Token buckets on writes, held across workers and replicas (edge/limits.py); 0 turns a limit off.
    rate_limit_token_rate: float = Field(default=2000.0, ge=0)
    rate_limit_token_burst: int = Field(default=4000, ge=0)
    # Per account: each worker holds a share of the budget, so the burst must absorb an uneven split of a
    # legitimate burst (200 concurrent charges to one account must not see a 429).
    rate_limit_user_rate: float = Field(default=1000.0, ge=0)
    rate_limit_user_burst: int = Field(default=2000, ge=0)

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
    access_log_sample: float = Field(default=1.0, ge=0.0, le=1.0)
    fast_lane: bool = True
    metrics_token: SecretStr | None = None
    # On by default: on one hot account it is the only way past one commit per fsync (docs/performance.md).
    batch_charges: bool = True
    batch_max_size: int = Field(default=256, ge=1, le=10_000)
    # One: the charges that arrive while a batch commits all go into the next one. Two or more split them into
    # smaller batches that take the same account locks in turn (docs/performance.md: 1 vs 2, +16% spread, +37% hot).
    batch_max_inflight: int = Field(default=1, ge=1, le=64)
    # Balance reads share statements the same way (ledger/read_batcher.py); nothing is cached.
    batch_reads: bool = True
    read_batch_max_inflight: int = Field(default=1, ge=1, le=64)
    # Plain hold captures share commits too (holds/batcher.py), with the charges' size and in-flight bounds.
    batch_captures: bool = True
    events: bool = True
    low_balance_threshold: int | None = Field(default=None, ge=0, le=2**53 - 1)
    dispatcher: bool = True
    webhooks_allow_insecure: bool = False
    # Svix's schedule (Standard Webhooks' reference): 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h: about 28 h.
    webhook_retry_schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]
    )
    webhook_timeout: float = Field(default=10.0, gt=0, le=300)
    webhook_retry_after_max: float = Field(default=3600.0, ge=0)
    webhook_secret_grace_hours: float = Field(default=24.0, ge=0)
    events_retention_days: float = Field(default=30.0, gt=0)
    hold_sweep_interval: float = Field(default=5.0, gt=0)
    hold_sweep_delay: float = Field(default=5.0, ge=0)
    allowance_grant_interval: float = Field(default=5.0, gt=0)
    console: bool = True
    console_session_seconds: int = Field(default=1800, ge=60, le=86_400)

    @field_validator("service_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        # Several tokens at once is how a token is rotated: add the new one, move callers, drop the old.
        if isinstance(value, str):
            return [token.strip() for token in value.split(",") if token.strip()]
        return value

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _split_schedule(cls, value: object) -> object:
        if isinstance(value, str):
            delays = [float(part) for part in value.split(",") if part.strip()]
            if any(delay < 0 for delay in delays):
                raise ValueError("retry delays must be >= 0 seconds")
            return delays
        return value

    @field_validator("low_balance_threshold", mode="before")
    @classmethod
    def _empty_threshold_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("jwt_secret", "jwks_url", "jwt_issuer", "jwt_audience", mode="before")
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
        secrets = []
        for entry in (token.get_secret_value() for token in self.service_tokens):
            # `name:scopes:token`: the token alone must be scrubbed too, wherever it shows up.
            secrets += [entry, entry.split(":", 2)[2]] if entry.count(":") >= 2 else [entry]
        secrets += [secret.get_secret_value() for secret in (self.jwt_secret, self.metrics_token) if secret]
        return secrets

    @property
    def embedded(self) -> bool:
        return self.database_url is None


@lru_cache
def get_settings() -> Settings:
    return Settings()
