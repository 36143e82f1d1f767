"""Camera conventions: OpenGL camera-to-world, +Z-up world, pinhole rays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gaussian_atlas.cameras import (
    ViewConfig,
    c2w_is_valid,
    camera_rays,
    complete_intrinsics,
    intrinsics,
    look_at_c2w,
    place_views,
    rotation_orthonormality_error,
)


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("seed", range(5))
def test_look_at_is_rigid_and_looks_down_minus_z(seed):
    rng = np.random.default_rng(seed)
    eye, target = rng.normal(size=3) * 3, rng.normal(size=3) * 0.5
    m = look_at_c2w(eye, target)
    assert m.shape == (4, 4) and m.dtype == np.float64
    assert rotation_orthonormality_error(m[:3, :3]) < 1e-12
    np.testing.assert_allclose(m[3], [0, 0, 0, 1])
    np.testing.assert_allclose(m[:3, 3], eye)
    # the camera's -Z axis points at the target
    np.testing.assert_allclose(-m[:3, 2], _unit(target - eye), atol=1e-12)
    # camera +Y leans towards world +Z (up), +X is horizontal
    assert m[2, 1] > 0
    assert abs(m[2, 0]) < 1e-12
    assert c2w_is_valid(m) == (True, "")


@pytest.mark.parametrize("eye", [(0, 0, 3), (0, 0, -2)])
def test_look_at_straight_down_or_up_is_still_valid(eye):
    m = look_at_c2w(eye)
    assert c2w_is_valid(m)[0]
    np.testing.assert_allclose(-m[:3, 2], _unit(-np.asarray(eye, float)), atol=1e-12)


def test_place_views_ring_and_random_views():
    cfg = ViewConfig(n_views=20, n_ring=12, ring_elevation_deg=20.0, radius=2.5)
    views = place_views(cfg, np.random.default_rng(0))
    assert len(views) == 20
    az = np.array([v["azimuth_deg"] for v in views])
    el = np.array([v["elevation_deg"] for v in views])
    np.testing.assert_allclose(el[:12], 20.0)
    steps = np.diff(az[:12]) % 360.0
    np.testing.assert_allclose(steps, 30.0, atol=1e-9)
    assert np.all((el[12:] >= -15.0) & (el[12:] <= 65.0))
    assert np.all((az >= 0) & (az < 360))
    for v in views:
        m = np.asarray(v["transform_matrix"])
        assert c2w_is_valid(m)[0]
        pos = m[:3, 3]
        assert np.linalg.norm(pos) == pytest.approx(2.5)
        np.testing.assert_allclose(-m[:3, 2], _unit(-pos), atol=1e-9)  # looks at the origin
        # position agrees with the stated azimuth / elevation (+Z up, azimuth from +X to +Y)
        a, e = math.radians(v["azimuth_deg"]), math.radians(v["elevation_deg"])
        np.testing.assert_allclose(pos, 2.5 * np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)]), atol=1e-9)


def test_place_views_is_seeded():
    cfg = ViewConfig(n_views=6, n_ring=4)
    a = place_views(cfg, np.random.default_rng(7))
    b = place_views(cfg, np.random.default_rng(7))
    c = place_views(cfg, np.random.default_rng(8))
    assert a == b
    assert a[0]["azimuth_deg"] != c[0]["azimuth_deg"]


def test_view_config_rejects_bad_values():
    with pytest.raises(ValueError):
        ViewConfig(n_views=4, n_ring=5)
    with pytest.raises(ValueError):
        ViewConfig(random_elevation_min_deg=10, random_elevation_max_deg=0)
    with pytest.raises(ValueError):
        ViewConfig(ring_elevation_deg=90)


def test_intrinsics_match_fov():
    intr = intrinsics(ViewConfig(resolution=64, fov_deg=45.0))
    assert intr["w"] == intr["h"] == 64
    assert intr["fl_x"] == pytest.approx(32.0 / math.tan(math.radians(22.5)))
    assert intr["fl_y"] == intr["fl_x"]
    assert (intr["cx"], intr["cy"]) == (32.0, 32.0)
    assert intr["camera_angle_x"] == pytest.approx(math.radians(45.0))
    # a NeRF-synthetic header with only camera_angle_x completes to the same intrinsics
    done = complete_intrinsics({"camera_angle_x": intr["camera_angle_x"], "w": 64, "h": 64})
    for k in ("fl_x", "fl_y", "cx", "cy"):
        assert done[k] == pytest.approx(intr[k])


def test_c2w_validator_catches_broken_poses():
    good = look_at_c2w((1.0, -2.0, 1.5))
    assert c2w_is_valid(good) == (True, "")
    assert c2w_is_valid(good.tolist())[0]
    bad = {
        "scaled": good @ np.diag([2.0, 2.0, 2.0, 1.0]),
        "reflected": good @ np.diag([-1.0, 1.0, 1.0, 1.0]),
        "nan": np.where(np.eye(4) == 1, np.nan, good),
        "last_row": np.vstack([good[:3], [0.0, 0.0, 1.0, 1.0]]),
        "shape": good[:3],
        "sheared": good + np.pad(np.array([[0, 0.1, 0], [0, 0, 0], [0, 0, 0]]), ((0, 1), (0, 1))),
    }
    for name, m in bad.items():
        ok, reason = c2w_is_valid(m)
        assert not ok and reason, name
    assert rotation_orthonormality_error(np.diag([-1.0, 1.0, 1.0])) == pytest.approx(2.0)
    assert rotation_orthonormality_error(np.eye(3)) == 0.0


def test_camera_rays_follow_the_pinhole_model():
    c2w = look_at_c2w((0.3, -2.0, 1.0), (0.1, 0.0, 0.2))
    intr = {"w": 8, "h": 6, "fl_x": 7.0, "fl_y": 9.0, "cx": 4.2, "cy": 2.9}
    o, d = camera_rays(c2w, intr)
    assert o.shape == d.shape == (48, 3)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0)
    np.testing.assert_allclose(o, np.broadcast_to(c2w[:3, 3], o.shape))
    d_cam = d @ c2w[:3, :3]  # back to camera coordinates
    assert np.all(d_cam[:, 2] < 0)  # everything in front: camera looks down -Z
    j, i = np.divmod(np.arange(48), 8)  # row-major: index = row * W + column
    np.testing.assert_allclose(d_cam[:, 0] / -d_cam[:, 2], (i + 0.5 - 4.2) / 7.0, atol=1e-12)
    np.testing.assert_allclose(d_cam[:, 1] / -d_cam[:, 2], -(j + 0.5 - 2.9) / 9.0, atol=1e-12)
    # pixel (0, 0) is top-left: its ray goes left (-X) and up (+Y) in camera space
    assert d_cam[0, 0] < 0 and d_cam[0, 1] > 0


def test_camera_rays_hit_projected_points():
    """A world point projected with the intrinsics lies on the ray of its pixel."""
    rng = np.random.default_rng(3)
    cfg = ViewConfig(resolution=32)
    intr = intrinsics(cfg)
    c2w = np.asarray(place_views(cfg, rng)[5]["transform_matrix"])
    o, d = camera_rays(c2w, intr)
    w2c = np.linalg.inv(c2w)
    for p in rng.uniform(-0.7, 0.7, size=(20, 3)):
        pc = w2c[:3, :3] @ p + w2c[:3, 3]
        u = intr["fl_x"] * pc[0] / -pc[2] + intr["cx"]
        v = -intr["fl_y"] * pc[1] / -pc[2] + intr["cy"]
        i, j = int(u), int(v)
        assert 0 <= i < 32 and 0 <= j < 32
        ray = d[j * 32 + i]
        to_p = _unit(p - o[0])
        angle = math.degrees(math.acos(min(1.0, float(ray @ to_p))))
        assert angle < cfg.fov_deg / 32  # within about one pixel
