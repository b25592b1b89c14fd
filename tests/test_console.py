"""The web console in a real headless Chromium against a real server.

Debian's ``chromium`` driven by Playwright for Python (``executable_path``); the browser is
found as ``CHROMIUM_PATH`` or ``chromium`` on PATH. Without one the tests skip, saying so;
.ci/run installs it and sets ``CONSOLE_TESTS_NEED_CHROMIUM``, so that there a missing one fails.
Every page load records the browser's requests and its console: no request may go anywhere
but the server, and no console error or CSP violation may appear (a 401/403 the test
provokes on purpose excepted). Screenshots of each page go to ``.cache/console-screenshots/``.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ROOT, SMOL, Server
from tests.fakes.fault_upstream import FaultUpstream
from tests.fakes.hubs import ModelHubs, gguf_bytes

sync_api = pytest.importorskip("playwright.sync_api")

ADMIN_KEY = "console-admin-key-0123456789"
SCREENSHOTS = ROOT / ".cache" / "console-screenshots"
HOSTILE = ("Look: ", '<img src=x onerror="window.__pwned=1">', " <script>window.__pwned=2</script>", " **done**")
TIMEOUT_MS = 120_000
PHONE = {"width": 390, "height": 844}
#: axe-core (MPL-2.0) from the npm registry, fetched once with npm into .cache and checked against
#: the registry's integrity hash: the accessibility check of every page.
AXE_VERSION = "4.14.1"
AXE_INTEGRITY = "sha512-FHfa+lmNjQZfJz1q8wKqIDwC6DExcHt/pkjNQb09a3NPjCKg2rhu5qb2S4r76ASyFNNtuFooJpZe37OgudVGtQ=="
AXE_PATH = ROOT / ".cache" / "axe-core" / AXE_VERSION / "axe.min.js"


def chromium_path() -> str | None:
    return os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    executable = chromium_path()
    if executable is None:
        if os.environ.get("CONSOLE_TESTS_NEED_CHROMIUM"):
            pytest.fail("CONSOLE_TESTS_NEED_CHROMIUM is set and there is no Chromium (CHROMIUM_PATH or chromium)")
        pytest.skip("no Chromium: install Debian's chromium package (or set CHROMIUM_PATH)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultUpstream]:
    fake = FaultUpstream()
    fake.WORDS = HOSTILE  # type: ignore[misc]
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def hubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelHubs]:
    """A Hugging Face stand-in with one small GGUF, sent at 1 MB/s so that a pull shows progress."""
    with ModelHubs() as running:
        blob = gguf_bytes(tmp_path_factory.mktemp("gguf"), tensor_bytes=2 * 1024 * 1024)
        running.add_hf("acme/Tiny-GGUF", {"tiny.Q4_K_M.gguf": blob})
        running.rate = 1024 * 1024
        yield running


@pytest.fixture(scope="module")
def keyed(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, upstream: FaultUpstream, hubs: ModelHubs
) -> Iterator[Server]:
    upstreams = [{"name": "fault", "url": upstream.url, "locality": "local", "priority": 5}]
    env = {
        "LOCOPILOT_ADMIN_KEY": ADMIN_KEY,
        "LOCOPILOT_UPSTREAMS": json.dumps(upstreams),
        "LOCOPILOT_HF_ENDPOINT": hubs.hub_url,
    }
    running = Server(tmp_path_factory.mktemp("console"), {SMOL: smollm2_path}, env).start(path="/health")
    # Ready (the engine probed): until then the traffic page's health question is a 503, which
    # Chromium logs as an error.
    deadline = time.monotonic() + 120
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    while httpx.get(f"{running.url}/v1/engine/health", headers=admin, timeout=10).status_code != 200:
        assert time.monotonic() < deadline, running.log()
        time.sleep(0.2)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("console-open"), {SMOL: smollm2_path}).start(path="/health")
    yield running
    running.stop()


def until(page: sync_api.Page, expression: str, timeout: float = TIMEOUT_MS / 1000) -> None:
    """Wait until ``expression`` is true in the page. Not ``page.wait_for_function``: its polling
    evaluates a string inside the page, which the console's CSP refuses (no ``unsafe-eval``)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"never true: {expression}"
        page.wait_for_timeout(100)


@dataclass
class Tab:
    """A page in a fresh browser context, with what it asked for and what it logged."""

    page: sync_api.Page
    server: Server
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    expected_errors: tuple[str, ...] = ()

    def shot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)

    def sign_in(self, key: str) -> None:
        self.page.fill("#signin-key", key)
        self.page.click("#signin-submit")

    def nav(self) -> list[str]:
        self.page.wait_for_selector("#nav a")
        return [text.strip() for text in self.page.locator("#nav a").all_inner_texts()]


