"""Settings of a benchmark arm as dotted overrides of a config dataclass (``--variants`` of bench_fit,
``--fit-set`` of bench_data_e2e): ``"densify.refine_every=50,lr_means=5.6e-4"``."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def parse_overrides(text: str) -> dict[str, Any]:
    """``"densify.refine_every=50,lr_means=5.6e-4"`` -> ``{"densify.refine_every": 50, "lr_means": 0.00056}``
    (values read as YAML scalars: numbers, booleans, null, else strings; ``1e-5``, which YAML 1.1 leaves a string
    for want of a dot, is read as the number it is). Raises ``ValueError`` on an item without ``=``."""
    import yaml

    out: dict[str, Any] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r}: expected key=value (dotted keys for nested settings)")
        v = yaml.safe_load(value.strip())
        if isinstance(v, str):
            try:
                v = float(v) if v.strip().lower() not in ("nan", "inf", "-inf", "infinity", "-infinity") else v
            except ValueError:
                pass
        out[key.strip()] = v
    return out


def with_overrides(cfg: T, overrides: dict[str, Any], where: str = "") -> T:
    """``cfg`` (a frozen, possibly nested dataclass) with dotted keys replaced: ``{"densify.refine_every": 50}``.

    Raises ``ValueError`` naming an unknown key and the known ones (a typo must not be ignored)."""
    where = where or type(cfg).__name__
    flat: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        head, dot, rest = key.partition(".")
        if dot:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[head] = value
    names = {f.name for f in dataclasses.fields(cfg)}  # type: ignore[arg-type]
    unknown = sorted((set(flat) | set(nested)) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    for head, sub in nested.items():
        inner = getattr(cfg, head)
        if not dataclasses.is_dataclass(inner):
            raise ValueError(f"{where}.{head} is not a section: set it as {head}=value")
        flat[head] = with_overrides(inner, sub, f"{where}.{head}")
    return dataclasses.replace(cfg, **flat)  # type: ignore[type-var]
