"""The evaluation's report: the HTML gallery (turntable, atlas picture and scores per prompt) and file names
of prompts."""

from __future__ import annotations

import html
import math
import re
from typing import Any, Mapping, Sequence


def slug(text: str, max_len: int = 60) -> str:
    """File-name-safe form of a prompt: ``"a red torus" -> "a-red-torus"``."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].strip("-")
    return s or "prompt"


def gallery_html(items: Sequence[Mapping[str, Any]], summary: Mapping[str, Any] | None = None,
                 title: str = "Gaussian Atlas evaluation") -> str:
    """A self-contained HTML page: per prompt its turntable, atlas picture and scores.

    ``items``: ``{"prompt", "turntable" (relative path), "atlas" (relative path or None),
    "scores" ({label: value})}``; ``summary``: shown as a table of key/values on top.
    """
    e = html.escape
    head = ("<!doctype html><html><head><meta charset='utf-8'><title>" + e(title) + "</title><style>"
            "body{font-family:sans-serif;margin:1em} .g{display:flex;flex-wrap:wrap;gap:12px}"
            ".c{border:1px solid #ccc;padding:8px;width:300px} .c img{max-width:100%;image-rendering:pixelated}"
            "table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #ddd;padding:2px 6px}"
            ".ok{color:#080}.bad{color:#b00}</style></head><body><h1>" + e(title) + "</h1>")
    parts = [head]
    if summary:
        parts.append("<table>" + "".join(f"<tr><th>{e(str(k))}</th><td>{e(_fmt(v))}</td></tr>"
                                         for k, v in summary.items()) + "</table>")
    parts.append("<div class='g'>")
    for it in items:
        cells = "".join(f"<tr><th>{e(str(k))}</th><td class='{_cls(v)}'>{e(_fmt(v))}</td></tr>"
                        for k, v in (it.get("scores") or {}).items())
        atlas = f"<img src='{e(str(it['atlas']))}' alt='atlas channels'>" if it.get("atlas") else ""
        parts.append(f"<div class='c'><b>{e(str(it['prompt']))}</b><br><img src='{e(str(it['turntable']))}' "
                     f"alt='turntable'>{atlas}<table>{cells}</table></div>")
    parts.append("</div></body></html>\n")
    return "".join(parts)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.3f}"
    return "n/a" if v is None else str(v)


def _cls(v: Any) -> str:
    return ("ok" if v else "bad") if isinstance(v, bool) else ""
