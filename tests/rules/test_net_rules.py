"""NET-STREAMING-IN-CLASS: sustained use, in a classroom, in a timetabled lesson, and nothing else."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from auditd.config import Room, Timetable
from auditd.model import Finding, NetObservation
from auditd.policy import RulesFile, default_policy_dir
from auditd.rules.net import (
    RULE,
    RoomIndex,
    Thresholds,
    build_sessions,
    lessons_overlapping,
    streaming_in_class,
)
from auditd.tomlmodel import load_toml

LONDON = ZoneInfo("Europe/London")
TIMETABLE = Timetable.model_validate(
    {
        "weekdays": ["mon", "tue", "wed", "thu", "fri"],
        "periods": [
            {"name": "P1", "start": "08:50", "end": "09:50"},
            {"name": "P2", "start": "09:50", "end": "10:50"},
        ],
        "terms": [{"start": "2026-09-03", "end": "2026-12-18"}, {"start": "2027-02-22", "end": "2027-04-01"}],
    }
)
ROOMS = RoomIndex.build(
    [
        Room(name="Room 12", subnets=["10.20.12.0/24", "2001:db8:12::/64"]),
        Room(name="Lab", subnets=["10.20.0.0/16"]),
    ]
)
DEFAULT = Thresholds(gap=timedelta(minutes=5), min_duration=timedelta(minutes=3), min_bytes=2_000_000)
SPEC = next(r for r in load_toml(default_policy_dir() / "rules.toml", RulesFile).rules if r.id == RULE)


def at(text: str) -> datetime:
    """A UTC instant from 'YYYY-MM-DD HH:MM[:SS]'."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def flow(
    start: str,
    minutes: float,
    mb: float,
    *,
    client: str = "10.20.12.34",
    service: str = "Netflix",
    n: int = 0,
) -> NetObservation:
    first = at(start)
    return NetObservation(
        source="t",
        ts=first,
        client=client,
        server="198.51.100.7",
        host="ipv4-c001.1.oca.nflxvideo.net",
        via="tls-sni",
        bytes=int(mb * 1e6),
        first_seen=first,
        last_seen=first + timedelta(minutes=minutes),
        flow=f"f{n}-{start}-{client}",
        service=service,
        category="streaming",
    )


def dns(when: str, *, client: str = "10.20.12.34", service: str = "Netflix") -> NetObservation:
    return NetObservation("t", at(when), client, "10.20.0.53", "www.netflix.com", "dns", service=service)


def findings(
    obs: list[NetObservation], thresholds: Thresholds = DEFAULT, devices: dict[str, str] | None = None
) -> list[Finding]:
    return streaming_in_class(
        obs, rooms=ROOMS, timetable=TIMETABLE, tz=LONDON, thresholds=thresholds, spec=SPEC, devices=devices
    )


class TestSessions:
    """A device's use of one service is joined into sessions; gaps under the limit join."""

    def test_flows_with_short_gaps_join(self) -> None:
        sessions = build_sessions(
            [flow("2026-11-23 09:00", 4, 1, n=1), flow("2026-11-23 09:07", 4, 1, n=2)], timedelta(minutes=5)
        )
        assert len(sessions) == 1
        assert sessions[0].duration == timedelta(minutes=11)
        assert sessions[0].bytes == 2_000_000

    def test_long_gap_splits(self) -> None:
        sessions = build_sessions(
            [flow("2026-11-23 09:00", 4, 1, n=1), flow("2026-11-23 09:20", 4, 1, n=2)], timedelta(minutes=5)
        )
        assert len(sessions) == 2

    def test_names_of_one_flow_count_its_bytes_once(self) -> None:
        a = flow("2026-11-23 09:00", 10, 3, n=1)
        b = dataclasses.replace(a, host="www.netflix.com", via="http-host")
        (session,) = build_sessions([a, b], timedelta(minutes=5))
        assert session.bytes == 3_000_000
        assert set(session.names) == {(a.host, "tls-sni"), ("www.netflix.com", "http-host")}

    def test_dns_alone_makes_no_session(self) -> None:
        assert build_sessions([dns("2026-11-23 09:00"), dns("2026-11-23 09:02")], timedelta(minutes=5)) == []

    def test_dns_names_join_the_session_they_fall_in(self) -> None:
        (session,) = build_sessions(
            [dns("2026-11-23 08:59"), flow("2026-11-23 09:00", 5, 3)], timedelta(minutes=5)
        )
        assert ("www.netflix.com", "dns") in session.names

    def test_services_and_devices_are_separate(self) -> None:
        obs = [
            flow("2026-11-23 09:00", 5, 3, n=1),
            flow("2026-11-23 09:00", 5, 3, service="Spotify", n=2),
            flow("2026-11-23 09:00", 5, 3, client="10.20.12.35", n=3),
        ]
        assert len(build_sessions(obs, timedelta(minutes=5))) == 3