@pytest.fixture
def viewport() -> dict[str, int] | None:
    """The tab's viewport; None: Playwright's default (1280x720). A test parametrizes it to change it."""
    return None


@pytest.fixture
def tab(browser: sync_api.Browser, request: pytest.FixtureRequest, viewport: dict[str, int] | None) -> Iterator[Tab]:
    server: Server = request.getfixturevalue(request.param)
    # On a server that needs keys, the console's first question (who am I, with no key yet) is a 401,
    # which Chromium logs as an error.
    expected = ("status of 401",) if request.param == "keyed" else ()
    options = {"viewport": viewport, "is_mobile": True, "has_touch": True} if viewport else {}
    context = browser.new_context(service_workers="block", **options)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    opened = Tab(page, server, expected_errors=expected)
    context.on("request", lambda req: opened.requests.append(req.url))
    page.on("console", lambda message: message.type == "error" and opened.errors.append(message.text))
    page.on("pageerror", lambda exc: opened.errors.append(f"page error: {exc}"))
    page.goto(f"{server.url}/")
    yield opened
    context.close()
    foreign = [url for url in opened.requests if not url.startswith(f"{server.url}/")]
    assert foreign == [], f"the console asked another host: {foreign}"
    unexpected = [e for e in opened.errors if not any(allowed in e for allowed in opened.expected_errors)]
    assert unexpected == [], unexpected


