"""Camera placement, intrinsics and rays for the multi-view renders.

Conventions (the same as Blender's NeRF-synthetic ``transforms.json``)
-----------------------------------------------------------------------
World
    Right-handed, **+Z up**. Objects are normalised by the renderer so the
    mesh's bounding-box centre is at the origin and its farthest vertex lies
    at radius ``object_radius`` (default 1.0).
Camera pose
    ``transform_matrix`` is the **camera-to-world** 4x4 matrix in the
    **OpenGL / NeRF-synthetic camera convention**: in camera space the camera
    looks down **-Z**, **+Y** is up and **+X** is right. Its columns are the
    camera's right, up and backward axes and its position, in world
    coordinates. (OpenCV/COLMAP poses are obtained by negating the 2nd and
    3rd columns.)
Spherical placement
    ``azimuth_deg`` is measured in the XY plane from +X towards +Y;
    ``elevation_deg`` is the angle above the XY plane. A camera at
    (azimuth, elevation, radius) sits at
    ``radius * (cos e cos a, cos e sin a, sin e)`` and looks at the origin
    with world +Z as its up hint.
Intrinsics
    Pinhole, in pixels: ``fl_x, fl_y`` focal lengths, ``cx, cy`` principal
    point, ``w, h`` image size; ``camera_angle_x`` is the horizontal field of
    view in radians (``fl_x = 0.5 * w / tan(0.5 * camera_angle_x)``).
    Pixel (0, 0) is the top-left pixel, +u runs right and +v runs **down**;
    the centre of pixel (i, j) is at ``(u, v) = (i + 0.5, j + 0.5)``.

View layout (:func:`place_views`)
---------------------------------
Like G-Objaverse's renders: ``n_ring`` views on an orbit ring at a fixed
elevation with evenly spaced azimuths (the ring's start azimuth is random
per object), then ``n_views - n_ring`` views at uniformly random azimuth and
elevation in ``[random_elevation_min_deg, random_elevation_max_deg]``. All
cameras are at distance ``radius`` from the origin and look at it. With the
defaults (radius 2.8, FOV 45 degrees) a sphere of radius 1 subtends 20.9
degrees of the 22.5-degree half field of view, so a normalised object stays
fully in frame from every view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "ViewConfig",
    "look_at_c2w",
    "spherical_to_cartesian",
    "place_views",
    "intrinsics",
    "complete_intrinsics",
    "rotation_orthonormality_error",
    "c2w_is_valid",
    "camera_rays",
]


@dataclass(frozen=True)
class ViewConfig:
    """Where the cameras of one object go, and the image they take.

    Parameters
    ----------
    n_views
        Total views per object.
    n_ring
        Views on the orbit ring (evenly spaced azimuth, randomised start).
    ring_elevation_deg
        Elevation of the ring, degrees above the XY plane.
    random_elevation_min_deg, random_elevation_max_deg
        Range of the uniformly random elevations of the remaining views.
    radius
        Camera distance from the origin (object radius is 1.0).
    fov_deg
        Horizontal (= vertical, images are square) field of view, degrees.
    resolution
        Image width and height in pixels.
    """

    n_views: int = 24
    n_ring: int = 16
    ring_elevation_deg: float = 20.0
    random_elevation_min_deg: float = -15.0
    random_elevation_max_deg: float = 65.0
    radius: float = 2.8
    fov_deg: float = 45.0
    resolution: int = 128

    def __post_init__(self) -> None:
        if self.n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {self.n_views}")
        if not 0 <= self.n_ring <= self.n_views:
            raise ValueError(f"n_ring must be in [0, n_views={self.n_views}], got {self.n_ring}")
        if not self.random_elevation_min_deg <= self.random_elevation_max_deg:
            raise ValueError("random_elevation_min_deg must be <= random_elevation_max_deg")
        for name in ("ring_elevation_deg", "random_elevation_min_deg", "random_elevation_max_deg"):
            if not -90.0 < getattr(self, name) < 90.0:
                raise ValueError(f"{name} must be strictly inside (-90, 90) degrees")
        if not 0.0 < self.fov_deg < 180.0:
            raise ValueError(f"fov_deg must be in (0, 180), got {self.fov_deg}")
        if self.radius <= 0:
            raise ValueError(f"radius must be > 0, got {self.radius}")
        if self.resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")


def look_at_c2w(
    eye: Sequence[float] | np.ndarray,
    target: Sequence[float] | np.ndarray = (0.0, 0.0, 0.0),
    up: Sequence[float] | np.ndarray = (0.0, 0.0, 1.0),
) -> np.ndarray:
    """Camera-to-world matrix of a camera at ``eye`` looking at ``target``.

    OpenGL convention: the camera's -Z axis points from ``eye`` to
    ``target``, +Y is as close to ``up`` as possible, +X = right.

    Parameters
    ----------
    eye, target, up
        ``[3]`` world-space points / direction. If ``up`` is (nearly) parallel
        to the viewing direction another up hint is used, so the result is
        always a valid rigid transform.

    Returns
    -------
    np.ndarray
        ``[4, 4]`` float64 camera-to-world matrix.
    """
    eye = np.asarray(eye, dtype=np.float64).reshape(3)
    target = np.asarray(target, dtype=np.float64).reshape(3)
    up = np.asarray(up, dtype=np.float64).reshape(3)
    forward = target - eye  # [3]
    norm = np.linalg.norm(forward)
    if not norm > 0:
        raise ValueError("look_at_c2w: eye and target coincide")
    forward = forward / norm
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-8 * max(np.linalg.norm(up), 1e-300):
        # up is parallel to the view direction: pick the world axis least aligned with it
        alt = np.eye(3)[int(np.argmin(np.abs(forward)))]
        right = np.cross(forward, alt)
    right = right / np.linalg.norm(right)
    cam_up = np.cross(right, forward)  # unit by construction
    c2w = np.eye(4)
    c2w[:3, 0] = right
    c2w[:3, 1] = cam_up
    c2w[:3, 2] = -forward
    c2w[:3, 3] = eye
    return c2w


def spherical_to_cartesian(azimuth_deg: float, elevation_deg: float, radius: float) -> np.ndarray:
    """``[3]`` position at (azimuth from +X towards +Y, elevation above XY, radius)."""
    a, e = math.radians(azimuth_deg), math.radians(elevation_deg)
    return radius * np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])


def place_views(cfg: ViewConfig, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Camera poses for one object: an orbit ring plus random-elevation views.

    Parameters
    ----------
    cfg
        The view layout.
    rng
        Source of the ring's start azimuth and the random views; seed it
        per object for reproducible renders.

    Returns
    -------
    list of dict
        ``cfg.n_views`` entries ``{"transform_matrix": [4, 4] nested list
        (camera-to-world, OpenGL convention), "azimuth_deg": float in
        [0, 360), "elevation_deg": float}``; ring views first.
    """
    start = float(rng.uniform(0.0, 360.0))
    azimuths = [(start + 360.0 * i / max(cfg.n_ring, 1)) % 360.0 for i in range(cfg.n_ring)]
    elevations = [float(cfg.ring_elevation_deg)] * cfg.n_ring
    n_rand = cfg.n_views - cfg.n_ring
    azimuths += [float(a) for a in rng.uniform(0.0, 360.0, size=n_rand)]
    elevations += [
        float(e)
        for e in rng.uniform(cfg.random_elevation_min_deg, cfg.random_elevation_max_deg, size=n_rand)
    ]
    views = []
    for az, el in zip(azimuths, elevations):
        eye = spherical_to_cartesian(az, el, cfg.radius)
        views.append(
            {
                "transform_matrix": look_at_c2w(eye).tolist(),
                "azimuth_deg": float(az),
                "elevation_deg": float(el),
            }
        )
    return views


