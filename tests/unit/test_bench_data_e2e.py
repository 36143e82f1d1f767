"""benchmarks/bench_data_e2e.py: its pandas reading of the prune_check suite (the GPU machine has no
great-expectations) rejects the same fits for the same reasons as the stage's great-expectations run."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("bench_data_e2e", ROOT / "benchmarks" / "bench_data_e2e.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_data_e2e"] = mod  # its worker processes import it by name (spawn)
    spec.loader.exec_module(mod)
    return mod


def _row(i: int, **kw) -> dict:
    base = {"id": f"o{i}", "shard": "s", "status": "ok", "reason": "", "ply": f"o{i}.ply", "n_gaussians": 1000,
            "n_nonfinite": 0, "psnr": 30.0, "log_scale_min": math.log(1e-3), "log_scale_max": math.log(0.1),
            "frac_transparent": 0.01, "extent": 1.2}
    return {**base, **kw}


def test_plain_prune_check_agrees_with_great_expectations():
    pytest.importorskip("great_expectations")
    from gaussian_atlas.checks import validate_fits
    from gaussian_atlas.prune import PruneCheckConfig

    cfg = PruneCheckConfig(tau=4096, psnr_floor=20.0)
    rows = [_row(0), _row(1, psnr=19.5), _row(2, n_gaussians=5000), _row(3, n_nonfinite=2, psnr=12.0),
            _row(4, frac_transparent=0.8), _row(5, extent=7.0, log_scale_max=math.log(5.0)),
            _row(6, log_scale_min=math.log(1e-9)), _row(7, psnr=float("nan")),
            {"id": "o8", "shard": "s", "status": "failed", "reason": "fit failed: boom"}, _row(9, psnr=20.0)]
    table = pd.DataFrame(rows)
    plain = _load().plain_verdict(table, cfg)
    gx = validate_fits(table, cfg)["reasons"]
    assert plain == gx
    assert set(plain) == {1, 2, 3, 4, 5, 6, 7, 8}  # the suite can reject: a good fit and one at the floor pass
    assert plain[7] == ["held-out PSNR missing (NaN: the held-out render gave no finite value)"]
    assert plain[8] == ["fit failed: boom"]


def test_tiny_cpu_run_resumes_without_refitting(tmp_path):
    """The whole chain at toy scale on the CPU; a rerun after losing a batch's marker (a kill before the atlas
    step finished) refits nothing and ends with the same statistics."""
    import json

    import numpy as np

    mod = _load()
    argv = ["--device", "cpu", "--objects", "2", "--batch", "1", "--resolution", "16", "--views", "8", "--steps", "3",
            "--init-points", "64", "--side", "8", "--workers", "1", "--gate", "plain", "--atlas-worker", "thread",
            "--psnr-floor", "0", "--out", str(tmp_path / "w"), "--json", str(tmp_path / "r.json")]
    first = mod.main(argv)
    assert first["complete"] and first["stages"]["fit"]["n"] == 2 and first["quality"]["n_atlases"] == 2
    with np.load(tmp_path / "w" / "stats.npz") as z:
        mean, count = z["mean"], int(z["count"])
    assert count == 2 and json.loads((tmp_path / "r.json").read_text())["complete"]
    (tmp_path / "w" / "batches" / "b00001.json").unlink()
    again = mod.main(argv)
    assert again["complete"] and again["batches_done_now"] == 1 and again["stages"]["fit"]["n"] == 0
    with np.load(tmp_path / "w" / "stats.npz") as z:
        np.testing.assert_allclose(z["mean"], mean)


def test_overlap_modes_do_the_same_work(tmp_path):
    """``--overlap renders`` (atlas after each fit) and ``none`` take every object through every stage, with the
    statistics of the pipelined run (the order of the work changes, not the work)."""
    import numpy as np

    mod = _load()
    base = ["--device", "cpu", "--objects", "2", "--batch", "1", "--resolution", "16", "--views", "8", "--steps", "3",
            "--init-points", "64", "--side", "8", "--workers", "1", "--gate", "plain", "--atlas-worker", "thread",
            "--psnr-floor", "0"]
    means = {}
    for mode in ("pipeline", "renders", "none"):
        res = mod.main(base + ["--overlap", mode, "--out", str(tmp_path / mode), "--json", str(tmp_path / f"{mode}.json")])
        assert res["complete"] and res["overlap"] == mode and res["quality"]["n_atlases"] == 2
        with np.load(tmp_path / mode / "stats.npz") as z:
            means[mode] = z["mean"]
    np.testing.assert_allclose(means["renders"], means["pipeline"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(means["none"], means["pipeline"], rtol=1e-5, atol=1e-6)
