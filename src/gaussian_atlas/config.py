"""Config flows one way: a ``params.yaml`` section -> a frozen dataclass.

:func:`from_dict` builds (nested) frozen dataclasses from plain dicts and
refuses unknown keys with a message naming them, so a typo in ``params.yaml``
fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

__all__ = ["from_dict", "to_dict", "flatten"]

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build ``cls`` (a dataclass) from ``data``; nested dataclass fields from nested dicts.

    Raises
    ------
    ValueError
        ``data`` has keys that ``cls`` does not know (the message lists them
        and the known ones).
    """
    data = dict(data or {})
    where = where or cls.__name__
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints.get(name)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}.{name}")
        elif isinstance(value, list):
            value = _tuples(value)
        kwargs[name] = value
    return cls(**kwargs)


def _tuples(value: Any) -> Any:
    """Lists (at any depth) -> tuples, so frozen configs stay hashable."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def to_dict(cfg: Any) -> dict[str, Any]:
    """A (nested) dataclass as a plain dict."""
    return dataclasses.asdict(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (for logging params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
