"""The review console: a server-rendered Flask app over the store, for people who review findings.

Plain HTML forms that work without JavaScript. Every request opens its own store connection
(waitress serves requests on threads). Every POST carries a CSRF token bound to the session;
every change (sign-in, failed sign-in, confirm, dismiss, grant, revoke) lands in the audit log.
Values from mail and traffic are hostile: templates autoescape everything, and the Content
Security Policy allows no script at all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, abort, g, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from auditd.cli import build_digest, parse_subject, parse_when
from auditd.config import Config, Console
from auditd.console.auth import (
    Permissions,
    Role,
    after_failure,
    is_locked,
    new_token,
    pseudonym,
    same_token,
    signin_csrf,
    token_id,
    verify_password,
)
from auditd.digest.render import render_html
from auditd.errors import AuditError
from auditd.model import JSONValue, Status, StoredFinding, Subject
from auditd.policy import RULE_IDS, load_policy
from auditd.store import SessionRecord, Store

HERE = Path(__file__).resolve().parent
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
# The digest is the e-mail's own HTML (inline styles, no script).
DIGEST_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"
EXPIRING_SOON = timedelta(days=7)
LIST_LIMIT = 500

Clock = Callable[[], datetime]


def now_utc() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Viewer:
    """The signed-in person of this request."""

    email: str
    role: Role
    perms: Permissions
    session: SessionRecord


@dataclass(frozen=True)
class Filters:
    rule: str = ""
    status: str = ""
    person: str = ""
    room: str = ""
    since: str = ""
    until: str = ""


def create_app(config: Config, *, clock: Clock = now_utc) -> Flask:
    """The console's WSGI app for one configuration."""
    console = config.console or Console()
    policy = load_policy(config.policy.dir)
    app = Flask("auditd.console", root_path=str(HERE), template_folder="templates", static_folder="static")
    app.config.update(MAX_CONTENT_LENGTH=64 * 1024, TEMPLATES_AUTO_RELOAD=False)
    with Store.connect(config, trust_wide=True) as first:
        pseudonym_key = first.console_key("pseudonym")
        signin_key = first.console_key("signin")
    prefix = "__Host-" if console.cookie_secure else ""
    session_cookie = f"{prefix}choysez-session"
    pre_cookie = f"{prefix}choysez-signin"
    tz = config.organisation.tz
    session_length = timedelta(minutes=console.session_minutes)

    # ---- helpers used by templates ------------------------------------------------------------

    def when(moment: datetime | None) -> str:
        return "—" if moment is None else moment.astimezone(tz).strftime("%Y-%m-%d %H:%M")

    def who(email: str | None) -> str:
        return "—" if not email else pseudonym(pseudonym_key, email)

    app.jinja_env.filters["when"] = when
    app.jinja_env.filters["who"] = who
    app.jinja_env.filters["value"] = _value_text
    app.jinja_env.filters["evidence_items"] = _evidence_items
    app.jinja_env.globals.update(
        organisation=config.organisation.name,
        clauses=policy.clauses,
        rule_titles={k: v.title for k, v in policy.rules.items()},
        timezone=config.organisation.timezone,
    )

    # ---- per request: store, identity, CSRF -------------------------------------------------

    def db() -> Store:
        if "store" not in g:
            g.store = Store.connect(config, trust_wide=True)  # narrowed to the user's site below
        s: Store = g.store
        return s

    @app.teardown_appcontext
    def _close(_exc: BaseException | None) -> None:
        s = g.pop("store", None)
        if s is not None:
            s.close()

    def client() -> dict[str, JSONValue]:
        peer = request.remote_addr or "?"
        info: dict[str, JSONValue] = {"ip": peer, "via": "console"}
        forwarded = request.headers.get("X-Forwarded-For")
        if forwarded and console.is_trusted_proxy(peer):
            info["forwarded_for"] = forwarded[:200]
        return info

    def open_session(email: str, role: str, method: str) -> str:
        token = new_token()
        now = clock()
        db().create_session(token_id(token), email, new_token(), expires_at=now + session_length, now=now)
        db().audit(email, "signin", f"user:{email}", {**client(), "method": method, "role": role}, now=now)
        g.new_session_token = token
        return token

    def current_session() -> SessionRecord | None:
        token = request.cookies.get(session_cookie)
        if not token:
            return None
        return db().get_session(token_id(token), now=clock())

    def proxy_identity() -> SessionRecord:
        peer = request.remote_addr or ""
        if not console.is_trusted_proxy(peer):
            abort(403, description="This console accepts requests only through its reverse proxy.")
        email = (request.headers.get(console.proxy_header) or "").strip().lower()
        if not email:
            abort(403, description=f"The reverse proxy did not say who you are ({console.proxy_header}).")
        s = current_session()
        if s is not None and s.email == email:
            return s
        user = db().get_user(email)
        if user is None:
            db().audit(
                email[:200], "signin.failed", "console", {**client(), "why": "no such user"}, now=clock()
            )
            abort(403, description="You have no account on this console; ask the ICT manager.")
        token = open_session(user.email, user.role, "proxy-header")
        found = db().get_session(token_id(token), now=clock())
        assert found is not None
        return found

    @app.before_request
    def _identify() -> BaseResponse | None:
        if request.endpoint in ("static", None):
            return None
        if request.endpoint == "signin":
            if console.auth == "proxy-header":
                return redirect(url_for("findings"))
            return None
        s = proxy_identity() if console.auth == "proxy-header" else current_session()
        if s is not None and s.site:
            db().scope = s.site  # a site's staff see their site; trust-wide accounts see every site
        if s is None:
            if request.method == "POST":
                abort(403, description="Your session has ended; sign in again.")
            return redirect(url_for("signin", next=request.full_path.rstrip("?")))
        if request.method == "POST" and not same_token(request.form.get("csrf_token"), s.csrf):
            db().audit(s.email, "csrf.refused", request.path[:200], client(), now=clock())
            abort(403, description="This form is out of date or did not come from the console.")
        now = clock()
        if s.expires_at - now < session_length - timedelta(minutes=1):
            db().touch_session(s.id, expires_at=now + session_length, now=now)
        role = Role(s.role)
        perms = Permissions(role, config.people.may_review(s.email), config.people.may_approve(s.email))
        g.viewer = Viewer(s.email, role, perms, s)
        return None

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Cache-Control"] = "no-store"
        token = g.get("new_session_token")
        if token:
            resp.set_cookie(
                session_cookie,
                token,
                httponly=True,
                secure=console.cookie_secure,
                samesite="Strict",
                path="/",
            )
        return resp

    @app.errorhandler(HTTPException)
    def _error(exc: HTTPException) -> tuple[str, int]:
        return render_template("error.html", code=exc.code, name=exc.name, message=exc.description), (
            exc.code or 500
        )

    def viewer() -> Viewer:
        v: Viewer = g.viewer
        return v

    def page(template: str, status: int = 200, **kw: Any) -> tuple[str, int]:
        return render_template(template, viewer=g.get("viewer"), **kw), status

    # ---- sign-in ----------------------------------------------------------------------------

    def signin_page(message: str | None, status: int, email: str = "") -> BaseResponse:
        pre = request.cookies.get(pre_cookie) or new_token()
        html, code = page(
            "signin.html",
            status,
            csrf=signin_csrf(signin_key, pre),
            message=message,
            email=email,
            next=_safe_next(request.values.get("next")),
        )
        resp = Response(html, status=code)
        resp.set_cookie(
            pre_cookie, pre, httponly=True, secure=console.cookie_secure, samesite="Strict", path="/"
        )
        return resp

    @app.route("/signin", methods=["GET", "POST"])
    def signin() -> BaseResponse:
        if request.method == "GET":
            return signin_page(None, 200)
        pre = request.cookies.get(pre_cookie)
        if not pre or not same_token(request.form.get("csrf_token"), signin_csrf(signin_key, pre)):
            abort(403, description="The sign-in form is out of date or did not come from the console.")
        email = request.form.get("email", "").strip().lower()[:254]
        password = request.form.get("password", "")
        now = clock()
        st = db()
        refused = "Wrong e-mail address or password."
        with st.transaction():
            user = st.get_user(email) if email else None
            if user is not None and is_locked(user.locked_until, now):
                st.audit(email, "signin.locked", f"user:{email}", client(), now=now)
                return signin_page(
                    "Too many failed sign-ins: this account is locked for a while. Try again later.",
                    429,
                    email,
                )
            ok = verify_password(password, user.password_hash if user else None)
            if user is None or not ok:
                details = {**client(), "why": "no such user" if user is None else "wrong password"}
                if user is not None:
                    attempt = after_failure(user.failed_attempts, now)
                    st.set_signin_state(
                        email, failed_attempts=attempt.failed_attempts, locked_until=attempt.locked_until
                    )
                    if attempt.locked_until is not None:
                        details["locked_until"] = attempt.locked_until.isoformat()
                st.audit(email or "-", "signin.failed", f"user:{email or '-'}", details, now=now)
                return signin_page(refused, 401, email)
            st.set_signin_state(email, failed_attempts=0, locked_until=None, signed_in_at=now)
            open_session(user.email, user.role, "password")
        return redirect(_safe_next(request.form.get("next")) or url_for("findings"))

    @app.post("/signout")
    def signout() -> BaseResponse:
        v = viewer()
        db().delete_session(v.session.id)
        db().audit(v.email, "signout", f"user:{v.email}", client(), now=clock())
        resp = redirect(url_for("signin"))
        resp.delete_cookie(session_cookie, path="/", secure=console.cookie_secure, samesite="Strict")
        return resp

    # ---- findings -----------------------------------------------------------------------------

    @app.get("/")
    def home() -> BaseResponse:
        return redirect(url_for("findings"))

    def filtered(flt: Filters) -> list[StoredFinding]:
        status = Status(flt.status) if flt.status in {s.value for s in Status} else None
        rule = flt.rule if flt.rule in RULE_IDS else None
        since = parse_when(flt.since, tz) if flt.since else None
        until = parse_when(flt.until, tz, end_of_day=True) if flt.until else None
        found = db().list_findings(rule=rule, status=status, since=since)
        person = flt.person.strip().lower()
        room = flt.room.strip().lower()
        out = []
        for f in found:
            if not viewer().perms.may_see(f):
                continue
            if until is not None and f.first_seen >= until:
                continue
            if room and (f.subject.room or "").lower() != room:
                continue
            if person and not _matches_person(f.subject, person, who):
                continue
            out.append(f)
        out.sort(key=lambda f: (f.last_seen, f.id), reverse=True)
        return out

    @app.get("/findings")
    def findings() -> tuple[str, int]:
        args = request.args
        flt = Filters(**{k: args.get(k, "")[:200] for k in Filters.__dataclass_fields__})
        try:
            found = filtered(flt)
            problem = None
        except AuditError as exc:
            found, problem = [], str(exc)
        rooms = sorted({r.name for r in config.network.rooms})
        return page(
            "findings.html",
            400 if problem else 200,
            findings=found[:LIST_LIMIT],
            total=len(found),
            limit=LIST_LIMIT,
            flt=flt,
            rules=RULE_IDS,
            statuses=[s.value for s in Status],
            rooms=rooms,
            problem=problem,
        )

    def visible_finding(fid: int) -> StoredFinding:
        try:
            f = db().get_finding(fid)
        except AuditError:
            abort(404, description=f"There is no finding #{fid}.")
        if not viewer().perms.may_see(f):
            abort(403, description="This finding does not involve a pupil: it is not shown to the DSL.")
        return f

    @app.get("/findings/<int:fid>")
    def finding(fid: int) -> tuple[str, int]:
        f = visible_finding(fid)
        approval = db().get_approval(f.approval_id) if f.approval_id else None
        return page(
            "finding.html",
            f=f,
            approval=approval,
            clause_texts=[(c, policy.clauses.get(c, "")) for c in f.clauses],
            reveal=viewer().perms.reveals_names,
            may_review=viewer().perms.may_review(f),
            may_approve=viewer().perms.may_approve,
            grant_subject=_subject_text(f.subject),
            done=request.args.get("done", ""),
        )

    def review(fid: int, status: Status) -> BaseResponse:
        f = visible_finding(fid)
        v = viewer()
        if not v.perms.may_review(f):
            abort(403, description="Only the configured ICT manager or DSL may confirm or dismiss findings.")
        note: str | None
        if status == Status.DISMISSED:
            note = request.form.get("reason", "").strip()[:2000]
            if not note:
                html, code = page(
                    "error.html", 400, code=400, name="Reason needed", message="Say why you dismiss it."
                )
                return Response(html, status=code)
        else:
            note = request.form.get("note", "").strip()[:2000] or None
        db().review(fid, status, by=v.email, note=note, now=clock())
        return redirect(url_for("finding", fid=fid, done=status.value))

    @app.post("/findings/<int:fid>/confirm")
    def confirm(fid: int) -> BaseResponse:
        return review(fid, Status.CONFIRMED)

    @app.post("/findings/<int:fid>/dismiss")
    def dismiss(fid: int) -> BaseResponse:
        return review(fid, Status.DISMISSED)

    # ---- approvals ------------------------------------------------------------------------------

    def approvals_page(
        status: int = 200, problem: str | None = None, form: dict[str, str] | None = None
    ) -> tuple[str, int]:
        if not viewer().perms.may_view_approvals:
            abort(403, description="Approvals are for the centre manager and the ICT manager.")
        now = clock()
        everything = db().list_approvals()
        usage = db().approval_usage()
        active = [a for a in everything if a.is_active(now)]
        expiring = [a for a in active if a.effective_until - now <= EXPIRING_SOON]
        upcoming = [a for a in everything if a.revoked_at is None and a.valid_from > now]
        past = [a for a in everything if a not in active and a not in upcoming]
        form = form or {
            "rule": request.args.get("rule", "")[:100],
            "subject": request.args.get("subject", "")[:400],
            "valid_from": now.astimezone(tz).strftime("%Y-%m-%dT%H:%M"),
            "valid_until": "",
            "reason": "",
        }
        return page(
            "approvals.html",
            status,
            active=sorted(active, key=lambda a: a.effective_until),
            expiring={a.id for a in expiring},
            upcoming=upcoming,
            past=sorted(past, key=lambda a: a.id, reverse=True),
            usage=usage,
            rules=RULE_IDS,
            may_approve=viewer().perms.may_approve,
            problem=problem,
            form=form,
            done=request.args.get("done", ""),
            subject_text=_subject_text,
        )

    @app.get("/approvals")
    def approvals() -> tuple[str, int]:
        return approvals_page()

    def require_approver() -> Viewer:
        v = viewer()
        if not v.perms.may_approve:
            abort(
                403,
                description="Only the configured centre manager or a deputy may grant or revoke approvals.",
            )
        return v

    @app.post("/approvals/grant")
    def grant() -> BaseResponse | tuple[str, int]:
        v = require_approver()
        form = {
            k: request.form.get(k, "").strip()[:2000]
            for k in ("rule", "subject", "valid_from", "valid_until", "reason")
        }
        try:
            if form["rule"] not in RULE_IDS:
                raise _Problem("Choose the rule the approval is for.")
            if not form["reason"]:
                raise _Problem("Say why (the reason is kept with the approval and shown in the digest).")
            if not form["valid_from"] or not form["valid_until"]:
                raise _Problem("Give the period: from and until.")
            a, n = db().grant_approval(
                rule=form["rule"],
                subject=parse_subject(form["subject"]),
                valid_from=parse_when(form["valid_from"], tz),
                valid_until=parse_when(form["valid_until"], tz, end_of_day=True),
                approved_by=v.email,
                reason=form["reason"],
                now=clock(),
            )
        except (AuditError, _Problem) as exc:
            return approvals_page(400, str(exc), form)
        return redirect(url_for("approvals", done=f"granted:{a.id}:{n}"))

    @app.post("/approvals/<int:aid>/revoke")
    def revoke(aid: int) -> BaseResponse | tuple[str, int]:
        v = require_approver()
        reason = request.form.get("reason", "").strip()[:2000]
        try:
            if not reason:
                raise _Problem("Say why the approval is revoked.")
            _a, n = db().revoke_approval(aid, by=v.email, reason=reason, now=clock())
        except (AuditError, _Problem) as exc:
            return approvals_page(400, str(exc))
        return redirect(url_for("approvals", done=f"revoked:{aid}:{n}"))

    # ---- digests, sources, audit -------------------------------------------------------------

    @app.get("/digests")
    def digests() -> tuple[str, int]:
        if not viewer().perms.may_view_digests:
            abort(403, description="Digests name everyone: they are for the centre manager and ICT manager.")
        records = db().list_digest_records()
        days: dict[str, list[Any]] = {}
        for r in records:
            days.setdefault(r.day, []).append(r)
        today = clock().astimezone(tz).date().isoformat()
        return page("digests.html", days=days, today=today)

    @app.get("/digests/<day>")
    def digest(day: str) -> Response:
        if not viewer().perms.may_view_digests:
            abort(403, description="Digests name everyone: they are for the centre manager and ICT manager.")
        try:
            when_day = clock().astimezone(tz).date() if day == "today" else date.fromisoformat(day)
        except ValueError:
            abort(404, description="Not a day (YYYY-MM-DD).")
        data = build_digest(config, db(), policy, when_day, clock())
        resp = Response(render_html(data), mimetype="text/html")
        resp.headers["Content-Security-Policy"] = DIGEST_CSP
        return resp

    @app.get("/digests/show")
    def digest_pick() -> BaseResponse:
        return redirect(url_for("digest", day=request.args.get("day", "")[:10] or "today"))

    @app.get("/sources")
    def sources() -> tuple[str, int]:
        st = db()
        runs = {r.source: r for r in st.last_runs()}
        rows = []
        for src in (*config.mail.sources, *config.network.sources):
            rows.append(
                {
                    "name": src.name,
                    "kind": "mail" if src in config.mail.sources else "network",
                    "type": src.type,
                    "every": src.interval_minutes,
                    "last": runs.pop(src.name, None),
                    "success": st.last_success(src.name),
                }
            )
        for name, run in sorted(runs.items()):  # runs of sources no longer configured, or ad-hoc files
            rows.append(
                {
                    "name": name,
                    "kind": run.kind,
                    "type": "",
                    "every": None,
                    "last": run,
                    "success": st.last_success(name),
                }
            )
        return page("sources.html", rows=rows)

    @app.get("/audit")
    def audit() -> tuple[str, int]:
        if not viewer().perms.may_view_audit:
            abort(403, description="The audit log is for the centre manager and the ICT manager.")
        entries = db().list_audit()
        entries.reverse()
        return page("audit.html", entries=entries[:LIST_LIMIT], total=len(entries), limit=LIST_LIMIT)

    return app