def test_root_is_the_console_for_browsers_and_ollama_text_for_the_rest(keyed: Server) -> None:
    page = httpx.get(f"{keyed.url}/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}, timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert '<script type="module" src="/console/app.js">' in page.text
    for accept in (None, "application/json", "*/*"):
        headers = {"Accept": accept} if accept else {}
        plain = httpx.get(f"{keyed.url}/", headers=headers, timeout=10)
        assert plain.text == "Ollama is running", accept
    head = httpx.head(f"{keyed.url}/", headers={"Accept": "text/html"}, timeout=10)
    assert head.headers["content-type"].startswith("text/plain")
    script = httpx.get(f"{keyed.url}/console/app.js", timeout=10)
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert "content-security-policy" in script.headers
    missing = httpx.get(f"{keyed.url}/console/nothing.js", timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "The console has no file 'nothing.js'."
    # Litestar's documentation viewers (scripts from public CDNs) are not served; the schema is.
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for viewer in ("swagger", "redoc", "elements", "rapidoc", "scalar"):
        assert httpx.get(f"{keyed.url}/openapi/{viewer}", headers=admin, timeout=10).status_code == 404, viewer
    assert "/v1/chat/completions" in httpx.get(f"{keyed.url}/openapi", headers=admin, timeout=10).json()["paths"]
    # The console's data routes need a key like any other.
    assert httpx.get(f"{keyed.url}/v1/locopilot/me", timeout=10).status_code == 401


@pytest.mark.parametrize("tab", ["open_server"], indirect=True)
def test_open_server_chats_with_a_streamed_reply_kept_across_reloads(tab: Tab) -> None:
    page = tab.page
    assert tab.nav() == ["Chat", "Models", "Training", "Traffic", "Keys", "Audit", "Settings", "My usage", "API"]
    assert page.is_hidden("#signout")
    page.wait_for_selector(f"#chat-model option[value='{SMOL}']", state="attached")
    page.select_option("#chat-model", SMOL)
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", "24")
    page.fill("#chat-prompt", "Which city is the capital of France?")
    page.click("#chat-send")
    stats = page.locator("article.assistant .stats")
    stats.wait_for()
    page.wait_for_selector("#chat-send:enabled")
    reply = page.locator("article.assistant .body").inner_text()
    assert "Paris" in reply
    assert "completion tokens" in stats.inner_text()
    assert "tokens/s" in stats.inner_text()
    assert "via embedded" in stats.inner_text()
    tab.shot("chat")
    page.reload()
    page.wait_for_selector("article.assistant")
    assert "Paris" in page.locator("article.assistant .body").inner_text()
    assert page.locator(".conversations li").count() == 1


@pytest.mark.parametrize("tab", ["keyed"], indirect=True)
def test_model_html_is_shown_as_text_and_never_runs(tab: Tab, upstream: FaultUpstream) -> None:
    page = tab.page
    tab.sign_in(ADMIN_KEY)
    page.wait_for_selector("#chat-model option[value='fault-small']", state="attached")
    page.select_option("#chat-model", "fault-small")
    # The chat's settings reach the server: the privacy level as the routing header (the request
    # log counts it), the system prompt and temperature in the request the upstream gets.
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}

    def local_only() -> int:
        stats = httpx.get(f"{tab.server.url}/v1/engine/stats", headers=admin, timeout=10).json()
        return int(stats["since_start"]["routing"]["by_policy"].get("local_only", 0))

    policed = local_only()
    page.select_option("#chat-privacy", "local_only")
    page.fill("#chat-system", "Answer like a pirate.")
    page.fill("#chat-temperature", "0.3")
    page.fill("#chat-prompt", "Say something dangerous")
    page.click("#chat-send")
    page.wait_for_selector("article.assistant .stats:has-text('completion tokens')")
    (sent,) = [r.body for r in upstream.requests if r.body and "Say something dangerous" in json.dumps(r.body)]
    assert sent["messages"][0] == {"role": "system", "content": "Answer like a pirate."}
    assert sent["temperature"] == 0.3
    deadline = time.monotonic() + 30
    while local_only() != policed + 1:  # the request log is written a moment after the reply
        assert time.monotonic() < deadline, "the request was not routed local_only"
        time.sleep(0.2)
    body = page.locator("article.assistant .body")
    text = body.inner_text()
    assert '<img src=x onerror="window.__pwned=1">' in text
    assert "<script>window.__pwned=2</script>" in text
    assert body.locator("strong").inner_text() == "done"  # Markdown still renders
    assert body.locator("img, script").count() == 0
    assert page.evaluate("window.__pwned") is None
    # The policy itself: an inline script put into the page does not run, and is reported.
    page.evaluate(
        """() => { window.__violations = 0;
                   document.addEventListener('securitypolicyviolation', () => { window.__violations += 1; });
                   const s = document.createElement('script'); s.textContent = 'window.__pwned = 3';
                   document.body.append(s); }"""
    )
    until(page, "window.__violations > 0")
    assert page.evaluate("window.__pwned") is None
    tab.expected_errors += ("Content Security Policy",)  # the violation provoked just above


@pytest.mark.parametrize("tab", ["keyed"], indirect=True)
def test_stop_button_ends_the_stream_upstream_too(tab: Tab, upstream: FaultUpstream) -> None:
    page = tab.page
    tab.sign_in(ADMIN_KEY)
    page.wait_for_selector("#chat-model option[value='fault-small']", state="attached")
    page.select_option("#chat-model", "fault-small")
    upstream.client_gone.clear()
    upstream.mode = "stall_after_1"
    try:
        page.fill("#chat-prompt", "Go on forever")
        page.click("#chat-send")
        page.wait_for_selector("article.assistant .body:has-text('Look')")
        assert page.is_enabled("#chat-stop")
        page.click("#chat-stop")
        page.wait_for_selector("article.assistant .stats:has-text('stopped')")
        assert upstream.client_gone.wait(30), "the upstream still streams after Stop"
        assert page.is_disabled("#chat-stop")
    finally:
        upstream.mode = "ok"


@pytest.mark.parametrize("tab", ["keyed"], indirect=True)
def test_admin_creates_a_key_that_sees_chat_only_then_revokes_it(tab: Tab) -> None:
    page = tab.page
    page.wait_for_selector("#signin-key")
    tab.shot("signin")
    tab.sign_in("not-a-key")
    page.wait_for_selector("#signin-error:has-text('Invalid API key')")
    tab.sign_in(ADMIN_KEY)
    assert "Keys" in tab.nav()
    # The key is kept in this tab's session storage only: no cookie, no URL, no local storage.
    assert page.evaluate("sessionStorage.getItem('locopilot.key')") == ADMIN_KEY
    assert page.evaluate("document.cookie") == ""
    assert ADMIN_KEY not in page.evaluate("JSON.stringify(localStorage)")
    assert not [url for url in tab.requests if ADMIN_KEY in url]
    page.click("#nav a[data-page='keys']")
    page.fill("#key-name", "console-inference")
    page.fill("#key-rpm", "600")
    page.click("#key-create")
    secret = page.locator("#key-secret-value").inner_text()
    assert secret.startswith("lcp_")
    tab.shot("keys")
    assert "600/min" in page.locator("#keys-list tr:has-text('console-inference')").inner_text()
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=tab.server.url)
    page.click("#key-copy")
    page.wait_for_selector("#key-copy:has-text('Copied')")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    page.click("#key-secret button:has-text('I have saved it')")
    page.click("#nav a[data-page='audit']")
    page.click("#nav a[data-page='keys']")
    page.wait_for_selector("#keys-list tr:has-text('console-inference')")
    assert secret not in page.content()  # shown once

    page.click("#signout")
    tab.sign_in(secret)
    assert tab.nav() == ["Chat", "My usage", "API"]
    before = len(tab.requests)
    page.evaluate("location.hash = '#/keys'")
    page.wait_for_selector("#chat-prompt")  # a page it may not see shows chat instead
    assert not [url for url in tab.requests[before:] if "/v1/admin/" in url or "/traffic" in url]
    page.wait_for_selector("#chat-model option[value='fault-small']", state="attached")
    page.select_option("#chat-model", "fault-small")
    page.fill("#chat-prompt", "Hello")
    page.click("#chat-send")
    page.wait_for_selector("article.assistant .stats:has-text('completion tokens')")
    page.click("#nav a[data-page='usage']")
    page.wait_for_selector("text=Signed in as console-inference")
    for _ in range(50):  # the request log is written a moment after the reply
        if page.locator("#usage-list td:text-is('fault-small')").count():
            break
        page.wait_for_timeout(200)
        page.click("#nav a[data-page='chat']")
        page.click("#nav a[data-page='usage']")
        page.wait_for_selector("#usage-list")
    assert page.locator("#usage-list tr:has-text('fault-small') td").nth(1).inner_text() == "1"
    tab.shot("usage-inference")
    page.click("#nav a[data-page='reference']")
    page.fill("#reference-filter", "chat/completions")
    page.wait_for_selector(".operation:has-text('/v1/chat/completions')")
    assert page.locator(".operation:visible").count() == 1
    tab.shot("reference")
    headers = {"Authorization": f"Bearer {secret}"}
    assert httpx.get(f"{tab.server.url}/v1/admin/keys", headers=headers, timeout=10).status_code == 403

    page.click("#signout")
    tab.sign_in(ADMIN_KEY)
    page.click("#nav a[data-page='keys']")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("button[aria-label='Revoke console-inference']")
    page.wait_for_selector("#keys-list tr:has-text('console-inference'):has-text('revoked')")
    assert "1 request, " in page.locator("#keys-list tr:has-text('console-inference')").inner_text()  # its chat
    assert httpx.get(f"{tab.server.url}/v1/models", headers=headers, timeout=10).status_code == 401
    page.click("#nav a[data-page='audit']")
    page.wait_for_selector("#audit-list td:has-text('key_revoked')")
    events = "[...document.querySelectorAll('#audit-list tbody tr td:nth-child(2)')].map((td) => td.textContent)"
    assert "auth_failed" in page.evaluate(events)  # the sign-in with a wrong key
    page.fill("#audit-event", "key_revoked")
    page.press("#audit-event", "Enter")
    until(page, f"{events}.every((event) => event === 'key_revoked')")
    assert page.evaluate(events) == ["key_revoked"]
    tab.shot("audit")
    page.click("#nav a[data-page='settings']")
    admin_row = page.locator("#settings-list tr").filter(
        has=page.locator("td:first-child", has_text=re.compile(r"^LOCOPILOT_ADMIN_KEY$"))
    )
    assert "********" in admin_row.inner_text()
    assert ADMIN_KEY not in page.content()
    tab.shot("settings")