def intrinsics(cfg: ViewConfig) -> dict[str, float | int]:
    """Pinhole intrinsics of the square images described by ``cfg``.

    Returns
    -------
    dict
        ``camera_angle_x`` (radians), ``fl_x``, ``fl_y``, ``cx``, ``cy``
        (pixels) and ``w``, ``h`` (ints).
    """
    w = h = int(cfg.resolution)
    angle = math.radians(cfg.fov_deg)
    fl = 0.5 * w / math.tan(0.5 * angle)
    return {
        "camera_angle_x": angle,
        "fl_x": fl,
        "fl_y": fl,
        "cx": 0.5 * w,
        "cy": 0.5 * h,
        "w": w,
        "h": h,
    }


def complete_intrinsics(intr: Mapping[str, Any]) -> dict[str, float | int]:
    """Fill ``fl_x, fl_y, cx, cy`` from ``camera_angle_x`` (and ``camera_angle_y``) if missing.

    NeRF-synthetic files often carry only ``camera_angle_x``; ``w`` and
    ``h`` are required.
    """
    if "w" not in intr or "h" not in intr:
        raise ValueError("intrinsics need 'w' and 'h'")
    w, h = int(intr["w"]), int(intr["h"])
    out: dict[str, Any] = dict(intr)
    if "fl_x" not in out:
        if "camera_angle_x" not in out:
            raise ValueError("intrinsics need 'fl_x' or 'camera_angle_x'")
        out["fl_x"] = 0.5 * w / math.tan(0.5 * float(out["camera_angle_x"]))
    if "fl_y" not in out:
        if "camera_angle_y" in out:
            out["fl_y"] = 0.5 * h / math.tan(0.5 * float(out["camera_angle_y"]))
        else:
            out["fl_y"] = out["fl_x"]
    out.setdefault("cx", 0.5 * w)
    out.setdefault("cy", 0.5 * h)
    if "camera_angle_x" not in out:
        out["camera_angle_x"] = 2.0 * math.atan(0.5 * w / float(out["fl_x"]))
    out["w"], out["h"] = w, h
    return out


