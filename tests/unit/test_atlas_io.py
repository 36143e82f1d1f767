"""Atlases of many PLYs on disk: broken inputs quarantined with reasons, the rest written; resume; CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gaussian_atlas.atlas import AtlasConfig, write_atlases
from gaussian_atlas.gaussians import Gaussians, write_ply


def _g(n: int, seed: int) -> Gaussians:
    gen = torch.Generator().manual_seed(seed)
    return Gaussians(means=torch.randn(n, 3, generator=gen) * 0.4, quats=torch.randn(n, 4, generator=gen),
                     log_scales=torch.full((n, 3), -3.0), opacity_logits=torch.randn(n, generator=gen),
                     sh0=torch.randn(n, 3, generator=gen) * 0.3)


def _bad_plys(d: Path) -> dict[str, str]:
    """Write good and broken PLYs; returns id -> expected words in the reason."""
    d.mkdir(parents=True, exist_ok=True)
    write_ply(d / "good1.ply", _g(50, 1))
    write_ply(d / "good2.ply", _g(80, 2))
    good = (d / "good1.ply").read_bytes()
    head, body = good.split(b"end_header\n", 1)
    arr = np.frombuffer(body, dtype=np.float32).copy()
    arr[0] = np.nan
    (d / "nan.ply").write_bytes(head + b"end_header\n" + arr.tobytes())
    (d / "missing.ply").write_bytes(good.replace(b"property float f_dc_1\n", b""))
    (d / "garbage.ply").write_bytes(b"this is not a ply file")
    empty = head.replace(b"element vertex 50", b"element vertex 0") + b"end_header\n"
    (d / "empty.ply").write_bytes(empty)
    return {"nan": "NaN", "missing": "missing properties", "garbage": "cannot parse", "empty": "zero Gaussians"}


def test_broken_plys_quarantined_rest_written_and_resume(tmp_path):
    expect = _bad_plys(tmp_path / "plys")
    items = [{"id": p.stem, "src": str(p), "shard": "shard-00000", "caption": f"thing {p.stem}"}
             for p in sorted((tmp_path / "plys").glob("*.ply"))]
    cfg = AtlasConfig(side=8, method="scipy", cache_dir=str(tmp_path / "cache"))
    rows, quarantine = write_atlases(items, cfg, tmp_path / "out", progress=False)
    assert sorted(r["id"] for r in rows) == ["good1", "good2"]
    reasons = {q["id"]: q["reason"] for q in quarantine}
    assert set(reasons) == set(expect)
    for k, words in expect.items():
        assert words in reasons[k] and f"{k}.ply" in reasons[k], (k, reasons[k])
    with np.load(tmp_path / "out" / rows[0]["path"]) as z:
        assert z["atlas"].shape == (16, 8, 8) and int(z["n_real"]) == 50
    mtime = (tmp_path / "out" / rows[0]["path"]).stat().st_mtime_ns
    rows2, _ = write_atlases(items, cfg, tmp_path / "out", progress=False)  # resume: nothing rebuilt
    assert (tmp_path / "out" / rows[0]["path"]).stat().st_mtime_ns == mtime
    assert sorted(r["id"] for r in rows2) == ["good1", "good2"]


def test_cli_atlas_gaussianverse_layout(tmp_path):
    """``--layout gaussianverse`` reads ``<id>/point_cloud.ply`` with the INRIA names at SH degree 3, as the
    dataset authors' loader does (see tests/unit/test_gaussians.py), normals included."""
    from plyfile import PlyData, PlyElement

    names = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(45)]
             + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
    for k in range(2):
        g = _g(40, k)
        cols = [g.means, torch.zeros(40, 3), g.sh0, torch.zeros(40, 45), g.opacity_logits[:, None], g.log_scales,
                g.quats]
        data = torch.cat(cols, 1).numpy().astype(np.float32)  # [40, 62]
        rec = np.zeros(40, dtype=[(n, "f4") for n in names])
        for i, n in enumerate(names):
            rec[n] = data[:, i]
        (tmp_path / "gv" / f"obj{k}").mkdir(parents=True)
        PlyData([PlyElement.describe(rec, "vertex")]).write(str(tmp_path / "gv" / f"obj{k}" / "point_cloud.ply"))
    exe = Path(sys.executable).with_name("gatlas")
    r = subprocess.run([str(exe), "atlas", str(tmp_path / "gv"), "--layout", "gaussianverse", "--out",
                        str(tmp_path / "out"), "--side", "8", "--method", "scipy", "--cache-dir",
                        str(tmp_path / "cache")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    assert sorted(index["id"]) == ["obj0", "obj1"] and (index["n_real"] == 40).all()


def test_changed_fit_rebuilds_its_atlas_only(tmp_path):
    """The reuse key covers the input PLY: a refit object (same id, path, settings, code) gets a new
    atlas built from the new fit; an unchanged object keeps its file."""
    d = tmp_path / "plys"
    d.mkdir()
    write_ply(d / "a.ply", _g(50, 1))
    write_ply(d / "b.ply", _g(60, 2))
    items = [{"id": k, "src": str(d / f"{k}.ply"), "shard": "s", "caption": k} for k in ("a", "b")]
    cfg = AtlasConfig(side=8, method="scipy", cache_dir=str(tmp_path / "cache"))
    rows, _ = write_atlases(items, cfg, tmp_path / "out", progress=False)
    paths = {r["id"]: tmp_path / "out" / r["path"] for r in rows}
    before = {k: (p.stat().st_mtime_ns, np.load(p)["atlas"].copy()) for k, p in paths.items()}
    write_ply(d / "a.ply", _g(40, 9))  # object a refit: another Gaussian count and values
    rows2, _ = write_atlases(items, cfg, tmp_path / "out", progress=False)
    with np.load(paths["a"]) as z:
        assert int(z["n_real"]) == 40
        assert not np.allclose(z["atlas"], before["a"][1])
    assert paths["b"].stat().st_mtime_ns == before["b"][0]  # untouched input: reused
    assert {r["id"]: r["n_real"] for r in rows2} == {"a": 40, "b": 60}
