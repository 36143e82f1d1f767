"""Each packed object drawn only into its own views (fit.views.ObjectLayout): the same images, gradients and
densification statistics as the flat set drawn into every view, and an object's statistics do not depend on
which objects share its batch."""

from __future__ import annotations

import copy
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch

from gaussian_atlas.fit import DensifyConfig, FitConfig, pack_views
from gaussian_atlas.fit.losses import photometric_loss
from gaussian_atlas.fit.plain import PlainFit
from gaussian_atlas.fit.views import ObjectLayout
from gaussian_atlas.prune import blending_weights
from gaussian_atlas.render import render

CFG = FitConfig(steps=100, tau=500, init_points=200, views_per_step=2, holdout_every=4, measure_views=4,
                densify=DensifyConfig(refine_start_iter=50, refine_every=50, refine_stop_iter=90))


def _three(objects):
    """Three objects (the fixture's two and a renamed copy of the first)."""
    return [objects[0], objects[1], replace(objects[0], id=objects[0].id + "-copy")]


def _rep(objs, cfg=CFG, seed=0):
    objs, pv = pack_views(objs, cfg, torch.device("cpu"))
    return PlainFit(objs, pv, cfg, np.random.default_rng(seed), torch.device("cpu")), pv


def _step_stats(rep, pv, views, flat: bool):
    """One forward/backward and the strategy's statistics update (no refinement: step 0)."""
    splats, extra = rep.splats()
    out = pv.render(splats, views, None if flat else extra["layout"], background=1.0)
    gt_rgb, gt_alpha = pv.targets(views)
    info = {**extra, **out.meta}
    if flat:
        info["layout"] = None
    rep.strategy.step_pre_backward(rep.params, rep.optimizers, rep.state, 0, info)
    loss, _ = photometric_loss(out, gt_rgb, gt_alpha, splats[2], rep.cfg)
    loss.backward()
    rep.strategy.step_post_backward(rep.params, rep.optimizers, rep.state, 0, info, packed=False)
    grads = {k: v.grad.clone() for k, v in rep.params.items() if v.grad is not None}
    return out, grads, rep.state["grad2d"].clone(), rep.state["count"].clone()


def test_layout_puts_every_gaussian_in_exactly_one_slot_of_its_object():
    g = torch.tensor([2, 0, 0, 1, 2, 2, 0])
    lay = ObjectLayout.of_groups(g, 4)  # object 3 has no Gaussian
    assert lay.src.shape == (4, 3)
    real = lay.src[lay.src < lay.n]
    assert sorted(real.tolist()) == list(range(len(g)))
    for b in range(4):
        row = lay.src[b][lay.src[b] < lay.n]
        assert (g[row] == b).all() and (row.diff() > 0).all()  # its own, in flat order
    padded = lay.pad(torch.arange(7.0)[:, None], -1.0)  # [B, M, 1]
    assert padded.shape == (4, 3, 1) and (padded[3] == -1).all()
    with pytest.raises(ValueError, match="drifted"):
        ObjectLayout.of_groups(torch.tensor([0, 5]), 2)


def test_per_object_render_equals_the_flat_render_with_gradients_and_statistics(objects):
    torch.manual_seed(0)
    rep_a, pv = _rep(_three(objects))
    rep_b = copy.deepcopy(rep_a)
    views = pv.sample(np.random.default_rng(1), 3)
    assert rep_a.layout() is not None
    out_flat, g_flat, grad2d_flat, count_flat = _step_stats(rep_a, pv, views, flat=True)
    out_obj, g_obj, grad2d_obj, count_obj = _step_stats(rep_b, pv, views, flat=False)
    assert out_obj.rgb.shape == out_flat.rgb.shape == (9, pv.height, pv.width, 3)
    assert torch.allclose(out_obj.rgb, out_flat.rgb, atol=1e-5)
    assert torch.allclose(out_obj.alpha, out_flat.alpha, atol=1e-5)
    for k in g_flat:
        assert torch.allclose(g_obj[k], g_flat[k], atol=1e-7, rtol=1e-4), k
    assert count_flat.sum() > 0 and torch.equal(count_obj, count_flat)
    assert torch.allclose(grad2d_obj, grad2d_flat, rtol=1e-4, atol=1e-9)


