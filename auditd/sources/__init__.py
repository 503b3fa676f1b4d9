"""Sources: where events come from. Each reads one kind of input and yields model objects."""

from __future__ import annotations

from pathlib import Path

from auditd.errors import InputError


def detect(path: Path) -> str:
    """What kind of input a path is: maildir, mbox, eml, capture or `log:KIND` (see netlogs.LOG_KINDS).

    Decided by content (magic bytes, a Maildir's folders), not by the file name alone.
    """
    from auditd.sources.netlogs import detect_log  # imported here, each when needed: start-up time
    from auditd.sources.pcap import is_capture

    if not path.exists():
        raise InputError("no such file or folder", where=str(path))
    if path.is_dir():
        from auditd.sources.mailfile import is_maildir

        if is_maildir(path):
            return "maildir"
        raise InputError("a folder that is not a Maildir (no cur/ or new/)", where=str(path))
    if is_capture(path):
        return "capture"
    log = detect_log(path)
    if log is not None:
        return f"log:{log}"
    from auditd.sources.mailfile import is_mbox

    if is_mbox(path):
        return "mbox"
    if _looks_like_message(path):
        return "eml"
    raise InputError(
        "not a recognised input (mail message, mbox, Maildir, pcap, pcapng or network log)", where=str(path)
    )


def _looks_like_message(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", where=str(path)) from None
    if b"\0" in head:
        return False
    first = head.split(b"\n", 1)[0]
    name, colon, _ = first.partition(b":")
    return (
        bool(colon)
        and bool(name)
        and b" " not in name.strip()
        and path.suffix.lower() in (".eml", ".msg", "")
    )
