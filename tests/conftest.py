"""Shared fixtures: tiny render datasets written in both supported layouts."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import tempfile

import numpy as np
import pytest
from PIL import Image

# Telemetry off for everything the tests start.
for _k, _v in {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
               "MLFLOW_DISABLE_TELEMETRY": "true", "GX_ANALYTICS_ENABLED": "false"}.items():
    os.environ.setdefault(_k, _v)
# An isolated Prefect home for the whole session (prefect_test_harness runs in it).
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def _look_at(eye: np.ndarray) -> np.ndarray:
    """OpenGL camera-to-world looking at the origin, Z-up world."""
    f = -eye / np.linalg.norm(eye)
    r = np.cross(f, [0.0, 0.0, 1.0])
    r /= np.linalg.norm(r)
    u = np.cross(r, f)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = r, u, -f, eye
    return m


def _disc_rgba(size: int, radius: float = 0.3, color=(200, 30, 30)) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    inside = (xx - size / 2 + 0.5) ** 2 + (yy - size / 2 + 0.5) ** 2 < (radius * size) ** 2
    img = np.full((size, size, 4), 255, np.uint8)
    img[..., 3] = 0
    img[inside] = (*color, 255)
    return img


def make_nerf_object(root: Path, obj_id: str, n_views: int = 8, size: int = 16, split: bool = False) -> Path:
    """Write one object in the NeRF-synthetic layout; returns its folder."""
    d = root / obj_id
    (d / "images").mkdir(parents=True, exist_ok=True)
    frames = []
    for i in range(n_views):
        az = 2 * math.pi * i / n_views
        eye = 2.5 * np.array([math.cos(az), math.sin(az), 0.4])
        Image.fromarray(_disc_rgba(size)).save(d / "images" / f"r_{i:03d}.png")
        frames.append({"file_path": f"images/r_{i:03d}" + ("" if split else ".png"),
                       "transform_matrix": _look_at(eye).tolist()})
    if split:
        half = n_views // 2
        for name, fr in (("train", frames[:half]), ("test", frames[half:])):
            (d / f"transforms_{name}.json").write_text(json.dumps({"camera_angle_x": 0.69, "frames": fr}))
    else:
        (d / "transforms.json").write_text(json.dumps({"camera_angle_x": 0.69, "frames": frames}))
    return d


def make_gobjaverse_object(root: Path, obj_id: str, group: str = "0", n_views: int = 8, size: int = 16) -> Path:
    """Write one object in the G-Objaverse layout (OpenCV camera axes)."""
    d = root / group / obj_id / "campos_512_v4"
    for i in range(n_views):
        v = d / f"{i:05d}"
        v.mkdir(parents=True, exist_ok=True)
        az = 2 * math.pi * i / n_views
        m = _look_at(1.6 * np.array([math.cos(az), math.sin(az), 0.3]))
        m[:3, 1:3] *= -1  # OpenGL -> OpenCV axes, as G-Objaverse stores them
        Image.fromarray(_disc_rgba(size)).save(v / f"{i:05d}.png")
        (v / f"{i:05d}.json").write_text(json.dumps({
            "x": m[:3, 0].tolist(), "y": m[:3, 1].tolist(), "z": m[:3, 2].tolist(), "origin": m[:3, 3].tolist(),
            "x_fov": 0.6911112070083618, "y_fov": 0.6911112070083618}))
    return d


def write_captions(path: Path, captions: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": k, "caption": v}) + "\n" for k, v in captions.items()))
    return path


def make_ingested(root: Path, n_objects: int) -> Path:
    """Render ``n_objects`` small single-part procedural objects under ``root/raw`` (8 views at 24²) and
    ingest them into ``root/ing``; returns ``root``."""
    from gaussian_atlas.cameras import ViewConfig
    from gaussian_atlas.data import IngestConfig, ingest
    from gaussian_atlas.meshrender import RenderConfig
    from gaussian_atlas.procedural import ProceduralConfig, generate_dataset

    generate_dataset(ProceduralConfig(n_objects=n_objects, composition_fraction=0.0, workers=0, render=RenderConfig(
        views=ViewConfig(n_views=8, n_ring=6, resolution=24), supersample=1, n_surface_samples=200)),
        root / "raw", progress=False)
    ingest(IngestConfig(source=str(root / "raw"), captions=str(root / "raw" / "captions.jsonl"), min_views=4),
           root / "ing", progress=False)
    return root


@pytest.fixture
def nerf_dataset(tmp_path: Path):
    """Five good NeRF-layout objects + captions."""
    root = tmp_path / "renders"
    ids = [f"obj{i}" for i in range(5)]
    for i in ids:
        make_nerf_object(root, i)
    caps = write_captions(tmp_path / "captions.jsonl", {i: f"a red disc number {i}" for i in ids})
    return root, caps, ids
