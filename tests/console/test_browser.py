"""The review console in a real browser: Debian's Chromium, headless, driven by Playwright.

One browser for the whole session; each test signs in in a fresh context (its own cookies).
Screenshots for the README are written to docs/screenshots/ when CHOYSEZ_SCREENSHOTS=1.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.console.conftest import ACCOUNTS, HOSTILE_SUBJECT, LOCKOUT_ACCOUNT, PASSWORD, Console

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "docs" / "screenshots"

if not CHROMIUM.exists():
    pytest.skip(
        "Debian's chromium is not installed (/usr/bin/chromium); `make test` installs it "
        "(apt-get install chromium)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

Page = Any  # playwright.sync_api.Page; Any keeps mypy quiet when the package is absent


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Chromium; Playwright gives it a fresh temporary profile (user-data-dir) of its own."""
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield b
        b.close()


@pytest.fixture
def new_page(browser: Any) -> Iterator[Any]:
    contexts: list[Any] = []

    def make() -> Page:
        ctx = browser.new_context(viewport={"width": 1280, "height": 860}, java_script_enabled=True)
        ctx.set_default_timeout(10_000)
        contexts.append(ctx)
        return ctx.new_page()

    yield make
    for ctx in contexts:
        ctx.close()


def sign_in(page: Page, console: Console, email: str, password: str = PASSWORD) -> Any:
    page.goto(console.url + "signin")
    page.fill("#email", email)
    page.fill("#password", password)
    with page.expect_navigation():
        page.click("button[type=submit]")
    return page


def signed_in(new_page: Any, console: Console, role: str) -> Page:
    page = sign_in(new_page(), console, ACCOUNTS[role])
    assert page.url.endswith("/findings"), page.url
    return page


