"""Free Gaussians, the plain representation of the fitting loop (``fit.method: plain``).

Initialised from mesh surface samples coloured by the training views that see them (or
random points in the unit ball), SH degree 0; densified by gsplat's ``DefaultStrategy``
inside :class:`~gaussian_atlas.prune.BoundedVisibilityStrategy`, which keeps every object
at ``≤ τ`` Gaussians by visibility ranking (paper Sec. 3).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..gaussians import Gaussians, rgb_to_sh0
from ..prune import BoundedVisibilityStrategy, blending_weights, object_groups
from ..render import render
from .config import FitConfig, FitInput, FitResult
from .views import ObjectLayout, PackedViews, initial_points, mean_knn_distance


def observed_colors(points: np.ndarray, normals: np.ndarray, obj: FitInput,
                    views: Sequence[int] | None = None) -> np.ndarray:
    """Mean observed colour of surface points over the training images that face them.

    A point counts in a view when its normal faces the camera, it projects inside
    the image and lands on an opaque pixel (alpha > 0.5). Only ``views`` are used
    (the training views: held-out views never inform the fit). Points seen by no
    view get NaN. points, normals ``[P, 3]`` -> ``[P, 3]`` in [0, 1].
    """
    V, H, W, _ = obj.rgb.shape
    acc = np.zeros((len(points), 3))
    cnt = np.zeros(len(points))
    for v in (range(V) if views is None else views):
        c2w = obj.c2w[v].astype(np.float64)
        cam = c2w[:3, 3]
        facing = ((cam - points) * normals).sum(1) > 0
        pc = (points - cam) @ c2w[:3, :3]  # camera coordinates, OpenGL: looks down -z
        z = -pc[:, 2]
        ok = facing & (z > 1e-6)
        u = obj.K[v, 0, 0] * pc[:, 0] / np.maximum(z, 1e-6) + obj.K[v, 0, 2]
        vv = -obj.K[v, 1, 1] * pc[:, 1] / np.maximum(z, 1e-6) + obj.K[v, 1, 2]
        px, py = np.floor(u).astype(int), np.floor(vv).astype(int)
        ok &= (px >= 0) & (px < W) & (py >= 0) & (py < H)
        px, py = np.clip(px, 0, W - 1), np.clip(py, 0, H - 1)
        ok &= obj.alpha[v, py, px] > 0.5
        acc[ok] += obj.rgb[v, py[ok], px[ok]]
        cnt[ok] += 1
    with np.errstate(invalid="ignore"):
        return acc / cnt[:, None]



def init_gaussians(obj: FitInput, n: int, opacity: float, rng: np.random.Generator,
                   views: Sequence[int] | None = None, device: str | torch.device | None = None) -> Gaussians:
    """Initial Gaussians (on the CPU): ``n`` surface samples, else random points in the unit ball.

    Colours of surface samples are their mean observed (shaded) colour in the
    training views that face them (:func:`observed_colors`), falling back to the
    mesh's albedo; scales start at the mean distance to the 3 nearest neighbours
    (as 3DGS; computed on ``device``, default the CPU: ~0.1-0.3 s per object there), rotations at identity.
    """
    pts, idx = initial_points(obj, n, rng)
    if idx is not None:
        cols = (obj.surface_colors[idx] if obj.surface_colors is not None else np.full((n, 3), 0.5)).astype(np.float32)
        if obj.surface_normals is not None:
            seen = observed_colors(pts.astype(np.float64), obj.surface_normals[idx].astype(np.float64), obj, views)
            cols = np.where(np.isfinite(seen), seen, cols).astype(np.float32)
    else:
        cols = rng.random((n, 3)).astype(np.float32)
    means = torch.from_numpy(pts)  # [n, 3]
    scale = mean_knn_distance(means.to(device or "cpu"), alone=1e-2).cpu()  # [n]
    quats = torch.zeros(n, 4)
    quats[:, 0] = 1.0
    return Gaussians(
        means=means, quats=quats, log_scales=torch.log(scale)[:, None].repeat(1, 3),
        opacity_logits=torch.full((n,), math.log(opacity / (1 - opacity))),
        sh0=rgb_to_sh0(torch.from_numpy(cols)),
    )


class PlainFit:
    """Free Gaussians of every packed object in one parameter set, for :func:`~gaussian_atlas.fit.fit_objects`.

    ``params`` (``means [N, 3]``, ``quats [N, 4]``, log ``scales [N, 3]``, logit ``opacities [N]``,
    ``sh0 [N, 3]``, ``visibility [N]`` not trained), one Adam each (gsplat's convention: the strategy
    edits each one's state), the means' learning rate decaying exponentially to ``lr_means_final``.
    With several objects, each is drawn only into its own views (:class:`~gaussian_atlas.fit.views.ObjectLayout`,
    rebuilt whenever the strategy replaces the parameters): memory linear in the batch.
    """

    VISIBILITY_VIEWS = 8  # views per object and render call when measuring visibility (bounds its memory)

    name = "plain"

    def __init__(self, objects: Sequence[FitInput], pv: PackedViews, cfg: FitConfig, rng: np.random.Generator,
                 device: torch.device) -> None:
        from gsplat.strategy import DefaultStrategy

        self.pv, self.cfg, self.device = pv, cfg, device
        # Initial Gaussians of every object, concatenated; means carry the packing offset.
        init = []
        for b, o in enumerate(objects):
            g = init_gaussians(o, cfg.init_points, cfg.init_opacity, rng, views=pv.train_idx[b], device=device)
            g.means = g.means + torch.tensor([float(pv.offsets[b]), 0.0, 0.0])
            init.append(g)
        g0 = Gaussians.cat(init)
        self.params = torch.nn.ParameterDict({
            "means": torch.nn.Parameter(g0.means.to(device)),  # [N, 3]
            "quats": torch.nn.Parameter(g0.quats.to(device)),  # [N, 4]
            "scales": torch.nn.Parameter(g0.log_scales.to(device)),  # [N, 3] log
            "opacities": torch.nn.Parameter(g0.opacity_logits.to(device)),  # [N] logit
            "sh0": torch.nn.Parameter(g0.sh0.to(device)),  # [N, 3]
            "visibility": torch.nn.Parameter(torch.zeros(len(g0), device=device), requires_grad=False),  # [N]
        })
        lrs = {"means": cfg.lr_means, "quats": cfg.lr_quats, "scales": cfg.lr_scales,
               "opacities": cfg.lr_opacities, "sh0": cfg.lr_sh0}
        # fused (one kernel per step) on CUDA, as gsplat's simple_trainer; gsplat's ops keep its state aligned
        self.optimizers = {k: torch.optim.Adam([{"params": self.params[k], "lr": lr, "name": k}], eps=1e-15,
                                               fused=device.type == "cuda" or None)
                           for k, lr in lrs.items()}
        self.means_decay = (cfg.lr_means_final / cfg.lr_means) ** (1.0 / max(1, cfg.steps))
        self._log_min_scale = math.log(cfg.min_scale)
        d = cfg.densify
        self.strategy = BoundedVisibilityStrategy(
            tau=cfg.tau, group_spacing=cfg.spacing if len(objects) > 1 else None, rank_by=cfg.bound_rank,
            seed=cfg.seed,
            densify=DefaultStrategy(prune_opa=d.prune_opa, grow_grad2d=d.grow_grad2d, grow_scale3d=d.grow_scale3d,
                                    prune_scale3d=d.prune_scale3d, refine_start_iter=d.refine_start_iter,
                                    refine_stop_iter=d.refine_stop_iter, refine_every=d.refine_every,
                                    reset_every=d.reset_every, absgrad=d.absgrad),
        )
        self.strategy.check_sanity(self.params, self.optimizers)
        self.state = self.strategy.initialize_state(scene_scale=1.0)
        # blending weights over random training views of every object: [N]
        self.state["measure_visibility"] = lambda p: self._visibility(p, pv.sample(rng, cfg.measure_views))
        self.n_objects = len(objects)
        self._layout: ObjectLayout | None = None
        self._layout_of: Tensor | None = None  # the means parameter the layout was built for

    @property
    def step_optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self.optimizers.values())

    @staticmethod
    def activated(p: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return (p["means"], p["quats"], torch.exp(p["scales"]), torch.sigmoid(p["opacities"]),
                torch.clamp(0.5 + 0.28209479177387814 * p["sh0"], min=0.0))

    def layout(self) -> ObjectLayout | None:
        """Each object's slots in the batch layout (None for one object: the flat set is drawn as is).
        Rebuilt when the strategy has replaced the means (every clone / split / removal does)."""
        means = self.params["means"]
        if self.n_objects == 1:
            return None
        if self._layout is None or self._layout_of is not means:
            self._layout = ObjectLayout.of_groups(object_groups(means, self.cfg.spacing), self.n_objects)
            self._layout_of = means
        return self._layout

    def _visibility(self, p: dict[str, Tensor], views: Sequence[np.ndarray]) -> Tensor:
        m, q, s, o, _ = self.activated(p)
        W, H, layout = self.pv.width, self.pv.height, self.layout()
        if layout is None:
            cw, kk = self.pv.cameras(views)
            return blending_weights(render, m, q, s, o, cw, kk, W, H)
        k, total = self.VISIBILITY_VIEWS, torch.zeros(len(m), device=m.device)
        for a in range(0, max(len(v) for v in views), k):  # a few views of every object per call
            cw, kk, valid = self.pv.cameras_per_object([v[a:a + k] for v in views])
            total += blending_weights(render, m, q, s, o, cw, kk, W, H, layout=layout, camera_valid=valid)
        return total

    def splats(self) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor, Tensor], dict[str, Any]]:
        """The Gaussians to render (activated, flat) and what the strategy reads beside the render's meta
        (``layout``: draw each object into its own views, None for one object)."""
        return self.activated(self.params), {"gaussian_ids": None, "layout": self.layout()}

    def stats(self) -> dict[str, int]:
        return {"n_gaussians": len(self.params["means"])}

    @torch.no_grad()
    def constrain(self) -> None:
        """Log-scales at or above ``log(cfg.min_scale)`` (see :class:`~gaussian_atlas.fit.FitConfig`)."""
        self.params["scales"].clamp_(min=self._log_min_scale)

    def decay(self) -> None:
        for group in self.optimizers["means"].param_groups:
            group["lr"] *= self.means_decay

    @torch.no_grad()
    def finish(self) -> None:
        """Final visibility over every training view (recorded in the PLY; the atlas keeps the most visible)."""
        self.params["visibility"].data.copy_(self._visibility(self.params, self.pv.train_idx))

    @torch.no_grad()
    def results(self, objects: Sequence[FitInput], common: dict[str, Any]) -> list[FitResult]:
        """Unpack every object's Gaussians (at the origin, on the CPU) with its held-out metrics."""
        pv, p, B = self.pv, self.params, len(objects)
        groups = torch.round(p["means"][:, 0].detach() / self.cfg.spacing).long() if B > 1 else \
            torch.zeros(len(p["means"]), dtype=torch.long, device=self.device)
        results = []
        for b, o in enumerate(objects):
            sel = groups == b
            g = Gaussians(means=p["means"][sel] - torch.tensor([float(pv.offsets[b]), 0, 0], device=self.device),
                          quats=p["quats"][sel], log_scales=p["scales"][sel], opacity_logits=p["opacities"][sel],
                          sh0=p["sh0"][sel], visibility=p["visibility"][sel]).detach().to("cpu")
            results.append(FitResult(o.id, g, {"n_gaussians": len(g), **pv.holdout(b, g.to(self.device)), **common,
                                               "bound_events": int(self.state["n_bound_events"])}))
        return results
