"""Webhooks: Standard Webhooks signatures, retries on a compressed schedule, replay, the delivery log, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from conftest import fund
from events.conftest import wait_for


def _verify(secret: str, request) -> dict:
    return Webhook(secret).verify(request.body, request.headers)


def test_deliveries_are_signed_and_tampering_or_a_stale_timestamp_fails(http, receiver, webhook):
    user = uuid.uuid4()
    fund(http, user, 10)
    request = wait_for(lambda: receiver.for_user(user), what="delivery")[0]
    payload = _verify(webhook["secret"], request)
    assert payload["type"] == "transaction.posted" and payload["data"]["amount"] == 10
    assert set(payload) == {"type", "timestamp", "data"}
    assert request.headers["webhook-signature"].startswith("v1,")
    with pytest.raises(WebhookVerificationError):
        Webhook(webhook["secret"]).verify(request.body.replace(b"10", b"99"), request.headers)
    stale = {**request.headers, "webhook-timestamp": str(int(time.time()) - 3600)}
    with pytest.raises(WebhookVerificationError):
        Webhook(webhook["secret"]).verify(request.body, stale)
    # The secret is shown on create only.
    assert "secret" not in http.get(f"/billing/webhooks/{webhook['id']}").json()


def test_a_rotated_secret_signs_with_both_during_the_grace_period(http, receiver, webhook):
    rotated = http.post(f"/billing/webhooks/{webhook['id']}/rotate-secret")
    assert rotated.status_code == 200 and rotated.json()["secret"] != webhook["secret"]
    user = uuid.uuid4()
    fund(http, user, 3)
    request = wait_for(lambda: receiver.for_user(user), what="delivery")[0]
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    _verify(webhook["secret"], request)
    _verify(rotated.json()["secret"], request)


def test_failures_are_retried_and_retry_after_is_honoured_until_delivered(http, receiver, webhook):
    user = uuid.uuid4()
    # 500, then a stall past the 1 s timeout, then 503 with Retry-After: 2, then success.
    receiver.plan = [500, ("sleep", 1.5), ("retry-after", 503, 2)]
    fund(http, user, 1)
    wait_for(lambda: len(receiver.for_user(user)) >= 4, timeout=30, what="four attempts")
    attempts = receiver.for_user(user)
    assert len({a.headers["webhook-id"] for a in attempts}) == 1
    assert len({a.body for a in attempts}) == 1
    assert attempts[3].at - attempts[2].at >= 2.0  # Retry-After, above the schedule's 1 s
    log = wait_for(
        lambda: [
            d
            for d in http.get(f"/billing/webhooks/{webhook['id']}/deliveries").json()
            if d["user_id"] == str(user) and d["status"] == "delivered"
        ],
        what="delivered in the log",
    )[0]
    assert [a["status_code"] for a in log["attempt_log"]] == [500, None, 503, 200]
    assert "timed out" in log["attempt_log"][1]["error"]


def test_a_receiver_down_for_a_while_gets_everything_in_order_once_back(http, receiver, webhook):
    user = uuid.uuid4()
    receiver.status = 502  # "down"
    for amount in (1, 2, 3):
        fund(http, user, amount)
    wait_for(lambda: len(receiver.for_user(user)) >= 2, what="retries while down")
    # Ordered per account: nothing after the first event is sent while the first is failing.
    assert {json.loads(r.body)["data"]["amount"] for r in receiver.for_user(user)} == {1}
    receiver.status = 200
    wait_for(
        lambda: [json.loads(r.body)["data"]["amount"] for r in receiver.for_user(user)][-3:] == [1, 2, 3],
        what="all three, in order",
    )


def test_after_the_last_attempt_it_fails_and_can_be_replayed(events_server, http, receiver, webhook):
    user = uuid.uuid4()
    receiver.status = 500
    started = datetime.now(UTC) - timedelta(seconds=1)
    fund(http, user, 7)
    failed = wait_for(
        lambda: [
            d
            for d in http.get(f"/billing/webhooks/{webhook['id']}/deliveries", params={"status": "failed"}).json()
            if d["user_id"] == str(user)
        ],
        timeout=30,
        what="failed delivery",
    )[0]
    assert failed["attempts"] == 4 and len(failed["attempt_log"]) == 4  # the first try and 3 retries
    receiver.status = 200
    before = len(receiver.for_user(user))
    replay = http.post(f"/billing/webhooks/{webhook['id']}/replay", json={"event_ids": [failed["event_id"]]})
    assert replay.status_code == 202 and replay.json() == {"replayed": 1}
    wait_for(lambda: len(receiver.for_user(user)) == before + 1, what="replayed delivery")
    # And by time range, through the CLI.
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "billing_service",
            "webhooks",
            "replay",
            webhook["id"],
            "--since",
            started.isoformat(),
            "--until",
            (datetime.now(UTC) + timedelta(seconds=1)).isoformat(),
        ],
        env=events_server.env,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr
    wait_for(lambda: len(receiver.for_user(user)) == before + 2, what="replay by range")
    log = subprocess.run(
        [sys.executable, "-m", "billing_service", "webhooks", "deliveries", webhook["id"], "--status", "delivered"],
        env=events_server.env,
        capture_output=True,
        text=True,
    )
    assert log.returncode == 0, log.stderr
    assert any(json.loads(line)["event_id"] == failed["event_id"] for line in log.stdout.splitlines())


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"url": "https://example.com/h", "events": ["charge.made"]}, "unknown_event_type"),
        ({"url": "https://example.com/h"}, "validation_error"),
        ({"url": "ftp://example.com/h", "events": ["*"]}, "webhook_url_invalid"),
        ({"url": "https://user:pw@example.com/h", "events": ["*"]}, "webhook_url_invalid"),
    ],
)
def test_bad_webhooks_are_refused_clearly(http, body, code):
    response = http.post("/billing/webhooks", json=body)
    assert response.status_code == 422 and response.json()["code"] == code, response.text


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/h",
        "https://127.0.0.1/h",
        "https://10.1.2.3/h",
        "https://169.254.169.254/latest",
        "https://[::1]/h",
        "https://localhost/h",
        "https://224.0.0.1/h",
    ],
)
def test_insecure_or_private_destinations_need_the_setting(client, url):
    # `client` is the suite's default server: BILLING_WEBHOOKS_ALLOW_INSECURE is off there.
    response = client.post("/billing/webhooks", json={"url": url, "events": ["*"]})
    assert response.status_code == 422 and response.json()["code"] == "webhook_url_not_allowed", response.text


def test_bad_replays_and_unknown_webhooks(http, webhook):
    replay = f"/billing/webhooks/{webhook['id']}/replay"
    for body in (
        {},
        {"since": "2026-01-01T00:00:00Z"},
        {"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
        {"since": "2026-01-01T00:00:00", "until": "2026-01-02T00:00:00"},
        {"event_ids": []},
        {"event_ids": [str(uuid.uuid4())], "since": "2026-01-01T00:00:00Z"},
    ):
        response = http.post(replay, json=body)
        assert response.status_code == 422, (body, response.text)
        assert set(response.json()) == {"detail", "code"}
    assert http.post(replay, json={"event_ids": ["nope"]}).status_code == 422
    missing = http.get(f"/billing/webhooks/{uuid.uuid4()}")
    assert missing.status_code == 404 and missing.json()["code"] == "webhook_not_found"
    assert http.get(f"/billing/webhooks/{webhook['id']}/deliveries", params={"cursor": "@@"}).status_code == 422


def test_webhooks_are_for_services_only(events_server, webhook):
    from conftest import user_jwt

    with events_server.client(token=user_jwt(uuid.uuid4())) as user:
        assert user.get("/billing/webhooks").status_code == 403
        assert user.post("/billing/webhooks", json={"url": "https://example.com", "events": ["*"]}).status_code == 403
