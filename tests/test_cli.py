"""The installed command, end to end on the sample school: what a sysadmin and the ICT manager type."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import subprocess
from pathlib import Path

from tests.conftest import ROOT, Run


def findings(cli: Run, config: Path, *extra: str) -> list[dict[str, object]]:
    proc = cli("findings", "--config", config, "--format", "json", *extra, check=True)
    result: list[dict[str, object]] = json.loads(proc.stdout)
    return result


class TestDemo:
    """`demo` runs the whole pipeline and finds both kinds of breach."""

    def test_demo_finds_mail_and_network_breaches_and_writes_digest(self, cli: Run, school: Path) -> None:
        out = school / "out"
        proc = cli("demo", "--config", school / "config.toml", "--out", out, check=True)
        for rule in ("MAIL-PERSONAL-SENDER", "MAIL-PERSONAL-RECIPIENT", "NET-STREAMING-IN-CLASS"):
            assert rule in proc.stdout
        assert "digest written to" in proc.stdout
        texts = list(out.glob("digest-*.txt"))
        htmls = list(out.glob("digest-*.html"))
        assert len(texts) == 1 and len(htmls) == 1
        digest = texts[0].read_text()
        assert "NET-STREAMING-IN-CLASS" in digest
        assert "Staff should not access personal sites in class" in digest
        assert "<html" in htmls[0].read_text()

        found = findings(cli, school / "config.toml")
        by_rule: dict[str, list[dict[str, object]]] = {}
        for f in found:
            by_rule.setdefault(str(f["rule"]), []).append(f)
        subj = {id(f): dict(f["subject"]) for f in found}  # type: ignore[call-overload]
        senders = {(subj[id(f)]["staff"], subj[id(f)]["address"]) for f in by_rule["MAIL-PERSONAL-SENDER"]}
        assert ("jane.smith@choysez.org.uk", "jane.smith77@gmail.com") in senders
        net = {(subj[id(f)]["room"], subj[id(f)]["service"]) for f in by_rule["NET-STREAMING-IN-CLASS"]}
        assert net == {("Room 12", "Netflix"), ("Room 14", "Sky Go")}
        approved = [f for f in found if f["status"] == "approved"]
        assert len(approved) == 1
        assert approved[0]["subject"]["address"] == "tom.baker@btinternet.com"  # type: ignore[index]
        assert approved[0]["approval_id"] is not None

    def test_running_twice_adds_nothing(self, cli: Run, school: Path) -> None:
        cli("demo", "--config", school / "config.toml", check=True)
        first = findings(cli, school / "config.toml")
        proc = cli("demo", "--config", school / "config.toml", check=True)
        assert "0 new findings" in proc.stdout
        second = findings(cli, school / "config.toml")
        assert [(f["id"], f["occurrences"]) for f in first] == [(f["id"], f["occurrences"]) for f in second]
        approvals = json.loads(
            cli("approvals", "list", "--config", school / "config.toml", "--format", "json").stdout
        )
        assert len(approvals) == 1

    def test_store_is_private(self, cli: Run, school: Path) -> None:
        cli("demo", "--config", school / "config.toml", check=True)
        mode = stat.S_IMODE(os.stat(school / "auditd.db").st_mode)
        assert mode == 0o600


class TestScan:
    """`scan` is incremental and idempotent; a failing source does not stop the others."""

    def test_scan_twice_leaves_count_unchanged(self, cli: Run, school: Path) -> None:
        config = school / "config.toml"
        cli("scan", "mail", "--config", config, check=True)
        cli("scan", "net", "--config", config, check=True)
        count = len(findings(cli, config))
        assert count >= 5
        second = cli("scan", "mail", "--config", config, check=True)
        assert "0 items read" in second.stdout  # the Maildir checkpoint: nothing new to read
        cli("scan", "net", "--config", config, check=True)
        cli("scan", "net", "--config", config, ROOT / "deploy/sample-school/captures/sample.pcap", check=True)
        assert len(findings(cli, config)) == count

    def test_failed_source_is_reported_and_others_run(self, cli: Run, school: Path) -> None:
        config = school / "config.toml"
        text = config.read_text().replace(
            "[[mail.sources]]",
            '[[mail.sources]]\nname = "gone"\ntype = "mbox"\npath = "no-such.mbox"\n\n[[mail.sources]]',
            1,
        )
        config.write_text(text)
        proc = cli("scan", "mail", "--config", config)
        assert proc.returncode == 1
        assert "gone: FAILED" in proc.stderr
        assert "sample-maildir:" in proc.stdout
        assert len(findings(cli, config, "--rule", "MAIL-PERSONAL-SENDER")) >= 2

    def test_scan_of_a_file_that_is_not_a_capture(self, cli: Run, school: Path, tmp_path: Path) -> None:
        junk = tmp_path / "notes.pcap"
        junk.write_text("this is not a capture\n")
        proc = cli("scan", "net", "--config", school / "config.toml", junk)
        assert proc.returncode == 1
        assert "not a pcap or pcapng" in proc.stderr


class TestFindingsAndReview:
    """Listing, filtering, exporting and reviewing findings."""

    def test_filters_and_formats(self, cli: Run, school: Path) -> None:
        config = school / "config.toml"
        cli("demo", "--config", config, check=True)
        net = findings(cli, config, "--rule", "NET-STREAMING-IN-CLASS")
        assert len(net) == 2
        assert all(f["clauses"] == ["SMP-1.10"] for f in net)
        for f in net:
            assert {
                "id",
                "rule",
                "clauses",
                "severity",
                "status",
                "subject",
                "first_seen",
                "last_seen",
                "occurrences",
                "pupil_involved",
                "evidence",
                "approval_id",
            } <= set(f)
        table = cli("findings", "--config", config, check=True).stdout
        assert "NET-STREAMING-IN-CLASS" in table and "findings" in table
        rows = list(
            csv.DictReader(io.StringIO(cli("findings", "--config", config, "--format", "csv").stdout))
        )
        assert len(rows) == len(findings(cli, config))
        jane = findings(cli, config, "--subject", "staff:Jane.Smith@choysez.org.uk")
        assert jane
        assert all(dict(f["subject"])["staff"] == "jane.smith@choysez.org.uk" for f in jane)  # type: ignore[call-overload]

    def test_evidence_holds_no_message_body(self, cli: Run, school: Path) -> None:
        config = school / "config.toml"
        cli("demo", "--config", config, check=True)
        dump = json.dumps(findings(cli, config))
        assert "hasn't handed in this week's homework" not in dump
        assert "Could you send both in with her tomorrow" not in dump

    def test_confirm_and_dismiss(self, cli: Run, school: Path) -> None:
        config = school / "config.toml"
        cli("demo", "--config", config, check=True)
        open_ids = [f["id"] for f in findings(cli, config, "--status", "open")]
        assert len(open_ids) >= 2
        refused = cli(
            "findings", "confirm", str(open_ids[0]), "--by", "jane.smith@choysez.org.uk", "--config", config
        )
        assert refused.returncode == 2
        assert "may not review" in refused.stderr
        cli(
            "findings",
            "confirm",
            str(open_ids[0]),
            "--by",
            "ict.manager@choysez.org.uk",
            "--config",
            config,
            check=True,
        )
        cli(
            "findings",
            "dismiss",
            str(open_ids[1]),
            "--by",
            "dsl@choysez.org.uk",
            "--reason",
            "teaching use",
            "--config",
            config,
            check=True,
        )
        statuses = {f["id"]: f["status"] for f in findings(cli, config)}
        assert statuses[open_ids[0]] == "confirmed"
        assert statuses[open_ids[1]] == "dismissed"
        cli("scan", "net", "--config", config, ROOT / "deploy/sample-school/captures/sample.pcap", check=True)
        cli("scan", "mail", "--config", config, check=True)
        assert {f["id"]: f["status"] for f in findings(cli, config)}[open_ids[1]] == "dismissed"
        missing = cli(
            "findings", "dismiss", "99999", "--by", "dsl@choysez.org.uk", "--reason", "x", "--config", config
        )
        assert missing.returncode == 2


class TestApprovals:
    """Only the centre manager or a deputy approves; every change is audited; approvals suppress."""

    def grant(self, cli: Run, config: Path, by: str) -> subprocess.CompletedProcess[str]:
        return cli(
            "approvals",
            "grant",
            "--config",
            config,
            "--rule",
            "NET-STREAMING-IN-CLASS",
            "--subject",
            "room:Room 14,service:Sky Go",
            "--from",
            "2026-11-23T00:00",
            "--until",
            "2026-11-23",
            "--approved-by",
            by,
            "--reason",
            "Sky Go used for the GCSE media studies coursework on sports coverage",
        )

    def test_only_centre_manager_or_deputy_may_grant(self, cli: Run, school: Path) -> None:
        config = school / "config.toml"
        proc = self.grant(cli, config, "ict.manager@choysez.org.uk")
        assert proc.returncode == 2
        assert "may not approve" in proc.stderr
        assert self.grant(cli, config, "priya.patel@choysez.org.uk").returncode == 0

    def test_grant_suppresses_existing_finding_and_revoke(self, cli: Run, school: Path) -> None:
        config = school / "config.toml"
        cli("demo", "--config", config, check=True)
        proc = self.grant(cli, config, "centre.manager@choysez.org.uk")
        assert "1 existing finding now approved" in proc.stdout
        sky = findings(cli, config, "--subject", "room:Room 14")
        assert [f["status"] for f in sky] == ["approved"]
        approvals = json.loads(cli("approvals", "list", "--config", config, "--format", "json").stdout)
        new_id = max(a["id"] for a in approvals)
        cli(
            "approvals",
            "revoke",
            str(new_id),
            "--by",
            "centre.manager@choysez.org.uk",
            "--reason",
            "done",
            "--config",
            config,
            check=True,
        )
        again = cli(
            "approvals",
            "revoke",
            str(new_id),
            "--by",
            "centre.manager@choysez.org.uk",
            "--reason",
            "x",
            "--config",
            config,
        )
        assert again.returncode == 2
        # The Sky Go use happened while the approval stood: it stays approved.
        assert [f["status"] for f in findings(cli, config, "--subject", "room:Room 14")] == ["approved"]

    def test_bad_subject_and_rule(self, cli: Run, school: Path) -> None:
        config = school / "config.toml"
        base = [
            "approvals",
            "grant",
            "--config",
            config,
            "--from",
            "2026-11-23",
            "--until",
            "2026-11-24",
            "--approved-by",
            "centre.manager@choysez.org.uk",
            "--reason",
            "r",
        ]
        bad_subject = cli(*base, "--rule", "NET-STREAMING-IN-CLASS", "--subject", "teacher:x")
        assert bad_subject.returncode == 2 and "--subject" in bad_subject.stderr
        bad_rule = cli(*base, "--rule", "NET-ANYTHING", "--subject", "room:Room 12")
        assert bad_rule.returncode == 2 and "not a rule id" in bad_rule.stderr


class TestInspectAndCheck:
    """`inspect` classifies without storing; `check` validates."""

    def test_inspect_capture_jsonl(self, cli: Run, tmp_path: Path) -> None:
        proc = cli(
            "inspect", ROOT / "deploy/sample-school/captures/sample.pcap", "--only-matches", check=True
        )
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        assert lines and all(line["kind"] == "net" and line["service"] for line in lines)
        assert {"Netflix", "Sky Go"} <= {line["service"] for line in lines}
        assert set(lines[0]) == {
            "kind",
            "ts",
            "client",
            "server",
            "host",
            "via",
            "service",
            "category",
            "bytes",
        }
        everything = cli("inspect", ROOT / "deploy/sample-school/captures/sample.pcap", check=True).stdout
        hosts = {json.loads(line)["host"]: json.loads(line) for line in everything.splitlines()}
        assert hosts["fast.com"]["service"] is None
        assert hosts["www.youtube.com"]["service"] is None  # YouTube is off by default

    def test_inspect_maildir_with_config(self, cli: Run, school: Path) -> None:
        proc = cli("inspect", school / "mail", "--config", school / "config.toml", check=True)
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        assert len(lines) == 9
        flagged = [line for line in lines if line["findings"]]
        assert {line["findings"][0]["rule"] for line in flagged} == {
            "MAIL-PERSONAL-SENDER",
            "MAIL-PERSONAL-RECIPIENT",
        }
        assert not (school / "auditd.db").exists()  # inspect stores nothing

    def test_inspect_garbage_is_one_line_exit_2(self, cli: Run, tmp_path: Path) -> None:
        junk = tmp_path / "junk.bin"
        junk.write_bytes(bytes(range(256)) * 4)
        proc = cli("inspect", junk)
        assert proc.returncode == 2
        assert proc.stderr.count("\n") == 1 and str(junk) in proc.stderr
        assert "Traceback" not in proc.stderr

    def test_check_offline_on_the_example(self, cli: Run) -> None:
        proc = cli("check", "--offline", "--config", ROOT / "deploy/config.example.toml")
        assert proc.returncode == 0, proc.stderr

    def test_misspelt_key_exits_2_with_one_line(self, cli: Run, tmp_path: Path) -> None:
        text = (ROOT / "deploy/config.example.toml").read_text().replace("retention_days", "retention_dayz")
        for name in ("staff.csv", "community.csv"):
            (tmp_path / name).write_text((ROOT / "deploy" / name).read_text())
        (tmp_path / "config.toml").write_text(text)
        proc = cli("check", "--offline", "--config", tmp_path / "config.toml")
        assert proc.returncode == 2
        assert proc.stderr.strip().count("\n") == 0
        assert "store.retention_dayz" in proc.stderr and "config.toml" in proc.stderr

    def test_digest_to_file_in_both_formats(self, cli: Run, school: Path) -> None:
        config = school / "config.toml"
        cli("demo", "--config", config, check=True)
        cli("digest", "--config", config, "--output", school / "d.txt", check=True)
        cli("digest", "--config", config, "--output", school / "d.html", "--format", "html", check=True)
        assert "SOURCE HEALTH" in (school / "d.txt").read_text()
        assert "sample-captures" in (school / "d.html").read_text()