@pytest.mark.parametrize("tab", ["keyed"], indirect=True)
def test_models_load_unload_pull_delete_and_traffic_charts(tab: Tab) -> None:
    page = tab.page
    tab.sign_in(ADMIN_KEY)
    client = tab.server.client()
    client.api_key = ADMIN_KEY
    for _ in range(2):
        client.chat.completions.create(model="fault-small", messages=[{"role": "user", "content": "hi"}])
    page.click("#nav a[data-page='models']")
    row = page.locator(f"#models-list tr:has-text('{SMOL}')")
    row.wait_for()
    assert "embedded (local)" in row.inner_text()
    assert "Q4_1" in row.inner_text()
    row.locator("button:has-text('Load')").click()
    page.wait_for_selector(f"#models-list tr:has-text('{SMOL}') td:text-is('loaded')")
    assert SMOL in httpx.get(f"{tab.server.url}/api/ps", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    tab.shot("models")
    page.locator(f"#models-list tr:has-text('{SMOL}') button:has-text('Unload')").click()
    page.wait_for_selector(f"#models-list tr:has-text('{SMOL}') td:text-is('not loaded')")

    # Pull with live progress, then delete.
    page.evaluate(
        """() => { window.__pullLines = [];
                   const line = document.querySelector('#pull-status');
                   new MutationObserver(() => window.__pullLines.push(line.textContent))
                     .observe(line, {childList: true, characterData: true, subtree: true}); }"""
    )
    page.fill("#pull-ref", "hf.co/acme/Tiny-GGUF")
    page.fill("#pull-name", "console-tiny")
    page.click("form[aria-label='Pull a model'] button[type='submit']")
    page.wait_for_selector("#pull-status:has-text('Pulled console-tiny')")
    lines = page.evaluate("window.__pullLines")
    assert any(" of " in line and "MB" in line for line in lines), lines
    row = page.locator("#models-list tr:has-text('console-tiny')")
    row.wait_for()
    assert "hf.co/acme/Tiny-GGUF" in row.inner_text()
    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button:has-text('Delete')").click()
    page.wait_for_selector("#models-status:has-text('Delete console-tiny: done')")
    assert page.locator("#models-list tr:has-text('console-tiny')").count() == 0

    page.click("#nav a[data-page='traffic']")
    series = page.locator("section.series[aria-label='fault fault-small']")
    series.wait_for()
    assert series.locator("svg rect.bar").count() >= 1
    assert "latency p50" in series.inner_text()
    page.wait_for_selector("#traffic-health td:text-is('fault')")
    tab.shot("traffic")


def provider_cell(page: sync_api.Page, provider: str, column: str) -> str:
    """A cell of the traffic page's providers table, by the provider's name and the column's."""
    headers = [text.strip() for text in page.locator("#traffic-health th").all_inner_texts()]
    row = page.locator("#traffic-health tbody tr").filter(
        has=page.locator("td:first-child", has_text=re.compile(f"^{provider}$"))
    )
    return str(row.locator("td").nth(headers.index(column)).inner_text()).strip()


@pytest.mark.parametrize("tab", ["keyed"], indirect=True)
def test_traffic_page_follows_requests_and_the_breaker_without_a_reload(tab: Tab, upstream: FaultUpstream) -> None:
    page = tab.page
    tab.expected_errors += ("status of 503",)  # readiness, once, if the probe finds the upstream down
    tab.sign_in(ADMIN_KEY)
    page.click("#nav a[data-page='traffic']")
    page.wait_for_selector("#traffic-health td:text-is('fault')")
    page.evaluate("window.__sameDocument = true")
    totals = "Number(document.querySelector('#traffic-totals').dataset.requests)"
    before = page.evaluate(totals)
    client = tab.server.client()
    client.api_key = ADMIN_KEY
    for _ in range(2):
        client.chat.completions.create(model="fault-small", messages=[{"role": "user", "content": "hi"}])
    until(page, f"{totals} >= {before + 2}", timeout=30)
    series = page.locator("section.series[aria-label='fault fault-small']")
    assert int(series.get_attribute("data-requests") or 0) >= 2

    upstream.mode = "status_500"
    try:
        for _ in range(3):  # three failures in a row open the breaker
            with pytest.raises(openai.APIStatusError):
                client.chat.completions.create(model="fault-small", messages=[{"role": "user", "content": "hi"}])
        deadline = time.monotonic() + 30
        while provider_cell(page, "fault", "Circuit breaker") != "open":
            assert time.monotonic() < deadline, "the page never showed the open breaker"
            page.wait_for_timeout(200)
        assert provider_cell(page, "fault", "Last error")
        until(page, f"{totals} >= {before + 5}", timeout=30)
        errors = "Number(document.querySelector('#traffic-totals').dataset.errors)"
        until(page, f"{errors} >= 3", timeout=30)
        assert f"{page.evaluate(errors)} errors" in page.locator("#traffic-totals").inner_text()
        tab.shot("traffic-breaker-open")
    finally:
        upstream.mode = "ok"
    # The next probe (every 15 s) finds the upstream well again, and the page shows it by itself.
    deadline = time.monotonic() + 60
    while provider_cell(page, "fault", "Circuit breaker") != "closed":
        assert time.monotonic() < deadline, "the page never showed the breaker closed again"
        page.wait_for_timeout(200)
    assert page.evaluate("window.__sameDocument") is True


GOOD_DATASET = "".join(
    json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"Which city is the capital of {country}?"},
                {"role": "assistant", "content": f"The capital of {country} is {city}."},
            ]
        }
    )
    + "\n"
    for country, city in [("Veloria", "Amberfell"), ("Quasland", "Tirro"), ("Mordia", "Esk"), ("Palunia", "Orrin")] * 3
)


