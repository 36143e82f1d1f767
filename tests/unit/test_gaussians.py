"""Gaussians container and PLY files: activations, indexing, round trips, schema errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from gaussian_atlas.gaussians import (
    INRIA_PROPERTIES,
    SH_C0,
    Gaussians,
    PlyError,
    read_gaussianverse_ply,
    read_ply,
    write_ply,
)


def _random(n: int = 64, seed: int = 0, visibility: bool = False, batch: tuple[int, ...] = ()) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    shp = batch + (n,)
    return Gaussians(
        means=torch.randn(shp + (3,), generator=g),
        quats=torch.randn(shp + (4,), generator=g),
        log_scales=torch.randn(shp + (3,), generator=g) - 3,
        opacity_logits=torch.randn(shp, generator=g),
        sh0=torch.randn(shp + (3,), generator=g),
        visibility=torch.rand(shp, generator=g) if visibility else None,
    )


def _assert_same(a: Gaussians, b: Gaussians) -> None:
    da, db = a.as_dict(), b.as_dict()
    assert da.keys() == db.keys()
    for k in da:
        assert torch.equal(da[k], db[k]), k


def _header(path: Path) -> list[str]:
    raw = path.read_bytes()
    end = raw.index(b"end_header\n")
    return raw[:end].decode("ascii").splitlines()


# ---- the container --------------------------------------------------------------

def test_activations_and_from_activated_invert():
    g = _random(32)
    assert torch.allclose(g.scales(), torch.exp(g.log_scales))
    assert torch.allclose(g.opacities(), torch.sigmoid(g.opacity_logits))
    assert torch.allclose(g.unit_quats().norm(dim=-1), torch.ones(32))
    assert (g.rgb() >= 0).all()
    assert torch.allclose(g.rgb(), (0.5 + SH_C0 * g.sh0).clamp_min(0))
    assert SH_C0 == pytest.approx(1 / (2 * math.sqrt(math.pi)))
    rgb = torch.rand(32, 3)
    h = Gaussians.from_activated(g.means, g.quats, g.scales(), g.opacities(), rgb)
    assert torch.allclose(h.log_scales, g.log_scales, atol=1e-5)
    assert torch.allclose(h.opacity_logits, g.opacity_logits, atol=1e-4)
    assert torch.allclose(h.rgb(), rgb, atol=1e-6)
    # opacity exactly 0 or 1 stays finite
    h = Gaussians.from_activated(g.means[:2], g.quats[:2], g.scales()[:2], torch.tensor([0.0, 1.0]), rgb[:2])
    assert h.validate() == []


def test_len_index_cat_stack():
    g = _random(10, visibility=True)
    assert len(g) == 10 and g.batch_shape == ()
    sub = g.index(torch.tensor([3, 1]))
    assert len(sub) == 2 and torch.equal(sub.means[0], g.means[3]) and torch.equal(sub.visibility[1], g.visibility[1])
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[0, 9]] = True
    assert torch.equal(g.index(mask).sh0, g.sh0[[0, 9]])
    assert len(g.index(slice(2, 5))) == 3
    both = Gaussians.cat([g, sub])
    assert len(both) == 12 and torch.equal(both.quats[10], g.quats[3])
    assert Gaussians.cat([g, _random(3)]).visibility is None  # kept only if every item has it
    batch = Gaussians.stack([g, g.index(torch.arange(9, -1, -1))])
    assert batch.batch_shape == (2,) and len(batch) == 10
    # per-object gather [B, N']
    picked = batch.index(torch.tensor([[0, 1], [0, 1]]))
    assert torch.equal(picked.means[1], g.means[[9, 8]])
    assert torch.equal(picked.visibility[0], g.visibility[[0, 1]])
    back = batch.unstack()
    _assert_same(back[0], g)
    assert g.detach().means.requires_grad is False
    assert g.to("cpu", torch.float64).dtype == torch.float64


def test_validate_reports_problems():
    assert _random().validate() == []
    g = _random(8)
    g.means[2, 1] = float("nan")
    g.log_scales[5, 0] = float("inf")
    g.quats[4] = 0
    probs = g.validate()
    assert any("means has 1 non-finite" in p for p in probs)
    assert any("log_scales has 1 non-finite" in p for p in probs)
    assert any("1 zero-norm quaternions" in p for p in probs)
    bad = _random(8)
    bad.opacity_logits = bad.opacity_logits[:7]
    assert any("opacity_logits must be [8]" in p for p in bad.validate())


# ---- INRIA PLY --------------------------------------------------------------------------

@pytest.mark.parametrize("visibility", [False, True])
def test_ply_round_trip_is_exact(tmp_path, visibility):
    g = _random(100, visibility=visibility)
    p = write_ply(tmp_path / "obj.ply", g)
    _assert_same(read_ply(p), g)
    assert not [f for f in tmp_path.iterdir() if f.name != "obj.ply"]  # no temporary left behind


def test_ply_header_is_inria_layout(tmp_path):
    p = write_ply(tmp_path / "a.ply", _random(7))
    lines = _header(p)
    assert lines[0] == "ply" and lines[1] == "format binary_little_endian 1.0"
    assert "element vertex 7" in lines
    props = [ln.split() for ln in lines if ln.startswith("property")]
    assert [x[2] for x in props] == list(INRIA_PROPERTIES)
    assert all(x[1] == "float" for x in props)
    assert p.stat().st_size == len(p.read_bytes()[: p.read_bytes().index(b"end_header\n") + 11]) + 7 * 17 * 4
    # the optional property goes last
    p2 = write_ply(tmp_path / "b.ply", _random(7, visibility=True))
    names = [ln.split()[2] for ln in _header(p2) if ln.startswith("property")]
    assert names == list(INRIA_PROPERTIES) + ["visibility"]
    # normals are zero, values are the pre-activation ones
    v = PlyData.read(str(p))["vertex"]
    assert np.all(v["nx"] == 0) and np.all(v["nz"] == 0)
    g = _random(7)
    assert np.array_equal(v["opacity"], g.opacity_logits.numpy()) and np.array_equal(v["rot_3"], g.quats[:, 3].numpy())


def test_write_refuses_non_finite_batched_and_empty(tmp_path):
    g = _random(5)
    g.sh0[1, 2] = float("nan")
    with pytest.raises(PlyError, match=r"bad\.ply.*sh0 has 1 non-finite"):
        write_ply(tmp_path / "bad.ply", g)
    with pytest.raises(PlyError, match="batched"):
        write_ply(tmp_path / "b.ply", _random(5, batch=(2,)))
    with pytest.raises(PlyError, match="zero Gaussians"):
        write_ply(tmp_path / "e.ply", _random(0))
    # float64 values that overflow float32 are caught too
    h = _random(3).to(dtype=torch.float64)
    h.means[0, 0] = 1e300
    with pytest.raises(PlyError, match="1 rows are not finite in float32"):
        write_ply(tmp_path / "o.ply", h)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporaries


def _write_vertex(path: Path, names: list[str], rows: np.ndarray, text: bool = False) -> Path:
    arr = np.zeros(len(rows), dtype=[(n, "<f4") for n in names])
    for j, n in enumerate(names):
        arr[n] = rows[:, j]
    PlyData([PlyElement.describe(arr, "vertex")], text=text, byte_order="<").write(str(path))
    return path


def test_read_accepts_higher_sh_degree_and_any_order(tmp_path):
    g = _random(20)
    names = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(45)] + [
        "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    cols = np.concatenate([g.means, g.sh0, np.full((20, 45), np.nan), g.opacity_logits[:, None], g.log_scales,
                           g.quats], axis=1)  # NaN in the ignored f_rest_* is fine
    _assert_same(read_ply(_write_vertex(tmp_path / "sh3.ply", names, cols)), g)
    _assert_same(read_ply(_write_vertex(tmp_path / "ascii.ply", names, cols, text=True)), g)


def _inria_rows(g: Gaussians) -> np.ndarray:
    return np.concatenate([g.means, np.zeros((len(g), 3)), g.sh0, g.opacity_logits[:, None], g.log_scales, g.quats],
                          axis=1)


def test_read_errors_name_file_and_problem(tmp_path):
    g = _random(6)
    rows = _inria_rows(g)
    names = list(INRIA_PROPERTIES)
    # missing properties
    keep = [i for i, n in enumerate(names) if n not in ("f_dc_1", "rot_3")]
    p = _write_vertex(tmp_path / "missing.ply", [names[i] for i in keep], rows[:, keep])
    with pytest.raises(PlyError, match=r"missing\.ply: missing properties \['f_dc_1', 'rot_3'\]"):
        read_ply(p)
    # NaN / inf rows
    bad = rows.copy()
    bad[0, 0] = np.nan
    bad[2, 9] = np.inf
    bad[4, 12] = -np.inf
    with pytest.raises(PlyError, match=r"nan\.ply: 3 rows contain NaN/inf"):
        read_ply(_write_vertex(tmp_path / "nan.ply", names, bad))
    # zero rows
    with pytest.raises(PlyError, match=r"empty\.ply: zero Gaussians"):
        read_ply(_write_vertex(tmp_path / "empty.ply", names, rows[:0]))
    # garbage bytes
    (tmp_path / "garbage.ply").write_bytes(b"\x00\x01not a ply at all" * 10)
    with pytest.raises(PlyError, match=r"garbage\.ply: cannot parse"):
        read_ply(tmp_path / "garbage.ply")
    # truncated binary body
    good = write_ply(tmp_path / "good.ply", g).read_bytes()
    (tmp_path / "trunc.ply").write_bytes(good[:-10])
    with pytest.raises(PlyError, match=r"trunc\.ply: cannot parse"):
        read_ply(tmp_path / "trunc.ply")
    # no vertex element
    face = np.zeros(2, dtype=[("a", "<f4")])
    PlyData([PlyElement.describe(face, "face")]).write(str(tmp_path / "novertex.ply"))
    with pytest.raises(PlyError, match=r"novertex\.ply: no vertex element"):
        read_ply(tmp_path / "novertex.ply")
    # zero quaternion
    zq = rows.copy()
    zq[1, 13:17] = 0
    with pytest.raises(PlyError, match=r"zq\.ply: 1 zero-norm quaternions"):
        read_ply(_write_vertex(tmp_path / "zq.ply", names, zq))
    assert issubclass(PlyError, ValueError)
    with pytest.raises(FileNotFoundError):
        read_ply(tmp_path / "nope.ply")


# ---- GaussianVerse layout ---------------------------------------------------------------
#
# The reference is the dataset authors' public loader, tiangexiang/3DGen-Playground:
#   dataloaders/standard_3dgen_loader.py (commit 65c7437d), ``load_ply(path)``: reads the vertex properties BY NAME
#     with plyfile: ``x y z``, ``opacity``, ``f_dc_0..2``, every ``f_rest_*`` sorted by its index and reshaped to
#     (N, 3, 15), every ``scale_*`` and every ``rot*`` sorted by index; it returns the float32 array
#     ``concat(xyz, opacity, concat(f_dc[:, :, None], f_rest(N, 3, 15), -1).reshape(N, 48), scales, rots)`` of
#     width 59, so each colour channel's DC is followed by that channel's 15 higher-order coefficients: DC at
#     columns 4, 20, 36.
#   utils/gsplat_render_util.py (commit 16a20e25), ``_point_clouds_to_gsplat_inputs``: reads that array as
#     opacity = sigmoid(col 3), SH = cols 4:52 reshaped (3, 16) with DC = [..., 0], scales = exp(cols 52:55),
#     quats = normalised cols 55:59 (gsplat's w, x, y, z).
# So the file holds INRIA-named properties (59 of them, in any order; the usual 3DGS ``save_ply`` adds normals:
# 62), and "59 columns" is the width of the loader's array, not a property order to read by position.

_INRIA_SH3 = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(45)]
              + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
"""The property order of a 3DGS ``save_ply`` at SH degree 3 (INRIA), normals included: 62 properties."""


def _sh3_columns(g: Gaussians, rest: np.ndarray) -> dict[str, np.ndarray]:
    """Property name -> values of an SH degree-3 fitting (``rest`` [N, 45], INRIA's channel-major f_rest_*)."""
    n = len(g)
    cols = {"x": g.means[:, 0], "y": g.means[:, 1], "z": g.means[:, 2], "nx": np.zeros(n), "ny": np.zeros(n),
            "nz": np.zeros(n), "opacity": g.opacity_logits}
    cols.update({f"f_dc_{c}": g.sh0[:, c] for c in range(3)})
    cols.update({f"f_rest_{i}": rest[:, i] for i in range(45)})
    cols.update({f"scale_{c}": g.log_scales[:, c] for c in range(3)})
    cols.update({f"rot_{c}": g.quats[:, c] for c in range(4)})
    return {k: np.asarray(v, dtype=np.float32) for k, v in cols.items()}


def _write_named(path: Path, cols: dict[str, np.ndarray], order: list[str]) -> Path:
    return _write_vertex(path, order, np.stack([cols[k] for k in order], axis=1))


def _authors_load_ply(path: Path) -> np.ndarray:
    """``load_ply`` of dataloaders/standard_3dgen_loader.py, step by step (see the comment above): ``[N, 59]``."""
    v = PlyData.read(str(path)).elements[0]
    names = [p.name for p in v.properties]
    def by_index(prefix: str) -> list[str]:
        return sorted((n for n in names if n.startswith(prefix)), key=lambda x: int(x.split("_")[-1]))

    xyz = np.stack([np.asarray(v[a]) for a in ("x", "y", "z")], axis=1)
    opacities = np.asarray(v["opacity"])[..., None]
    features_dc = np.zeros((len(xyz), 3, 1))
    for c in range(3):
        features_dc[:, c, 0] = np.asarray(v[f"f_dc_{c}"])
    extra = np.stack([np.asarray(v[n]) for n in by_index("f_rest_")], axis=1).reshape(len(xyz), 3, 15)
    scales = np.stack([np.asarray(v[n]) for n in by_index("scale_")], axis=1)
    rots = np.stack([np.asarray(v[n]) for n in by_index("rot")], axis=1)
    features = np.concatenate((features_dc, extra), axis=-1).reshape(len(xyz), -1)
    return np.concatenate((xyz, opacities, features, scales, rots), axis=1).astype(np.float32)


def _gaussians_of_loader_array(a: np.ndarray) -> Gaussians:
    """What utils/gsplat_render_util.py reads from the loader's array (pre-activation; DC = SH[..., 0])."""
    sh = a[:, 4:52].reshape(len(a), 3, 16)
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))  # noqa: E731
    return Gaussians(means=t(a[:, 0:3]), quats=t(a[:, 55:59]), log_scales=t(a[:, 52:55]), opacity_logits=t(a[:, 3]),
                     sh0=t(sh[:, :, 0]))


