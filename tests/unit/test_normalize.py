"""Pixel-wise atlas statistics (paper Sec. 5): streaming = one pass = numpy, the floor, exact inverses, files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gaussian_atlas.normalize import DEFAULT_STD_FLOOR, RunningStats, denormalize, normalize

SHAPE = (16, 6, 6)


def _data(b: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # per-pixel offsets far from zero and very different spreads: a naive sum-of-squares would lose digits
    loc = rng.normal(size=SHAPE) * 100.0
    spread = np.exp(rng.normal(size=SHAPE))
    return (loc + spread * rng.normal(size=(b,) + SHAPE)).astype(np.float32)


def test_matches_numpy_and_single_pass_equals_chunks_and_merge():
    x = _data()
    one = RunningStats().update(x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(one.mean, x64.mean(0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(one.std, np.maximum(x64.std(0), DEFAULT_STD_FLOOR), rtol=0, atol=1e-10)
    assert one.count == len(x) and one.shape == SHAPE

    # uneven chunks, single atlases and torch tensors stream to the same numbers
    streamed = RunningStats()
    for s, e in [(0, 1), (1, 7), (7, 8), (8, 30), (30, 40)]:
        chunk = x[s:e]
        streamed.update(torch.from_numpy(chunk) if s % 2 else chunk[0] if e - s == 1 else chunk)
    np.testing.assert_allclose(streamed.mean, one.mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(streamed.std, one.std, rtol=0, atol=1e-10)

    # two halves merged (e.g. two workers) = one pass
    a, b = RunningStats().update(x[:13]), RunningStats().update(x[13:])
    merged = a.merge(b)
    assert merged.count == 40
    np.testing.assert_allclose(merged.mean, one.mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(merged.var, one.var, rtol=0, atol=1e-10)
    # merging an empty accumulator changes nothing; merging into one copies
    np.testing.assert_allclose(RunningStats().merge(one).mean, one.mean, rtol=0, atol=0)
    assert one.merge(RunningStats()).count == 40


def test_floor_applies_where_data_is_constant():
    x = _data(10).astype(np.float64)
    x[:, 3] = 0.25  # channel 3 constant at every pixel
    x[:, 5, 0, 0] = 7.0 + np.linspace(0, 1e-6, 10)  # one pixel barely varies
    rs = RunningStats(std_floor=1e-3).update(x)
    assert (rs.std[3] == 1e-3).all()
    assert rs.std[5, 0, 0] == 1e-3
    assert (rs.std[0] > 1e-3).all()  # real spreads are untouched
    np.testing.assert_allclose(rs.std[0], x[:, 0].std(0), rtol=1e-12)
    assert rs.floored_fraction() == pytest.approx((36 + 1) / (16 * 36))
    z = normalize(x, rs)
    assert np.isfinite(z).all() and (z[:, 3] == 0).all()
    with pytest.raises(ValueError, match="std_floor"):
        RunningStats(std_floor=0.0)


@pytest.mark.parametrize("kind", ["numpy64", "torch64", "torch32"])
def test_normalize_denormalize_are_inverses(kind):
    x = _data(8, seed=1)
    rs = RunningStats().update(x)
    if kind == "numpy64":
        a = x.astype(np.float64)
    else:
        a = torch.from_numpy(x).to(torch.float64 if kind == "torch64" else torch.float32)
    z = normalize(a, rs)
    assert type(z) is type(a) and z.dtype == a.dtype
    back = denormalize(z, rs)
    tol = 1e-12 if "64" in kind else 1e-4
    np.testing.assert_allclose(np.asarray(back, dtype=np.float64), np.asarray(a, dtype=np.float64), rtol=0,
                               atol=tol * 100)  # values are ~100: relative 1e-12 / 1e-6
    np.testing.assert_allclose(np.asarray(normalize(denormalize(z, rs), rs), dtype=np.float64),
                               np.asarray(z, dtype=np.float64), rtol=0, atol=tol * 100)
    # standardised data: zero mean and unit std per pixel
    z64 = np.asarray(normalize(x.astype(np.float64), rs))
    np.testing.assert_allclose(z64.mean(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(z64.std(0), 1.0, atol=1e-9)
    with pytest.raises(ValueError, match="shape"):
        normalize(np.zeros((16, 5, 5)), rs)


def test_save_load_round_trip_and_merge_after_load(tmp_path):
    x = _data(20, seed=2)
    rs = RunningStats(std_floor=2e-3).update(x[:12])
    path = rs.save(tmp_path / "stats.npz")
    with np.load(path) as z:
        assert {"mean", "std", "m2", "count", "std_floor"} <= set(z.files)
        assert int(z["count"]) == 12
        np.testing.assert_array_equal(z["std"], rs.std)
    loaded = RunningStats.load(path)
    assert loaded.count == 12 and loaded.std_floor == 2e-3
    np.testing.assert_array_equal(loaded.mean, rs.mean)
    np.testing.assert_array_equal(loaded.std, rs.std)
    loaded.update(x[12:])
    full = RunningStats(std_floor=2e-3).update(x)
    np.testing.assert_allclose(loaded.mean, full.mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(loaded.std, full.std, rtol=0, atol=1e-10)


def test_bad_input_and_empty_stats(tmp_path):
    rs = RunningStats()
    with pytest.raises(ValueError, match="empty"):
        rs.mean
    with pytest.raises(ValueError, match="empty"):
        rs.save(tmp_path / "s.npz")
    bad = _data(3)
    bad[1, 2, 3, 4] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        rs.update(bad)
    assert rs.count == 0  # nothing was folded in
    rs.update(_data(3))
    with pytest.raises(ValueError, match="shape"):
        rs.update(np.zeros((2, 16, 5, 5)))
    with pytest.raises(ValueError, match="B, C, H, W"):
        rs.update(np.zeros((16, 6)))
    summary = rs.summary()
    assert summary["count"] == 3.0 and "std/0" in summary and "mean/15" in summary