class _Problem(Exception):
    """A form the person must correct (shown beside the form, not as an error page)."""


def _subject_text(s: Subject) -> str:
    return ",".join(f"{k}:{v}" for k, v in s.as_dict().items())


def _matches_person(s: Subject, wanted: str, who: Callable[[str | None], str]) -> bool:
    """A person filter takes an address (official or personal) or a pseudonym (`Staff 3f2a` or `3f2a`)."""
    for email in (s.staff, s.address):
        if not email:
            continue
        if wanted == email.lower():
            return True
    if s.staff:
        alias = who(s.staff).lower()
        return wanted in (alias, alias.removeprefix("staff "))
    return False


def _safe_next(target: str | None) -> str | None:
    """Only a path on this site: `next=https://evil.example/` must not become an open redirect."""
    if not target:
        return None
    parts = urlsplit(target)
    if (
        parts.scheme
        or parts.netloc
        or not target.startswith("/")
        or target.startswith("//")
        or "\\" in target
    ):
        return None
    return target


# Evidence fields in the order a reviewer reads them; others follow alphabetically.
EVIDENCE_ORDER = (
    "date", "from", "to", "cc", "subject", "pupils", "terms", "score", "threshold", "confidence",
    "lesson_date", "period", "room", "device", "staff", "service", "first_seen", "last_seen",
    "minutes_in_lesson", "bytes", "flows", "names", "servers", "mailbox", "target",
    "message_id", "source", "location",
)  # fmt: skip