def test_read_gaussianverse_as_the_authors_loader_reads_it(tmp_path):
    """A fitting written the way the GaussianVerse authors' loader reads it (INRIA names, SH degree 3, with and
    without normals, in the 3DGS order and shuffled) gives the Gaussians that loader's columns hold."""
    g = _random(30, seed=4)
    rest = np.random.default_rng(0).normal(size=(30, 45))
    cols = _sh3_columns(g, rest)
    no_normals = [k for k in _INRIA_SH3 if k not in ("nx", "ny", "nz")]
    shuffled = list(np.random.default_rng(1).permutation(_INRIA_SH3))
    for name, order in [("save_ply", _INRIA_SH3), ("no_normals", no_normals), ("shuffled", shuffled)]:
        path = _write_named(tmp_path / f"{name}.ply", cols, order)
        ref = _authors_load_ply(path)
        assert ref.shape == (30, 59)
        assert np.array_equal(ref[:, [4, 20, 36]], g.sh0.numpy())  # DC columns of the loader's array
        h = read_gaussianverse_ply(path)
        _assert_same(h, _gaussians_of_loader_array(ref))
        _assert_same(h, g)


def test_read_gaussianverse_refuses_what_the_authors_loader_cannot_read(tmp_path):
    g = _random(30, seed=4)
    rest = np.random.default_rng(0).normal(size=(30, 45))
    cols = _sh3_columns(g, rest)
    # properties without the INRIA names: the loader looks them up by name, so neither do we read them by position
    rows = np.concatenate([g.means, g.opacity_logits[:, None], g.sh0, rest, g.log_scales, g.quats], axis=1)
    with pytest.raises(PlyError, match=r"nameless\.ply: missing properties \['x', 'y', 'z', 'opacity'"):
        read_gaussianverse_ply(_write_vertex(tmp_path / "nameless.ply", [f"attr_{i}" for i in range(59)], rows))
    # an SH degree-0 INRIA file is not a GaussianVerse fitting (the loader's reshape to (3, 15) fails on it)
    with pytest.raises(PlyError, match=r"inria\.ply: expected 45 f_rest_\* properties .* found 0"):
        read_gaussianverse_ply(write_ply(tmp_path / "inria.ply", g))
    bad = dict(cols, scale_1=cols["scale_1"].copy())
    bad["scale_1"][3] = np.nan
    with pytest.raises(PlyError, match=r"gvbad\.ply: 1 rows contain NaN/inf"):
        read_gaussianverse_ply(_write_named(tmp_path / "gvbad.ply", bad, _INRIA_SH3))
    with pytest.raises(PlyError, match=r"gv0\.ply: zero Gaussians"):
        read_gaussianverse_ply(_write_named(tmp_path / "gv0.ply", {k: v[:0] for k, v in cols.items()}, _INRIA_SH3))
    # NaN in the ignored higher-order SH coefficients does not matter
    nan_rest = dict(cols, f_rest_0=np.full(30, np.nan, np.float32))
    _assert_same(read_gaussianverse_ply(_write_named(tmp_path / "gvrest.ply", nan_rest, _INRIA_SH3)), g)
