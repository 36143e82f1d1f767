"""Render datasets: discovery, per-object facts, and the internal layout.

Two input layouts are read, and both are normalised to one internal layout.

NeRF-synthetic (``layout="nerf"``)
    ``<root>/.../<id>/transforms.json`` (or ``transforms_{train,val,test}.json``,
    merged). ``frames[i].file_path`` is relative to the object folder, with or
    without the ``.png`` extension; ``transform_matrix`` is camera-to-world in
    the OpenGL camera convention (looks down -Z, +Y up). Intrinsics are
    ``fl_x, fl_y, cx, cy, w, h`` when given, else derived from
    ``camera_angle_x`` (and ``camera_angle_y``) and the image size.
G-Objaverse (``layout="gobjaverse"``)
    ``<root>/.../<id>/campos_512_v4/<view>/<view>.png`` + ``<view>.json`` with
    the camera axes ``x, y, z`` and position ``origin`` (camera-to-world columns,
    OpenCV camera convention: looks down +Z, +Y down) and ``x_fov, y_fov`` in
    radians. On reading, the y and z axes are negated to get the OpenGL
    convention.

Both use a Z-up world (Blender). The internal layout written by :func:`ingest`
is the NeRF-synthetic one, sharded::

    <out>/objects/<shard>/<id>/transforms.json   # OpenGL c2w + per-frame intrinsics
    <out>/objects/<shard>/<id>/images/<view>.png # RGBA, straight alpha
    <out>/objects/<shard>/<id>/surface_samples.npz   (when the source had them)
    <out>/manifest.parquet                        # one row per accepted object
    <out>/quarantine.csv                          # id, source, reason

Captions come from a jsonl (``{"id": ..., "caption": ...}`` per line) or a csv
with the columns ``id, caption``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from . import io as gio
from .cameras import rotation_orthonormality_error

__all__ = [
    "DatasetError",
    "IngestConfig",
    "ObjectSource",
    "CameraView",
    "discover_objects",
    "read_captions",
    "read_object_views",
    "object_facts",
    "ingest",
    "load_manifest",
    "load_object",
]

LAYOUTS = ("auto", "nerf", "gobjaverse")
GOBJ_DIR = "campos_512_v4"


class DatasetError(ValueError):
    """A dataset-level problem (wrong path, nothing to read): one line, no traceback needed."""


@dataclass(frozen=True)
class IngestConfig:
    """Parameters of the ``ingest`` stage (``params.yaml: ingest``).

    Attributes
    ----------
    source : folder with the render dataset (any depth of sub-folders).
    captions : caption file (jsonl or csv); ``None`` uses ``captions`` from
        each object's ``object.json`` when present.
    layout : ``"auto"``, ``"nerf"`` or ``"gobjaverse"``.
    min_views : fewest readable views an object may have.
    alpha_coverage_min, alpha_coverage_max : allowed range of the mean
        fraction of opaque pixels (alpha > 0.5) over the views; an object that
        fills the whole frame has no usable background, an empty one has no object.
    rotation_tol : max ``|R^T R - I| + |det R - 1|`` of a camera rotation.
    max_quarantine_fraction : the stage fails when more than this fraction of
        the objects found is quarantined.
    shard_size : objects per shard folder of the internal layout.
    link : ``"hardlink"`` (fall back to copy across filesystems) or ``"copy"``.
    workers : threads reading objects.
    """

    source: str = "data/procedural"
    captions: str | None = "data/procedural/captions.jsonl"
    layout: str = "auto"
    min_views: int = 8
    alpha_coverage_min: float = 0.002
    alpha_coverage_max: float = 0.95
    rotation_tol: float = 1e-3
    max_quarantine_fraction: float = 0.2
    shard_size: int = 1000
    link: str = "hardlink"
    workers: int = 4

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"ingest.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.link not in ("hardlink", "copy"):
            raise ValueError(f"ingest.link must be 'hardlink' or 'copy', got {self.link!r}")
        if self.shard_size < 1:
            raise ValueError("ingest.shard_size must be >= 1")


@dataclass(frozen=True)
class ObjectSource:
    """One object found in a source dataset."""

    id: str
    layout: str  # "nerf" | "gobjaverse"
    path: str  # the object folder (for gobjaverse: the campos_512_v4 folder)


@dataclass
class CameraView:
    """One view of an object, in the internal (OpenGL c2w, pixel intrinsics) convention."""

    name: str  # view stem, e.g. "r_000" or "00012"
    image_path: str
    c2w: np.ndarray  # [4, 4] float64
    fl_x: float
    fl_y: float
    cx: float | None = None  # None: image centre (filled once the size is known)
    cy: float | None = None
    w: int | None = None
    h: int | None = None


# --------------------------------------------------------------------------- discovery


def discover_objects(root: str | os.PathLike, layout: str = "auto") -> list[ObjectSource]:
    """Find every object folder under ``root``, in sorted path order.

    Raises
    ------
    DatasetError
        ``root`` does not exist or holds no object of the requested layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset path does not exist: {root}")
    if not root.is_dir():
        raise DatasetError(f"dataset path is not a folder: {root}")
    found: list[ObjectSource] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        d = Path(dirpath)
        if layout in ("auto", "gobjaverse") and d.name == GOBJ_DIR:
            found.append(ObjectSource(id=d.parent.name, layout="gobjaverse", path=str(d)))
            dirnames[:] = []  # views live below; nothing else to find
            continue
        if layout in ("auto", "nerf") and any(
            f == "transforms.json" or (f.startswith("transforms_") and f.endswith(".json")) for f in filenames
        ):
            found.append(ObjectSource(id=d.name, layout="nerf", path=str(d)))
            dirnames[:] = [n for n in dirnames if n != "images"]
    if not found:
        what = {"auto": "transforms*.json or */campos_512_v4", "nerf": "transforms*.json",
                "gobjaverse": "*/campos_512_v4"}[layout]
        raise DatasetError(f"no objects found under {root} (looked for {what})")
    return found