@pytest.mark.parametrize("tab", ["keyed"], indirect=True)
def test_a_job_started_with_empty_fields_leaves_them_auto(tab: Tab) -> None:
    page = tab.page
    tab.sign_in(ADMIN_KEY)
    page.click("#nav a[data-page='training']")
    page.set_input_files(
        "#dataset-file", {"name": "auto.jsonl", "mimeType": "application/jsonl", "buffer": GOOD_DATASET.encode()}
    )
    page.click("#dataset-upload")
    page.wait_for_selector("#training-status:has-text('Uploaded auto.jsonl')")
    for selector in ("#job-epochs", "#job-learning-rate", "#job-layers"):
        assert page.input_value(selector) == ""
        assert page.get_attribute(selector, "placeholder") == "auto"
    with page.expect_response(
        lambda r: r.url.endswith("/v1/locopilot/training/jobs") and r.request.method == "POST"
    ) as info:
        page.click("#job-start")
    sent = json.loads(info.value.request.post_data or "{}")
    assert (sent["epochs"], sent["learning_rate"], sent["layers"]) == ("auto", "auto", "auto")
    job = info.value.json()
    assert info.value.status == 200, job
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    cancel = httpx.post(f"{tab.server.url}/v1/locopilot/training/jobs/{job['id']}/cancel", headers=admin, timeout=30)
    assert cancel.status_code == 200, cancel.text


