"""Atomic file output and small readers shared by every stage.

Every artefact the pipeline writes goes through these helpers, so a killed
process never leaves a half-written file behind: data is written to a
temporary file in the destination folder and moved into place with
``os.replace`` (atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = [
    "content_stamp",
    "remove_stale_temps",
    "atomic_path",
    "atomic_dir",
    "write_bytes",
    "write_text",
    "write_json",
    "write_npz",
    "write_png",
    "write_parquet",
    "write_csv",
    "read_json",
]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # mkstemp/mkdtemp create 0600/0700; outputs get the usual 0644/0755


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` on success.

    The temporary file keeps ``path``'s suffix (or ``suffix``) so writers that
    infer a format from the extension (PIL, pandas) still work. On an
    exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=suffix if suffix is not None else path.suffix + ".tmp" + path.suffix,
        dir=path.parent,
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; swap it in for ``path`` on success.

    Used for per-object output folders: either the whole folder appears, or
    nothing does. An existing ``path`` is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return write_bytes(path, buf.getvalue())


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an ``[H, W, C]`` uint8 image (C = 1, 3 or 4) as PNG, atomically."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"write_png expects uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False, compress_level=6)
    return write_bytes(path, buf.getvalue())


def write_parquet(path: str | os.PathLike, frame: "Any") -> Path:
    """Write a pandas DataFrame as parquet, atomically."""
    with atomic_path(path, suffix=".parquet") as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(path)


def write_csv(path: str | os.PathLike, frame: "Any", index: bool = False) -> Path:
    """Write a pandas DataFrame as CSV, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index)
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, "r", encoding="utf-8") as fh:
        return json.load(fh)


def content_stamp(folder: str | os.PathLike, exclude: tuple[str, ...] = ()) -> str:
    """Hash of every file under ``folder`` (relative path and bytes), names in ``exclude`` skipped.

    The reuse key of an output made from a folder of inputs: it changes when any input file's
    content, name or presence changes, not when only its time stamp does (a checkout, a copy).
    """
    import hashlib

    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name in exclude:
            continue
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:24]


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete the temporary files and folders that :func:`atomic_path` / :func:`atomic_dir` leave beside
    their targets when the process is killed (``.<name>.<8 random chars>...``) directly in ``folder``.
    Call it before writing into ``folder`` again; returns how many were removed."""
    import re

    folder = Path(folder)
    if not folder.is_dir():
        return 0
    pat = re.compile(r"^\..+\.[a-z0-9_]{8}(\.tmp|\.old|\..*)$")
    n = 0
    for p in folder.iterdir():
        if pat.match(p.name):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
    return n