def read_captions(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, str]]:
    """Read a jsonl or csv caption file.

    Returns
    -------
    captions : id -> caption (the first one when an id repeats with the same text)
    conflicts : id -> reason, for ids listed twice with different captions
        or rows that cannot be parsed (keyed by ``"<line N>"`` then).
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"caption file does not exist: {path}")
    rows: list[tuple[str, Any]] = []
    bad: dict[str, str] = {}
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    rows.append((str(rec["id"]), rec.get("caption")))
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    bad[f"<line {n}>"] = f"{path.name} line {n}: not a {{id, caption}} record ({exc})"
    elif path.suffix.lower() in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            if reader.fieldnames is None or not {"id", "caption"} <= set(reader.fieldnames):
                raise DatasetError(f"caption file {path} needs the columns id, caption; has {reader.fieldnames}")
            for rec in reader:
                rows.append((str(rec["id"]), rec.get("caption")))
    else:
        raise DatasetError(f"caption file {path}: unknown format {path.suffix!r} (use .jsonl or .csv)")
    captions: dict[str, str] = {}
    for id_, cap in rows:
        cap = "" if cap is None else str(cap).strip()
        if id_ in captions and captions[id_] != cap:
            bad[id_] = f"two different captions for this id in {path.name}: {captions[id_]!r} and {cap!r}"
            continue
        captions.setdefault(id_, cap)
    return captions, bad


# --------------------------------------------------------------------------- reading one object


def _nerf_views(obj_dir: Path) -> list[CameraView]:
    files = [obj_dir / "transforms.json"] if (obj_dir / "transforms.json").exists() else sorted(
        obj_dir.glob("transforms_*.json")
    )
    views: list[CameraView] = []
    for f in files:
        meta = gio.read_json(f)
        frames = meta.get("frames")
        if not isinstance(frames, list):
            raise ValueError(f"{f.name}: no 'frames' list")
        for i, fr in enumerate(frames):
            rel = fr.get("file_path")
            if not rel:
                raise ValueError(f"{f.name}: frame {i} has no file_path")
            img = (obj_dir / rel).resolve() if Path(rel).suffix else (obj_dir / (rel + ".png")).resolve()
            c2w = np.asarray(fr.get("transform_matrix"), dtype=np.float64)
            if c2w.shape == (3, 4):
                c2w = np.vstack([c2w, [0, 0, 0, 1]])
            if c2w.shape != (4, 4):
                raise ValueError(f"{f.name}: frame {i} transform_matrix has shape {c2w.shape}, expected 4x4")
            get = lambda k: fr.get(k, meta.get(k))  # noqa: E731  per-frame overrides the shared value
            w, h = get("w"), get("h")
            fl_x, fl_y = get("fl_x"), get("fl_y")
            if fl_x is None:
                ax = get("camera_angle_x")
                if ax is None:
                    raise ValueError(f"{f.name}: frame {i} has neither fl_x nor camera_angle_x")
                fl_x = ("angle", float(ax))
            if fl_y is None:
                ay = get("camera_angle_y")
                fl_y = ("angle", float(ay)) if ay is not None else ("same", None)
            views.append(CameraView(name=img.stem, image_path=str(img), c2w=c2w, fl_x=fl_x, fl_y=fl_y,
                                    cx=get("cx"), cy=get("cy"), w=w, h=h))
    return views


def _gobjaverse_views(campos_dir: Path) -> list[CameraView]:
    views: list[CameraView] = []
    for vdir in sorted(p for p in campos_dir.iterdir() if p.is_dir()):
        stem = vdir.name
        jpath, ipath = vdir / f"{stem}.json", vdir / f"{stem}.png"
        if not jpath.exists():
            raise ValueError(f"view {stem}: camera file {jpath.name} is missing")
        meta = gio.read_json(jpath)
        try:
            c2w = np.eye(4)
            for col, key in enumerate(("x", "y", "z", "origin")):
                c2w[:3, col] = np.asarray(meta[key], dtype=np.float64)
        except KeyError as exc:
            raise ValueError(f"view {stem}: camera json lacks {exc}") from None
        c2w[:3, 1:3] *= -1.0  # OpenCV (y down, z forward) -> OpenGL (y up, looks down -z)
        fx = ("angle", float(meta["x_fov"])) if "x_fov" in meta else ("angle", 0.6911112070083618)
        fy = ("angle", float(meta["y_fov"])) if "y_fov" in meta else ("same", None)
        views.append(CameraView(name=stem, image_path=str(ipath), c2w=c2w, fl_x=fx, fl_y=fy))
    return views


def read_object_views(src: ObjectSource) -> list[CameraView]:
    """Cameras of one object (images not opened yet). Raises ``ValueError`` with a reason."""
    path = Path(src.path)
    try:
        return _nerf_views(path) if src.layout == "nerf" else _gobjaverse_views(path)
    except json.JSONDecodeError as exc:
        raise ValueError(f"camera file is not valid JSON ({exc})") from None


def _finish_intrinsics(v: CameraView, w: int, h: int) -> None:
    """Turn FOV placeholders into pixel focal lengths once the image size is known."""
    v.w = int(v.w) if v.w is not None else w
    v.h = int(v.h) if v.h is not None else h
    if isinstance(v.fl_x, tuple):
        v.fl_x = 0.5 * w / math.tan(0.5 * v.fl_x[1])
    if isinstance(v.fl_y, tuple):
        v.fl_y = v.fl_x if v.fl_y[0] == "same" else 0.5 * h / math.tan(0.5 * v.fl_y[1])
    v.fl_x, v.fl_y = float(v.fl_x), float(v.fl_y)
    v.cx = float(v.cx) if v.cx is not None else w / 2.0
    v.cy = float(v.cy) if v.cy is not None else h / 2.0


def object_facts(src: ObjectSource, captions: dict[str, str] | None) -> tuple[dict[str, Any], list[CameraView]]:
    """Read one object fully (decode every image) and return its facts row and views.

    Problems that stop reading (a missing file, an undecodable PNG, a broken
    camera file) are recorded in ``read_error``; everything else is measured
    and judged by the validation suite (:mod:`gaussian_atlas.checks`).
    """
    from PIL import Image

    facts: dict[str, Any] = {
        "id": src.id, "layout": src.layout, "source_path": src.path, "n_views": 0, "width": 0, "height": 0,
        "n_image_sizes": 0, "poses_finite": True, "max_rotation_error": 0.0, "alpha_coverage": float("nan"),
        "alpha_coverage_min_view": float("nan"), "has_alpha": True, "fov_x_deg": float("nan"),
        "caption": None, "read_error": None, "has_surface_samples": False, "split": "train",
    }
    meta_caption = None
    obj_json = Path(src.path) / "object.json"
    if src.layout == "nerf" and obj_json.exists():
        try:
            meta = gio.read_json(obj_json)
            meta_caption = meta.get("caption")
            # "train", or "ceiling": rendered for a held-out prompt, fit and scored but never trained on
            facts["split"] = str(meta.get("split") or "train")
        except (OSError, json.JSONDecodeError, AttributeError):
            meta_caption = None
    facts["caption"] = (captions or {}).get(src.id, meta_caption if captions is None else None)
    facts["has_surface_samples"] = (Path(src.path) / "surface_samples.npz").exists()
    try:
        views = read_object_views(src)
    except (OSError, ValueError) as exc:
        facts["read_error"] = f"cameras: {exc}"
        return facts, []
    facts["n_views"] = len(views)
    sizes: set[tuple[int, int]] = set()
    coverages: list[float] = []
    for v in views:
        name = Path(v.image_path).name
        if not os.path.exists(v.image_path):
            facts["read_error"] = f"view {v.name}: image file {name} is missing"
            return facts, views
        try:
            with Image.open(v.image_path) as im:
                im.load()  # decode fully: a truncated or corrupt PNG fails here
                mode, size = im.mode, im.size
                alpha = np.asarray(im.getchannel("A")) if "A" in im.getbands() else None
        except Exception as exc:  # PIL raises many types for corrupt data
            facts["read_error"] = f"view {v.name}: cannot decode image {name} ({type(exc).__name__}: {exc})"
            return facts, views
        sizes.add(size)
        if alpha is None:
            facts["has_alpha"] = False
            coverages.append(1.0)
        else:
            coverages.append(float((alpha > 127).mean()))
        _finish_intrinsics(v, *size)
        if not np.isfinite(v.c2w).all():
            facts["poses_finite"] = False
        else:
            facts["max_rotation_error"] = max(facts["max_rotation_error"], rotation_orthonormality_error(v.c2w[:3, :3]))
            if not np.allclose(v.c2w[3], [0, 0, 0, 1], atol=1e-6):
                facts["max_rotation_error"] = max(facts["max_rotation_error"], float(np.abs(v.c2w[3] - [0, 0, 0, 1]).max()))
    if sizes:
        (w, h), *_ = sorted(sizes)
        facts.update(width=w, height=h, n_image_sizes=len(sizes))
        facts["alpha_coverage"] = float(np.mean(coverages))
        facts["alpha_coverage_min_view"] = float(np.min(coverages))
        facts["fov_x_deg"] = float(np.degrees(2 * math.atan(0.5 * views[0].w / views[0].fl_x)))
    return facts, views


# --------------------------------------------------------------------------- writing the internal layout


def _link_or_copy(src: str, dst: Path, mode: str) -> None:
    if mode == "hardlink":
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def _shard_name(index: int, shard_size: int) -> str:
    return f"shard-{index // shard_size:05d}"


def _write_object(dst: Path, src: ObjectSource, views: list[CameraView], facts: dict[str, Any], link: str) -> None:
    with gio.atomic_dir(dst) as tmp:
        (tmp / "images").mkdir()
        frames = []
        for v in views:
            fname = f"{v.name}.png"
            _link_or_copy(v.image_path, tmp / "images" / fname, link)
            frames.append({"file_path": f"images/{fname}", "transform_matrix": v.c2w.tolist(),
                           "fl_x": v.fl_x, "fl_y": v.fl_y, "cx": v.cx, "cy": v.cy, "w": v.w, "h": v.h})
        gio.write_json(tmp / "transforms.json", {
            "convention": "c2w OpenGL camera (looks down -Z, +Y up), Z-up world",
            "camera_angle_x": 2 * math.atan(0.5 * views[0].w / views[0].fl_x),
            "frames": frames,
        })
        samples = Path(src.path) / "surface_samples.npz"
        if samples.exists():
            _link_or_copy(str(samples), tmp / "surface_samples.npz", link)
        gio.write_json(tmp / "object.json", {"id": src.id, "caption": facts["caption"], "source": src.path,
                                              "layout": src.layout, "source_stamp": facts.get("source_stamp")})


def ingest(cfg: IngestConfig, out_dir: str | os.PathLike, docs_dir: str | os.PathLike | None = None,
           progress: bool = True) -> dict[str, Any]:
    """Validate a render dataset and write the internal layout, manifest and quarantine list.

    Every object is read (all images decoded) and described by a row of facts;
    the great-expectations suite of :mod:`gaussian_atlas.checks` judges the
    rows; objects that fail any expectation are quarantined with the reason,
    the rest are written to ``out_dir/objects/<shard>/<id>/``.

    Returns a summary dict (counts, quarantined fraction, seconds, paths). The
    caller decides whether ``quarantined_fraction > cfg.max_quarantine_fraction``
    fails the stage; :func:`ingest` itself always writes what it could.
    """
    from tqdm.auto import tqdm

    from .checks import validate_ingest_facts

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    sources = discover_objects(cfg.source, cfg.layout)
    captions: dict[str, str] | None = None
    caption_problems: dict[str, str] = {}
    if cfg.captions:
        captions, caption_problems = read_captions(cfg.captions)

    with ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        results = list(tqdm(pool.map(lambda s: object_facts(s, captions), sources), total=len(sources),
                            desc="ingest: reading objects", disable=not progress, unit="obj"))
    rows = []
    seen: dict[str, str] = {}
    for (facts, _), src in zip(results, sources):
        # Later copies of an id are judged by the suite's occurrence check; the first is kept.
        facts["id_occurrence"] = 1 if src.id not in seen else 2
        facts["duplicate_of"] = seen.get(src.id)
        seen.setdefault(src.id, src.path)
        if src.id in caption_problems and facts["read_error"] is None:
            facts["read_error"] = f"caption: {caption_problems[src.id]}"
        rows.append(facts)
    facts_df = pd.DataFrame(rows)
    facts_df.insert(0, "row", np.arange(len(facts_df)))

    verdict = validate_ingest_facts(facts_df, cfg, docs_dir=docs_dir)
    reasons: dict[int, list[str]] = verdict["reasons"]  # row -> reasons

    accepted_rows, quarantine_rows = [], []
    for row, (facts, views), src in zip(facts_df.itertuples(index=False), results, sources):
        if row.row in reasons:
            quarantine_rows.append({"id": src.id, "source_path": src.path, "reason": "; ".join(reasons[row.row])})
        else:
            accepted_rows.append((facts, views, src))

    # Write accepted objects; an existing, complete object folder from an earlier
    # (killed) run with the same source is kept as it is.
    objects_root = out_dir / "objects"
    manifest_rows = []
    keep: set[Path] = set()
    for i, (facts, views, src) in enumerate(tqdm(accepted_rows, desc="ingest: writing objects",
                                                  disable=not progress, unit="obj")):
        rel = Path("objects") / _shard_name(i, cfg.shard_size) / src.id
        dst = out_dir / rel
        keep.add(dst)
        stamp = dst / "object.json"
        source_stamp = gio.content_stamp(src.path)  # the source's bytes: a re-rendered object is ingested anew
        if not (stamp.exists() and gio.read_json(stamp).get("source") == src.path
                and gio.read_json(stamp).get("caption") == facts["caption"]
                and gio.read_json(stamp).get("source_stamp") == source_stamp
                and len(list((dst / "images").glob("*.png"))) == len(views)):
            _write_object(dst, src, views, {**facts, "source_stamp": source_stamp}, cfg.link)
        manifest_rows.append({
            "id": src.id, "caption": facts["caption"], "path": rel.as_posix(), "shard": rel.parts[1],
            "n_views": facts["n_views"], "width": facts["width"], "height": facts["height"],
            "alpha_coverage": facts["alpha_coverage"], "fov_x_deg": facts["fov_x_deg"],
            "has_surface_samples": facts["has_surface_samples"], "layout": src.layout, "source_path": src.path,
            "split": facts.get("split", "train"),
        })
    # Remove object folders left from earlier runs that are no longer accepted.
    if objects_root.exists():
        for shard in objects_root.iterdir():
            for obj in (shard.iterdir() if shard.is_dir() else []):
                if obj not in keep:
                    shutil.rmtree(obj, ignore_errors=True)
            if shard.is_dir() and not any(shard.iterdir()):
                shard.rmdir()

    manifest = pd.DataFrame(manifest_rows, columns=[
        "id", "caption", "path", "shard", "n_views", "width", "height", "alpha_coverage", "fov_x_deg",
        "has_surface_samples", "layout", "source_path", "split"])
    gio.write_parquet(out_dir / "manifest.parquet", manifest)
    quarantine = pd.DataFrame(quarantine_rows, columns=["id", "source_path", "reason"])
    with gio.atomic_path(out_dir / "quarantine.csv") as tmp:
        quarantine.to_csv(tmp, index=False)
    gio.write_parquet(out_dir / "facts.parquet", facts_df)

    n = len(sources)
    return {
        "n_found": n,
        "n_accepted": len(manifest),
        "n_quarantined": len(quarantine),
        "quarantined_fraction": len(quarantine) / n if n else 0.0,
        "n_views_total": int(manifest["n_views"].sum()) if len(manifest) else 0,
        "seconds": time.perf_counter() - t0,
        "gx_success": bool(verdict["success"]),
        "data_docs": verdict.get("docs_index"),
        "expectations": verdict["expectations"],
    }


# --------------------------------------------------------------------------- reading the internal layout


def load_manifest(out_dir: str | os.PathLike) -> pd.DataFrame:
    path = Path(out_dir) / "manifest.parquet"
    if not path.exists():
        raise DatasetError(f"no manifest at {path}: run the ingest stage first")
    return pd.read_parquet(path)


def load_object(obj_dir: str | os.PathLike, white_background: bool = True,
                views: Iterable[int] | None = None) -> dict[str, np.ndarray]:
    """Load one object folder (internal or NeRF-synthetic layout): images and cameras as arrays.

    Returns
    -------
    dict with ``rgb [V, H, W, 3] float32`` in [0, 1] (composited on white when
    ``white_background``), ``alpha [V, H, W] float32``, ``c2w [V, 4, 4] float32``
    (OpenGL convention), ``K [V, 3, 3] float32`` (pixels), and, when present,
    ``surface_points [K, 3]``, ``surface_normals [K, 3]``, ``surface_colors [K, 3]`` (float32 in [0, 1]).
    """
    from PIL import Image

    obj_dir = Path(obj_dir)
    cams = _nerf_views(obj_dir)  # the internal layout is NeRF-synthetic; raw NeRF folders work too
    cams = cams if views is None else [cams[i] for i in views]
    rgbs, alphas, c2ws, Ks = [], [], [], []
    for v in cams:
        with Image.open(v.image_path) as im:
            rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
        _finish_intrinsics(v, rgba.shape[1], rgba.shape[0])
        rgb, a = rgba[..., :3], rgba[..., 3]
        if white_background:
            rgb = rgb * a[..., None] + (1.0 - a[..., None])
        rgbs.append(rgb)
        alphas.append(a)
        c2ws.append(v.c2w.astype(np.float32))
        Ks.append(np.array([[v.fl_x, 0, v.cx], [0, v.fl_y, v.cy], [0, 0, 1]], dtype=np.float32))
    out = {"rgb": np.stack(rgbs), "alpha": np.stack(alphas), "c2w": np.stack(c2ws), "K": np.stack(Ks)}
    samples = obj_dir / "surface_samples.npz"
    if samples.exists():
        with np.load(samples) as z:
            out["surface_points"] = z["points"].astype(np.float32)
            if "normals" in z:
                out["surface_normals"] = z["normals"].astype(np.float32)
            cols = z["colors"]
            out["surface_colors"] = (cols.astype(np.float32) / 255.0) if cols.dtype == np.uint8 else cols.astype(np.float32)
    return out


def config_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as a flat-ish dict (for logging)."""
    return asdict(cfg)
