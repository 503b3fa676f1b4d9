"""staff.csv and community.csv: validated line by line, with the line named in every error."""

from __future__ import annotations

from pathlib import Path

import pytest

from auditd.directory import load_community, load_devices, load_staff
from auditd.errors import ConfigError


def official(email: str) -> bool:
    return email.endswith("@choysez.org.uk")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


class TestStaff:
    """Staff with their declared personal addresses."""

    def test_reads_personal_addresses(self, tmp_path: Path) -> None:
        path = write(
            tmp_path,
            "staff.csv",
            "name,email,role,personal_emails\n"
            "Jane Smith,Jane.Smith@choysez.org.uk,Teacher,jane77@gmail.com; j.smith@outlook.com\n\n"
            "Tom Baker,tom.baker@choysez.org.uk,Youth Worker,\n",
        )
        jane, tom = load_staff(path, official)
        assert jane.email == "jane.smith@choysez.org.uk"
        assert jane.personal_emails == ("jane77@gmail.com", "j.smith@outlook.com")
        assert tom.personal_emails == ()

    @pytest.mark.parametrize(
        ("body", "expected"),
        [
            ("Jane,jane@gmail.com,T,\n", "line 2: email jane@gmail.com is not in an official domain"),
            ("Jane,jane@choysez.org.uk,T,me@choysez.org.uk\n", "line 2: personal address me@choysez.org.uk"),
            ("Jane,jane@choysez.org.uk,T,not-an-address\n", "line 2: personal_emails: not an e-mail"),
            ("Jane,jane@choysez.org.uk,T\n", "line 2: expected 4 fields, found 3"),
            (
                "Jane,jane@choysez.org.uk,T,\nJ2,jane@choysez.org.uk,T,\n",
                "line 3: jane@choysez.org.uk already appears on line 2",
            ),
            (",jane@choysez.org.uk,T,\n", "line 2: name is empty"),
        ],
    )
    def test_errors_name_the_line(self, tmp_path: Path, body: str, expected: str) -> None:
        path = write(tmp_path, "staff.csv", "name,email,role,personal_emails\n" + body)
        with pytest.raises(ConfigError) as err:
            load_staff(path, official)
        assert expected in str(err.value)
        assert str(err.value).startswith(str(path))

    def test_wrong_header(self, tmp_path: Path) -> None:
        path = write(tmp_path, "staff.csv", "name,mail\nJane,jane@choysez.org.uk\n")
        with pytest.raises(ConfigError, match="line 1: header must be name,email,role,personal_emails"):
            load_staff(path, official)

    def test_not_utf8(self, tmp_path: Path) -> None:
        path = tmp_path / "staff.csv"
        path.write_bytes(b"name,email,role,personal_emails\nJos\xe9,jose@choysez.org.uk,T,\n")
        with pytest.raises(ConfigError, match="not UTF-8"):
            load_staff(path, official)


class TestCommunity:
    """Pupils, parents and carers."""

    def test_reads_pupils_and_parents(self, tmp_path: Path) -> None:
        path = write(
            tmp_path,
            "community.csv",
            "name,email,relationship,pupil\nLily Evans,,pupil,\n"
            "Mark Evans,mark@example.net,Parent,Lily Evans\n",
        )
        lily, mark = load_community(path)
        assert lily.email is None and lily.relationship == "pupil"
        assert mark.relationship == "parent" and mark.pupil == "Lily Evans"

    @pytest.mark.parametrize(
        ("row", "expected"),
        [
            (
                "Mark,mark@example.net,uncle,Lily\n",
                "line 2: relationship must be one of pupil, parent, carer",
            ),
            ("Mark,mark@example.net,parent,\n", "line 2: a parent needs the pupil's name"),
            ("Mark,,carer,Lily\n", "line 2: a carer needs an e-mail address"),
        ],
    )
    def test_errors_name_the_line(self, tmp_path: Path, row: str, expected: str) -> None:
        path = write(tmp_path, "community.csv", "name,email,relationship,pupil\n" + row)
        with pytest.raises(ConfigError, match=expected):
            load_community(path)


class TestDevices:
    """The optional device-to-staff map."""

    def test_reads_and_lowercases(self, tmp_path: Path) -> None:
        path = write(tmp_path, "devices.csv", "device,staff\nAA:BB:CC:00:11:22,Jane.Smith@choysez.org.uk\n")
        assert load_devices(path) == {"aa:bb:cc:00:11:22": "jane.smith@choysez.org.uk"}