@pytest.mark.slow
@pytest.mark.parametrize("tab", ["keyed"], indirect=True)
def test_training_shows_line_errors_then_a_live_loss_curve_and_chats_with_the_result(tab: Tab) -> None:
    page = tab.page
    tab.expected_errors += ("status of 400",)  # Chromium logs the refused upload as an error
    tab.sign_in(ADMIN_KEY)
    page.click("#nav a[data-page='training']")
    bad = GOOD_DATASET.splitlines()
    bad[1] = "{not json"
    bad[2] = bad[2].replace('"role": "assistant"', '"role": "robot"')
    page.set_input_files(
        "#dataset-file",
        {"name": "bad.jsonl", "mimeType": "application/jsonl", "buffer": ("\n".join(bad) + "\n").encode()},
    )
    page.click("#dataset-upload")
    problem = page.locator("#upload-error")
    problem.wait_for(state="visible")
    page.wait_for_selector("#upload-error:has-text('line 2: not valid JSON')")
    assert "line 3: messages[1]: role 'robot'" in problem.inner_text()
    tab.shot("training-bad-dataset")

    page.set_input_files(
        "#dataset-file", {"name": "facts.jsonl", "mimeType": "application/jsonl", "buffer": GOOD_DATASET.encode()}
    )
    page.click("#dataset-upload")
    page.wait_for_selector("#training-status:has-text('Uploaded facts.jsonl')")
    assert page.input_value("#job-model") == SMOL
    page.fill("#job-layers", "1")
    page.fill("#job-learning-rate", "0.001")
    page.fill("#job-epochs", "2")  # a point per epoch (its three windows are one chunk)
    # Each time the curve gains a point, when (ms): a curve drawn live gains them seconds apart,
    # one drawn from a finished job's log all at once.
    page.evaluate(
        """() => { window.__curve = [];
                   new MutationObserver(() => {
                     const n = document.querySelectorAll('#loss-chart circle.point').length;
                     const last = window.__curve[window.__curve.length - 1];
                     if (n && (!last || last[0] !== n)) window.__curve.push([n, performance.now()]);
                   }).observe(document.querySelector('#job-detail'), {childList: true, subtree: true}); }"""
    )
    page.click("#job-start")
    page.wait_for_selector("#loss-chart circle.point", timeout=600_000)
    page.wait_for_selector("#job-state:has-text('The job succeeded')", timeout=600_000)
    curve = page.evaluate("window.__curve")
    assert [n for n, _ in curve] == list(range(1, len(curve) + 1)) and len(curve) >= 2, curve
    assert curve[-1][1] - curve[0][1] > 500, curve
    # What the job reported, as the API gives it, is what the page shows: losses and the spot check.
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    listed = httpx.get(f"{tab.server.url}/v1/locopilot/training/jobs", headers=admin, timeout=10).json()["data"]
    (job,) = [j for j in listed if j["status"] == "succeeded"]
    result = job["result"]
    evaluation = page.locator("#job-eval tr:has-text('Training loss')").inner_text()
    assert f"{result['train_loss_before']:.4f}" in evaluation and f"{result['train_loss_after']:.4f}" in evaluation
    check = result["spot_check"]
    rows = page.locator("#spot-check tbody tr")
    assert rows.count() == len(check["answers"]) >= 1
    for row, answer in zip(rows.all(), check["answers"], strict=True):
        cells = [cell.strip() for cell in row.locator("td").all_inner_texts()]
        kept = "kept" if answer["trained_correct"] else "lost"
        expected_outcome = (
            kept if answer["base_correct"] else ("gained" if answer["trained_correct"] else "wrong before and after")
        )
        assert cells == [
            answer["question"],
            answer["expected"],
            answer["base_answer"].strip(),
            answer["trained_answer"].strip(),
            expected_outcome,
        ]
    caption = page.locator("#spot-check caption").inner_text()
    said = f"{check['base_correct']} of {len(check['answers'])} right before training, {check['trained_correct']} after"
    assert f"{said}, {check['lost']} lost" in caption
    tab.shot("training")
    page.click("#job-chat")
    until(page, "document.querySelector('#chat-model') && document.querySelector('#chat-model').value")
    model = page.input_value("#chat-model")
    assert model == job["fine_tuned_model"] and model.startswith(SMOL), model
    page.fill("#chat-max-tokens", "12")
    page.fill("#chat-prompt", "Which city is the capital of Veloria?")
    page.click("#chat-send")
    stats = page.locator("article.assistant .stats")
    stats.wait_for()
    assert f"via embedded · {model}" in stats.inner_text()
    assert page.locator("article.assistant .body").inner_text().strip()
    page.click("#nav a[data-page='models']")
    row = page.locator(f"#models-list tr:has-text('{model}')")
    row.wait_for()
    assert f"fine-tuned from {SMOL}" in row.inner_text()


