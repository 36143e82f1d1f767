"""The evaluation's report: the HTML gallery (turntable, atlas picture and scores per prompt) and file names
of prompts."""

from __future__ import annotations

import base64
import html
import math
import mimetypes
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence


def slug(text: str, max_len: int = 60) -> str:
    """File-name-safe form of a prompt: ``"a red torus" -> "a-red-torus"``."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].strip("-")
    return s or "prompt"


def gallery_html(items: Sequence[Mapping[str, Any]], summary: Mapping[str, Any] | None = None,
                 title: str = "Gaussian Atlas evaluation", root: str | os.PathLike | None = None) -> str:
    """An HTML page: per prompt its turntable, atlas picture and scores.

    ``items``: ``{"prompt", "turntable" (relative path), "atlas" (relative path or None),
    "scores" ({label: value})}``; ``summary``: shown as a table of key/values on top. With ``root`` (the folder
    the paths are relative to) the pictures are embedded as ``data:`` URIs, so the page is self-contained: MLflow
    shows an HTML artifact in a sandboxed frame where relative paths do not resolve. Without it they are linked.
    """
    e = html.escape

    def src(path: Any) -> str:
        return e(_data_uri(Path(root) / str(path)) if root is not None else str(path))

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
        atlas = f"<img src='{src(it['atlas'])}' alt='atlas channels'>" if it.get("atlas") else ""
        parts.append(f"<div class='c'><b>{e(str(it['prompt']))}</b><br><img src='{src(it['turntable'])}' "
                     f"alt='turntable'>{atlas}<table>{cells}</table></div>")
    parts.append("</div></body></html>\n")
    return "".join(parts)


def _data_uri(path: Path) -> str:
    """``data:<type>;base64,...`` of a picture file."""
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.3f}"
    return "n/a" if v is None else str(v)


def _cls(v: Any) -> str:
    return ("ok" if v else "bad") if isinstance(v, bool) else ""