def _evidence_items(data: dict[str, object]) -> list[tuple[str, object]]:
    rank = {k: i for i, k in enumerate(EVIDENCE_ORDER)}
    keys = sorted((k for k in data if k != "reasons"), key=lambda k: (rank.get(k, len(rank)), k))
    return [(k, data[k]) for k in keys]


def _value_text(value: object) -> str:
    """Evidence values as text (templates escape it)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(_value_text(v) for v in value) or "—"
    if isinstance(value, dict):
        if set(value) == {"host", "via"}:
            return f"{value['host']} ({value['via']})"
        return "; ".join(f"{k}: {_value_text(v)}" for k, v in value.items())
    return str(value)


# ---- serving ------------------------------------------------------------------------------------


def serve_console(
    config: Config,
    stop_event: threading.Event,
    *,
    host: str | None = None,
    port: int | None = None,
    on_ready: Callable[[str, int], None] | None = None,
) -> None:
    """Serve the console with waitress until `stop_event` is set (the daemon's `run` calls this).

    Blocks. `host`/`port` override the `[console]` section; port 0 picks a free port, which
    `on_ready(host, port)` is told once the socket listens.
    """
    from waitress.server import create_server

    console = config.console or Console()
    app = create_app(config)
    server: Any = create_server(
        app,
        host=host or console.host,
        port=console.port if port is None else port,
        threads=8,
        ident="choysez-auditd",
        clear_untrusted_proxy_headers=False,
    )
    if on_ready is not None:
        on_ready(str(server.effective_host), int(server.effective_port))

    def watch() -> None:
        stop_event.wait()
        server.close()

    watcher = threading.Thread(target=watch, name="console-stop", daemon=True)
    watcher.start()
    try:
        server.run()
    except (OSError, ValueError):
        if not stop_event.is_set():
            raise
    finally:
        server.task_dispatcher.shutdown()
