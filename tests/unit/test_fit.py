"""Fitting on the CPU: the loss goes down, held-out PSNR rises, the bound holds, packing is invisible."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from gaussian_atlas.fit import DensifyConfig, FitConfig, fit_objects


CFG = FitConfig(steps=150, tau=500, init_points=300, views_per_step=2, holdout_every=4, measure_views=4,
                densify=DensifyConfig(refine_start_iter=20, refine_every=20, refine_stop_iter=120))


def test_fit_improves_held_out_psnr(objects):
    torch.set_num_threads(2)
    cfg = replace(CFG, init_points=600, tau=2000)  # 32x32 aliased renders: PSNR ~20.5 dB after 150 steps
    start = fit_objects(objects[:1], replace(cfg, steps=1))[0]
    losses = []
    res = fit_objects(objects[:1], cfg, on_step=lambda s, m: losses.append(m["loss"]))[0]
    m = res.metrics
    assert m["psnr"] > start.metrics["psnr"] + 2.0, (start.metrics["psnr"], m["psnr"])
    assert m["psnr"] > 19.0 and m["ssim"] > 0.8
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:5])
    g = res.gaussians
    assert not g.validate() and g.visibility is not None and (g.visibility >= 0).all()
    assert g.visibility.sum() > 0


def test_bound_holds_when_densification_wants_more(objects):
    greedy = replace(CFG, steps=60, densify=DensifyConfig(refine_start_iter=10, refine_every=10, refine_stop_iter=50,
                                                           grow_grad2d=1e-7))  # grow everything: the bound must act
    sizes = []
    res = fit_objects(objects[:1], greedy, on_step=lambda s, m: sizes.append(m["n_gaussians"]))[0]
    assert res.metrics["bound_events"] >= 1
    assert max(sizes) <= greedy.tau and res.metrics["n_gaussians"] <= greedy.tau


def test_packed_fit_unpacks_each_object_at_the_origin(objects):
    before = [o.c2w.copy() for o in objects]
    res = fit_objects(objects, replace(CFG, steps=40))
    for o, c in zip(objects, before):  # packing shifts copies, never the caller's cameras
        assert np.array_equal(o.c2w, c)
    assert [r.id for r in res] == [o.id for o in objects]
    for r in res:
        assert 0 < r.metrics["n_gaussians"] <= CFG.tau
        assert r.gaussians.means.norm(dim=-1).median() < 1.5  # objects live in the unit sphere


def test_min_scale_floors_what_adam_drives_down(objects, monkeypatch):
    """Log-scales pushed down step after step (here fast: a strong scale regulariser and a large learning rate)
    stop at ``log(min_scale)``, in every step's parameters (splits, which divide scales by 1.6, included) and in
    the result; the unconstrained fit goes below it."""
    from gaussian_atlas.fit.plain import PlainFit

    drift = replace(CFG, steps=60, lr_scales=0.05, lambda_reg=1.0,  # everything splits every 10 steps until 50
                    densify=replace(CFG.densify, refine_start_iter=10, refine_every=10, refine_stop_iter=55,
                                    grow_grad2d=1e-9, grow_scale3d=1e-9))
    seen: list[float] = []
    orig = PlainFit.stats

    def stats(self):  # every step's smallest log-scale, after the optimiser step, the strategy and the floor
        seen.append(float(self.params["scales"].detach().min()))
        return orig(self)

    monkeypatch.setattr(PlainFit, "stats", stats)
    free = fit_objects(objects[:1], replace(drift, min_scale=1e-30), on_step=lambda s, m: None)[0]
    free_seen, seen[:] = list(seen), []
    floor = free_seen[25]  # reached mid-way: later splits would put children under it
    assert free_seen[-1] < floor - 0.5
    res = fit_objects(objects[:1], replace(drift, min_scale=float(np.exp(floor))), on_step=lambda s, m: None)[0]
    assert len(seen) == drift.steps and min(seen) >= floor - 1e-5
    assert float(res.gaussians.log_scales.min()) >= floor - 1e-5
    assert (res.gaussians.log_scales < floor + 1e-5).any()  # the floor held some Gaussians


def test_min_scale_must_be_positive():
    with pytest.raises(ValueError, match="min_scale"):
        FitConfig(min_scale=0.0)


def test_objects_of_different_sizes_are_refused(objects):
    small = replace(objects[1], rgb=objects[1].rgb[:, :16, :16], alpha=objects[1].alpha[:, :16, :16])
    with pytest.raises(ValueError, match="share one image size"):
        fit_objects([objects[0], small], replace(CFG, steps=1))


def test_fit_reuse_key_is_settings_and_code_version_not_source_text(monkeypatch):
    """A docstring edit must not refit every object; a CODE_VERSION bump must."""
    import pathlib

    from gaussian_atlas.fit import config_hash, store

    cfg = FitConfig(steps=10, tau=64)
    before = config_hash(cfg)
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: pytest.fail(f"config_hash read {self}"))
    assert config_hash(cfg) == before
    assert config_hash(replace(cfg, steps=11)) != before
    monkeypatch.setattr(store, "CODE_VERSION", store.CODE_VERSION + 1)
    assert config_hash(cfg) != before


def test_atlas_reuse_key_is_settings_and_code_version_not_source_text(monkeypatch):
    import pathlib

    from gaussian_atlas import atlas
    from gaussian_atlas.atlas import AtlasConfig, atlas_stamp

    before = atlas_stamp(AtlasConfig())
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: pytest.fail(f"atlas_stamp read {self}"))
    assert atlas_stamp(AtlasConfig()) == before
    assert atlas_stamp(AtlasConfig(layout="random")) != before
    monkeypatch.setattr(atlas, "CODE_VERSION", atlas.CODE_VERSION + 1)
    assert atlas_stamp(AtlasConfig()) != before
