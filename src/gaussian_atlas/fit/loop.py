"""The fitting loop (paper Sec. 3), one for every representation.

Each step draws ``views_per_step`` random training views of every packed object, renders
the representation's Gaussians into all of them in one call (white background, like the
references), takes the photometric loss (:func:`~gaussian_atlas.fit.losses.photometric_loss`),
steps the optimisers and lets the representation's strategy densify / grow, prune and bound
through gsplat's hooks (``step_pre_backward`` / ``step_post_backward``).

A representation (:class:`~gaussian_atlas.fit.plain.PlainFit`,
:class:`~gaussian_atlas.fit.anchors.AnchorFit`) is built from the packed objects and holds
``params``, the ``optimizers`` its ``strategy`` edits, its ``state``, and ``step_optimizers``
(every optimiser to step). It gives the Gaussians to render (``splats() -> (activated
(means, quats, scales, opacities, colours), info for the strategy)``), its counts
(``stats()``), the bounds its parameters keep after every step (``constrain()``, after the strategy), its
learning-rate schedule (``decay()``), the work after the last step
(``finish()``) and the per-object :class:`~gaussian_atlas.fit.FitResult` (``results()``).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .anchors import AnchorFit
from .config import FitConfig, FitInput, FitResult
from .losses import load_lpips, photometric_loss
from .plain import PlainFit
from .views import pack_views

REPRESENTATIONS: dict[str, Any] = {"plain": PlainFit, "anchors": AnchorFit}


def out_of_time(cfg: FitConfig, t0: float) -> bool:
    """True once ``cfg.max_seconds`` (> 0) have passed since ``t0`` (``time.perf_counter``)."""
    return cfg.max_seconds > 0 and time.perf_counter() - t0 >= cfg.max_seconds


def fit_objects(objects: Sequence[FitInput], cfg: FitConfig, device: str | torch.device = "cpu",
                progress: bool = False, on_step: Callable[[int, dict[str, float]], None] | None = None,
                ) -> list[FitResult]:
    """Fit every object of ``objects`` together (packed in space; all must share one image size).

    Returns one :class:`FitResult` per object, in order, with ``n_gaussians ≤ cfg.tau``
    and held-out ``psnr``/``ssim`` in its metrics. ``cfg.method`` picks the representation:
    ``"plain"`` (free Gaussians) or ``"anchors"`` (Scaffold-GS anchors, baked into Gaussians;
    ``FitResult.model`` holds the anchor model). ``on_step(step, {"loss", "l1", "n_gaussians",
    ...})`` is called after every step (anchors add ``n_live`` and ``n_anchors``).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    device = torch.device(device)
    objects, pv = pack_views(objects, cfg, device)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    rep = REPRESENTATIONS[cfg.method](objects, pv, cfg, rng, device)

    lpips_fn, lpips_status = (None, "off")
    if cfg.lambda_lpips > 0:
        lpips_fn, lpips_status = load_lpips(cfg.lpips_weights, device)

    bar = tqdm(range(cfg.steps), desc=f"fit {len(objects)} object(s), {cfg.method}", unit="step",
               disable=not progress)
    steps_done = 0
    for step in bar:
        # 1. views_per_step random training views of every object
        views = pv.sample(rng, cfg.views_per_step)
        gt_rgb, gt_alpha = pv.targets(views)  # [C, H, W, 3], [C, H, W]

        # 2. the representation's Gaussians, rendered into every view in one call (with a layout: each
        # object's Gaussians into its own views only, gsplat's batch dimensions)
        splats, extra = rep.splats()  # (means [N, 3], quats [N, 4], scales [N, 3], opacities [N], colours [N, 3])
        out = pv.render(splats, views, extra.get("layout"), background=1.0)  # rgb [C, H, W, 3]
        info = {**extra, **out.meta}
        rep.strategy.step_pre_backward(rep.params, rep.optimizers, rep.state, step, info)

        # 3. the fitting loss
        loss, l1 = photometric_loss(out, gt_rgb, gt_alpha, splats[2], cfg, lpips_fn)
        loss.backward()

        # 4. optimiser steps, learning-rate schedule, then densify / grow, prune and bound
        for opt in rep.step_optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        rep.decay()
        rep.strategy.step_post_backward(rep.params, rep.optimizers, rep.state, step, info, packed=False)
        rep.constrain()  # after the strategy too: a split divides scales by 1.6
        steps_done = step + 1
        if on_step is not None or (progress and step % 50 == 0):
            stats = {"loss": float(loss.detach()), "l1": float(l1.detach()), **rep.stats()}
            if on_step is not None:
                on_step(step, stats)
            if progress and step % 50 == 0:
                bar.set_postfix(loss=f"{stats['loss']:.4f}", **{k.removeprefix("n_"): v for k, v in stats.items()
                                                                if k.startswith("n_")})
        if out_of_time(cfg, t0):
            break
    bar.close()
    rep.finish()
    seconds = time.perf_counter() - t0
    return rep.results(objects, {"steps": steps_done, "seconds": seconds / len(objects), "method": rep.name,
                                 "lpips": lpips_status})
