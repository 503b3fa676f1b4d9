"""Mail decoding: every charset and encoding found in real mail, and bad input that must not crash."""

from __future__ import annotations

import base64
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auditd.model import MailMessage
from auditd.sources.mailfile import (
    ADDRESS_CAP,
    MailStats,
    decode_words,
    html_to_text,
    parse_message,
    read_maildir,
    read_mbox,
)
from tests.conftest import ROOT

DATA = ROOT / "tests" / "data" / "mail"


def parsed(raw: bytes) -> MailMessage:
    return parse_message(raw, source="t", location="t")


class TestHeaders:
    """RFC 2047 words, 8-bit header bytes, missing and huge headers."""

    def test_encoded_words_in_any_charset(self) -> None:
        assert decode_words("=?windows-1252?Q?Ava=92s_report_=96_parents=92_evening?=") == (
            "Ava\u2019s report \u2013 parents\u2019 evening"
        )
        assert decode_words("=?ISO-8859-1?Q?Caf=E9?= menu") == "Caf\u00e9 menu"
        assert decode_words("=?utf-8?B?TGlseeKAmXMgdHJpcA==?=") == "Lily\u2019s trip"
        assert decode_words("Re: =?utf-8?q?a?= =?utf-8?q?b?=") == "Re: ab"

    def test_broken_and_unknown_encoded_words_degrade(self) -> None:
        assert decode_words("=?x-made-up?Q?hello?=") == "hello"
        assert isinstance(decode_words("=?utf-8?B?not*base64?="), str)
        assert decode_words("=?utf-8?Q?unterminated") == "=?utf-8?Q?unterminated"

    def test_eight_bit_bytes_in_headers(self) -> None:
        m = parsed(
            b"From: J\xc3\xa9r\xc3\xb4me Dupont <jerome@example.fr>\n"
            b"To: Zo\xeb Hart <zoe@example.net>\n"
            b"Subject: Lily\x92s caf\xe9 trip\n\nbody\n"
        )
        assert m.sender is not None
        assert m.sender.name == "J\u00e9r\u00f4me Dupont"  # UTF-8 bytes
        assert m.to[0].name == "Zo\u00eb Hart"  # windows-1252 bytes
        assert m.subject == "Lily\u2019s caf\u00e9 trip"

    def test_missing_date_and_message_id(self) -> None:
        m = parsed(b"From: a@example.net\nTo: b@example.net\nSubject: x\n\nhello\n")
        assert m.date is None and m.message_id is None and m.key == "location:t"

    def test_bad_dates_are_none(self) -> None:
        for value in (b"yesterday", b"Mon, 99 Foo 2026 99:99:99 +0000", b"Tue, 1 Jan 99999 00:00:00 +0000"):
            assert parsed(b"Date: " + value + b"\nFrom: a@b.c\n\nx\n").date is None

    def test_huge_headers_are_capped_and_quick(self) -> None:
        to = b", ".join(b"p%d@example.net" % i for i in range(60_000))
        raw = b"From: a@b.c\nTo: " + to + b"\nSubject: " + b"x" * 2_000_000 + b"\n\nbody\n"
        start = time.monotonic()
        m = parsed(raw)
        assert time.monotonic() - start < 10
        assert 0 < len(m.to) <= ADDRESS_CAP
        assert len(m.subject) <= 16 * 1024


