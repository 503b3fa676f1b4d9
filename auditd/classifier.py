"""The streaming classifier: what a name or an address is, and the filters built on it.

Kept apart from `auditd.policy` (which validates the policy files with pydantic) so that reading a
capture or a log needs no validation library: `inspect` on a big file starts in a tenth of the
time. `load_classifier` keeps the tables it built from a validated policy in the user's cache,
keyed by the exact bytes of the policy files, so a later run skips the validation only when the
files are the very ones that were validated.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from auditd import __version__
from auditd.errors import ConfigError
from auditd.model import NetObservation

CACHE_FORMAT = 1
POLICY_FILES = ("rules.toml", "streaming.toml")  # what a classifier is built from


@dataclass(frozen=True, slots=True)
class Classification:
    """What a name is: a service and category, or explicitly not viewing (service None)."""

    service: str | None
    category: str | None
    matched: str
    source: str
    why: str = ""


@dataclass(frozen=True, slots=True)
class Classifier:
    """Matches names on label boundaries; the longest listed name wins.

    `notnetflix.com` never matches `netflix.com`, and `sky.com.example` never matches `sky.com`.
    """

    exact: dict[str, Classification]
    suffix: dict[str, Classification]
    networks: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Classification], ...]

    def classify(self, host: str) -> Classification | None:
        name = host.strip().lower().rstrip(".")
        if not name:
            return None
        hit = self.exact.get(name)
        if hit is not None:
            return hit
        while True:
            hit = self.suffix.get(name)
            if hit is not None:
                return hit
            dot = name.find(".")
            if dot < 0:
                return None
            name = name[dot + 1 :]

    def classify_address(self, address: str) -> Classification | None:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        for net, hit in self.networks:
            if ip.version == net.version and ip in net:
                return hit
        return None

    def to_json(self) -> str:
        return json.dumps(
            {
                "exact": {k: dataclasses.astuple(v) for k, v in self.exact.items()},
                "suffix": {k: dataclasses.astuple(v) for k, v in self.suffix.items()},
                "networks": [[str(net), dataclasses.astuple(hit)] for net, hit in self.networks],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Classifier:
        data = json.loads(text)
        return cls(
            {k: Classification(*v) for k, v in data["exact"].items()},
            {k: Classification(*v) for k, v in data["suffix"].items()},
            tuple((ipaddress.ip_network(n), Classification(*v)) for n, v in data["networks"]),
        )


# ---- loading, with a cache of validated policies --------------------------------------------------


def default_policy_dir() -> Path:
    """The repository's `policies/` when running from a checkout, else the copy in the wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "policies", here / "_policies"):
        if (candidate / "rules.toml").is_file():
            return candidate
    raise ConfigError("no policies folder found; set [policy] dir in the config")


def cache_dir() -> Path | None:
    """`$XDG_CACHE_HOME/choysez-auditd` (or `~/.cache/...`); None when there is no home to use."""
    base = os.environ.get("XDG_CACHE_HOME") or (
        os.path.join(os.environ["HOME"], ".cache") if os.environ.get("HOME") else ""
    )
    return Path(base) / "choysez-auditd" if base else None


def _cache_key(folder: Path, categories: set[str] | None) -> str | None:
    digest = hashlib.sha256(f"{CACHE_FORMAT} {__version__} {sorted(categories or [])!r}".encode())
    digest.update(b"default" if categories is None else b"given")
    here = Path(__file__).with_suffix(".py")
    for code in (here, here.with_name("policy.py")):  # the code that builds it: an edit invalidates
        try:
            digest.update(code.read_bytes())
        except OSError:
            digest.update(str(code).encode())
    for name in POLICY_FILES:
        try:
            digest.update(b"\0" + (folder / name).read_bytes())
        except OSError:
            return None  # let the validating load say what is wrong
    return digest.hexdigest()


def load_classifier(folder: Path | None, categories: set[str] | None = None) -> Classifier:
    """The classifier of the policy in `folder` (the bundled one if None) for `categories` (the
    policy's own if None): from the cache when these exact policy files were validated before, else
    validated now (a bad policy raises ConfigError as `load_policy` does) and cached."""
    folder = folder or default_policy_dir()
    key = _cache_key(folder, categories)
    where = cache_dir()
    cached = where / f"classifier-{key}.json" if where is not None and key is not None else None
    if cached is not None:
        try:
            return Classifier.from_json(cached.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            pass  # absent, unreadable or from another build: validate and write it again
    from auditd.policy import load_policy

    classifier = load_policy(folder).classifier(categories)
    if cached is not None:
        try:
            import tempfile  # here: it costs start-up time, and is needed once per policy

            cached.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=cached.parent, delete=False, suffix=".tmp") as fh:
                fh.write(classifier.to_json())
            os.replace(fh.name, cached)
        except OSError:
            pass  # a read-only home: no cache, just slower start-ups
    return classifier


# ---- applying it ------------------------------------------------------------------------------


def connection(flow: str | None) -> str | None:
    """A capture flow's connection ("tcp client:port server:port"), the same in every file."""
    return flow.rpartition(" ")[0] or None if flow else None


def classify(
    observations: Iterable[NetObservation],
    classifier: Classifier,
    named: dict[str, tuple[str, str]] | None = None,
) -> Iterator[NetObservation]:
    """Fill in service and category from the lists; names the lists do not know stay null.

    A nameless flow (`via="ip"`) is a connection whose name was seen earlier (a capture file
    rotated mid-connection) when `named` maps its connection to (host, via); else it is kept only
    when its server is in a published address range, and then reads as `via="ip-range"`.
    Named flows are added to `named` as they pass.
    """
    lookup = functools.lru_cache(maxsize=1 << 16)(classifier.classify)  # logs repeat names a lot
    table = named if named is not None else {}
    for o in observations:
        conn = connection(o.flow) if named is not None and o.via != "dns" else None
        if conn is not None and o.via == "ip" and conn in table:
            host, via = table[conn]
            o = dataclasses.replace(o, host=host, via=via)
        elif conn is not None and o.via != "ip":
            table[conn] = (o.host, o.via)
        if o.via == "ip":
            by_range = classifier.classify_address(o.server)
            if by_range is not None and by_range.service is not None:
                yield dataclasses.replace(
                    o, host=o.server, via="ip-range", service=by_range.service, category=by_range.category
                )
            continue
        hit = lookup(o.host)
        if hit is not None and hit.service is not None:
            yield dataclasses.replace(o, service=hit.service, category=hit.category)
        else:
            yield o


def matches_only(classifier: Classifier) -> Callable[[str], bool]:
    """A name filter for log readers: True for names a list gives a service, each looked up once."""

    @functools.lru_cache(maxsize=1 << 16)
    def keep(host: str) -> bool:
        hit = classifier.classify(host)
        return hit is not None and hit.service is not None

    return keep
