"""Load a TOML file into a validated pydantic model, with one-line errors naming file and key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from auditd.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base for every config and policy model: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def dotted(loc: tuple[int | str, ...], data: Any = None) -> str:
    """Render a pydantic error location as the key path the user wrote: `mail.sources[0].port`.

    Parts that are not in the data (the tag of a tagged union, validator names) are left out.
    """
    out = ""
    node = data
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        if isinstance(node, dict) and part not in node and i < len(loc) - 1:
            continue  # a union tag such as 'imap': not a key the user wrote
        out += f".{part}" if out else part
        node = node.get(part) if isinstance(node, dict) else None
    return out


def describe(err: ValidationError, data: Any = None) -> str:
    """One line for the first error: the key and what is wrong with it."""
    # An unknown key is usually the cause of a "missing" one (a misspelling): name it first.
    first = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    key = dotted(tuple(first["loc"]), data)
    kind = first["type"]
    if kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "missing":
        msg = "required key is missing"
    else:
        msg = first["msg"].removeprefix("Value error, ")
        given = first.get("input")
        shown = repr(given)
        if not isinstance(given, dict | list | type(None)) and len(shown) <= 60 and shown not in msg:
            msg += f" (got {shown})"
    more = len(err.errors()) - 1
    suffix = f" (+{more} more error{'s' if more > 1 else ''})" if more else ""
    return f"key '{key}': {msg}{suffix}" if key else f"{msg}{suffix}"


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("file not found", where=str(path)) from None
    except IsADirectoryError:
        raise ConfigError("is a folder, not a file", where=str(path)) from None
    except PermissionError:
        raise ConfigError("permission denied", where=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", where=str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("not valid UTF-8 text", where=str(path)) from None


def validate(model: type[M], data: Any, where: str, context: dict[str, Any] | None = None) -> M:
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(describe(exc, data), where=where) from None


def load_toml(path: Path, model: type[M], context: dict[str, Any] | None = None) -> M:
    return validate(model, read_toml(path), str(path), context)