def rotation_orthonormality_error(R: np.ndarray) -> float:
    """``max |R^T R - I| + |det(R) - 1|`` of a ``[3, 3]`` matrix (0 for a rotation)."""
    R = np.asarray(R, dtype=np.float64)
    if R.shape != (3, 3):
        raise ValueError(f"expected a [3, 3] matrix, got shape {R.shape}")
    return float(np.abs(R.T @ R - np.eye(3)).max() + abs(np.linalg.det(R) - 1.0))


def c2w_is_valid(m: Any, tol: float = 1e-3) -> tuple[bool, str]:
    """Check a camera-to-world matrix: ``[4, 4]``, finite, last row ``[0, 0, 0, 1]``, rotation part a proper rotation.

    Returns
    -------
    (ok, reason)
        ``reason`` is ``""`` when ``ok`` and otherwise says what is wrong.
    """
    try:
        m = np.asarray(m, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        return False, f"not a numeric matrix ({exc})"
    if m.shape != (4, 4):
        return False, f"shape {m.shape} is not (4, 4)"
    if not np.all(np.isfinite(m)):
        return False, "contains NaN or inf"
    if np.abs(m[3] - np.array([0.0, 0.0, 0.0, 1.0])).max() > tol:
        return False, f"last row {m[3].tolist()} is not [0, 0, 0, 1]"
    err = rotation_orthonormality_error(m[:3, :3])
    if err > tol:
        return False, f"rotation part is not orthonormal with det +1 (error {err:.3g} > {tol:g})"
    return True, ""


def camera_rays(c2w: np.ndarray, intr: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """World-space rays through every pixel centre.

    Parameters
    ----------
    c2w
        ``[4, 4]`` camera-to-world matrix, OpenGL convention.
    intr
        Intrinsics dict (``w``, ``h`` and ``fl_x``/``fl_y``/``cx``/``cy`` or
        ``camera_angle_x``, see :func:`complete_intrinsics`).

    Returns
    -------
    origins, dirs
        ``[H*W, 3]`` float64 each, row-major (index ``j * W + i`` is pixel
        column ``i``, row ``j``; row 0 is the top of the image); ``dirs`` are
        unit vectors.
    """
    intr = complete_intrinsics(intr)
    c2w = np.asarray(c2w, dtype=np.float64)
    w, h = int(intr["w"]), int(intr["h"])
    u = np.arange(w, dtype=np.float64) + 0.5  # [W]
    v = np.arange(h, dtype=np.float64) + 0.5  # [H]
    uu, vv = np.meshgrid(u, v, indexing="xy")  # [H, W]
    d_cam = np.stack(
        [
            (uu - float(intr["cx"])) / float(intr["fl_x"]),
            -(vv - float(intr["cy"])) / float(intr["fl_y"]),  # +v is down, camera +Y is up
            -np.ones_like(uu),  # camera looks down -Z
        ],
        axis=-1,
    ).reshape(-1, 3)  # [H*W, 3]
    R = c2w[:3, :3]
    # R @ d per ray, written out: a BLAS matmul here oversubscribes cores in worker pools
    dirs = d_cam[:, 0:1] * R[:, 0] + d_cam[:, 1:2] * R[:, 1] + d_cam[:, 2:3] * R[:, 2]  # [H*W, 3]
    dirs /= np.sqrt(np.einsum("nd,nd->n", dirs, dirs))[:, None]
    origins = np.broadcast_to(c2w[:3, 3], dirs.shape).copy()  # [H*W, 3]
    return origins, dirs
