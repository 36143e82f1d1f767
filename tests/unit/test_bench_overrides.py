"""benchmarks/_overrides.py: a benchmark arm's dotted settings replace exactly those keys; typos raise."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _overrides import parse_overrides, with_overrides  # noqa: E402

from gaussian_atlas.fit import FitConfig  # noqa: E402


def test_overrides_set_dotted_keys_and_refuse_unknown_ones():
    cfg = FitConfig()
    o = parse_overrides("densify.refine_every=50, lr_means=5.6e-4,method=anchors,densify.absgrad=true")
    assert o == {"densify.refine_every": 50, "lr_means": 5.6e-4, "method": "anchors", "densify.absgrad": True}
    new = with_overrides(cfg, o)
    assert (new.densify.refine_every, new.lr_means, new.method, new.densify.absgrad) == (50, 5.6e-4, "anchors", True)
    assert new.densify.prune_opa == cfg.densify.prune_opa and new.tau == cfg.tau  # the rest untouched
    assert cfg.densify.refine_every != 50  # a copy
    with pytest.raises(ValueError, match="refine_evry"):
        with_overrides(cfg, {"densify.refine_evry": 5})
    with pytest.raises(ValueError, match="not a section"):
        with_overrides(cfg, {"tau.x": 5})
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides("tau")


def test_exponents_without_a_dot_are_numbers():
    """YAML 1.1 reads ``1e-5`` as a string; an arm's ``min_scale=1e-5`` must still set the number."""
    o = parse_overrides("min_scale=1e-5,lambda_reg=2E-3,method=plain,lpips_weights=nan")
    assert o == {"min_scale": 1e-5, "lambda_reg": 2e-3, "method": "plain", "lpips_weights": "nan"}
    assert with_overrides(FitConfig(), o).min_scale == 1e-5


def test_pick_fit_arm_rule():
    """The end-to-end run's arm: the fastest at >= 50 objects/min with every object >= -0.3 dB, else the best worst
    object among those >= 50 objects/min, else none."""
    from pick_fit_arm import pick

    def row(name, opm, worst):
        return {"variant": name, "objects_per_minute": opm, "worst": worst, "mean": worst, "overrides": {}}

    best, _ = pick([row("a", 73, -2.4), row("b", 60, -0.2), row("c", 55, -0.1), row("d", 45, 0.5)])
    assert best["variant"] == "b"  # c is better in quality but slower; d is under 50 objects/min
    best, why = pick([row("a", 73, -2.4), row("b", 60, -0.9), row("d", 45, 0.5)])
    assert best["variant"] == "b" and "no arm" in why
    assert pick([row("d", 45, 0.5)])[0] is None