def test_visibility_per_object_equals_flat_also_with_uneven_view_lists(objects):
    rep, pv = _rep(_three(objects))
    m, q, s, o, _ = rep.activated(rep.params)
    views = [pv.train_idx[0], pv.train_idx[1][:5], pv.train_idx[2][:1]]  # 9, 5 and 1 views: padded cameras
    flat = blending_weights(partial(render, far=pv.far), m, q, s, o, *pv.cameras(views), pv.width, pv.height)
    per_object = rep._visibility(rep.params, views)  # chunks of VISIBILITY_VIEWS views, padded cameras masked
    assert flat.sum() > 0
    assert torch.allclose(per_object, flat, rtol=1e-4, atol=1e-6)


def test_an_objects_statistics_do_not_depend_on_its_batch_mates(objects):
    """Object 0 alone (flat) and beside two others (per-object): the same densification statistics for its
    Gaussians (the loss's 1/B and gsplat's n_cameras normalisation cancel), and the same images."""
    three = _three(objects)
    rep3, pv3 = _rep(three)
    rep1, pv1 = _rep(three[:1])
    with torch.no_grad():  # the same starting Gaussians for object 0 in both
        n0 = int((rep3.layout().src[0] < rep3.layout().n).sum())
        for k in rep1.params:
            rep1.params[k].data = rep3.params[k].data[:n0].clone()
    views3 = pv3.sample(np.random.default_rng(2), 2)
    out3, _, grad2d3, count3 = _step_stats(rep3, pv3, views3, flat=False)
    out1, _, grad2d1, count1 = _step_stats(rep1, pv1, views3[:1], flat=True)
    assert torch.allclose(out3.rgb[:2], out1.rgb, atol=1e-5)
    assert count1.sum() > 0 and torch.equal(count3[:n0], count1)
    assert torch.allclose(grad2d3[:n0], grad2d1, rtol=1e-4, atol=1e-9)


def test_stacked_views_gather_what_the_per_object_lists_hold(objects):
    _, pv = _rep(_three(objects))
    assert pv.stacked is not None
    lists = replace(pv, stacked=None)
    views = pv.sample(np.random.default_rng(3), 3)
    for a, b in zip(pv.targets(views) + pv.cameras(views) + pv.cameras_per_object(views),
                    lists.targets(views) + lists.cameras(views) + lists.cameras_per_object(views)):
        assert torch.equal(a, b)


def test_separable_ssim_equals_torchmetrics_value_and_gradient():
    """The fit's SSIM (two 1-D passes of the Gaussian window) is torchmetrics' SSIM, value and gradient."""
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure

    from gaussian_atlas.fit.losses import ssim

    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 24, 20, 3, generator=g)
    pred = (target + 0.2 * torch.randn(3, 24, 20, 3, generator=g)).clamp(0, 1).requires_grad_(True)
    ours = ssim(pred, target)
    (g_ours,) = torch.autograd.grad(ours, pred)
    ref = structural_similarity_index_measure(pred.permute(0, 3, 1, 2), target.permute(0, 3, 1, 2), data_range=1.0)
    (g_ref,) = torch.autograd.grad(ref, pred)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-7)
    assert float(ssim(target, target)) == pytest.approx(1.0, abs=1e-6)


def test_pad_gradient_equals_autograd_indexing():
    """ObjectLayout.pad's gathered backward equals autograd's scatter of the plain indexing, empty slots too."""
    gen = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 5, (40,), generator=gen)
    groups[groups == 3] = 4  # object 3 empty
    lay = ObjectLayout.of_groups(groups, 5)
    assert (lay.src.flatten()[lay.slot] == torch.arange(40)).all()  # slot inverts src
    for shape, fill in (((40, 3), (0.5, 0.0, 1.0)), ((40,), 0.0)):
        t = torch.randn(*shape, generator=gen, requires_grad=True)
        w = torch.randn(*lay.src.shape, *shape[1:], generator=gen)
        (grad,) = torch.autograd.grad((lay.pad(t, fill) * w).sum(), t)
        ref = torch.randn(*shape, generator=gen).copy_(t.detach()).requires_grad_()
        row = torch.as_tensor(fill, dtype=ref.dtype).expand((1,) + tuple(shape[1:]))
        out_ref = torch.cat([ref, row])[lay.src]
        (grad_ref,) = torch.autograd.grad((out_ref * w).sum(), ref)
        assert torch.equal(lay.pad(t, fill).detach(), out_ref.detach())
        assert torch.equal(grad, grad_ref)
