"""The paper's bounded Gaussian count: pruning by visibility ranking (Sec. 3).

    "To constrain the number of Gaussians, we track the visibility of each
    Gaussian over randomly selected camera views. If the number of Gaussians
    exceeds the threshold τ, the Gaussians are ranked by visibility and the
    least visible ones are pruned."

:class:`BoundedVisibilityStrategy` has gsplat's ``Strategy`` hook signature
(``initialize_state``, ``step_pre_backward``, ``step_post_backward``). It
delegates densification (clone/split/opacity pruning/opacity reset) to a
gsplat :class:`~gsplat.DefaultStrategy` and, after every post-backward hook,
enforces ``count <= tau`` per object by removing the lowest-ranked Gaussians
with :func:`gsplat.strategy.ops.remove`, which keeps every optimizer's state
(Adam moments) and the strategy's running statistics aligned with the
parameters. The fitting loop never branches on the strategy's type.

Visibility of Gaussian i over a set of views is its total blending weight
``Σ_views Σ_pixels α_i(p) · T_i(p)`` (opacity-weighted and occlusion-aware):
:func:`blending_weights` gets it exactly as the gradient of a rendered
constant channel with respect to that channel's per-Gaussian value.

Several objects can be fitted as one parameter set ("packed" along x at a
fixed spacing, so no camera sees another object): the bound then holds for
each object separately (:func:`object_groups`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from gsplat.strategy import DefaultStrategy, Strategy
from gsplat.strategy.ops import remove
from torch import Tensor

__all__ = ["BOUND_RANKS", "BoundedVisibilityStrategy", "PruneCheckConfig", "blending_weights", "object_groups", "rank_within_groups"]


BOUND_RANKS = ("visibility", "opacity", "random")


def object_groups(means: Tensor, spacing: float | None) -> Tensor:
    """Object index of each Gaussian when objects are packed along x every ``spacing`` units.

    means: ``[N, 3]``. Returns ``[N]`` long (all zeros when ``spacing`` is None).
    """
    if spacing is None:
        return torch.zeros(means.shape[0], dtype=torch.long, device=means.device)
    return torch.round(means[:, 0].detach() / spacing).long()


def rank_within_groups(groups: Tensor, score: Tensor) -> Tensor:
    """Rank of each element by descending ``score`` inside its group (0 = best).

    groups: ``[N]`` long, score: ``[N]`` float. Returns ``[N]`` long. Ties are
    broken by index, so the result is deterministic.
    """
    n = groups.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=groups.device)
    # Sort by score (descending), then stably by group: each group's members end
    # up contiguous and in descending score order.
    by_score = torch.sort(score, descending=True, stable=True).indices
    order = by_score[torch.sort(groups[by_score], stable=True).indices]  # [N]
    sorted_groups = groups[order]
    starts = torch.ones(n, dtype=torch.bool, device=groups.device)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    idx = torch.arange(n, device=groups.device)
    group_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=0).values
    ranks = torch.empty_like(idx)
    ranks[order] = idx - group_start
    return ranks


def blending_weights(render_fn: Callable[..., Any], means: Tensor, quats: Tensor, scales: Tensor,
                     opacities: Tensor, c2w: Tensor, K: Tensor, width: int, height: int,
                     layout: Any = None, camera_valid: Tensor | None = None) -> Tensor:
    """Total blending weight ``Σ_views Σ_pixels α_i T_i`` of every Gaussian.

    Renders a constant one-channel colour ``w_i = 1`` and differentiates the
    image sum with respect to ``w``: ``∂/∂w_i Σ_p Σ_j w_j α_j(p) T_j(p) = Σ_p α_i(p) T_i(p)``.

    means ``[N, 3]``, quats ``[N, 4]``, scales ``[N, 3]`` (activated), opacities ``[N]``
    (activated), c2w ``[C, 4, 4]``, K ``[C, 3, 3]``. ``render_fn`` is
    :func:`gaussian_atlas.render.render` (or anything with its signature).
    With ``layout`` (a :class:`gaussian_atlas.fit.views.ObjectLayout` of the packed objects) each
    object's Gaussians are drawn only into its own cameras, c2w ``[B, C, 4, 4]``, K ``[B, C, 3, 3]``,
    and only the cameras of ``camera_valid [B, C]`` (default all) count.
    Returns ``[N]`` (no graph attached).
    """
    ones = torch.ones(means.shape[0], 1, device=means.device, dtype=means.dtype, requires_grad=True)
    with torch.enable_grad():
        splats = (means.detach(), quats.detach(), scales.detach(), opacities.detach(), ones)
        if layout is not None:
            splats = layout.pad_splats(splats)  # [B, M, ...]
        img = render_fn(splats, c2w, K, width, height, background=0.0).rgb  # [(B,) C, H, W, 1]
        if camera_valid is not None:
            img = img * camera_valid[..., None, None, None].to(img.dtype)
        (grad,) = torch.autograd.grad(img.sum(), ones)
    return grad[:, 0].detach()


@dataclass
class BoundedVisibilityStrategy(Strategy):
    """gsplat densification with the paper's hard bound ``count <= tau`` per object.

    Attributes
    ----------
    tau : the bound (paper: 36,864).
    densify : the gsplat strategy that grows and prunes (clone/split by
        screen-space gradient, prune by opacity and size, opacity reset).
    group_spacing : objects packed along x at this spacing (None: one object).

    The trainer owns the running state and must put in it, under
    ``"measure_visibility"``, a callable ``params -> [N] visibility`` that renders
    randomly chosen training views (see :func:`blending_weights`); the strategy calls
    it only when some object is over ``tau``. The last measured visibility is kept in
    ``params["visibility"]`` (not trainable), so it follows every clone/split/remove.

    ``rank_by`` (the bounding-rule ablation, ``fit.bound_rank``): ``"visibility"`` (the paper's:
    the accumulated blending weight ``sum alpha * T`` over sampled training views), ``"opacity"``
    (the least opaque go first; no rendering) or ``"random"`` (a seeded draw: the control).
    """

    tau: int = 36_864
    densify: DefaultStrategy = field(default_factory=DefaultStrategy)
    group_spacing: float | None = None
    rank_by: str = "visibility"  # which Gaussians the bound removes first: see BOUND_RANKS
    seed: int = 0  # of the "random" rule

    def initialize_state(self, scene_scale: float = 1.0) -> dict[str, Any]:
        state = self.densify.initialize_state(scene_scale)
        state.update(n_bound_events=0, n_bound_removed=0, measure_visibility=None)
        return state

    def check_sanity(self, params: dict[str, Tensor], optimizers: dict[str, torch.optim.Optimizer]) -> None:
        trainable = {k: v for k, v in params.items() if k != "visibility"}
        self.densify.check_sanity(trainable, optimizers)
        if "visibility" not in params or params["visibility"].requires_grad:
            raise ValueError("params needs a non-trainable 'visibility' tensor [N] for the bounded strategy")
        if self.tau < 1:
            raise ValueError(f"tau must be >= 1, got {self.tau}")
        if self.rank_by not in BOUND_RANKS:
            raise ValueError(f"unknown bound rank {self.rank_by!r}; expected one of {', '.join(BOUND_RANKS)}")

    def step_pre_backward(self, params, optimizers, state, step, info) -> None:
        self.densify.step_pre_backward(params, optimizers, state, step, info)

    def step_post_backward(self, params, optimizers, state, step, info, packed: bool = False) -> None:
        if info.get("layout") is not None:  # objects drawn into their own views: gsplat's packed layout, flat ids
            info, packed = info["layout"].packed_info(info), True
        self.densify.step_post_backward(params, optimizers, state, step, info, packed=packed)
        self.enforce_bound(params, optimizers, state)

    @torch.no_grad()
    def enforce_bound(self, params, optimizers, state) -> int:
        """Remove the lowest-visibility Gaussians of every object above ``tau``; returns how many.

        Counts change only when gsplat's ops replace the parameters, so the check (two host syncs) is
        skipped while ``params["means"]`` is the tensor last checked (a weak reference in the state,
        which gsplat's ops leave alone: they touch tensors only)."""
        checked = state.get("bound_checked")
        if checked is not None and checked() is params["means"]:
            return 0
        groups = object_groups(params["means"], self.group_spacing)
        counts = torch.bincount(groups - groups.min()) if groups.numel() else groups
        if groups.numel() == 0 or int(counts.max()) <= self.tau:
            state["bound_checked"] = weakref.ref(params["means"])
            return 0
        if self.rank_by == "visibility":
            measure = state.get("measure_visibility")
            if measure is None:
                raise RuntimeError("the bounded strategy needs state['measure_visibility'] set by the trainer")
            score = measure(params)  # [N]
            params["visibility"].data.copy_(score)
        elif self.rank_by == "opacity":
            score = torch.sigmoid(params["opacities"].detach())  # [N]
        else:  # random: a fresh seeded draw per bound event
            gen = torch.Generator().manual_seed(self.seed + 1009 * int(state["n_bound_events"]))
            score = torch.rand(groups.shape[0], generator=gen).to(groups.device)
        over = rank_within_groups(groups, score) >= self.tau  # [N] bool
        n = int(over.sum())
        remove(params=params, optimizers=optimizers, state=state, mask=over)
        state["n_bound_events"] += 1
        state["n_bound_removed"] += n
        state["bound_checked"] = weakref.ref(params["means"])
        return n


@dataclass(frozen=True)
class PruneCheckConfig:
    """``params.yaml: prune_check``: the quality gate after fitting (suite in :mod:`gaussian_atlas.checks`).

    tau : the bound every fit must respect (the stage passes ``fit.tau``).
    psnr_floor : lowest acceptable held-out PSNR (dB).
    min_scale, max_scale : Gaussian standard deviations outside this range are degenerate.
    max_transparent_fraction : most Gaussians of a fit may not be invisible (opacity < 0.005).
    max_extent : no Gaussian may sit farther than this from the object centre.
    max_rejected_fraction : the stage fails above this fraction of rejected fits.
    """

    tau: int = 36_864
    psnr_floor: float = 20.0
    min_scale: float = 1e-7
    max_scale: float = 2.0
    max_transparent_fraction: float = 0.5
    max_extent: float = 3.0
    max_rejected_fraction: float = 0.2
