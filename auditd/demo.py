"""`choysez-auditd demo`: the whole pipeline on the bundled sample school.

Grants the sample school's approvals (once), scans its Maildir and capture, lists what was
found and writes the digest in both formats.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from auditd.cli import build_digest, parse_subject, parse_when
from auditd.config import load_config
from auditd.digest.render import render_html, render_text
from auditd.digest.send import current_day
from auditd.errors import ConfigError
from auditd.pipeline import Context, scan_mail, scan_net
from auditd.store import Store
from auditd.tomlmodel import Strict, load_toml

SAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "sample-school" / "config.toml"


class DemoApproval(Strict):
    rule: str
    subject: str
    valid_from: str
    valid_until: str
    approved_by: str
    reason: str


class DemoApprovals(Strict):
    approval: list[DemoApproval] = []


def run_demo(config_path: Path | None, out: Path | None, now: datetime) -> int:
    path = config_path or SAMPLE
    if not path.is_file():
        raise ConfigError("the sample school is not here (run the demo from a checkout)", where=str(path))
    config = load_config(path)
    out = out or config.base / "out"
    tz = config.organisation.tz
    with Store.connect(config) as store:
        ctx = Context.load(config, store)
        wanted = config.base / "approvals.toml"
        if wanted.is_file():
            existing = {(a.rule, a.subject, a.reason) for a in store.list_approvals()}
            for spec in load_toml(wanted, DemoApprovals).approval:
                subject = parse_subject(spec.subject)
                if (spec.rule, subject, spec.reason) in existing:
                    continue
                a, _ = store.grant_approval(
                    rule=spec.rule,
                    subject=subject,
                    valid_from=parse_when(spec.valid_from, tz),
                    valid_until=parse_when(spec.valid_until, tz),
                    approved_by=spec.approved_by,
                    reason=spec.reason,
                    now=now,
                )
                print(f"approval #{a.id} granted by {a.approved_by}: {a.rule} for {spec.subject}")
        reports = scan_mail(ctx, now=now) + scan_net(ctx, now=now)
        for r in reports:
            state = "ok" if r.ok else f"FAILED: {r.error}"
            print(f"scanned {r.name}: {r.items} items, {r.new} new findings ({state})")
        findings = store.list_findings()
        print(f"\n{len(findings)} findings in {config.store.path}:")
        for f in sorted(findings, key=lambda f: f.id):
            who = ", ".join(f"{k}:{v}" for k, v in f.subject.as_dict().items())
            extra = f" (approval #{f.approval_id})" if f.approval_id else ""
            pupil = " [pupil involved]" if f.pupil_involved else ""
            print(f"  #{f.id:<3} {f.rule:<24} {f.status.value:<9} {who}{pupil}{extra}")
        day = current_day(now, config.digest.at, tz)  # the digest these findings will go out in
        data = build_digest(config, store, ctx.policy, day, now)
    out.mkdir(parents=True, exist_ok=True)
    text_path = out / f"digest-{day.isoformat()}.txt"
    html_path = out / f"digest-{day.isoformat()}.html"
    text = render_text(data)
    text_path.write_text(text, encoding="utf-8")
    html_path.write_text(render_html(data), encoding="utf-8")
    print(f"\ndigest (the ICT manager's; it goes out at {config.digest.time}), an excerpt:\n")
    print(excerpt(text))
    print(f"\ndigest written to {text_path} and {html_path}")
    print(f"explore: choysez-auditd findings --config {path}")
    return 0 if all(r.ok for r in reports) else 1


def excerpt(text: str, lines: int = 24) -> str:
    """The head of the text digest, and where the approvals section starts (what was suppressed)."""
    all_lines = text.splitlines()
    head = all_lines[:lines]
    if "APPROVED EXCEPTIONS" in all_lines and "APPROVED EXCEPTIONS" not in head:
        at = all_lines.index("APPROVED EXCEPTIONS")
        head += ["  …", *all_lines[at : at + 4]]
    if len(all_lines) > len(head):
        head.append("  …")
    return "\n".join("  | " + line for line in head)
