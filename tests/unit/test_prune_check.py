"""The prune_check quality gate: every kind of bad fit is rejected with its reason, good ones pass."""

from __future__ import annotations

import math
import re

import pandas as pd

from gaussian_atlas.checks import validate_fits
from gaussian_atlas.prune import PruneCheckConfig

GOOD = {"status": "ok", "reason": "", "n_gaussians": 900, "n_nonfinite": 0, "psnr": 31.0, "log_scale_min": -6.0,
        "log_scale_max": -2.0, "frac_transparent": 0.05, "extent": 1.1}


def test_each_bad_fit_rejected_with_reason(tmp_path):
    cfg = PruneCheckConfig(tau=1000, psnr_floor=25.0)
    rows = {
        "good": {},
        "failed": {"status": "failed", "reason": "cannot write PLY: 3 rows contain NaN/inf", "psnr": float("nan")},
        "too_many": {"n_gaussians": 1001},
        "nan": {"n_nonfinite": 3},
        "blurry": {"psnr": 21.5},
        "no_psnr": {"psnr": float("nan")},  # an "ok" fit whose held-out render gave NaN: must not pass
        "tiny_scale": {"log_scale_min": math.log(1e-9)},
        "huge_scale": {"log_scale_max": math.log(5.0)},
        "transparent": {"frac_transparent": 0.8},
        "flown_away": {"extent": 7.5},
    }
    table = pd.DataFrame([{"id": k, **GOOD, **v} for k, v in rows.items()])
    verdict = validate_fits(table, cfg, docs_dir=tmp_path / "docs")
    reasons = {table["id"][r]: "; ".join(m) for r, m in verdict["reasons"].items()}
    assert "good" not in reasons
    assert reasons["failed"] == "cannot write PLY: 3 rows contain NaN/inf"  # only its own reason
    assert "1001 Gaussians (allowed 1..1000)" in reasons["too_many"]
    assert "3 Gaussians with NaN/inf" in reasons["nan"]
    assert "PSNR 21.50 dB below the floor 25 dB" in reasons["blurry"]
    assert reasons["no_psnr"] == "held-out PSNR missing (NaN: the held-out render gave no finite value)"
    assert "degenerate scale 1e-09" in reasons["tiny_scale"]
    assert "degenerate scale 5" in reasons["huge_scale"]
    assert "80% of the Gaussians are transparent" in reasons["transparent"]
    assert "reach 7.50" in reasons["flown_away"]
    index = (tmp_path / "docs" / "index.html").read_text()
    # readable offline: no script or style from a CDN; the failing expectations and the pages are listed
    assert "<script" not in index and not re.search(r"(src|href)=['\"]https?://", index)
    assert re.search(r"expect_column_values_to_be_between\(n_gaussians\)</code></td><td>1</td>", index)
    pages = re.findall(r"href='([^']+)'", index)
    assert any(p.startswith("validations/") for p in pages) and all((tmp_path / "docs" / p).exists() for p in pages)
    assert (tmp_path / "docs" / "gx_index.html").exists()


def test_offline_index_lists_each_failing_row_with_value_and_reason_capped(tmp_path):
    cfg = PruneCheckConfig(tau=1000, psnr_floor=25.0)
    n = 25
    table = pd.DataFrame([{"id": "good", **GOOD}, {"id": "crowded", **GOOD, "n_gaussians": 1001}] +
                         [{"id": f"blurry-{i:02d}", **GOOD, "psnr": 20.0 + i / 100} for i in range(n)])
    validate_fits(table, cfg, docs_dir=tmp_path / "docs")
    index = (tmp_path / "docs" / "index.html").read_text()
    failing = index.split("<h2>Failing rows</h2>", 1)[1]
    rows = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td></tr>", failing)
    assert ("crowded", "1001", "1001 Gaussians (allowed 1..1000)") in rows
    blurry = [r for r in rows if r[0].startswith("blurry-")]
    assert len(blurry) == 20  # capped (checks.LISTED_ROWS), the rest counted
    assert blurry[0] == ("blurry-00", "20", "held-out PSNR 20.00 dB below the floor 25 dB")
    assert f"expect_column_values_to_be_between(psnr)</code> {{&quot;min_value&quot;: 25.0}}: {n} failing row(s)" \
        in failing
    assert "and 5 more" in failing and "good" not in failing
