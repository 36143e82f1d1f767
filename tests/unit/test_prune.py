"""The bounded-count strategy: ranking, the bound per object, optimizer state kept aligned."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gsplat.strategy import DefaultStrategy

from gaussian_atlas.prune import BoundedVisibilityStrategy, blending_weights, object_groups, rank_within_groups
from gaussian_atlas.render import render


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_within_groups_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, 5, (300,), generator=g)
    score = torch.randint(0, 20, (300,), generator=g).float()  # ties on purpose
    ranks = rank_within_groups(groups, score)
    for k in groups.unique():
        idx = torch.where(groups == k)[0]
        # descending score, ties by index
        order = sorted(idx.tolist(), key=lambda i: (-float(score[i]), i))
        assert [int(ranks[i]) for i in order] == list(range(len(order)))


def _params(n_per_group: int, groups: int, spacing: float):
    torch.manual_seed(0)
    means = torch.randn(groups * n_per_group, 3) * 0.3
    means[:, 0] += torch.arange(groups).repeat_interleave(n_per_group).float() * spacing
    n = len(means)
    params = torch.nn.ParameterDict({
        "means": torch.nn.Parameter(means),
        "quats": torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(n, 4), dim=-1)),
        "scales": torch.nn.Parameter(torch.full((n, 3), math.log(0.05))),
        "opacities": torch.nn.Parameter(torch.zeros(n)),
        "sh0": torch.nn.Parameter(torch.randn(n, 3)),
        "visibility": torch.nn.Parameter(torch.zeros(n), requires_grad=False),
    })
    opts = {k: torch.optim.Adam([params[k]], lr=1e-3) for k in ["means", "quats", "scales", "opacities", "sh0"]}
    return params, opts


def test_bound_enforced_per_object_keeps_most_visible_and_optimizer_state_aligned():
    spacing, tau = 100.0, 37
    params, opts = _params(n_per_group=80, groups=3, spacing=spacing)
    # give every parameter an optimizer state, then tag each row's state with the row's own values
    loss = sum(p.sum() for k, p in params.items() if k != "visibility")
    loss.backward()
    for o in opts.values():
        o.step()
    tagged = torch.rand(len(params["means"]))  # the "visibility" each Gaussian will be measured at
    params["sh0"].data[:, 0] = tagged  # carried in a parameter, to check which rows survive
    for k, o in opts.items():
        o.state[params[k]]["exp_avg"] = params[k].detach().clone()
    strategy = BoundedVisibilityStrategy(tau=tau, group_spacing=spacing, densify=DefaultStrategy(refine_stop_iter=0))
    state = strategy.initialize_state()
    state["measure_visibility"] = lambda p: p["sh0"][:, 0].detach().clone()
    strategy.check_sanity(params, opts)

    removed = strategy.enforce_bound(params, opts, state)
    assert removed == 3 * (80 - tau)
    groups = object_groups(params["means"], spacing)
    assert torch.bincount(groups).tolist() == [tau] * 3
    for k in range(3):
        kept = params["sh0"][groups == k, 0].detach()
        expected = torch.sort(tagged[k * 80:(k + 1) * 80], descending=True).values[:tau]
        assert torch.equal(torch.sort(kept, descending=True).values, expected)
    for k, o in opts.items():  # Adam moments still belong to their rows
        assert torch.equal(o.state[params[k]]["exp_avg"], params[k].detach())
    assert torch.equal(params["visibility"], params["sh0"][:, 0].detach())
    assert strategy.enforce_bound(params, opts, state) == 0  # already within the bound


def test_strategy_needs_visibility_and_a_measure():
    params, opts = _params(10, 1, 100.0)
    del params["visibility"]
    with pytest.raises(ValueError, match="visibility"):
        BoundedVisibilityStrategy(tau=5).check_sanity(params, opts)
    params, opts = _params(10, 1, 100.0)
    s = BoundedVisibilityStrategy(tau=5)
    with pytest.raises(RuntimeError, match="measure_visibility"):
        s.enforce_bound(params, opts, s.initialize_state())


def test_blending_weights_sum_to_rendered_alpha():
    torch.manual_seed(1)
    n = 64
    means = torch.randn(n, 3) * 0.3
    quats = torch.nn.functional.normalize(torch.randn(n, 4), dim=-1)
    scales = torch.rand(n, 3) * 0.1 + 0.02
    opac = torch.rand(n) * 0.9 + 0.05
    from gaussian_atlas.cameras import look_at_c2w
    c2w = torch.tensor(np.stack([look_at_c2w([2.5, 0, 0.5]), look_at_c2w([0, 2.5, 1.0])]), dtype=torch.float32)
    K = torch.tensor([[40.0, 0, 16], [0, 40.0, 16], [0, 0, 1]]).expand(2, 3, 3)
    w = blending_weights(render, means, quats, scales, opac, c2w, K, 32, 32)
    alpha = render((means, quats, scales, opac, torch.ones(n, 1)), c2w, K, 32, 32, background=0.0).alpha
    assert w.shape == (n,) and (w >= 0).all()
    assert torch.allclose(w.sum(), alpha.sum(), rtol=1e-4)
    # a Gaussian hidden far behind the camera contributes nothing
    means2 = torch.cat([means, torch.tensor([[50.0, 0.0, 0.5]])])
    w2 = blending_weights(render, means2, torch.cat([quats, quats[:1]]), torch.cat([scales, scales[:1]]),
                          torch.cat([opac, opac[:1]]), c2w, K, 32, 32)
    assert w2[-1] == 0


@pytest.mark.parametrize("rule", ["opacity", "random"])
def test_other_bound_rules_respect_the_bound_and_keep_state_aligned(rule):
    """The ablation rules (fit.bound_rank): the bound holds per object, the optimizer state follows its rows,
    "opacity" keeps the most opaque, "random" is seeded (same seed, same survivors) and never renders."""
    spacing, tau = 100.0, 20

    def run(seed):
        params, opts = _params(n_per_group=50, groups=2, spacing=spacing)
        loss = sum(p.sum() for k, p in params.items() if k != "visibility")
        loss.backward()
        for o in opts.values():
            o.step()
        params["sh0"].data[:, 0] = torch.arange(len(params["means"]), dtype=torch.float32)  # row ids
        for k, o in opts.items():
            o.state[params[k]]["exp_avg"] = params[k].detach().clone()
        s = BoundedVisibilityStrategy(tau=tau, group_spacing=spacing, densify=DefaultStrategy(refine_stop_iter=0),
                                      rank_by=rule, seed=seed)
        state = s.initialize_state()
        state["measure_visibility"] = lambda p: (_ for _ in ()).throw(AssertionError("must not render"))
        before = torch.sigmoid(params["opacities"].detach()).clone()
        s.check_sanity(params, opts)
        assert s.enforce_bound(params, opts, state) == 2 * (50 - tau)
        groups = object_groups(params["means"], spacing)
        assert torch.bincount(groups).tolist() == [tau] * 2
        for k, o in opts.items():
            assert torch.equal(o.state[params[k]]["exp_avg"], params[k].detach())
        return params["sh0"][:, 0].detach().long(), before

    kept, opac = run(0)
    if rule == "opacity":
        for g in range(2):
            ids = torch.arange(g * 50, (g + 1) * 50)
            best = ids[torch.sort(opac[ids], descending=True, stable=True).indices[:tau]]
            assert sorted(kept[(kept >= g * 50) & (kept < (g + 1) * 50)].tolist()) == sorted(best.tolist())
    else:
        assert torch.equal(kept, run(0)[0]) and not torch.equal(kept, run(1)[0])


def test_unknown_bound_rule_is_refused():
    from gaussian_atlas.fit import FitConfig

    with pytest.raises(ValueError, match="bound_rank"):
        FitConfig(bound_rank="size")


def test_bound_check_reruns_exactly_when_the_parameters_were_replaced():
    """The per-step check is skipped while the means tensor is the one last checked; a replacement (what every
    gsplat op does when the count changes) is always checked again, even to an object over the bound."""
    from gsplat.strategy.ops import duplicate

    spacing, tau = 100.0, 50
    params, opts = _params(n_per_group=40, groups=2, spacing=spacing)
    strategy = BoundedVisibilityStrategy(tau=tau, group_spacing=spacing, densify=DefaultStrategy(refine_stop_iter=0))
    state = strategy.initialize_state()
    calls = []
    state["measure_visibility"] = lambda p: calls.append(1) or torch.rand(len(p["means"]))
    assert strategy.enforce_bound(params, opts, state) == 0 and not calls  # 40 <= 50 everywhere
    assert strategy.enforce_bound(params, opts, state) == 0
    duplicate(params=params, optimizers=opts, state=state, mask=torch.arange(80) < 30)  # object 0: 70 > 50
    assert strategy.enforce_bound(params, opts, state) == 20 and len(calls) == 1
    assert torch.bincount(object_groups(params["means"], spacing)).tolist() == [tau, 40]
    assert strategy.enforce_bound(params, opts, state) == 0 and len(calls) == 1
