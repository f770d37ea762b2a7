"""The process's events settings, read by the ledger's and holds' statements on every write.

A module-level value rather than a parameter threaded through every call: the hot routes' signatures stay as
they are, and reading it costs an attribute lookup. `configure` is called by create_app and the CLI.
"""

from __future__ import annotations

from billing_service.settings import Settings

# Write the outbox (BILLING_EVENTS). The statements take it as the %(events)s parameter.
enabled = True
# The low-balance threshold a new account gets (BILLING_LOW_BALANCE_THRESHOLD); None: no alert.
default_threshold: int | None = None


def configure(settings: Settings) -> None:
    global enabled, default_threshold
    enabled = settings.events
    default_threshold = settings.low_balance_threshold