def shoot(page: Page, name: str) -> None:
    if os.environ.get("CHOYSEZ_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def status_of(page: Page, url: str) -> int:
    resp = page.goto(url)
    assert resp is not None
    return int(resp.status)


def post_from_page(page: Page, path: str, fields: dict[str, str]) -> int:
    """A POST with the signed-in page's cookies, as a forged form would send it.

    Sent through the browser context's own HTTP client: the console's Content Security Policy
    forbids scripts (and so `fetch`) in its pages.
    """
    origin = page.url.split("/", 3)
    resp = page.context.request.post(f"{origin[0]}//{origin[2]}{path}", form=fields, max_redirects=0)
    return int(resp.status)


def csrf_of(page: Page) -> str:
    token: str = page.get_attribute("input[name=csrf_token]", "value")
    return token


class TestSignIn:
    """Local accounts: every page needs a session; wrong passwords lock an account for a while."""

    def test_pages_need_a_session(self, new_page: Any, console: Console) -> None:
        page = new_page()
        page.goto(console.url + "approvals")
        assert "/signin" in page.url
        assert page.locator("h1").inner_text() == "Sign in"

    def test_each_role_signs_in_and_sees_its_menu(self, new_page: Any, console: Console) -> None:
        expected = {
            "ict-manager": {"Findings", "Approvals", "Digests", "Sources", "Audit log"},
            "centre-manager": {"Findings", "Approvals", "Digests", "Sources", "Audit log"},
            "dsl": {"Findings", "Sources"},
            "viewer": {"Findings", "Approvals", "Sources"},
        }
        for role, menu in expected.items():
            page = signed_in(new_page, console, role)
            assert set(page.locator("nav a").all_inner_texts()) == menu, role
            assert ACCOUNTS[role] in page.locator("form.who").inner_text()

    def test_session_cookie_is_httponly_and_strict(self, new_page: Any, console: Console) -> None:
        page = signed_in(new_page, console, "viewer")
        cookies = {c["name"]: c for c in page.context.cookies()}
        session = cookies["choysez-session"]
        assert session["httpOnly"] is True
        assert session["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""  # no script can read it

    def test_sign_out_ends_the_session(self, new_page: Any, console: Console) -> None:
        page = signed_in(new_page, console, "viewer")
        with page.expect_navigation():
            page.click("form.who button")
        assert "/signin" in page.url
        page.goto(console.url + "findings")
        assert "/signin" in page.url

    def test_wrong_password_is_refused_and_five_lock_the_account(
        self, new_page: Any, console: Console
    ) -> None:
        page = new_page()
        for _ in range(5):
            sign_in(page, console, LOCKOUT_ACCOUNT, "not the password at all")
            assert "Wrong e-mail address or password." in page.content()
        sign_in(page, console, LOCKOUT_ACCOUNT)  # the right password, too late
        assert "locked" in page.locator("[role=alert]").inner_text()
        assert "/signin" in page.url
        audit = signed_in(new_page, console, "ict-manager")
        audit.goto(console.url + "audit")
        log = audit.locator("table").inner_text()
        assert log.count("signin.failed") >= 5
        assert "signin.locked" in log

    def test_unknown_account_gets_the_same_answer(self, new_page: Any, console: Console) -> None:
        page = sign_in(new_page(), console, "nobody@choysez.org.uk", "whatever it is")
        assert "Wrong e-mail address or password." in page.content()

    def test_next_never_leaves_the_site(self, new_page: Any, console: Console) -> None:
        page = new_page()
        page.goto(console.url + "signin?next=https://evil.example/")
        page.fill("#email", ACCOUNTS["viewer"])
        page.fill("#password", PASSWORD)
        with page.expect_navigation():
            page.click("button[type=submit]")
        assert page.url == console.url + "findings"


class TestReview:
    """The ICT manager confirms and dismisses; names are pseudonyms in lists and shown on the page."""

    def test_findings_list_pseudonymises_staff(self, new_page: Any, console: Console) -> None:
        page = signed_in(new_page, console, "ict-manager")
        table = page.locator("table.list").inner_text()
        assert "NET-STREAMING-IN-CLASS" in table and "MAIL-PERSONAL-SENDER" in table
        assert "Staff " in table
        assert "jane.smith" not in page.content()
        shoot(page, "findings")

    def test_filters_by_rule_and_person(self, new_page: Any, console: Console) -> None:
        page = signed_in(new_page, console, "ict-manager")
        page.select_option("select[name=rule]", "NET-STREAMING-IN-CLASS")
        with page.expect_navigation():
            page.click("form.filters button")
        rows = page.locator("table.list tbody tr").all_inner_texts()
        assert rows and all("NET-STREAMING-IN-CLASS" in r for r in rows)
        page.goto(console.url + "findings?person=jane.smith%40choysez.org.uk")
        rows = page.locator("table.list tbody tr").all_inner_texts()
        pseudonyms = {r.split("\t")[3] for r in rows}
        assert len(pseudonyms) == 1 and next(iter(pseudonyms)).startswith("Staff ")
        alias = next(iter(pseudonyms))
        page.goto(console.url + "findings?person=" + urllib.parse.quote(alias))
        assert page.locator("table.list tbody tr").all_inner_texts() == rows

    def test_confirm_and_dismiss(self, new_page: Any, console: Console) -> None:
        page = signed_in(new_page, console, "ict-manager")
        netflix = console.finding_id("NET-STREAMING-IN-CLASS", room="Room 12")
        page.goto(f"{console.url}findings/{netflix}")
        assert "Staff should not access personal sites in class" in page.locator("blockquote").inner_text()
        page.fill("#note", "Seen on the room's timetable: a supply teacher.")
        with page.expect_navigation():
            page.click("button[value=confirm]")
        assert page.locator("[role=status]").inner_text() == "Finding confirmed."
        assert "confirmed by ict.manager@choysez.org.uk" in page.locator("dl.facts").inner_text()

        sam = console.finding_id("MAIL-PERSONAL-RECIPIENT", staff="sam.okafor@choysez.org.uk")
        page.goto(f"{console.url}findings/{sam}")
        page.fill("#reason", "Parent replied to an old personal thread; spoken to Sam.")
        with page.expect_navigation():
            page.click("button[value=dismiss]")
        assert page.locator("[role=status]").inner_text() == "Finding dismissed."

        page.goto(console.url + "audit")
        log = page.locator("table").inner_text()
        assert f"finding:{netflix}" in log and "finding.confirm" in log
        assert f"finding:{sam}" in log and "finding.dismiss" in log

    def test_finding_page_names_the_person_and_shows_evidence(self, new_page: Any, console: Console) -> None:
        page = signed_in(new_page, console, "ict-manager")
        fid = console.finding_id("MAIL-PERSONAL-SENDER", staff="jane.smith@choysez.org.uk")
        page.goto(f"{console.url}findings/{fid}")
        facts = page.locator("dl.facts").inner_text()
        assert "jane.smith@choysez.org.uk" in facts and "jane.smith77@gmail.com" in facts
        assert "official Choysez email account" in page.locator("blockquote").first.inner_text()
        assert "mark.evans@example.net" in page.locator("table.evidence").first.inner_text()
        shoot(page, "finding")

    def test_hostile_subject_line_is_text(self, new_page: Any, console: Console) -> None:
        page = signed_in(new_page, console, "ict-manager")
        page.goto(f"{console.url}findings/{console.hostile_id}")
        assert page.get_by_text(HOSTILE_SUBJECT, exact=True).is_visible()
        assert page.locator("script").count() == 0
        assert "pwned" not in page.title()
        page.goto(f"{console.url}digests/today")  # the digest, as sent, escapes it too
        assert page.locator("script").count() == 0
        assert "pwned" not in page.title()

    def test_viewer_sees_no_names_and_cannot_review(self, new_page: Any, console: Console) -> None:
        page = signed_in(new_page, console, "viewer")
        fid = console.finding_id("MAIL-PERSONAL-SENDER", staff="jane.smith@choysez.org.uk")
        page.goto(f"{console.url}findings/{fid}")
        assert "jane.smith" not in page.content()
        assert page.locator("button[value=confirm]").count() == 0
        token = page.evaluate("() => document.querySelector('form.who input[name=csrf_token]').value")
        assert post_from_page(page, f"/findings/{fid}/confirm", {"csrf_token": token}) == 403


class TestDsl:
    """The DSL sees only findings that involve a pupil, and never the approvals."""

    def test_dsl_sees_only_pupil_findings(self, new_page: Any, console: Console) -> None:
        page = signed_in(new_page, console, "dsl")
        rows = page.locator("table.list tbody tr").all_inner_texts()
        assert rows and all("pupil" in r for r in rows)
        assert "NET-STREAMING-IN-CLASS" not in page.locator("table.list").inner_text()
        net = console.finding_id("NET-STREAMING-IN-CLASS", room="Room 14")
        assert status_of(page, f"{console.url}findings/{net}") == 403
        assert status_of(page, f"{console.url}findings?rule=NET-STREAMING-IN-CLASS") == 200
        assert page.locator("table.list tbody tr").all_inner_texts() == ["No findings match."]

    def test_dsl_cannot_reach_approvals(self, new_page: Any, console: Console) -> None:
        page = signed_in(new_page, console, "dsl")
        token = csrf_of(page)
        assert status_of(page, console.url + "approvals") == 403
        assert status_of(page, console.url + "audit") == 403
        assert status_of(page, console.url + "digests") == 403
        page.goto(console.url + "findings")
        form = {
            "csrf_token": token,
            "rule": "NET-STREAMING-IN-CLASS",
            "subject": "room:Room 12",
            "valid_from": "2026-11-01T00:00",
            "valid_until": "2026-11-30T00:00",
            "reason": "no",
        }
        assert post_from_page(page, "/approvals/grant", form) == 403


class TestApprovals:
    """The centre manager grants and revokes; the finding it covers is approved."""

    def test_grant_and_revoke(self, new_page: Any, console: Console) -> None:
        page = signed_in(new_page, console, "centre-manager")
        sky = console.finding_id("NET-STREAMING-IN-CLASS", room="Room 14")
        page.goto(f"{console.url}findings/{sky}")
        with page.expect_navigation():
            page.click("text=Grant an approval for this person")
        assert page.input_value("#subject").startswith("room:Room 14")
        page.fill("#valid_from", "2026-11-23T00:00")
        page.fill("#valid_until", "2026-12-18T23:59")  # to the end of term: still in force now
        page.fill("#grant-reason", "Sky Go documentary for the media studies coursework, agreed in advance.")
        with page.expect_navigation():
            page.click("form.grid button[type=submit]")
        notice = page.locator("[role=status]").inner_text()
        assert "granted; 1 open finding(s) it covers are now approved" in notice, notice
        aid = int(notice.split("#")[1].split(" ")[0])
        page.goto(f"{console.url}findings/{sky}")
        assert "approved" in page.locator("dl.facts").inner_text()

        page.goto(console.url + "approvals")
        shoot(page, "approvals")
        row = page.locator(f"#approval-{aid}")
        row.locator("input[name=reason]").fill("Coursework finished early.")
        with page.expect_navigation():
            row.locator("button").click()
        assert f"Approval #{aid} revoked" in page.locator("[role=status]").inner_text()
        page.goto(console.url + "audit")
        log = page.locator("table").inner_text()
        assert f"approval:{aid}" in log and "approval.grant" in log and "approval.revoke" in log

    def test_a_bad_grant_is_explained_not_crashed(self, new_page: Any, console: Console) -> None:
        page = signed_in(new_page, console, "centre-manager")
        page.goto(console.url + "approvals")
        page.select_option("#rule", "MAIL-PERSONAL-SENDER")
        page.fill("#subject", "nobody")
        page.fill("#valid_from", "2026-11-23T00:00")
        page.fill("#valid_until", "2026-11-24T00:00")
        page.fill("#grant-reason", "x")
        with page.expect_navigation():
            page.click("form.grid button[type=submit]")
        assert "each part must be KEY:VALUE" in page.locator("[role=alert]").inner_text()
        assert page.input_value("#subject") == "nobody"

    def test_ict_manager_sees_approvals_but_may_not_grant(self, new_page: Any, console: Console) -> None:
        page = signed_in(new_page, console, "ict-manager")
        page.goto(console.url + "approvals")
        assert page.locator("form.grid").count() == 0
        token = page.evaluate("() => document.querySelector('input[name=csrf_token]').value")
        form = {
            "csrf_token": token,
            "rule": "NET-STREAMING-IN-CLASS",
            "subject": "room:Room 12",
            "valid_from": "2026-11-01T00:00",
            "valid_until": "2026-11-30T00:00",
            "reason": "no",
        }
        assert post_from_page(page, "/approvals/grant", form) == 403


class TestCsrf:
    """Every form carries a token bound to the session; without it the change is refused."""

    def test_post_without_token_is_refused(self, new_page: Any, console: Console) -> None:
        page = signed_in(new_page, console, "ict-manager")
        fid = console.finding_id("MAIL-PERSONAL-SENDER", staff="jane.smith@choysez.org.uk")
        assert post_from_page(page, f"/findings/{fid}/dismiss", {"reason": "forged"}) == 403
        assert post_from_page(page, f"/findings/{fid}/dismiss", {"reason": "x", "csrf_token": "guess"}) == 403
        page.goto(f"{console.url}findings/{fid}")
        assert "dismissed" not in page.locator("dl.facts").inner_text()

    def test_another_session_token_is_refused(self, new_page: Any, console: Console) -> None:
        other = signed_in(new_page, console, "ict-manager")
        page = signed_in(new_page, console, "ict-manager")
        fid = console.finding_id("MAIL-PERSONAL-SENDER", staff="jane.smith@choysez.org.uk")
        assert post_from_page(page, f"/findings/{fid}/confirm", {"csrf_token": csrf_of(other)}) == 403

    def test_sign_in_without_its_token_is_refused(self, console: Console) -> None:
        body = urllib.parse.urlencode({"email": ACCOUNTS["viewer"], "password": PASSWORD}).encode()
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(console.url + "signin", data=body, timeout=10)
        assert exc.value.code == 403


class TestOtherPages:
    def test_sources_show_each_source_health(self, new_page: Any, console: Console) -> None:
        page = signed_in(new_page, console, "viewer")
        page.goto(console.url + "sources")
        table = page.locator("table.list").inner_text()
        assert "sample-maildir" in table and "sample-captures" in table and "ok" in table
        shoot(page, "sources")

    def test_digests_page_renders_a_day(self, new_page: Any, console: Console) -> None:
        page = signed_in(new_page, console, "centre-manager")
        page.goto(console.url + "digests")
        page.fill("input[name=day]", "2026-11-24")
        with page.expect_navigation():
            page.click("form.filters button")
        assert page.url.endswith("/digests/2026-11-24")
        assert "digest for Tuesday 24 November 2026" in page.locator("h1").inner_text()