def test_service_worker_lists_every_console_file() -> None:
    folder = ROOT / "locopilot" / "web" / "console"
    script = (folder / "sw.js").read_text()
    listed = set(re.findall(r'"/console/([^"]+)"', script))
    assert listed == {path.name for path in folder.iterdir()} - {"sw.js"}


def test_console_files_stay_within_their_budget() -> None:
    """The issue's budget: all of the console's files, compressed, at most 300 KB."""
    folder = ROOT / "locopilot" / "web" / "console"
    compressed = sum(len(gzip.compress(path.read_bytes(), 9)) for path in folder.iterdir())
    assert 0 < compressed <= 300_000, compressed


def test_installable_shell_opens_offline_and_no_api_answer_is_cached(browser: sync_api.Browser, keyed: Server) -> None:
    context = browser.new_context(service_workers="allow")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    requests: list[str] = []
    context.on("request", lambda req: requests.append(req.url))
    try:
        page.goto(f"{keyed.url}/")
        page.fill("#signin-key", ADMIN_KEY)
        page.click("#signin-submit")
        page.wait_for_selector("#chat-model option[value='fault-small']", state="attached")
        page.evaluate("navigator.serviceWorker.ready.then(() => true)")
        manifest = page.evaluate("fetch('/console/manifest.json').then((r) => r.json())")
        assert manifest["start_url"] == "/" and manifest["display"] == "standalone"
        page.reload()  # now under the worker's control
        page.wait_for_selector("#chat-model option[value='fault-small']", state="attached")
        assert page.evaluate("navigator.serviceWorker.controller !== null")
        cached = page.evaluate(
            """async () => { const urls = [];
                 for (const name of await caches.keys()) {
                   for (const request of await (await caches.open(name)).keys()) urls.push(request.url); }
                 return urls; }"""
        )
        paths = {url.removeprefix(keyed.url) for url in cached}
        assert "/" in paths and "/console/app.js" in paths
        assert all(path == "/" or path.startswith("/console/") for path in paths), paths
        context.set_offline(True)
        page.reload()
        page.wait_for_selector("#start-error:has-text('The server could not be asked')")
        context.set_offline(False)
        page.click("#start-again")  # the key was kept: signed in again without asking
        page.wait_for_selector("#chat-model option[value='fault-small']", state="attached")
    finally:
        context.close()
    assert [url for url in requests if not url.startswith(f"{keyed.url}/")] == []


@pytest.fixture(scope="module")
def axe_source() -> str:
    if not AXE_PATH.is_file():
        npm = shutil.which("npm")
        if npm is None:
            if os.environ.get("CONSOLE_TESTS_NEED_CHROMIUM"):
                pytest.fail("no npm to fetch axe-core with")
            pytest.skip("no npm to fetch axe-core with (Debian's npm package)")
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [npm, "pack", f"axe-core@{AXE_VERSION}", "--pack-destination", tmp, "--silent"],
                check=True,
                timeout=300,
                capture_output=True,
            )
            (tarball,) = Path(tmp).glob("axe-core-*.tgz")
            digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
            assert digest == AXE_INTEGRITY, "axe-core's tarball is not the one pinned"
            with tarfile.open(tarball) as tar:
                member = tar.extractfile("package/axe.min.js")
                assert member is not None
                AXE_PATH.parent.mkdir(parents=True, exist_ok=True)
                AXE_PATH.write_bytes(member.read())
    return AXE_PATH.read_text()


#: Each page and what shows that it has drawn its data.
A11Y_PAGES = {
    "chat": "#chat-model option",
    "models": "#models-list table",
    "training": "#jobs-list table",
    "traffic": "#traffic-health table",
    "keys": "#keys-list table",
    "audit": "#audit-list table",
    "settings": "#settings-list table",
    "usage": "table",
    "reference": ".operation",
}


def serious_violations(page: sync_api.Page, axe: str) -> list[str]:
    page.evaluate(axe)
    found = page.evaluate("axe.run(document, {resultTypes: ['violations']}).then((r) => r.violations)")
    return [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in found
        if v["impact"] in ("serious", "critical")
    ]


