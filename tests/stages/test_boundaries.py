"""Absurd inputs are refused with a reason and change nothing else: a PLY with a Gaussian e^80 wide, an
object collapsed to one point, an atlas outside the bounds given to normalize."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import yaml

from gaussian_atlas.atlas import AtlasConfig, write_atlases
from gaussian_atlas.gaussians import Gaussians, write_ply


def _g(n: int, seed: int) -> Gaussians:
    gen = torch.Generator().manual_seed(seed)
    return Gaussians(means=torch.randn(n, 3, generator=gen) * 0.4, quats=torch.randn(n, 4, generator=gen),
                     log_scales=torch.full((n, 3), -3.0), opacity_logits=torch.randn(n, generator=gen),
                     sh0=torch.randn(n, 3, generator=gen) * 0.3)


def test_absurd_plys_are_quarantined_with_the_offending_value(tmp_path):
    d = tmp_path / "plys"
    d.mkdir()
    write_ply(d / "good.ply", _g(40, 0))
    wide = _g(40, 1)
    wide.log_scales[7, 0] = 80.0  # scale_0 = 80: a Gaussian e^80 wide
    write_ply(d / "wide.ply", wide)
    one = _g(1, 2)
    write_ply(d / "single.ply", one)
    point = _g(30, 3)
    point.means[:] = torch.tensor([0.3, 0.1, -0.2])
    write_ply(d / "point.ply", point)
    items = [{"id": p.stem, "src": str(p), "shard": "s", "caption": p.stem} for p in sorted(d.glob("*.ply"))]
    rows, quarantine = write_atlases(items, AtlasConfig(side=8, method="scipy", cache_dir=str(tmp_path / "c")),
                                     tmp_path / "out", progress=False)
    assert [r["id"] for r in rows] == ["good"]
    reasons = {q["id"]: q["reason"] for q in quarantine}
    assert "scale_0 of Gaussian 7" in reasons["wide"] and "max_log_scale" in reasons["wide"]
    assert "share one centre" in reasons["single"] and "share one centre" in reasons["point"]


def test_normalize_leaves_an_absurd_atlas_out_of_the_statistics(tmp_path, monkeypatch):
    from stages import normalize

    side = 4
    rng = np.random.default_rng(0)

    def atlas():
        a = np.zeros((16, side, side), np.float32)
        a[0:3] = rng.uniform(-0.2, 0.2, (3, side, side))
        a[[3, 7, 11]] = rng.uniform(0.1, 0.9, (side, side))
        a[4:7] = rng.uniform(0, 1, (3, side, side))
        a[8:11] = rng.uniform(-5, -3, (3, side, side))
        a[12] = 1.0
        return a

    def run(folder, extra: np.ndarray | None):
        (folder / "a").mkdir(parents=True)
        rows = []
        for i in range(3):
            np.savez(folder / "a" / f"{i}.npz", atlas=atlas() if extra is None or i < 3 else extra)
            rows.append({"id": str(i), "path": f"a/{i}.npz", "caption": "x"})
        if extra is not None:
            np.savez(folder / "a" / "bad.npz", atlas=extra)
            rows.append({"id": "bad", "path": "a/bad.npz", "caption": "x"})
        pd.DataFrame(rows).to_parquet(folder / "index.parquet")
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump({"normalize": {"std_floor": 1e-3, "min_atlases": 2, "batch": 2},
                                          "atlas": {"side": side, "method": "scipy"}}))
        normalize.main(["--atlas", str(folder), "--out", str(folder / "norm"), "--metrics", str(folder / "m.json"),
                        "--reports", str(folder / "rep"), "--params", str(params)])
        with np.load(folder / "norm" / "stats.npz") as z:
            return {k: z[k].copy() for k in ("mean", "std")}, pd.read_csv(folder / "norm" / "quarantine.csv")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GATLAS_MLFLOW_PARENT_RUN_ID", raising=False)
    rng = np.random.default_rng(0)
    clean, q0 = run(tmp_path / "clean", None)
    bad = atlas()
    bad[8, 1, 2] = 79.9  # the channel value a scale_0 = 80 PLY gave before the bound
    rng = np.random.default_rng(0)
    with_bad, q1 = run(tmp_path / "dirty", bad)
    assert len(q0) == 0 and q1["path"].tolist() == ["a/bad.npz"] and "log-scale 79.9" in q1["reason"][0]
    for k in ("mean", "std"):
        np.testing.assert_array_equal(clean[k], with_bad[k])
