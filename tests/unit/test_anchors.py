"""The anchor fitter (fit.method: anchors): rank-averaged bound, growing, baking, fitting, the stage's contract."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gaussian_atlas.fit.anchors import (AnchorConfig, AnchorMLPs, AnchorModel, AnchorStrategy, grow_anchors,
                                   rank_average_bound)
from gaussian_atlas.cameras import look_at_c2w
from gaussian_atlas.fit import FitConfig, config_hash, fit_objects
from gaussian_atlas.gaussians import read_ply, write_ply
from gaussian_atlas.render import ALPHA_THRESHOLD, render
from tests.conftest import make_ingested

ROOT = Path(__file__).resolve().parents[2]
BAKE_TOL = 1e-5  # max |pixel| difference, anchor model vs its baked PLY (float32 PLY, logit/log round trips)


def _cameras(n: int = 3, side: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    eyes = [[2.5 * math.cos(a), 2.5 * math.sin(a), 0.8] for a in np.linspace(0, 2 * math.pi, n, endpoint=False)]
    c2w = torch.tensor(np.stack([look_at_c2w(e) for e in eyes]), dtype=torch.float32)
    K = torch.tensor([[1.2 * side, 0, side / 2], [0, 1.2 * side, side / 2], [0, 0, 1]]).expand(n, 3, 3)
    return c2w, K


def _assert_bakes_exactly(model: AnchorModel, tmp_path: Path, side: int = 32) -> None:
    c2w, K = _cameras(side=side)
    with torch.no_grad():
        (m, q, s, o, c), idx = model.drawn()
        ref = render((m, q, s, o, c), c2w, K, side, side)
        ply = write_ply(tmp_path / "baked.ply", model.bake())
        g = read_ply(ply)
        out = render(g, c2w, K, side, side)
    assert not g.validate()
    assert len(g) == int((o >= ALPHA_THRESHOLD).sum()) and len(g) > 0  # only the culled ones are left out
    assert ref.alpha.mean() > 0.05  # the comparison sees the object
    assert (out.rgb - ref.rgb).abs().max() < BAKE_TOL
    assert (out.alpha - ref.alpha).abs().max() < BAKE_TOL


# --------------------------------------------------------------------------- baking


def test_baked_ply_renders_the_anchor_model(tmp_path):
    torch.manual_seed(0)
    A, k, F = 80, 5, 8
    model = AnchorModel(anchors=torch.randn(A, 3) * 0.4, features=torch.randn(A, F),
                        scaling=torch.full((A, 6), math.log(0.12)) + 0.2 * torch.randn(A, 6),
                        offsets=torch.randn(A, k, 3), alive=torch.rand(A, k) > 0.2,
                        groups=torch.zeros(A, dtype=torch.long), mlps=AnchorMLPs(1, F, k))
    (_, _, _, o, _), idx = model.drawn()
    assert 0 < len(idx) < int(model.alive.sum())  # some live slots are not drawn (opacity <= 0)
    assert bool((model.alive.reshape(-1)[idx]).all())  # pruned slots never are
    _assert_bakes_exactly(model, tmp_path)


def test_grouped_mlps_are_independent_per_object():
    torch.manual_seed(0)
    mlps = AnchorMLPs(3, 4, 2)
    x = torch.randn(3, 5, 4)
    full = mlps(x)
    for g in range(3):
        one = mlps.select(g)(x[g:g + 1])
        for a, b in zip(full, one):
            assert torch.allclose(a[g:g + 1], b, atol=1e-6)
    with torch.no_grad():  # editing object 1's weights leaves objects 0 and 2 alone
        mlps.w_color[1] += 1.0
    after = mlps(x)
    assert torch.equal(after[2][0], full[2][0]) and torch.equal(after[2][2], full[2][2])
    assert not torch.equal(after[2][1], full[2][1])


# --------------------------------------------------------------------------- the rank-averaged bound


def _hand_built():
    # object 0: three anchors, k = 3; object 1: one anchor under the bound
    vis = torch.tensor([[9.0, 1.0, 0.0],    # A0: slot 2 live but not drawn
                        [8.0, 7.0, 0.0],    # A1: slot 2 pruned earlier
                        [10.0, 0.5, 0.0],   # A2: slot 2 pruned earlier
                        [5.0, 0.0, 0.0]])   # A3 (object 1): slot 1 live, not drawn; slot 2 pruned
    alive = torch.tensor([[True, True, True], [True, True, False], [True, True, False], [True, True, False]])
    drawn = torch.tensor([[True, True, False], [True, True, False], [True, True, False], [True, False, False]])
    groups = torch.tensor([0, 0, 0, 1])
    return vis, alive, drawn, groups


def test_rank_average_bound_on_a_hand_built_case():
    vis, alive, drawn, groups = _hand_built()
    # Object 0, drawn slots by visibility: A2s0 10 (r_g 0), A0s0 9 (1), A1s0 8 (2), A1s1 7 (3), A0s1 1 (4),
    # A2s1 0.5 (5); anchors by summed visibility: A1 15 (r_a 0), A2 10.5 (1), A0 10 (2).
    # 2·N·A_o·(average normalised rank) = 3 r_g + 6 r_a: A2s0 6, A1s0 6, A1s1 9, A0s0 15, A2s1 21, A0s1 24.
    keep3 = rank_average_bound(vis, alive, groups, tau=3, drawn=drawn)
    expected3 = {(2, 0), (1, 0), (1, 1)}  # visibility alone would keep A0s0 (9) instead of A1s1 (7)
    kept = {tuple(x) for x in torch.nonzero(keep3[:3]).tolist()}
    assert kept == expected3
    keep4 = rank_average_bound(vis, alive, groups, tau=4, drawn=drawn)
    # anchor rank alone would take A2s1 (anchor A2 is 2nd) instead of A0s0
    assert {tuple(x) for x in torch.nonzero(keep4[:3]).tolist()} == expected3 | {(0, 0)}
    for keep in (keep3, keep4):
        assert not keep[0, 2]  # the live slot that is not drawn goes first
        assert torch.equal(keep[3], alive[3])  # object 1 is under the bound: untouched, undrawn slot included
        assert not (keep & ~alive).any()  # pruned slots stay pruned


def test_rank_average_bound_ties_prefer_the_more_visible_gaussian():
    vis = torch.tensor([[1.0, 0.0], [0.6, 0.5]])  # anchors: A1 1.1 (r_a 0), A0 1.0 (r_a 1); r_g: 1.0, 0.6, 0.5, 0.0
    alive = torch.ones(2, 2, dtype=torch.bool)
    # 2 r_g + 4 r_a: A0s0 0 + 4 = 4, A1s0 2 + 0 = 2, A1s1 4 + 0 = 4, A0s1 6 + 4 = 10 -> tie at 4: A0s0 (r_g 0) wins
    keep = rank_average_bound(vis, alive, torch.zeros(2, dtype=torch.long), tau=2)
    assert torch.equal(keep, torch.tensor([[True, False], [True, False]]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_average_bound_holds_per_object(seed):
    g = torch.Generator().manual_seed(seed)
    A, k, tau = 60, 4, 25
    groups = torch.randint(0, 3, (A,), generator=g)
    alive = torch.rand(A, k, generator=g) > 0.3
    drawn = alive & (torch.rand(A, k, generator=g) > 0.2)
    vis = torch.rand(A, k, generator=g) * drawn
    keep = rank_average_bound(vis, alive, groups, tau, drawn)
    assert not (keep & ~alive).any()
    for obj in range(3):
        live = int(alive[groups == obj].sum())
        n = int(keep[groups == obj].sum())
        if live <= tau:
            assert torch.equal(keep[groups == obj], alive[groups == obj])
        else:
            assert n == min(tau, int(drawn[groups == obj].sum()))
            assert not (keep[groups == obj] & ~drawn[groups == obj]).any()


# --------------------------------------------------------------------------- growing


def test_grow_anchors_fills_free_voxels_where_gradients_are_large():
    anchors = torch.zeros(1, 3)
    features = torch.tensor([[1.0, 2.0]])
    means = torch.tensor([[[0.04, 0.0, 0.0],   # level 0 (0.1): anchor's own voxel; level 1 (0.05): a free voxel
                           [0.30, 0.0, 0.0],   # level 0: free voxel
                           [0.60, 0.0, 0.0],   # gradient under the threshold
                           [0.90, 0.0, 0.0]]])  # never drawn (count 0)
    thr = 1e-3
    grad = torch.tensor([[5 * thr, 1.5 * thr, 0.5 * thr, 0.0]]) * 2
    count = torch.tensor([[2.0, 2.0, 2.0, 0.0]])
    alive = torch.ones(1, 4, dtype=torch.bool)
    pos, feat, scale = grow_anchors(anchors, features, means, grad, count, alive, 0.1, thr, levels=2, max_new=10)
    got = sorted((round(float(p[0]), 4), round(float(s[0]), 4)) for p, s in zip(pos, scale))
    assert got == [(0.05, round(math.log(0.05), 4)), (0.3, round(math.log(0.1), 4))]
    assert torch.equal(feat, features.expand(2, 2))
    # at most max_new, the largest gradient first
    pos1, _, _ = grow_anchors(anchors, features, means, grad, count, alive, 0.1, thr, levels=2, max_new=1)
    assert torch.allclose(pos1, torch.tensor([[0.05, 0.0, 0.0]]))
    # a pruned slot proposes nothing
    none, _, _ = grow_anchors(anchors, features, means, grad, count, torch.zeros(1, 4, dtype=torch.bool), 0.1, thr, 2, 10)
    assert len(none) == 0


def test_grown_anchor_takes_the_mean_feature_of_its_proposers():
    anchors = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.0, 0.0]])
    features = torch.tensor([[1.0], [3.0]])
    means = torch.tensor([[[0.1, 0.0, 0.0]], [[0.1, 0.0, 0.0]]])  # both propose voxel (1, 0, 0)
    grad, count = torch.ones(2, 1), torch.ones(2, 1)
    pos, feat, _ = grow_anchors(anchors, features, means, grad, count, torch.ones(2, 1, dtype=torch.bool), 0.1,
                                0.5, levels=1, max_new=5)
    assert torch.allclose(pos, torch.tensor([[0.1, 0.0, 0.0]])) and torch.allclose(feat, torch.tensor([[2.0]]))


def test_strategy_refine_keeps_the_bound_and_the_optimizer_state_aligned():
    torch.manual_seed(0)
    A, k, tau = 6, 2, 6
    anchors = torch.stack([torch.arange(A) * 0.1, torch.zeros(A), torch.zeros(A)], 1)
    offsets = torch.randn(A, k, 3) * 0.1
    offsets[0, 0] = torch.tensor([0.0, 3.0, 0.0])  # exp(scaling) = 0.1: anchor 0's slot 0 sits at (0, 0.3, 0)
    params = torch.nn.ParameterDict({
        "anchors": torch.nn.Parameter(anchors, requires_grad=False),
        "features": torch.nn.Parameter(torch.randn(A, 4)),
        "scaling": torch.nn.Parameter(torch.full((A, 6), math.log(0.1))),
        "offsets": torch.nn.Parameter(offsets)})
    opts = {n: torch.optim.Adam([params[n]], lr=1e-3) for n in ("features", "scaling", "offsets")}
    sum(params[n].sum() for n in opts).backward()
    for n, o in opts.items():
        o.step()
        o.state[params[n]]["exp_avg"] = params[n].detach().clone()  # tag each row's moments with its values
    cfg = AnchorConfig(n_offsets=k, voxel_size=0.1, grow_grad2d=1e-3, grow_levels=1, max_grow_fraction=1.0,
                       refine_start_iter=10, refine_every=10)
    strategy = AnchorStrategy(tau=tau, cfg=cfg)
    strategy.check_sanity(params, opts)
    state = strategy.initialize_state(params, torch.zeros(A, dtype=torch.long))
    state["grad2d"][0, 0], state["count"][:] = 1.0, 1.0  # only anchor 0's slot 0 asks for a new anchor
    state["opa_steps"][:] = 10
    state["opa_sum"][:] = 5.0
    state["opa_sum"][5] = 0.0  # anchor 5 is transparent
    # visibility grows with y (the new anchor is the most visible) and with x
    state["measure_visibility"] = lambda p: ((1 + 10 * p["anchors"][:, 1:2] + p["anchors"][:, :1]).expand(-1, k)
                                             + torch.tensor([0.01, 0.0]), torch.ones(len(p["anchors"]), k, dtype=torch.bool))
    old_rows = {n: params[n].detach().clone() for n in opts}
    strategy.refine(params, opts, state, step=10)

    assert state["n_grown"] == 1 and state["n_pruned_anchors"] == 1 and state["n_bound_events"] == 1
    assert int(state["alive"].sum()) == tau and state["alive"].any(1).all()  # no anchor without a live slot
    assert all(len(v) == len(params["anchors"]) for v in state.values() if isinstance(v, torch.Tensor))
    new = torch.isclose(params["anchors"], torch.tensor([0.0, 0.3, 0.0])).all(1)
    assert int(new.sum()) == 1 and state["alive"][new].all()  # the grown anchor is the most visible: kept
    assert not torch.isclose(params["anchors"][:, 0], torch.tensor(0.5)).any()  # the transparent one is gone
    assert torch.allclose(params["scaling"][new], torch.full((1, 6), math.log(0.1)))
    for n, o in opts.items():  # Adam moments still belong to their rows; the new row's start at zero
        m = o.state[params[n]]["exp_avg"]
        assert m.shape == params[n].shape
        assert torch.equal(m[~new], params[n].detach()[~new]) and (m[new] == 0).all()
        kept = [i for i in range(A) if torch.isclose(params["anchors"], anchors[i]).all(1).any()]
        assert torch.equal(params[n].detach()[~new], old_rows[n][kept])
    assert state["grad2d"].sum() == 0 and state["opa_steps"].sum() == 0  # statistics restart


# --------------------------------------------------------------------------- fitting




CFG = FitConfig(method="anchors", steps=80, tau=400, init_points=600, views_per_step=2, holdout_every=4,
                measure_views=4, anchors=AnchorConfig(refine_start_iter=10, refine_every=15, refine_stop_iter=70))  # 15, 30, 45, 60


def test_anchor_fit_learns_within_the_bound_and_bakes_exactly(objects, tmp_path):
    torch.set_num_threads(2)
    start = fit_objects(objects[:1], replace(CFG, steps=1))[0]
    log = []
    res = fit_objects(objects[:1], CFG, on_step=lambda s, m: log.append(m))[0]
    m = res.metrics
    losses = [x["loss"] for x in log]
    assert np.mean(losses[-15:]) < 0.6 * np.mean(losses[:5]), (losses[:5], losses[-15:])
    # 32² aliased renders, tau = 400: ~10.5 dB after one step, ~16 dB after 80 (the plain fitter: ~16 dB too)
    assert m["psnr"] > start.metrics["psnr"] + 4.0 and m["psnr"] > 15.0, (start.metrics["psnr"], m["psnr"])
    assert m["method"] == "anchors" and m["steps"] == CFG.steps
    # the bound: live slots (an upper bound on drawn Gaussians) never exceed tau, and it had to act
    assert max(x["n_live"] for x in log) <= CFG.tau and max(x["n_gaussians"] for x in log) <= CFG.tau
    assert m["bound_events"] >= 1 and m["anchors_grown"] >= 1
    assert 0 < m["n_gaussians"] <= CFG.tau
    g = res.gaussians
    assert not g.validate() and g.visibility is not None and (g.visibility >= 0).all() and g.visibility.sum() > 0
    assert g.means.norm(dim=-1).median() < 1.5
    # the object's anchor model renders what its baked PLY renders
    assert isinstance(res.model, AnchorModel) and int(res.model.alive.sum()) <= CFG.tau
    _assert_bakes_exactly(res.model, tmp_path)


def test_packed_anchor_fit_bounds_and_unpacks_each_object(objects):
    before = [o.c2w.copy() for o in objects]
    cfg = replace(CFG, steps=20, tau=150, anchors=replace(CFG.anchors, refine_start_iter=5, refine_every=10))
    res = fit_objects(objects, replace(cfg, batch_objects=2))
    for o, c in zip(objects, before):
        assert np.array_equal(o.c2w, c)
    assert [r.id for r in res] == [o.id for o in objects]
    for r in res:
        assert 0 < r.metrics["n_gaussians"] <= cfg.tau and int(r.model.alive.sum()) <= cfg.tau
        assert r.gaussians.means.norm(dim=-1).median() < 1.5  # each object back at the origin
        assert r.model.mlps.n_groups == 1 and (r.model.groups == 0).all()
        assert r.metrics["psnr"] > 10.0
    assert res[0].metrics["anchors_grown"] >= 1 and res[0].metrics["bound_events"] >= 1  # the bound acted, per object


@pytest.mark.parametrize("method", ["plain", "anchors"])
def test_time_budget_stops_the_fit(objects, method):
    t0 = time.perf_counter()
    res = fit_objects(objects[:1], replace(CFG, method=method, steps=100_000, max_seconds=1.0))[0]
    assert 1 <= res.metrics["steps"] < 100_000
    assert time.perf_counter() - t0 < 30.0  # budget, then the final visibility / bake / held-out renders
    assert res.metrics["n_gaussians"] <= CFG.tau


# --------------------------------------------------------------------------- params, stage outputs, resume


def test_params_select_the_method_and_the_hash_ignores_the_other_method():
    from stages.fit import fit_config

    repo = yaml.safe_load((ROOT / "params.yaml").read_text())["fit"]
    cfg, run = fit_config(repo)
    assert cfg.method in ("plain", "anchors") and isinstance(cfg.anchors, AnchorConfig) and "workers" in run
    assert cfg.anchors == AnchorConfig(**repo["anchors"])  # every key of the repo's anchors section is read
    cfg, _ = fit_config({**repo, "method": "anchors", "anchors": {**repo["anchors"], "n_offsets": 4}})
    assert cfg.method == "anchors" and cfg.anchors.n_offsets == 4
    with pytest.raises(ValueError, match="unknown method"):
        fit_config({**repo, "method": "scaffold"})
    with pytest.raises(ValueError, match="unknown key"):
        fit_config({**repo, "anchors": {"n_ofsets": 4}})
    plain = replace(cfg, method="plain")
    # retuning one method's settings keeps the other method's finished fits
    assert config_hash(replace(plain, anchors=AnchorConfig(n_offsets=3))) == config_hash(plain)
    assert config_hash(replace(cfg, lr_sh0=1.0)) == config_hash(cfg)
    assert config_hash(replace(cfg, anchors=AnchorConfig(n_offsets=3))) != config_hash(cfg)
    assert config_hash(plain) != config_hash(cfg)
    assert config_hash(replace(plain, max_seconds=5.0)) != config_hash(plain)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    return make_ingested(tmp_path_factory.mktemp("ing"), n_objects=2) / "ing"


STAGE_CFG = FitConfig(method="anchors", steps=6, tau=100, init_points=100, views_per_step=2, holdout_every=4,
                      measure_views=2, anchors=AnchorConfig(n_offsets=4, refine_start_iter=2, refine_every=3))


def test_anchor_fits_write_the_plain_outputs_and_resume(ingested, tmp_path):
    import json

    from gaussian_atlas.data import load_manifest
    from gaussian_atlas.fit import fit_chunk, fit_outputs, is_done

    items = load_manifest(ingested)[["id", "path", "shard"]].to_dict("records")
    out = tmp_path / "fits"
    rows = fit_chunk(items, str(ingested), str(out), STAGE_CFG, device="cpu")
    assert [r["status"] for r in rows] == ["ok"] * len(items)
    for it, r in zip(items, rows):
        ply, meta = fit_outputs(out, it["shard"], it["id"])
        g = read_ply(ply)
        assert not g.validate() and len(g) == r["n_gaussians"] <= STAGE_CFG.tau and g.visibility is not None
        saved = json.loads(meta.read_text())
        assert saved["method"] == "anchors" and saved["config_hash"] == config_hash(STAGE_CFG)
        assert is_done(out, it["shard"], it["id"], STAGE_CFG)
        assert not is_done(out, it["shard"], it["id"], replace(STAGE_CFG, method="plain"))  # another fitter re-fits
    again = fit_chunk(items, str(ingested), str(out), STAGE_CFG, device="cpu")  # nothing is fitted again
    assert [r["seconds"] for r in again] == [r["seconds"] for r in rows]


def test_a_failing_anchor_fit_is_quarantined_alone(ingested, tmp_path, monkeypatch):
    from gaussian_atlas.fit import anchors
    from gaussian_atlas.data import load_manifest
    from gaussian_atlas.fit import fit_chunk

    items = load_manifest(ingested)[["id", "path", "shard"]].to_dict("records")
    real = anchors.init_anchors

    def broken(obj, *a, **kw):
        if obj.id == items[0]["id"]:
            raise RuntimeError("no anchors")
        return real(obj, *a, **kw)

    monkeypatch.setattr(anchors, "init_anchors", broken)
    rows = {r["id"]: r for r in fit_chunk(items, str(ingested), str(tmp_path / "fits"), replace(STAGE_CFG, batch_objects=2),
                                          device="cpu")}
    bad = rows[items[0]["id"]]
    assert bad["status"] == "failed" and "fit failed" in bad["reason"] and "no anchors" in bad["reason"]
    assert all(rows[i["id"]]["status"] == "ok" for i in items[1:])