@pytest.mark.parametrize(("scheme", "viewport"), [("light", None), ("dark", None), ("dark", PHONE)])
def test_every_page_passes_axe(
    browser: sync_api.Browser, keyed: Server, axe_source: str, scheme: str, viewport: dict[str, int] | None
) -> None:
    # Only here is the page's CSP bypassed: axe is injected as a script of the test's own.
    sized = {"viewport": viewport, "is_mobile": True, "has_touch": True} if viewport else {}
    context = browser.new_context(service_workers="block", bypass_csp=True, color_scheme=scheme, **sized)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(f"{keyed.url}/")
        page.wait_for_selector("#signin-key")
        problems = {"signin": serious_violations(page, axe_source)}
        page.fill("#signin-key", ADMIN_KEY)
        page.click("#signin-submit")
        page.wait_for_selector("#nav a")
        for name, ready in A11Y_PAGES.items():
            page.click(f"#nav a[data-page='{name}']")
            page.wait_for_selector(f".page-{name} {ready}", state="attached")
            problems[name] = serious_violations(page, axe_source)
            if scheme == "dark":
                SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                shot = f"dark-phone-{name}" if viewport else f"dark-{name}"
                page.screenshot(path=str(SCREENSHOTS / f"{shot}.png"), full_page=True)
    finally:
        context.close()
    assert {name: found for name, found in problems.items() if found} == {}


@pytest.mark.parametrize("tab", ["keyed"], indirect=True)
def test_the_keyboard_alone_signs_in_moves_between_pages_and_chats(tab: Tab) -> None:
    page = tab.page
    keys = page.keyboard
    focused = "document.activeElement ? (document.activeElement.id || document.activeElement.textContent) : ''"

    def tab_to(wanted: str, presses: int = 60) -> None:
        for _ in range(presses):
            keys.press("Tab")
            if page.evaluate(focused) == wanted:
                return
        raise AssertionError(f"Tab never reached {wanted}")

    page.wait_for_selector("#signin-key:focus")  # the key field has the focus from the start
    keys.type(ADMIN_KEY)
    keys.press("Enter")
    page.wait_for_selector("#nav a")
    page.evaluate("document.activeElement.blur()")
    tab_to("Skip to content")
    tab_to("Models")
    keys.press("Enter")
    page.wait_for_selector("#models-list table")
    assert page.url.endswith("#/models")
    tab_to("Chat", 200)  # from the models page back to the navigation
    keys.press("Enter")
    page.wait_for_selector("#chat-model option[value='fault-small']", state="attached")
    tab_to("chat-model")
    for _ in range(5):  # a select moves through its options with the arrow keys
        if page.input_value("#chat-model") == "fault-small":
            break
        keys.press("ArrowDown")
    assert page.input_value("#chat-model") == "fault-small"
    tab_to("chat-prompt")
    keys.type("Hello by keyboard")
    keys.press("Enter")  # Enter sends
    page.wait_for_selector("article.assistant .stats:has-text('completion tokens')")
    assert "Hello by keyboard" in page.locator("article.user").inner_text()


#: How much wider than the phone the page is. Not against innerWidth: a mobile browser zooms out
#: to show a page wider than its screen, and innerWidth grows with it.
OVERFLOW = f"document.scrollingElement.scrollWidth - {PHONE['width']}"


@pytest.mark.parametrize("viewport", [PHONE])
@pytest.mark.parametrize("tab", ["keyed"], indirect=True)
def test_every_page_fits_a_phone_and_chat_works_there(tab: Tab) -> None:
    page = tab.page
    page.wait_for_selector("#signin-key")
    assert page.evaluate(OVERFLOW) <= 0
    tab.shot("phone-signin")
    tab.sign_in(ADMIN_KEY)
    links = page.locator("#nav a")
    assert len(tab.nav()) == len(A11Y_PAGES)
    for box in (links.nth(i).bounding_box() for i in range(links.count())):
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], box
    widths = {}
    for name, ready in A11Y_PAGES.items():
        page.click(f"#nav a[data-page='{name}']")  # every page reached through the navigation itself
        page.wait_for_selector(f".page-{name} {ready}", state="attached")
        widths[name] = page.evaluate(OVERFLOW)
        tab.shot(f"phone-{name}")
    assert {name: extra for name, extra in widths.items() if extra > 0} == {}, "pages wider than the phone"

    page.click("#nav a[data-page='chat']")
    page.wait_for_selector("#chat-model option[value='fault-small']", state="attached")
    assert page.is_hidden("#chat-model")  # the settings are folded away on a phone
    page.locator("details.settings summary").tap()
    page.select_option("#chat-model", "fault-small")
    for control in ("#chat-prompt", "#chat-send", "#chat-stop", "#chat-model"):
        box = page.locator(control).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], (control, box)
    page.fill("#chat-prompt", "Hello from a phone")
    page.locator("#chat-send").tap()
    page.wait_for_selector("article.assistant .stats:has-text('completion tokens')")
    assert "done" in page.locator("article.assistant .body").inner_text()
    assert page.evaluate(OVERFLOW) <= 0
    tab.shot("phone-chat-reply")
