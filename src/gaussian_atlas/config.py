"""Config flows one way: a ``params.yaml`` section -> a frozen dataclass.

:func:`from_dict` builds (nested) frozen dataclasses from plain dicts and
refuses unknown keys with a message naming them, so a typo in ``params.yaml``
fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

__all__ = ["TELEMETRY_OFF", "from_dict", "missing_keys", "resolve_device", "telemetry_off", "to_dict", "flatten"]

# Usage reporting of every tool the project runs, off unless the environment says otherwise (the stages
# and ``gatlas`` call :func:`telemetry_off` first).
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}

T = TypeVar("T")


def missing_keys(cls: type, data: dict[str, Any] | None, where: str = "") -> list[str]:
    """Fields of ``cls`` (recursively through nested dataclasses) that ``data`` does not set."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f"{where}.{f.name}" if where else f.name
        if f.name not in data:
            out.append(key)
        elif dataclasses.is_dataclass(hints.get(f.name)) and isinstance(data[f.name], dict):
            out += missing_keys(hints[f.name], data[f.name], key)
    return out


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "", complete: bool = False) -> T:
    """Build ``cls`` (a dataclass) from ``data``; nested dataclass fields from nested dicts.

    ``complete=True`` (the stages): every field must be given, so ``params.yaml`` is the one
    source of every setting; a deleted line raises (naming the keys) instead of the class
    default applying silently.

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
    if complete:  # after the unknown keys (a typo) have been reported, at every level
        absent = missing_keys(cls, data)
        if absent:
            raise ValueError(f"{where}: missing key(s) {absent}: params.yaml must set every setting "
                             f"(a class default would apply silently)")
    return cls(**kwargs)


def _tuples(value: Any) -> Any:
    """Lists (at any depth) -> tuples, so frozen configs stay hashable."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def telemetry_off(extra: dict[str, str] | None = None) -> None:
    """Set :data:`TELEMETRY_OFF` (and ``extra``) in ``os.environ`` where the environment does not set them."""
    import os

    for k, v in {**TELEMETRY_OFF, **(extra or {})}.items():
        os.environ.setdefault(k, v)


def resolve_device(device: str = "auto") -> str:
    """The one reading of a ``device`` setting: ``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``;
    any other name as it is."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
