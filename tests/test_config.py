"""Configuration: the contract's example loads unchanged, every key is documented, mistakes are one line."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from auditd.config import Config, config_path, load_config, read_secret
from auditd.directory import load_directory
from auditd.errors import ConfigError
from tests.conftest import ROOT, corpus_path

EXAMPLE = ROOT / "deploy" / "config.example.toml"


def contract_example() -> str:
    contract = corpus_path("..", "design", "CONTRACT.md").read_text()
    match = re.search(r"## Example configuration.*?```toml\n(.*?)```", contract, re.S)
    assert match, "CONTRACT.md has no example configuration block"
    return match.group(1)


def write_config(folder: Path, text: str) -> Path:
    for name in ("staff.csv", "community.csv"):
        (folder / name).write_text((ROOT / "deploy" / name).read_text())
    path = folder / "config.toml"
    path.write_text(text)
    return path


class TestExamples:
    """The examples people copy must keep loading."""

    def test_contract_example_loads_unchanged(self, tmp_path: Path) -> None:
        config = load_config(write_config(tmp_path, contract_example()))
        assert config.organisation.official_domains == ["choysez.org.uk"]
        assert config.mail.sources[0].name == "staff-imap"
        assert config.network.rooms[0].subnets == ["10.20.12.0/24"]
        assert config.store.path == tmp_path / "auditd.db"
        assert len(load_directory(config).staff) == 2

    def test_deploy_example_loads(self) -> None:
        config = load_config(EXAMPLE)
        assert config.digest.sender == "choysez-auditd@choysez.org.uk"
        assert config.digest.at.hour == 7

    def test_deploy_example_documents_every_key(self) -> None:
        text = EXAMPLE.read_text()
        missing = [key for key in _all_keys(Config) if not re.search(rf"\b{re.escape(key)}\b", text)]
        assert missing == []


def _all_keys(model: type[BaseModel]) -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        if name == "path" and model is Config:
            continue  # set by the loader, never written
        keys.add(field.alias or name)
        for arg in _models_in(field.annotation):
            keys |= _all_keys(arg)
    return keys


def _models_in(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


class TestMistakes:
    """A mistake is one line naming the file and the key, never a traceback or a silent default."""

    @pytest.mark.parametrize(
        ("change", "expected"),
        [
            (("password_file =", "passwrd_file ="), "key 'mail.sources[0].passwrd_file': unknown key"),
            (('"10.20.12.0/24"', '"10.20.12.0/33"'), "key 'network.rooms[0].subnets': bad subnet"),
            (('"10.20.12.0/24"', '"10.20.12.7/24"'), "host bits set"),
            (('start = "08:50"', 'start = "8.50"'), "key 'timetable.periods[0].start': not a time of day"),
            (("port = 10143", 'port = "imap"'), "key 'mail.sources[0].port'"),
            (('timezone = "Europe/London"', 'timezone = "Europe/Londn"'), "unknown time zone"),
            (('type = "pcap"', 'type = "pcapng"'), "key 'network.sources[0]'"),
            (
                ('host = "127.0.0.1"', 'host = "mail.example.org"'),
                "tls = false is only allowed for a loopback",
            ),
            (('time = "07:00"', 'time = "7am"'), "key 'digest.time'"),
            (('ict_manager = "ict.manager@choysez.org.uk"', 'ict_manager = "ict manager"'), "not an e-mail"),
            (("[organisation]", "[organization]"), "key 'organization': unknown key"),
        ],
    )
    def test_names_the_key(self, tmp_path: Path, change: tuple[str, str], expected: str) -> None:
        text = EXAMPLE.read_text()
        assert change[0] in text
        path = write_config(tmp_path, text.replace(change[0], change[1], 1))
        with pytest.raises(ConfigError) as err:
            load_config(path)
        message = str(err.value)
        assert expected in message
        assert message.startswith(str(path))
        assert "\n" not in message

    def test_toml_syntax_error_names_line(self, tmp_path: Path) -> None:
        path = write_config(tmp_path, "[organisation\nname = 1\n")
        with pytest.raises(ConfigError, match=r"line 1"):
            load_config(path)

    def test_missing_directory_file_names_key(self, tmp_path: Path) -> None:
        text = EXAMPLE.read_text().replace('staff = "staff.csv"', 'staff = "people.csv"')
        config = load_config(write_config(tmp_path, text))
        with pytest.raises(ConfigError, match=r"key 'directory.staff': file not found: .*people.csv"):
            load_directory(config)

    def test_duplicate_source_names(self, tmp_path: Path) -> None:
        text = EXAMPLE.read_text().replace('name = "captures"', 'name = "staff-imap"')
        with pytest.raises(ConfigError, match="source name used twice: staff-imap"):
            load_config(write_config(tmp_path, text))

    def test_period_ending_before_it_starts(self, tmp_path: Path) -> None:
        text = EXAMPLE.read_text().replace('end = "09:50" }', 'end = "08:00" }', 1)
        with pytest.raises(ConfigError, match="ends before it starts"):
            load_config(write_config(tmp_path, text))


class TestLocations:
    """Where config and secrets are looked for."""

    def test_explicit_then_environment_then_default(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CHOYSEZ_AUDITD_CONFIG", "/srv/a.toml")
        assert config_path("/x/y.toml") == Path("/x/y.toml")
        assert config_path(None) == Path("/srv/a.toml")
        monkeypatch.delenv("CHOYSEZ_AUDITD_CONFIG")
        assert config_path(None) == Path("/etc/choysez-auditd/config.toml")

    def test_secret_from_credentials_directory(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        creds = tmp_path / "creds"
        creds.mkdir()
        (creds / "imap-password").write_text("s3cret\n")
        (tmp_path / "imap-password").write_text("wrong")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
        assert read_secret(Path("imap-password"), tmp_path, "password_file") == "s3cret"
        monkeypatch.delenv("CREDENTIALS_DIRECTORY")
        assert read_secret(Path("imap-password"), tmp_path, "password_file") == "wrong"

    def test_missing_secret_is_one_line(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="cannot read secret for password_file"):
            read_secret(Path("nope"), tmp_path, "password_file")
