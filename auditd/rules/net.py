"""NET-STREAMING-IN-CLASS: sustained use of a personal streaming service in a timetabled lesson.

Pure: classified observations, rooms, timetable, thresholds and the time zone in; findings out.
A device's use of one service is joined into sessions (gaps shorter than `gap` join); a session
counts only when it lasts and moves enough bytes, and only for the part inside a lesson.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from auditd.config import Room, Timetable
from auditd.model import Evidence, Finding, JSONValue, NetObservation, Subject
from auditd.policy import RuleSpec
from auditd.rules.mail import fingerprint

RULE = "NET-STREAMING-IN-CLASS"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class RoomIndex:
    """Maps a client address to its room; the most specific subnet wins."""

    nets: tuple[tuple[Network, str], ...]

    @classmethod
    def build(cls, rooms: Iterable[Room]) -> RoomIndex:
        nets = [(n, r.name) for r in rooms for n in r.networks()]
        nets.sort(key=lambda item: item[0].prefixlen, reverse=True)
        return cls(tuple(nets))

    def room_of(self, address: str) -> str | None:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        for net, name in self.nets:
            if ip.version == net.version and ip in net:
                return name
        return None


@dataclass(frozen=True)
class Thresholds:
    gap: timedelta
    min_duration: timedelta
    min_bytes: int


@dataclass
class Session:
    device: str
    service: str
    start: datetime
    end: datetime
    bytes: int = 0
    flows: set[str] = field(default_factory=set)
    names: dict[tuple[str, str], None] = field(default_factory=dict)  # ordered set of (host, via)
    servers: dict[str, None] = field(default_factory=dict)

    @property
    def duration(self) -> timedelta:
        return self.end - self.start


def _span(o: NetObservation) -> tuple[datetime, datetime]:
    return (o.first_seen or o.ts, o.last_seen or o.ts)


def build_sessions(observations: Iterable[NetObservation], gap: timedelta) -> list[Session]:
    """Join each device's use of each service into sessions.

    Only observations with traffic (bytes) open or extend a session: a DNS lookup names a service
    but shows no viewing, so its names join a session that traffic makes, never make one alone.
    """
    by_key: dict[tuple[str, str], list[NetObservation]] = defaultdict(list)
    for o in observations:
        if o.service is not None:
            by_key[(o.client, o.service)].append(o)
    sessions: list[Session] = []
    for (device, service), obs in by_key.items():
        traffic = sorted((o for o in obs if o.bytes is not None), key=_span)
        mine: list[Session] = []
        for o in traffic:
            start, end = _span(o)
            cur = mine[-1] if mine else None
            if cur is None or start > cur.end + gap:
                cur = Session(device, service, start, end)
                mine.append(cur)
            cur.end = max(cur.end, end)
            flow = o.flow or f"{o.via}:{o.server}:{start.isoformat()}"
            if flow not in cur.flows:
                cur.flows.add(flow)
                cur.bytes += o.bytes or 0
            cur.names[(o.host, o.via)] = None
            cur.servers[o.server] = None
        for o in obs:  # names seen without traffic (DNS) join the session they fall in
            if o.bytes is None:
                at = o.ts
                for s in mine:
                    if s.start - gap <= at <= s.end + gap:
                        s.names[(o.host, o.via)] = None
                        break
        sessions.extend(mine)
    sessions.sort(key=lambda s: (s.start, s.device, s.service))
    return sessions


@dataclass(frozen=True)
class Lesson:
    day: date
    period: str
    start: datetime
    end: datetime


def lessons_overlapping(
    start: datetime, end: datetime, timetable: Timetable, tz: ZoneInfo
) -> list[tuple[Lesson, timedelta]]:
    """Timetabled lessons (in the school's time zone, across clock changes) overlapping a span."""
    out: list[tuple[Lesson, timedelta]] = []
    weekdays = timetable.weekday_numbers()
    day = start.astimezone(tz).date()
    last = end.astimezone(tz).date()
    while day <= last:
        in_term = any(t.start <= day <= t.end for t in timetable.terms)
        if in_term and day.weekday() in weekdays:
            for p in timetable.periods:
                p_start = datetime.combine(day, p.start, tz)
                p_end = datetime.combine(day, p.end, tz)
                overlap = min(end, p_end) - max(start, p_start)
                if overlap > timedelta(0):
                    out.append((Lesson(day, p.name, p_start, p_end), overlap))
        day += timedelta(days=1)
    return out


def streaming_in_class(
    observations: Iterable[NetObservation],
    *,
    rooms: RoomIndex,
    timetable: Timetable,
    tz: ZoneInfo,
    thresholds: Thresholds,
    spec: RuleSpec,
    devices: Mapping[str, str] | None = None,
) -> list[Finding]:
    """Findings for sessions that are sustained, in a classroom, during a lesson."""
    in_rooms = [o for o in observations if o.service and rooms.room_of(o.client)]
    findings: list[Finding] = []
    for s in build_sessions(in_rooms, thresholds.gap):
        if s.bytes < thresholds.min_bytes or s.duration < thresholds.min_duration:
            continue
        room = rooms.room_of(s.device)
        assert room is not None  # filtered above
        for lesson, overlap in lessons_overlapping(s.start, s.end, timetable, tz):
            if overlap < max(thresholds.min_duration, timedelta(seconds=1)):
                continue
            findings.append(_finding(s, room, lesson, overlap, spec, devices or {}))
    return findings


def _finding(
    s: Session,
    room: str,
    lesson: Lesson,
    overlap: timedelta,
    spec: RuleSpec,
    devices: Mapping[str, str],
) -> Finding:
    staff = devices.get(s.device)
    reasons = (
        f"{s.service} used for {_minutes(s.duration)} in {room} during {lesson.period}",
        f"{s.bytes / 1e6:.1f} MB in {len(s.flows)} flow{'s' if len(s.flows) != 1 else ''}",
    )
    names: list[JSONValue] = [{"host": h, "via": v} for h, v in s.names]
    servers: list[JSONValue] = [str(x) for x in list(s.servers)[:10]]
    data: dict[str, JSONValue] = {
        "room": room,
        "device": s.device,
        "staff": staff,
        "period": lesson.period,
        "lesson_date": lesson.day.isoformat(),
        "service": s.service,
        "first_seen": s.start.isoformat(),
        "last_seen": s.end.isoformat(),
        "minutes_in_lesson": round(overlap.total_seconds() / 60, 1),
        "bytes": s.bytes,
        "flows": len(s.flows),
        "servers": servers,
        "names": names,
    }
    return Finding(
        rule=RULE,
        clauses=tuple(spec.clauses),
        severity=spec.severity,
        subject=Subject(staff=staff, room=room, device=s.device, service=s.service),
        fingerprint=fingerprint(RULE, room, s.device, s.service, lesson.day.isoformat(), lesson.period),
        first_seen=s.start,
        last_seen=s.end,
        pupil_involved=False,
        evidence=(Evidence(key=f"session:{s.start.isoformat()}", observed_at=s.start, data=data),),
        reasons=reasons,
    )


def _minutes(d: timedelta) -> str:
    m = round(d.total_seconds() / 60)
    return f"{m} minute{'s' if m != 1 else ''}"