class TestBodies:
    """Charsets, transfer encodings, HTML-only bodies and nested messages."""

    def test_windows_1252_smart_quotes_quoted_printable(self) -> None:
        m = parsed(
            b"Content-Type: text/plain; charset=windows-1252\nContent-Transfer-Encoding: quoted-printable\n\n"
            b"Oliver=92s consent form =96 thanks\n"
        )
        assert "Oliver\u2019s consent form \u2013 thanks" in m.text

    def test_latin1_labelled_mail_with_windows_1252_quotes(self) -> None:
        m = parsed(b"Content-Type: text/plain; charset=iso-8859-1\n\nLily\x92s caf\xe9\n")
        assert "Lily\u2019s caf\u00e9" in m.text

    def test_undeclared_eight_bit_body(self) -> None:
        assert "na\u00efve" in parsed(b"From: a@b.c\n\nna\xc3\xafve\n").text
        assert "\u2019" in parsed(b"From: a@b.c\n\nit\x92s\n").text

    def test_wrong_and_unknown_charsets(self) -> None:
        assert "caf\u00e9" in parsed(b"Content-Type: text/plain; charset=utf-8\n\ncaf\xe9\n").text
        assert "hello" in parsed(b"Content-Type: text/plain; charset=x-no-such\n\nhello\n").text

    def test_base64_with_broken_padding(self) -> None:
        body = base64.b64encode("Ava\u2019s report".encode()).rstrip(b"=")
        m = parsed(
            b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64\n\n" + body + b"\n"
        )
        assert isinstance(m.text, str)

    def test_html_only_body(self) -> None:
        markup = (
            "<html><head><title>Secret title</title><style>p{color:red}</style>"
            "<script>var pupil='Lily Evans';</script></head><body><!--[if mso]>hidden<![endif]-->"
            "<p>Ava&#8217;s&nbsp;trip&amp;consent</p><div>second<br>line</div></body></html>"
        )
        text = html_to_text(markup)
        assert "Ava\u2019s trip&consent" in text
        assert "second\nline" in text
        for gone in ("Lily", "color", "Secret", "hidden", "<"):
            assert gone not in text

    def test_html_alternative_is_used_only_without_plain(self) -> None:
        raw = (
            b'Content-Type: multipart/alternative; boundary="b"\n\n'
            b"--b\nContent-Type: text/plain\n\nplain words\n"
            b"--b\nContent-Type: text/html\n\n<p>html words</p>\n--b--\n"
        )
        assert "plain words" in parsed(raw).text and "html words" not in parsed(raw).text

    def test_nested_message_text_is_included(self) -> None:
        m = parsed((DATA / "outlook-forward-as-attachment.eml").read_bytes())
        assert "Oliver Brown\u2019s EHCP review" in m.text
        assert "Subject: Oliver - review" in m.text

    def test_attachments_are_not_text(self) -> None:
        raw = (
            b'Content-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Type: text/plain\n\nhi\n'
            b"--b\nContent-Type: text/plain\n"
            b"Content-Disposition: attachment; filename=list.txt\n\nLily Evans\n"
            b"--b\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n\nJVBERi0=\n--b--\n"
        )
        assert "Lily" not in parsed(raw).text

    def test_broken_boundaries(self) -> None:
        no_close = (
            b'Content-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Type: text/plain\n\nstill read\n'
        )
        assert "still read" in parsed(no_close).text
        wrong = (
            b'Content-Type: multipart/mixed; boundary="zzz"\n\n--b\nContent-Type: text/plain\n\ntext\n--b--\n'
        )
        m = parsed(wrong)
        assert m.defects >= 1 and isinstance(m.text, str)
        no_boundary = b"Content-Type: multipart/mixed\n\nplain text really\n"
        assert isinstance(parsed(no_boundary).text, str)

    def test_deep_nesting_does_not_crash(self) -> None:
        raw = b"From: a@b.c\nSubject: deep\n"
        for i in range(200):
            raw += b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (i, i)
        raw += b"Content-Type: text/plain\n\ndeep text\n"
        m = parsed(raw)
        assert m.subject == "deep"


class TestSources:
    """One bad message is counted with its place; the mailbox is still read."""

    def test_unparseable_messages_are_counted_not_fatal(self, tmp_path: Path) -> None:
        cur = tmp_path / "md" / "cur"
        cur.mkdir(parents=True)
        (cur / "1.a:2,S").write_bytes(b"From: a@b.c\nSubject: ok\n\nfine\n")
        (cur / "2.b:2,S").write_bytes(bytes(range(256)) * 40)
        (cur / "3.c:2,S").write_bytes(b"\xff\xfe\x00garbage\n\n\x00\x00")
        stats = MailStats()
        got = [m for m, _ in read_maildir(tmp_path / "md", source="t", stats=stats)]
        assert stats.messages == 3
        assert len(got) + stats.unparseable == 3
        assert any(m.subject == "ok" for m in got)

    def test_mbox_of_real_shapes(self, tmp_path: Path) -> None:
        mbox = tmp_path / "all.mbox"
        parts = [
            b"From MAILER-DAEMON Thu Jan  1 00:00:00 1970\n" + p.read_bytes()
            for p in sorted(DATA.glob("*.eml"))
        ]
        mbox.write_bytes(b"\n".join(parts))
        got = [m for m, _ in read_mbox(mbox, source="t")]
        assert len(got) == len(parts)
        assert all(m.sender is not None for m in got)


@st.composite
def mutated_mail(draw: st.DrawFn) -> bytes:
    base = draw(st.sampled_from(sorted(DATA.glob("*.eml")))).read_bytes()
    cut = draw(st.integers(0, len(base)))
    junk = draw(st.binary(max_size=200))
    return base[:cut] + junk + base[cut:][: draw(st.integers(0, 400))]


class TestFuzz:
    """Random bytes and mangled real messages never make the parser raise."""

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=2000))
    def test_random_bytes(self, raw: bytes) -> None:
        m = parsed(raw)
        assert isinstance(m.text, str) and isinstance(m.subject, str)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(mutated_mail())
    def test_mangled_real_messages(self, raw: bytes) -> None:
        m = parsed(raw)
        assert isinstance(m.text, str)
