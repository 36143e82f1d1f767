"""Anchor-based fitting: Scaffold-GS with view-independent MLPs, the paper's fitter (Sec. 3).

    "We build our fitting model upon the state-of-the-art, Scaffold-GS, along with
    non-trivial modifications. First, we exclude view properties from the MLP
    predictors for attribute querying [...]. Second, we propose constraining the
    number of Gaussians per fitting [...] we apply the same ranking and pruning
    based on the tracked visibility of anchors. Final Gaussians for pruning are
    selected by averaging the ranks from both tracking metrics."

The model (Scaffold-GS, Lu et al. 2024, with the view input removed):

- **anchors** on a voxel grid of side ``voxel_size``: position ``x_v`` (fixed),
  feature ``f_v`` ``[F]``, scaling ``l_v = exp(scaling_v)`` ``[6]`` and ``k`` offsets
  ``O_v`` ``[k, 3]``; all learnable but the position;
- each anchor spawns ``k`` **neural Gaussians**: centres ``x_v + O_v,i · l_v[:3]``,
  and from three small MLPs of ``f_v`` *only* (no view direction, no distance, so the
  attributes are constants and can be baked): opacity ``tanh`` (a neural Gaussian with
  opacity ``<= 0`` is not drawn), scale ``l_v[3:] · sigmoid(·)``, rotation (normalised
  quaternion), colour ``sigmoid``. The MLPs are Scaffold-GS's Linear-ReLU-Linear of
  width ``F``; objects packed into one fit each get their own copy (:class:`AnchorMLPs`);
- **growing** every ``refine_every`` steps: neural Gaussians whose mean screen-space
  gradient exceeds ``grow_grad2d`` (gsplat's normalisation, as the plain fitter) propose
  their voxel, at ``grow_levels`` grid levels (side ``voxel_size / 2^i``, threshold
  ``grow_grad2d · 2^i``), and a new anchor is placed in every proposed voxel no anchor
  occupies yet (feature: mean of the proposing anchors', scaling ``log`` of the voxel
  side, offsets 0), at most ``max_grow_fraction`` of the anchors at a time;
- **anchor pruning** at the same steps: anchors whose neural Gaussians' summed opacity
  averaged over the interval is below ``prune_opa``;
- **the bound** (:func:`rank_average_bound`): the count that is bounded is the number of
  *live* neural-Gaussian slots (a pruned slot is never drawn again, so at most that many
  Gaussians are drawn or baked); whenever an object has more than ``τ``, visibility
  (total blending weight Σ α·T over ``fit.measure_views`` random training views, as the
  plain fitter's) is measured per neural Gaussian, an anchor's visibility is the sum of
  its Gaussians', both are ranked, and the Gaussians with the best *average* of the two
  (normalised) ranks are kept. Anchors left with no live slot are removed. It runs after
  growing and once more after the last step.

After fitting, :meth:`AnchorModel.bake` evaluates the MLPs once and writes plain 3DGS
parameters (the same :class:`~gaussian_atlas.gaussians.Gaussians`, hence the same INRIA
PLY as the plain fitter); they render the same images as the anchor model.

Everything else (view sampling, loss, packing of several objects, held-out metrics) is
the fitting loop's (:func:`gaussian_atlas.fit.fit_objects`); resume and quarantine are
:func:`gaussian_atlas.fit.fit_chunk`'s. :class:`AnchorFit` plugs the model and
:class:`AnchorStrategy` (gsplat's strategy hooks) into that loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..gaussians import Gaussians, rgb_to_sh0
from ..prune import blending_weights, rank_within_groups
from ..render import ALPHA_THRESHOLD, render
from .config import AnchorConfig, FitConfig, FitInput, FitResult
from .views import PackedViews, initial_points, mean_knn_distance

__all__ = ["AnchorConfig", "AnchorFit", "AnchorMLPs", "AnchorModel", "AnchorStrategy", "grow_anchors", "init_anchors",
           "rank_average_bound", "voxelize"]


# --------------------------------------------------------------------------- the model


def _linear(n_groups: int, fan_in: int, fan_out: int) -> tuple[nn.Parameter, nn.Parameter]:
    """``n_groups`` independent ``nn.Linear(fan_in, fan_out)`` (torch's default init) as ``[G, in, out]``, ``[G, out]``."""
    ws, bs = [], []
    for _ in range(n_groups):
        lin = nn.Linear(fan_in, fan_out)
        ws.append(lin.weight.detach().T)
        bs.append(lin.bias.detach())
    return nn.Parameter(torch.stack(ws)), nn.Parameter(torch.stack(bs))


class AnchorMLPs(nn.Module):
    """Scaffold-GS's opacity / covariance / colour MLPs of the anchor feature alone, one copy per object.

    Each is ``Linear(F, F) → ReLU → Linear(F, out)`` with ``out`` = k (opacity, tanh),
    7k (3 scale factors through a sigmoid + a quaternion) and 3k (colour, sigmoid).
    The weights of ``n_groups`` objects are stacked (``[G, ...]``) and evaluated as one
    batched matmul; with ``n_groups = 1`` this is exactly three ``nn.Linear`` MLPs.
    """

    def __init__(self, n_groups: int, feat_dim: int, n_offsets: int) -> None:
        super().__init__()
        self.n_groups, self.feat_dim, self.n_offsets = n_groups, feat_dim, n_offsets
        hidden = [_linear(n_groups, feat_dim, feat_dim) for _ in range(3)]
        self.w1 = nn.Parameter(torch.cat([w for w, _ in hidden], dim=2))  # [G, F, 3F]
        self.b1 = nn.Parameter(torch.cat([b for _, b in hidden], dim=1))  # [G, 3F]
        self.w_opacity, self.b_opacity = _linear(n_groups, feat_dim, n_offsets)  # [G, F, k], [G, k]
        self.w_cov, self.b_cov = _linear(n_groups, feat_dim, 7 * n_offsets)  # [G, F, 7k], [G, 7k]
        self.w_color, self.b_color = _linear(n_groups, feat_dim, 3 * n_offsets)  # [G, F, 3k], [G, 3k]

    def forward(self, feats: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # feats [G, M, F]
        """Raw heads of grouped features: opacity ``[G, M, k]`` (tanh), cov ``[G, M, 7k]``, colour ``[G, M, 3k]`` (sigmoid)."""
        h = torch.relu(torch.baddbmm(self.b1[:, None], feats, self.w1))  # [G, M, 3F]
        h_o, h_c, h_k = h.split(self.feat_dim, dim=-1)
        opacity = torch.tanh(torch.baddbmm(self.b_opacity[:, None], h_o, self.w_opacity))
        cov = torch.baddbmm(self.b_cov[:, None], h_c, self.w_cov)
        color = torch.sigmoid(torch.baddbmm(self.b_color[:, None], h_k, self.w_color))
        return opacity, cov, color

    def select(self, g: int) -> "AnchorMLPs":
        """A detached copy holding object ``g``'s MLPs only (``n_groups = 1``)."""
        out = AnchorMLPs.__new__(AnchorMLPs)
        nn.Module.__init__(out)
        out.n_groups, out.feat_dim, out.n_offsets = 1, self.feat_dim, self.n_offsets
        for name, p in self.named_parameters():
            setattr(out, name, nn.Parameter(p.detach()[g:g + 1].clone()))
        return out


def _group_layout(groups: Tensor, n_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pad anchors into ``[G, M]`` by object: (padded index into A, A for padding; group; slot within group).

    ``groups`` ``[A]`` long in ``[0, G)``. Row ``i`` of the anchors is at
    ``[group[i], pos[i]]`` of the padded layout.
    """
    A = groups.shape[0]
    counts = torch.bincount(groups, minlength=n_groups)  # [G]
    order = torch.argsort(groups, stable=True)  # [A]
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(groups)
    pos[order] = torch.arange(A, device=groups.device) - starts[groups[order]]
    M = int(counts.max()) if A else 0
    pad = torch.full((n_groups, max(M, 1)), A, dtype=torch.long, device=groups.device)
    pad[groups, pos] = torch.arange(A, device=groups.device)
    return pad, groups, pos


@dataclass(eq=False)
class AnchorModel:
    """Anchors, their neural-Gaussian slots and the MLPs (pre-activation, like :class:`Gaussians`).

    Attributes
    ----------
    anchors : ``[A, 3]`` positions (fixed).
    features : ``[A, F]``.
    scaling : ``[A, 6]`` log; ``[:3]`` scales the offsets, ``[3:]`` the Gaussians.
    offsets : ``[A, k, 3]``.
    alive : ``[A, k]`` bool; a pruned slot (False) is never drawn.
    groups : ``[A]`` long, the object of each anchor (0 for one object).
    mlps : :class:`AnchorMLPs` with one copy per group.
    """

    anchors: Tensor  # [A, 3]
    features: Tensor  # [A, F]
    scaling: Tensor  # [A, 6]
    offsets: Tensor  # [A, k, 3]
    alive: Tensor  # [A, k] bool
    groups: Tensor  # [A] long
    mlps: AnchorMLPs

    def __len__(self) -> int:
        return int(self.anchors.shape[0])

    def neural(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Activated attributes of every slot: means ``[A, k, 3]``, quats ``[A, k, 4]`` (unit),
        scales ``[A, k, 3]``, opacities ``[A, k]`` (tanh, in (-1, 1)), colours ``[A, k, 3]``."""
        A, k = self.offsets.shape[:2]
        pad, g, pos = _group_layout(self.groups, self.mlps.n_groups)
        feats = torch.cat([self.features, self.features.new_zeros(1, self.features.shape[1])])[pad]  # [G, M, F]
        op, cov, col = (t[g, pos] for t in self.mlps(feats))  # back to anchor order: [A, k], [A, 7k], [A, 3k]
        s = torch.exp(self.scaling)  # [A, 6]
        means = self.anchors[:, None, :] + self.offsets * s[:, None, :3]  # [A, k, 3]
        cov = cov.reshape(A, k, 7)
        scales = s[:, None, 3:] * torch.sigmoid(cov[..., :3])  # [A, k, 3]
        identity = torch.tensor([1.0, 0.0, 0.0, 0.0], device=cov.device, dtype=cov.dtype)
        quats = F.normalize(cov[..., 3:] + identity, dim=-1)  # [A, k, 4]; identity at a zero output
        return means, quats, scales, op, col.reshape(A, k, 3)

    def drawn(self, min_opacity: float = 0.0) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]:
        """The Gaussians that are drawn: live slots with opacity ``> min_opacity``.

        Returns the activated tuple ``(means [M, 3], quats [M, 4], scales [M, 3],
        opacities [M], colours [M, 3])`` :func:`~gaussian_atlas.render.render` takes,
        and their flat slot indices ``[M]`` (``anchor · k + j``).
        """
        means, quats, scales, op, col = self.neural()
        idx = torch.nonzero((self.alive & (op > min_opacity)).reshape(-1)).squeeze(1)  # [M]
        k = self.offsets.shape[1]
        flat = lambda t: t.reshape(len(self) * k, *t.shape[2:])[idx]  # noqa: E731
        return (flat(means), flat(quats), flat(scales), flat(op), flat(col)), idx

    @torch.no_grad()
    def bake(self) -> Gaussians:
        """Evaluate the MLPs once: the drawn neural Gaussians as plain 3DGS parameters.

        Slots whose opacity is not above 1/255 are left out: the renderer (gsplat and
        ours) culls those under it, so the baked Gaussians render the same images. Opacity is
        written as its logit (clamped to [1e-6, 1 − 1e-6]), colour as SH DC.
        """
        (m, q, s, o, c), _ = self.drawn(min_opacity=ALPHA_THRESHOLD)
        o = o.clamp(1e-6, 1 - 1e-6)
        return Gaussians(means=m.clone(), quats=q.clone(), log_scales=torch.log(s), opacity_logits=torch.logit(o),
                         sh0=rgb_to_sh0(c))

    def select(self, g: int, shift: Sequence[float] = (0.0, 0.0, 0.0)) -> "AnchorModel":
        """Object ``g`` alone (detached copy, ``n_groups = 1``), translated by ``shift``."""
        sel = self.groups == g
        d = torch.as_tensor(shift, dtype=self.anchors.dtype, device=self.anchors.device)
        return AnchorModel(self.anchors[sel].detach() + d, self.features[sel].detach().clone(),
                           self.scaling[sel].detach().clone(), self.offsets[sel].detach().clone(),
                           self.alive[sel].clone(), torch.zeros(int(sel.sum()), dtype=torch.long,
                                                                device=sel.device), self.mlps.select(g))

    def to(self, device: Any) -> "AnchorModel":
        return AnchorModel(self.anchors.to(device), self.features.to(device), self.scaling.to(device),
                           self.offsets.to(device), self.alive.to(device), self.groups.to(device),
                           self.mlps.to(device))


# --------------------------------------------------------------------------- initialisation, growing, the bound


def voxelize(points: Tensor, size: float) -> Tensor:
    """Integer voxel coordinates ``round(p / size)`` of ``points`` ``[P, 3]`` → ``[P, 3]`` long."""
    return torch.round(points / size).long()


def init_anchors(obj: FitInput, n_points: int, voxel_size: float, max_anchors: int,
                 rng: np.random.Generator) -> Tensor:
    """Initial anchor positions ``[A, 3]``: ``n_points`` mesh surface samples (else random points in
    the unit ball), snapped to the voxel grid, one anchor per occupied voxel, at most
    ``max_anchors`` (a random subset when more)."""
    pts, _ = initial_points(obj, n_points, rng)
    vox = torch.unique(voxelize(torch.from_numpy(pts), voxel_size), dim=0)  # [A, 3] sorted
    if len(vox) > max_anchors:
        vox = vox[torch.from_numpy(np.sort(rng.choice(len(vox), size=max_anchors, replace=False)))]
    return vox.float() * voxel_size


@torch.no_grad()
def grow_anchors(anchors: Tensor, features: Tensor, slot_means: Tensor, grad2d: Tensor, count: Tensor,
                 alive: Tensor, voxel_size: float, threshold: float, levels: int, max_new: int,
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Scaffold-GS anchor growing: new anchors where neural Gaussians have large screen-space gradients.

    anchors ``[A, 3]``, features ``[A, F]``, slot_means ``[A, k, 3]`` (the neural
    Gaussians' centres), grad2d / count ``[A, k]`` (accumulated normalised gradient
    norm and the number of views that drew the slot), alive ``[A, k]``.
    At level ``i`` (side ``voxel_size / 2^i``, threshold ``threshold · 2^i``) each live slot
    whose mean gradient exceeds the threshold proposes its voxel; voxels already
    holding an anchor (or a new one of a coarser level) are skipped. A new anchor sits
    on its voxel's grid point, its feature is the mean of its proposers' anchors' and
    its scaling is ``log`` of the level's side. At most ``max_new`` new anchors, the
    voxels with the largest gradient first.

    Returns positions ``[n, 3]``, features ``[n, F]``, scaling ``[n, 6]`` (log).
    """
    A, k = alive.shape
    avg = grad2d / count.clamp_min(1)  # [A, k]
    new_pos, new_feat, new_scale, new_score = [], [], [], []
    for i in range(levels):
        size, thr = voxel_size / 2 ** i, threshold * 2 ** i
        cand = alive & (count > 0) & (avg > thr)  # [A, k]
        if not cand.any():
            continue
        a_idx, _ = torch.nonzero(cand, as_tuple=True)
        keys = voxelize(slot_means[cand], size)  # [c, 3]
        taken = voxelize(torch.cat([anchors] + new_pos), size)  # [A + n, 3]
        uniq, inv = torch.unique(torch.cat([taken, keys]), dim=0, return_inverse=True)
        occupied = torch.zeros(len(uniq), dtype=torch.bool, device=anchors.device)
        occupied[inv[:len(taken)]] = True
        inv_c = inv[len(taken):]  # [c] voxel of each candidate
        free = ~occupied[inv_c]
        if not free.any():
            continue
        inv_c, a_idx, score = inv_c[free], a_idx[free], avg[cand][free]
        vox, slot = torch.unique(inv_c, return_inverse=True)  # new voxels [n], candidate -> new voxel
        n = len(vox)
        feat = torch.zeros(n, features.shape[1], device=features.device).index_add_(0, slot, features[a_idx])
        feat = feat / torch.bincount(slot, minlength=n)[:, None].float()
        best = torch.zeros(n, device=features.device).scatter_reduce_(0, slot, score, "amax", include_self=False)
        new_pos.append(uniq[vox].float() * size)
        new_feat.append(feat)
        new_scale.append(torch.full((n, 6), math.log(size), device=anchors.device))
        new_score.append(best)
    if not new_pos:
        return anchors.new_zeros(0, 3), features.new_zeros(0, features.shape[1]), anchors.new_zeros(0, 6)
    pos, feat, scale, score = (torch.cat(t) for t in (new_pos, new_feat, new_scale, new_score))
    if len(pos) > max_new:
        top = torch.argsort(score, descending=True, stable=True)[:max(0, max_new)]
        pos, feat, scale = pos[top], feat[top], scale[top]
    return pos, feat, scale


def rank_average_bound(slot_vis: Tensor, alive: Tensor, groups: Tensor, tau: int,
                       drawn: Tensor | None = None) -> Tensor:
    """The paper's bound for anchors: keep ``≤ tau`` live slots per object by the average of two ranks.

    slot_vis ``[A, k]`` visibility of each neural Gaussian, alive ``[A, k]`` bool,
    groups ``[A]`` long (object of each anchor), drawn ``[A, k]`` bool (slots drawn now,
    i.e. with positive opacity; default: every live slot). In an object with more than
    ``tau`` live slots, the live slots that are not drawn are released first (they are
    no Gaussians now); then, among the ``N`` drawn ones, each gets its rank ``r_g`` by
    visibility (0 = most visible), each anchor of the object its rank ``r_a`` among the
    object's ``A_o`` anchors by anchor visibility (the sum over its drawn slots), and the
    ``tau`` slots with the smallest average of the normalised ranks
    ``(r_g / N + r_a(anchor) / A_o) / 2`` are kept (ties: the more visible slot, then the
    lower index). Normalising makes the two ranks weigh the same although there are
    ``k`` times more slots than anchors. Objects at or under ``tau`` keep every live slot.

    Returns the new alive mask ``[A, k]`` (a subset of ``alive``).
    """
    A, k = alive.shape
    keep = alive.clone()
    slot_groups = groups[:, None].expand(A, k)
    counts = torch.bincount(slot_groups[alive], minlength=int(groups.max()) + 1 if A else 0)
    for g in torch.nonzero(counts > tau).flatten().tolist():
        a_idx = torch.nonzero(groups == g).squeeze(1)  # [A_o]
        if drawn is not None:
            keep[a_idx] &= drawn[a_idx]
        al = keep[a_idx]  # [A_o, k]
        vis = torch.where(al, slot_vis[a_idx], torch.zeros_like(slot_vis[a_idx]))
        zeros_a = torch.zeros(len(a_idx), dtype=torch.long, device=groups.device)
        r_a = rank_within_groups(zeros_a, vis.sum(1))  # [A_o]
        owner, j = torch.nonzero(al, as_tuple=True)  # live slots of the object
        n = len(owner)
        r_g = rank_within_groups(torch.zeros(n, dtype=torch.long, device=groups.device), vis[owner, j])  # [n]
        key = r_g * len(a_idx) + r_a[owner] * n  # = 2 n A_o · average normalised rank, exact in integers
        order = torch.argsort(r_g, stable=True)
        order = order[torch.argsort(key[order], stable=True)]  # by key, ties by r_g
        drop = order[tau:]
        keep[a_idx[owner[drop]], j[drop]] = False
    return keep


@dataclass
class AnchorStrategy:
    """Scaffold-GS anchor growing / pruning and the paper's rank-averaged bound, in gsplat's ``Strategy`` hooks.

    The counterpart of :class:`gaussian_atlas.prune.BoundedVisibilityStrategy` for the
    anchor fitter (``initialize_state``, ``check_sanity``, ``step_pre_backward``,
    ``step_post_backward``; running state in a dict the trainer owns). ``params`` hold
    ``anchors [A, 3]`` (not trainable), ``features [A, F]``, ``scaling [A, 6]``,
    ``offsets [A, k, 3]``, one Adam each; the per-anchor state (``alive``, ``groups``
    and the statistics) follows every append and removal, as do the Adam moments.

    The trainer renders the drawn slots of :meth:`AnchorModel.drawn` and passes
    ``info`` = the render's meta plus ``slots`` (their flat indices ``[M]``) and
    ``opacities_drawn`` (``[M]``); it must put in the state, under
    ``"measure_visibility"``, a callable ``params -> (visibility [A, k], drawn [A, k])``
    over random training views, called only when some object is over ``tau``.

    Attributes
    ----------
    tau : the bound on live neural-Gaussian slots per object.
    cfg : :class:`AnchorConfig` (growing / pruning thresholds and schedule).
    n_groups : objects packed in the parameters.
    spacing : packing distance along x (new anchors' object = round(x / spacing)).
    """

    tau: int
    cfg: AnchorConfig
    n_groups: int = 1
    spacing: float = 100.0

    def initialize_state(self, params: dict[str, Tensor], groups: Tensor) -> dict[str, Any]:
        A, k, dev = params["offsets"].shape[0], params["offsets"].shape[1], params["offsets"].device
        return {
            "alive": torch.ones(A, k, dtype=torch.bool, device=dev),  # [A, k] live slots
            "groups": groups.to(dev),  # [A] object of each anchor
            "grad2d": torch.zeros(A, k, device=dev),  # [A, k] Σ normalised |∂L/∂means2d|
            "count": torch.zeros(A, k, device=dev),  # [A, k] views that drew the slot
            "opa_sum": torch.zeros(A, device=dev),  # [A] Σ_steps Σ_slots max(opacity, 0)
            "opa_steps": torch.zeros(A, device=dev),  # [A] steps summed in opa_sum
            "measure_visibility": None,
            "n_bound_events": 0, "n_bound_removed": 0, "n_grown": 0, "n_pruned_anchors": 0,
        }

    def check_sanity(self, params: dict[str, Tensor], optimizers: dict[str, torch.optim.Optimizer]) -> None:
        for name in ("anchors", "features", "scaling", "offsets"):
            if name not in params:
                raise ValueError(f"the anchor strategy needs params[{name!r}]")
        if params["anchors"].requires_grad or "anchors" in optimizers:
            raise ValueError("anchor positions are fixed: params['anchors'] must not be trainable")
        if self.tau < 1:
            raise ValueError(f"tau must be >= 1, got {self.tau}")

    def step_pre_backward(self, params, optimizers, state, step, info) -> None:
        info["means2d"].retain_grad()

    @torch.no_grad()
    def step_post_backward(self, params, optimizers, state, step, info, packed: bool = False) -> None:
        """Accumulate the statistics; on the schedule grow, prune and bound."""
        k = params["offsets"].shape[1]
        slots = info["slots"]  # [M] flat slot index of each drawn Gaussian
        g2 = info["means2d"].grad.clone()  # [C, M, 2], normalised as gsplat's DefaultStrategy
        g2[..., 0] *= info["width"] / 2.0 * info["n_cameras"]
        g2[..., 1] *= info["height"] / 2.0 * info["n_cameras"]
        cam, gi = torch.nonzero((info["radii"] > 0).all(-1), as_tuple=True)
        state["grad2d"].view(-1).index_add_(0, slots[gi], g2[cam, gi].norm(dim=-1))
        state["count"].view(-1).index_add_(0, slots[gi], torch.ones_like(gi, dtype=state["count"].dtype))
        op = torch.zeros(state["alive"].numel(), device=slots.device)
        op[slots] = info["opacities_drawn"].detach().clamp_min(0)
        state["opa_sum"] += op.reshape(-1, k).sum(1)
        state["opa_steps"] += 1
        c = self.cfg  # gsplat DefaultStrategy's schedule: after refine_start_iter, every refine_every steps
        if c.refine_start_iter < step < c.refine_stop_iter and step % c.refine_every == 0:
            self.refine(params, optimizers, state, step)

    @torch.no_grad()
    def refine(self, params, optimizers, state, step: int) -> None:
        """Grow anchors, prune transparent anchors, enforce the bound, reset the statistics."""
        c, k = self.cfg, params["offsets"].shape[1]
        means = params["anchors"][:, None] + params["offsets"] * torch.exp(params["scaling"][:, None, :3])  # [A, k, 3]
        new_pos, new_feat, new_scale = grow_anchors(
            params["anchors"], params["features"], means, state["grad2d"], state["count"], state["alive"],
            c.voxel_size, c.grow_grad2d, c.grow_levels, max(1, int(c.max_grow_fraction * len(means))))
        # Anchor pruning (Scaffold-GS): summed opacity over a full interval too low; never a whole object.
        seen = state["opa_steps"] >= 0.8 * min(c.refine_every, step + 1)
        low = seen & (state["opa_sum"] < c.prune_opa * state["opa_steps"])
        left = torch.bincount(state["groups"][~low], minlength=self.n_groups)
        low &= left[state["groups"]] > 0
        state["n_pruned_anchors"] += int(low.sum())
        _remove_rows(params, optimizers, state, low)
        n, dev = len(new_pos), new_pos.device
        if n:
            groups = torch.round(new_pos[:, 0] / self.spacing).long() if self.n_groups > 1 else \
                torch.zeros(n, dtype=torch.long, device=dev)
            _append_rows(params, optimizers, state, {
                "anchors": new_pos, "features": new_feat, "scaling": new_scale,
                "offsets": torch.zeros(n, k, 3, device=dev), "alive": torch.ones(n, k, dtype=torch.bool, device=dev),
                "groups": groups, "grad2d": torch.zeros(n, k, device=dev), "count": torch.zeros(n, k, device=dev),
                "opa_sum": torch.zeros(n, device=dev), "opa_steps": torch.zeros(n, device=dev)})
            state["n_grown"] += n
        self.enforce_bound(params, optimizers, state)
        for key in ("grad2d", "count", "opa_sum", "opa_steps"):
            state[key].zero_()

    @torch.no_grad()
    def enforce_bound(self, params, optimizers, state) -> int:
        """The rank-averaged bound on every object over ``tau`` live slots; anchors left with
        no live slot are removed. Returns the number of slots released."""
        alive, groups = state["alive"], state["groups"]
        counts = torch.bincount(groups[:, None].expand_as(alive)[alive], minlength=self.n_groups)
        if not len(counts) or int(counts.max()) <= self.tau:
            return 0
        if state.get("measure_visibility") is None:
            raise RuntimeError("the anchor strategy needs state['measure_visibility'] set by the trainer")
        vis, drawn = state["measure_visibility"](params)
        keep = rank_average_bound(vis, alive, groups, self.tau, drawn)
        n = int(alive.sum() - keep.sum())
        state["alive"] = keep
        state["n_bound_events"] += 1
        state["n_bound_removed"] += n
        _remove_rows(params, optimizers, state, ~keep.any(1))
        return n


# --------------------------------------------------------------------------- the representation of the fitting loop


def _remove_rows(params: nn.ParameterDict, optimizers: dict[str, torch.optim.Optimizer], state: dict[str, Any],
                 mask: Tensor) -> None:
    """Remove the anchors of ``mask`` ``[A]`` from the parameters, their Adam moments and the per-anchor state."""
    if mask.any():
        from gsplat.strategy.ops import remove

        remove(params=params, optimizers=optimizers, state=state, mask=mask)


def _append_rows(params: nn.ParameterDict, optimizers: dict[str, torch.optim.Optimizer], state: dict[str, Any],
                 rows: dict[str, Tensor]) -> None:
    """Append anchors: ``rows`` holds the new rows of every parameter and per-anchor state tensor.

    Adam moments of the new rows start at zero; existing rows keep theirs.
    """
    for name, new in rows.items():
        if name in state and isinstance(state[name], Tensor):
            state[name] = torch.cat([state[name], new.to(state[name])])
            continue
        old = params[name]
        p = nn.Parameter(torch.cat([old.detach(), new.to(old)]), requires_grad=old.requires_grad)
        params[name] = p
        opt = optimizers.get(name)
        if opt is None:
            continue
        st = opt.state.pop(old, {})
        for key, v in list(st.items()):
            if key != "step" and isinstance(v, Tensor) and v.shape[:1] == old.shape[:1]:
                st[key] = torch.cat([v, torch.zeros((len(new), *v.shape[1:]), device=v.device, dtype=v.dtype)])
        opt.param_groups[0]["params"] = [p]
        if st:
            opt.state[p] = st


class AnchorFit:
    """Anchors of every packed object, for :func:`~gaussian_atlas.fit.fit_objects` (``fit.method: anchors``).

    ``params``: ``anchors [A, 3]`` (fixed), ``features [A, F]``, log ``scaling [A, 6]``,
    ``offsets [A, k, 3]``, one Adam each, plus one Adam over the per-object MLPs; offsets and
    MLPs decay exponentially to their ``*_final`` rates. Each step draws the live slots with
    positive opacity (:meth:`AnchorModel.drawn`); after the last step the bound is enforced once
    more and every object is baked into plain Gaussians (:class:`~gaussian_atlas.fit.FitResult`
    ``.model`` holds its :class:`AnchorModel`).
    """

    name = "anchors"

    def __init__(self, objects: Sequence[FitInput], pv: PackedViews, cfg: FitConfig, rng: np.random.Generator,
                 device: torch.device) -> None:
        self.pv, self.cfg, self.device = pv, cfg, device
        ac = cfg.anchors
        self.k = k = ac.n_offsets
        # Anchors of every object, concatenated; positions carry the packing offset.
        pos, grp = [], []
        for b, o in enumerate(objects):
            p = init_anchors(o, cfg.init_points, ac.voxel_size, max(1, cfg.tau // k), rng)
            pos.append(p + torch.tensor([float(pv.offsets[b]), 0.0, 0.0]))
            grp.append(torch.full((len(p),), b, dtype=torch.long))
        anchors, groups = torch.cat(pos), torch.cat(grp)
        A = len(anchors)
        # [A, 6] log (Scaffold-GS: the 3-NN distance)
        log_scale = torch.log(mean_knn_distance(anchors, alone=ac.voxel_size))[:, None].repeat(1, 6)
        self.params = nn.ParameterDict({
            "anchors": nn.Parameter(anchors.to(device), requires_grad=False),  # [A, 3] fixed
            "features": nn.Parameter(torch.zeros(A, ac.feat_dim, device=device)),  # [A, F]
            "scaling": nn.Parameter(log_scale.to(device)),  # [A, 6] log
            "offsets": nn.Parameter(torch.zeros(A, k, 3, device=device)),  # [A, k, 3]
        })
        self.mlps = AnchorMLPs(len(objects), ac.feat_dim, k).to(device)
        lrs = {"features": ac.lr_features, "scaling": ac.lr_scaling, "offsets": ac.lr_offsets}
        # One Adam per anchor parameter (gsplat's convention: the strategy edits each one's state).
        self.optimizers = {n: torch.optim.Adam([{"params": self.params[n], "lr": lr, "name": n}], eps=1e-15)
                           for n, lr in lrs.items()}
        self.mlp_opt = torch.optim.Adam(self.mlps.parameters(), lr=ac.lr_mlp, eps=1e-15)
        self.offsets_decay = (ac.lr_offsets_final / ac.lr_offsets) ** (1.0 / max(1, cfg.steps))
        self.mlp_decay = (ac.lr_mlp_final / ac.lr_mlp) ** (1.0 / max(1, cfg.steps))
        self.strategy = AnchorStrategy(tau=cfg.tau, cfg=ac, n_groups=len(objects), spacing=cfg.spacing)
        self.strategy.check_sanity(self.params, self.optimizers)
        self.state = self.strategy.initialize_state(self.params, groups)
        self.state["measure_visibility"] = lambda p: self._visibility(pv.sample(rng, cfg.measure_views))
        self.n_drawn = 0
        # init_anchors caps anchors at tau // k: binds only if tau < k
        self.strategy.enforce_bound(self.params, self.optimizers, self.state)

    @property
    def step_optimizers(self) -> list[torch.optim.Optimizer]:
        return [*self.optimizers.values(), self.mlp_opt]

    def model(self) -> AnchorModel:
        p = self.params
        return AnchorModel(p["anchors"], p["features"], p["scaling"], p["offsets"], self.state["alive"],
                           self.state["groups"], self.mlps)

    @torch.no_grad()
    def _visibility(self, views: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
        """Blending weight of every slot over ``views`` (0 where not drawn) ``[A, k]``, and the drawn mask."""
        (m, q, s, o, _), idx = self.model().drawn()
        cw, kk = self.pv.cameras(views)
        n = self.state["alive"].numel()
        vis = torch.zeros(n, device=self.device)
        drawn = torch.zeros(n, dtype=torch.bool, device=self.device)
        drawn[idx] = True
        if len(idx):
            vis[idx] = blending_weights(partial(render, far=self.pv.far), m, q, s, o, cw, kk, self.pv.width,
                                        self.pv.height)
        return vis.reshape(-1, self.k), drawn.reshape(-1, self.k)

    def splats(self) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor, Tensor], dict[str, Any]]:
        """The MLPs' neural Gaussians that are drawn, and their slots and opacities for the strategy."""
        (m, q, s, o, c), idx = self.model().drawn()
        if len(idx) == 0:
            raise RuntimeError("no neural Gaussian has positive opacity: the anchor fit collapsed")
        self.n_drawn = len(idx)
        return (m, q, s, o, c), {"slots": idx, "opacities_drawn": o}

    def stats(self) -> dict[str, int]:
        return {"n_gaussians": self.n_drawn, "n_live": int(self.state["alive"].sum()),
                "n_anchors": len(self.params["anchors"])}

    def constrain(self) -> None:
        """Nothing: the neural Gaussians' scales are ``exp(scaling) · sigmoid(·)``, bounded above by the anchor's;
        ``fit.min_scale`` applies to free Gaussians (``"plain"``) only, like ``densify`` and their ``lr_*``."""

    def decay(self) -> None:
        for group in self.optimizers["offsets"].param_groups:
            group["lr"] *= self.offsets_decay
        for group in self.mlp_opt.param_groups:
            group["lr"] *= self.mlp_decay

    def finish(self) -> None:
        """A no-op (live slots only increase when growing, which ends with the bound): the guarantee before baking."""
        self.strategy.enforce_bound(self.params, self.optimizers, self.state)

    @torch.no_grad()
    def results(self, objects: Sequence[FitInput], common: dict[str, Any]) -> list[FitResult]:
        """Bake every object, record visibility over all its training views, held-out metrics."""
        pv, st, W, H = self.pv, self.state, self.pv.width, self.pv.height
        full = self.model()
        results = []
        for b, o in enumerate(objects):
            mb = full.select(b, shift=(-float(pv.offsets[b]), 0.0, 0.0))
            g = mb.bake()  # at the origin
            tv = torch.as_tensor(pv.train_idx[b], device=self.device)
            cw, kk = pv.c2w[b][tv].clone(), pv.K[b][tv]
            cw[:, 0, 3] -= float(pv.offsets[b])
            g.visibility = blending_weights(render, g.means, g.unit_quats(), g.scales(), g.opacities(), cw, kk, W, H) \
                if len(g) else torch.zeros(0, device=self.device)
            metrics = {"n_gaussians": len(g), **pv.holdout(b, g), **common, "bound_events": st["n_bound_events"],
                       "n_anchors": len(mb), "n_live_slots": int(mb.alive.sum()),
                       "anchors_grown": st["n_grown"], "anchors_pruned": st["n_pruned_anchors"]}
            results.append(FitResult(o.id, g.detach().to("cpu"), metrics, model=mb.to("cpu")))
        return results