class TestSustained:
    """Only sustained use is reported: a lookup, a prefetch or a thumbnail is not viewing."""

    def test_sustained_session_in_lesson_is_reported(self) -> None:
        (f,) = findings([flow("2026-11-23 09:05", 20, 4)])
        assert f.rule == RULE
        assert f.clauses == ("SMP-1.10",)
        assert f.subject.room == "Room 12"
        assert f.subject.device == "10.20.12.34"
        assert f.subject.service == "Netflix"
        data = f.evidence[0].data
        assert data["period"] == "P1"
        assert data["lesson_date"] == "2026-11-23"
        assert data["bytes"] == 4_000_000

    def test_too_short_is_not_reported(self) -> None:
        assert findings([flow("2026-11-23 09:05", 2, 40)]) == []

    def test_too_few_bytes_is_not_reported(self) -> None:
        assert findings([flow("2026-11-23 09:05", 30, 0.5)]) == []

    def test_thresholds_are_configurable(self) -> None:
        loose = Thresholds(gap=timedelta(minutes=5), min_duration=timedelta(minutes=1), min_bytes=100_000)
        assert len(findings([flow("2026-11-23 09:05", 2, 0.5)], loose)) == 1

    def test_unclassified_traffic_is_ignored(self) -> None:
        assert findings([dataclasses.replace(flow("2026-11-23 09:05", 20, 4), service=None)]) == []


class TestWhereAndWhen:
    """Classrooms by subnet, lessons by timetable and term, in the school's time zone."""

    def test_outside_any_room_is_ignored(self) -> None:
        assert findings([flow("2026-11-23 09:05", 20, 4, client="192.168.1.5")]) == []

    def test_most_specific_subnet_wins(self) -> None:
        assert ROOMS.room_of("10.20.12.9") == "Room 12"
        assert ROOMS.room_of("10.20.99.9") == "Lab"
        assert ROOMS.room_of("2001:db8:12::5") == "Room 12"
        assert ROOMS.room_of("not-an-ip") is None

    def test_ipv6_client_in_room(self) -> None:
        assert len(findings([flow("2026-11-23 09:05", 20, 4, client="2001:db8:12::5")])) == 1

    def test_break_time_is_not_a_lesson(self) -> None:
        assert findings([flow("2026-11-23 12:30", 30, 9)]) == []

    def test_weekend_and_holidays_are_not_lessons(self) -> None:
        assert findings([flow("2026-11-21 09:05", 30, 9)]) == []  # Saturday
        assert findings([flow("2026-12-21 09:05", 30, 9)]) == []  # Christmas holidays

    def test_session_across_two_periods_reports_each(self) -> None:
        result = findings([flow("2026-11-23 09:30", 40, 9)])
        assert sorted(f.evidence[0].data["period"] for f in result) == ["P1", "P2"]  # type: ignore[type-var]

    def test_a_few_seconds_into_a_lesson_is_not_enough(self) -> None:
        # 08:20-08:51: sustained, but only one minute inside P1.
        assert findings([flow("2026-11-23 08:20", 31, 9)]) == []

    @pytest.mark.parametrize(
        ("utc", "expected"),
        [
            ("2027-03-26 09:00", "P1"),  # Friday before the clock change: GMT, P1 is 08:50-09:50 UTC
            ("2027-03-29 08:00", "P1"),  # Monday after: BST, P1 is 07:50-08:50 UTC
            ("2027-03-29 09:00", "P2"),
        ],
    )
    def test_lessons_follow_clock_changes(self, utc: str, expected: str) -> None:
        start = at(utc)
        (hit,) = [
            lesson
            for lesson, _ in lessons_overlapping(start, start + timedelta(minutes=10), TIMETABLE, LONDON)
        ]
        assert hit.period == expected

    def test_device_map_names_staff(self) -> None:
        (f,) = findings(
            [flow("2026-11-23 09:05", 20, 4)], devices={"10.20.12.34": "jane.smith@choysez.org.uk"}
        )
        assert f.subject.staff == "jane.smith@choysez.org.uk"


class TestFingerprint:
    """The same use seen twice is the same finding; another day or period is another."""

    def test_same_input_same_fingerprint(self) -> None:
        (a,) = findings([flow("2026-11-23 09:05", 20, 4)])
        (b,) = findings([flow("2026-11-23 09:05", 20, 4)])
        assert a.fingerprint == b.fingerprint

    def test_other_day_other_fingerprint(self) -> None:
        (a,) = findings([flow("2026-11-23 09:05", 20, 4)])
        (b,) = findings([flow("2026-11-24 09:05", 20, 4)])
        assert a.fingerprint != b.fingerprint
