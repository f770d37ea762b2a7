"""The web console (/console) driven in a real headless Chromium (Debian's), against a real `billing serve`
(several workers) and PostgreSQL. One browser for the module; a fresh context (cookie jar) per test.

The demo account is seeded by `billing demo`, as a newcomer would; the same tests save the screenshots in
docs/console/.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from conftest import SERVICE_TOKEN, LiveServer, fund, user_jwt

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Samples the balance chart's own pixels across its width: between the line and the top must be empty, midway
# between the line and zero must be the area's fill (a wrong fill polygon once covered part of the top).
BALANCE_FILL_SAMPLES = """() => {
  const chart = Chart.getChart("chart-balance");
  const x = chart.scales.x, y = chart.scales.y, points = chart.data.datasets[0].data;
  const ratio = chart.currentDevicePixelRatio;
  const filled = (px, value) => {
    const d = chart.ctx.getImageData(Math.round(px * ratio), Math.round(y.getPixelForValue(value) * ratio), 1, 1).data;
    return d[3] > 0 && d[2] > d[0] + 100;  // the area's blue, not a grey grid line
  };
  const found = {samples: 0, above: 0, below: 0};
  for (let k = 1; k < 40; k++) {
    const t = x.min + (x.max - x.min) * k / 40;
    let value = null;
    for (const p of points) { if (p.x <= t) value = p.y; else break; }  // a step: the last balance so far
    if (value === null) continue;
    const px = x.getPixelForValue(t);
    found.samples++;
    for (const part of [0.25, 0.5, 0.75]) if (filled(px, value + (y.max - value) * part)) found.above++;
    if (filled(px, value / 2)) found.below++;
  }
  return found;
}"""
DOCS = Path(__file__).resolve().parent.parent / "docs" / "console"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: scripts/test installs it (apt-get install chromium)")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def demo_user(server: LiveServer) -> uuid.UUID:
    # Fixed, so the screenshots show the same (seeded) month each run; every test session has a fresh database.
    user = uuid.UUID("6f1c1f0e-2b7a-4a53-9d2e-2b8f7f0c9a01")
    done = subprocess.run(
        [sys.executable, "-m", "billing_service", "demo", "--user-id", str(user)],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert str(user) in done.stdout
    return user


class Console:
    """A browser context (its own cookies) on the console, collecting console errors (CSP violations among them)."""

    def __init__(self, browser: Any, server: LiveServer, viewport: dict[str, int] = DESKTOP) -> None:
        self.server = server
        self.context = browser.new_context(viewport=viewport, device_scale_factor=1)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))

    def url(self, path: str) -> str:
        return self.server.base_url + path

    def open(self, path: str) -> Any:
        return self.page.goto(self.url(path))

    def sign_in(self, token: str) -> None:
        self.open("/console/sign-in")
        self.page.fill("#token", token)
        with self.page.expect_navigation():
            self.page.click("button[type=submit]")

    def cookie(self) -> str:
        (value,) = [c["value"] for c in self.context.cookies() if c["name"] == "billing_console"]
        return str(value)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def console(browser: Any, server: LiveServer) -> Iterator[Console]:
    opened = Console(browser, server)
    yield opened
    opened.close()


def _not_blank(png: bytes) -> None:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 3, "the chart is a blank canvas"


def test_service_signs_in_finds_the_account_and_sees_charts(console: Console, demo_user: uuid.UUID) -> None:
    console.sign_in(SERVICE_TOKEN)
    page = console.page
    assert page.url.endswith("/console/accounts")
    assert str(demo_user) in page.locator("table").first.inner_text()  # among the recently active
    page.fill("#q", str(demo_user)[:13])
    with page.expect_navigation():
        page.click("form.search button")
    assert "q=" in page.url and SERVICE_TOKEN not in page.url
    with page.expect_navigation():
        page.click(f"a[href='/console/accounts/{demo_user}']")
    assert page.locator("#balance").inner_text().replace("\u202f", "").isdigit()
    for chart in ("#chart-balance", "#chart-daily", "#chart-runs"):
        _not_blank(page.locator(chart).screenshot())
    assert page.locator("#holds li").count() >= 4  # the orchestrator, two sub-agents, a tool below one
    assert "Sub-agent: research" in page.locator("#holds").inner_text()
    assert page.locator("#events tbody tr").count() >= 5
    plan = page.locator("#allowances tbody tr").first.inner_text()
    assert "Team plan: monthly tokens" in plan and "200\u202f000 / month" in plan, plan
    assert SERVICE_TOKEN not in page.content()
    assert console.errors == []  # no CSP violation, no script error
    DOCS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(DOCS / "account-desktop.png"), full_page=True)
    console.open("/console/webhooks")
    assert page.locator("h1").inner_text() == "Webhooks"


def test_user_signs_in_and_sees_only_their_own_account(
    browser: Any, server: LiveServer, demo_user: uuid.UUID, client: httpx.Client
) -> None:
    other = uuid.uuid4()
    fund(client, other, 4242)
    client.post(
        "/billing/charge-tokens",
        json={"user_id": str(other), "amount": 17, "description": "secret-of-other-user"},
    ).raise_for_status()
    phone = Console(browser, server, PHONE)
    try:
        phone.sign_in(user_jwt(demo_user))
        page = phone.page
        assert page.url.endswith(f"/console/accounts/{demo_user}")
        _not_blank(page.locator("#chart-daily").screenshot())
        fill = page.evaluate(BALANCE_FILL_SAMPLES)
        assert fill["samples"] >= 30 and fill["above"] == 0 and fill["below"] >= fill["samples"] - 2, fill
        assert page.locator("header nav a").all_inner_texts() == ["My account"]
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(DOCS / "account-phone.png"), full_page=False)
        # Phone width: the page does not scroll sideways.
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        assert phone.errors == []

        response = phone.open(f"/console/accounts/{other}")
        assert response.status == 403
        content = page.content()
        assert str(other) not in content and "secret-of-other-user" not in content and "4242" not in content
        assert phone.open("/console/webhooks").status == 403
        phone.open("/console/accounts")  # a user has no account list: back to their own page
        assert page.url.endswith(f"/console/accounts/{demo_user}")
    finally:
        phone.close()


def test_history_pages_and_filters(console: Console, demo_user: uuid.UUID) -> None:
    console.sign_in(SERVICE_TOKEN)
    page = console.page
    console.open(f"/console/accounts/{demo_user}")
    rows = page.locator("#history tbody tr")
    assert rows.count() == 25
    first_page = rows.all_inner_texts()
    with page.expect_navigation():
        page.click("#older")
    assert "cursor=" in page.url
    second_page = rows.all_inner_texts()
    assert len(second_page) == 25 and not set(first_page) & set(second_page)
    balances = [int(t.replace("\u202f", "")) for t in page.locator("#history tbody td:nth-child(4)").all_inner_texts()]
    before = [int(t.replace("\u202f", "")) for t in page.locator("#history tbody td:nth-child(3)").all_inner_texts()]
    # The balance_after chain holds across the page: each row's balance minus its amount is the next row's.
    assert all(balances[i] - before[i] == balances[i + 1] for i in range(len(balances) - 1))
    with page.expect_navigation():
        page.click("#newest")
    assert rows.all_inner_texts() == first_page

    page.select_option("#f-type", "credit")
    with page.expect_navigation():
        page.click("#f-apply")
    assert set(page.locator("#history tbody td:nth-child(2)").all_inner_texts()) == {"credit"}
    assert rows.count() == 5  # the first top-up, two more, the launch-week bonus grant and the plan's month

    run_id = "run-live-0001"
    page.select_option("#f-type", "")
    page.fill("#f-run", run_id)
    with page.expect_navigation():
        page.click("#f-apply")
    assert set(page.locator("#history tbody td:nth-child(6)").all_inner_texts()) == {run_id}
    assert rows.count() == 2

    page.fill("#f-run", "")
    page.fill("#f-since", "2001-01-01")
    page.fill("#f-until", "2001-01-31")
    with page.expect_navigation():
        page.click("#f-apply")
    assert "No transactions match" in page.locator("#history").inner_text()
    assert console.errors == []


def test_an_xss_payload_renders_as_text(console: Console, client: httpx.Client) -> None:
    victim = uuid.uuid4()
    fund(client, victim, 1000)
    client.post(
        "/billing/charge-tokens",
        json={
            "user_id": str(victim),
            "amount": 10,
            "description": XSS,
            "metadata": {"run_id": XSS, "model": "</script><script>window.__xss=3</script>"},
        },
    ).raise_for_status()
    console.sign_in(SERVICE_TOKEN)
    page = console.page
    console.open(f"/console/accounts/{victim}")
    page.wait_for_load_state("load")
    assert page.evaluate("window.__xss") is None
    assert console.dialogs == []
    assert XSS in page.locator("#history tbody").inner_text()  # shown as text, not markup
    assert page.locator("#history img").count() == 0
    _not_blank(page.locator("#chart-runs").screenshot())  # the run id went into the chart as data
    html = page.content()
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in html


def test_sign_out_ends_the_session(console: Console, server: LiveServer) -> None:
    console.sign_in(SERVICE_TOKEN)
    cookie = console.cookie()
    (jar,) = [c for c in console.context.cookies() if c["name"] == "billing_console"]
    assert jar["httpOnly"] and jar["sameSite"] == "Strict" and jar["path"] == "/console"
    assert SERVICE_TOKEN not in cookie

    with httpx.Client(base_url=server.base_url, cookies={"billing_console": cookie}) as replay:
        assert replay.get("/console/accounts").status_code == 200  # any worker accepts it
        with console.page.expect_navigation():
            console.page.click("#sign-out")
        assert console.page.url.endswith("/console/sign-in")
        assert [c for c in console.context.cookies() if c["name"] == "billing_console"] == []
        refused = replay.get("/console/accounts")
        assert refused.status_code == 303 and refused.headers["location"] == "/console/sign-in"


def test_sign_in_refusals_and_headers(server: LiveServer) -> None:
    with httpx.Client(base_url=server.base_url) as http:
        form = http.get("/console/sign-in")
        assert form.status_code == 200
        csp = form.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert form.headers["x-content-type-options"] == "nosniff"
        assert re.search(r"<script(?![^>]*\bsrc=)(?![^>]*application/json)", form.text) is None  # no inline script
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert csrf is not None
        # The right token, but no CSRF nonce cookie (a cross-site form post): refused.
        bare = httpx.post(f"{server.base_url}/console/sign-in", data={"token": SERVICE_TOKEN, "csrf": csrf[1]})
        assert bare.status_code == 400 and "billing_console=" not in bare.headers.get("set-cookie", "")
        wrong = http.post("/console/sign-in", data={"token": "not-a-token", "csrf": csrf[1]})
        assert wrong.status_code == 401 and "not-a-token" not in wrong.text
        # A forged cookie (valid shape, wrong signature) is refused before any lookup.
        forged = httpx.get(f"{server.base_url}/console/accounts", cookies={"billing_console": "a.9999999999.b"})
        assert forged.status_code == 303
        assert http.get("/console/static/../../settings.py").status_code == 404


def test_webhooks_page_shows_deliveries_and_their_status(
    console: Console, client: httpx.Client, db: Any, user_id: uuid.UUID
) -> None:
    # Registered straight in the table: the API refuses a loopback receiver (SSRF guard), and so does the
    # dispatcher at delivery time, which is what this test wants: a delivery that failed with a reason, and
    # no traffic at all.
    (webhook_id,) = db.execute(
        "INSERT INTO webhooks (url, events, description, secret) VALUES (%s, %s, %s, %s) RETURNING id",
        ("http://127.0.0.1:9/console-test", ["balance.depleted"], "console <b>test</b>", "whsec_" + "A" * 32),
    ).fetchone()
    try:
        fund(client, user_id, 5)
        assert (
            client.post(
                "/billing/charge-tokens", json={"user_id": str(user_id), "amount": 50, "description": "too much"}
            ).status_code
            == 402
        )  # balance.depleted
        for _ in range(300):  # the dispatcher fans out and tries once; bounded, no timing asserted
            deliveries = client.get(f"/billing/webhooks/{webhook_id}/deliveries").json()
            if deliveries and deliveries[0]["attempts"] >= 1:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"no delivery attempt: {deliveries}")
        console.sign_in(SERVICE_TOKEN)
        console.open("/console/webhooks")
        section = console.page.locator("section", has_text="http://127.0.0.1:9/console-test")
        text = section.inner_text()
        assert "balance.depleted" in text and "destination refused" in text
        assert "console <b>test</b>" in text  # escaped, shown as text
        assert section.locator(".badge").first.inner_text() in {"pending", "failed"}
    finally:
        client.delete(f"/billing/webhooks/{webhook_id}")
