"""Every object's views for one packed fit: resizing, the train / held-out split, cameras shifted by the packing.

**Many objects at once.** Objects are *packed in space*: object ``b`` is
translated by ``b · spacing`` along x, together with its cameras. One
parameter set then holds every object's Gaussians, one ``render`` call draws
every object's views (each camera sees only its own object: when the whole set
is drawn into every view, the far plane at half the spacing hides the others;
before it was added, a view looking along x drew its neighbour ~90 units away,
a few pixels wide, inside the old far plane of 100), and gsplat's strategy works
unchanged on the whole set. The object a Gaussian belongs to is read back from
its x coordinate (:func:`gaussian_atlas.prune.object_groups`). On a GPU this
turns many small launches into few large ones; on a CPU fit one object at a time.

**Each object into its own views.** Drawing the whole set into every view costs
gsplat's unpacked projection ``[C, N]`` entries per tensor with ``C`` ∝ objects and
``N`` ∝ objects: memory quadratic in the batch (64 objects × 4 views × 2.4M Gaussians
peaked at 110 GiB on an H200). :class:`ObjectLayout` gathers the flat set into gsplat's
batch dimensions, ``[B, M, ...]`` (M = the largest object's count, empty slots
transparent), and :meth:`PackedViews.render` draws row b only into object b's views
``[B, C, 4, 4]``: ``B·C·M`` entries, linear in the batch, and no camera can see a
neighbour. The strategy gets the statistics back in gsplat's packed layout over the
flat set (:meth:`ObjectLayout.packed_info`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..gaussians import Gaussians
from ..render import RenderOutput, render
from .config import FitConfig, FitInput
from .losses import psnr, ssim


@dataclass(frozen=True)
class ObjectLayout:
    """Where each Gaussian of a packed (flat) parameter set sits when every object is drawn on its own.

    Slot ``(b, j)`` of the batch ``[B, M]`` holds flat Gaussian ``src[b, j]``; empty slots
    hold ``n`` (one past the last: a transparent stand-in). Inside an object the flat order
    is kept, so depth ties resolve as in the flat set.
    """

    src: Tensor  # [B, M] long: flat index of the Gaussian in each slot, n for an empty slot
    n: int  # Gaussians in the flat set
    slot: Tensor | None = None  # [n] long: the slot b * M + j of each flat Gaussian (the inverse of src)

    @classmethod
    def of_groups(cls, groups: Tensor, n_objects: int) -> "ObjectLayout":
        """The layout of Gaussians whose object is ``groups [N]`` (long, in ``[0, n_objects)``).

        Raises ``ValueError`` when a Gaussian's object is outside the batch (it drifted off its packing slot).
        """
        N, dev = groups.shape[0], groups.device
        if N and (int(groups.min()) < 0 or int(groups.max()) >= n_objects):
            raise ValueError(f"Gaussians assigned to objects {int(groups.min())}..{int(groups.max())}, outside the "
                             f"batch of {n_objects}: one drifted off its packing slot (fit.spacing too small?)")
        counts = torch.bincount(groups, minlength=n_objects)  # [B]
        M = max(int(counts.max()) if N else 0, 1)
        order = torch.sort(groups, stable=True).indices  # [N] flat indices, object by object, flat order kept
        g = groups[order]
        slot = torch.arange(N, device=dev) - (torch.cumsum(counts, 0) - counts)[g]  # [N] slot within its object
        src = torch.full((n_objects, M), N, dtype=torch.long, device=dev)
        src[g, slot] = order
        inv = torch.empty(N, dtype=torch.long, device=dev)
        inv[order] = g * M + slot
        return cls(src, N, inv)

    @property
    def n_objects(self) -> int:
        return self.src.shape[0]

    def pad(self, t: Tensor, fill: float | Sequence[float]) -> Tensor:  # [N, ...] -> [B, M, ...]
        """``t``'s rows in the batch layout, ``fill`` in empty slots (differentiable w.r.t. ``t``).

        The gradient is gathered back through ``slot`` (each Gaussian sits in exactly one slot) instead
        of autograd's scatter for advanced indexing (``index_put_(accumulate=True)``: a sort, then a
        scatter): at 128 objects x 8K Gaussians that scatter was 235 of a 323 ms step on an H200
        (docs/bench/profile_fit128_h200.json)."""
        row = torch.as_tensor(fill, dtype=t.dtype, device=t.device).expand((1,) + tuple(t.shape[1:]))
        if self.slot is None or not t.requires_grad:
            return torch.cat([t, row])[self.src]
        return _PadGather.apply(t, row, self.src, self.slot)

    def pad_splats(self, splats: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """Activated ``(means [N, 3], quats [N, 4], scales [N, 3], opacities [N], colours [N, D])`` as
        ``[B, M, ...]``; empty slots are transparent (opacity 0: culled by both renderers)."""
        m, q, s, o, c = splats
        return (self.pad(m, 0.0), self.pad(q, (1.0, 0.0, 0.0, 0.0)), self.pad(s, 1e-3), self.pad(o, 0.0),
                self.pad(c, 0.0))

    def packed_info(self, info: dict[str, Any]) -> dict[str, Any]:
        """After ``backward``: a per-object render's meta (unpacked ``[B, C, M, ...]``) in gsplat's packed
        layout over the flat set, for a gsplat strategy's ``step_post_backward(..., packed=True)``.

        ``means2d`` becomes a stand-in ``[nnz, 2]`` whose ``.grad`` (and ``.absgrad``) hold the gradients of
        the visible (view, Gaussian) pairs of real views (``info["camera_valid"] [B, C]``), ``radii [nnz, 2]``,
        ``gaussian_ids [nnz]`` flat indices, ``n_cameras`` the real views (the loss's mean is over them),
        so DefaultStrategy's statistics equal those of the flat set drawn into every view.
        """
        radii = info["radii"]  # [B, C, M, 2]
        sel = (radii > 0).all(-1)  # [B, C, M]
        if info.get("camera_valid") is not None:
            sel &= info["camera_valid"][:, :, None]
        b, c, j = torch.nonzero(sel, as_tuple=True)  # [nnz]
        m2 = info["means2d"]  # [B, C, M, 2]
        grad = m2.grad[b, c, j] if m2.grad is not None else torch.zeros(len(b), 2, device=radii.device)
        proxy = torch.zeros_like(grad)  # [nnz, 2]
        proxy.grad = grad
        if getattr(m2, "absgrad", None) is not None:
            proxy.absgrad = m2.absgrad[b, c, j]
        return {**info, "means2d": proxy, "radii": radii[b, c, j], "gaussian_ids": self.src[b, j],
                "n_cameras": info["n_images"]}


class _PadGather(torch.autograd.Function):
    """``cat([t, row])[src]`` whose backward is the gather ``grad.flatten(0, 1)[slot]`` (``slot`` inverts
    ``src`` on the rows of ``t``; ``row`` is a constant fill)."""

    @staticmethod
    def forward(ctx, t: Tensor, row: Tensor, src: Tensor, slot: Tensor) -> Tensor:  # [N, ...] -> [B, M, ...]
        ctx.save_for_backward(slot)
        return torch.cat([t, row])[src]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # [B, M, ...] -> [N, ...]
        (slot,) = ctx.saved_tensors
        return grad.flatten(0, 1)[slot], None, None, None


def resize_views(obj: FitInput, side: int) -> FitInput:
    """Resize images to ``side × side`` (area filter) and scale the intrinsics to match."""
    V, H, W, _ = obj.rgb.shape
    if side <= 0 or (H == side and W == side):
        return obj
    t = torch.from_numpy(np.concatenate([obj.rgb, obj.alpha[..., None]], -1)).permute(0, 3, 1, 2)
    t = torch.nn.functional.interpolate(t, size=(side, side), mode="area" if side < H else "bilinear")
    t = t.permute(0, 2, 3, 1).numpy()
    K = obj.K.copy()
    K[:, 0] *= side / W
    K[:, 1] *= side / H
    return FitInput(obj.id, t[..., :3], t[..., 3], obj.c2w, K, obj.surface_points, obj.surface_colors,
                    obj.surface_normals)


@dataclass
class PackedViews:
    """Every object's images and cameras for one packed fit (object ``b`` shifted by ``offsets[b]`` along x).

    Built by :func:`pack_views`; shared by every representation of the fitting loop.
    """

    width: int
    height: int
    offsets: Tensor  # [B] packing offset of each object along x (CPU)
    train_idx: list[np.ndarray]  # B × [V_train] view indices trained on
    test_idx: list[np.ndarray]  # B × [V_test] held-out view indices (never trained on)
    rgb: list[Tensor]  # B × [V, H, W, 3] on the device
    alpha: list[Tensor]  # B × [V, H, W]
    c2w: list[Tensor]  # B × [V, 4, 4], shifted by the object's offset
    K: list[Tensor]  # B × [V, 3, 3]
    # When every object has the same views V: the lists above are views into these [B, V, ...] tensors, and
    # equal-length view draws are gathered in one indexing op per tensor instead of B (the per-step host work)
    stacked: dict[str, Tensor] | None = None

    def _gather(self, views: Sequence[np.ndarray]) -> tuple[Tensor, Tensor] | None:
        """``(object index [B, 1], view index [B, n])`` on the device when ``stacked`` and every draw has n views."""
        if self.stacked is None or len({len(v) for v in views}) != 1:
            return None
        dev = self.stacked["c2w"].device
        return (torch.arange(len(views), device=dev)[:, None],
                torch.from_numpy(np.stack(views).astype(np.int64)).to(dev, non_blocking=True))

    @property
    def far(self) -> float:
        """Far plane of the packed views: half the packing distance (objects lie in the unit ball and cameras a
        few units from them, so nothing of a neighbour is nearer), 100 for a single object."""
        return 0.5 * float(self.offsets[1] - self.offsets[0]) if len(self.offsets) > 1 else 100.0

    def cameras(self, views: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
        """Cameras of ``views[b]`` of every object b, concatenated: ``[ΣV_b, 4, 4]``, ``[ΣV_b, 3, 3]``."""
        if (g := self._gather(views)) is not None:
            return self.stacked["c2w"][g].flatten(0, 1), self.stacked["K"][g].flatten(0, 1)
        return (torch.cat([self.c2w[b][v] for b, v in enumerate(views)]),
                torch.cat([self.K[b][v] for b, v in enumerate(views)]))

    def cameras_per_object(self, views: Sequence[np.ndarray]) -> tuple[Tensor, Tensor, Tensor]:
        """Cameras of ``views[b]`` in gsplat's batch layout: ``[B, C, 4, 4]``, ``[B, C, 3, 3]`` and which are
        real ``[B, C]`` bool (C = the longest list; shorter lists are padded with a copy of a real view)."""
        if (g := self._gather(views)) is not None:
            return (self.stacked["c2w"][g], self.stacked["K"][g],
                    torch.ones(g[1].shape, dtype=torch.bool, device=g[1].device))
        C = max(len(v) for v in views)
        idx = [np.concatenate([v, np.full(C - len(v), v[0] if len(v) else 0)]).astype(np.int64) for v in views]
        valid = torch.tensor(np.arange(C)[None, :] < np.array([len(v) for v in views])[:, None],
                             device=self.c2w[0].device)
        return (torch.stack([self.c2w[b][i] for b, i in enumerate(idx)]),
                torch.stack([self.K[b][i] for b, i in enumerate(idx)]), valid)

    def render(self, splats: Sequence[Tensor], views: Sequence[np.ndarray], layout: ObjectLayout | None = None,
               **kwargs: Any) -> RenderOutput:
        """Draw the packed Gaussians into ``views`` of every object: ``rgb [ΣV_b, H, W, 3]``, ``alpha [ΣV_b, H, W, 1]``.

        ``splats`` are the flat set's activated tensors ``(means [N, 3], ...)``. Without ``layout`` the whole
        set is drawn into every view (one gsplat camera batch: memory ∝ views × Gaussians). With it each
        object's Gaussians go only into its own views (gsplat's batch dimensions: memory ∝ Gaussians);
        ``meta`` then is the render's unpacked ``[B, C, M, ...]`` meta plus ``layout``, ``camera_valid [B, C]``
        and ``n_images`` for :meth:`ObjectLayout.packed_info`. ``kwargs`` go to :func:`~gaussian_atlas.render.render`.
        """
        if layout is None:
            cw, kk = self.cameras(views)
            return render(tuple(splats), cw, kk, self.width, self.height, **{"far": self.far, **kwargs})
        cw, kk, valid = self.cameras_per_object(views)  # [B, C, 4, 4], [B, C, 3, 3], [B, C]
        out = render(layout.pad_splats(splats), cw, kk, self.width, self.height, **kwargs)
        n_images = sum(len(v) for v in views)
        if n_images == valid.numel():  # every view real: [B, C, ...] -> [B·C, ...], object-major as `targets`
            rgb, alpha = out.rgb.flatten(0, 1), out.alpha.flatten(0, 1)
        else:
            rgb, alpha = out.rgb[valid], out.alpha[valid]
        meta = dict(out.meta, layout=layout, camera_valid=valid, n_images=n_images)
        return RenderOutput(rgb=rgb, alpha=alpha, meta=meta)

    def targets(self, views: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
        """Reference images of ``views``: rgb ``[ΣV_b, H, W, 3]``, alpha ``[ΣV_b, H, W]``."""
        if (g := self._gather(views)) is not None:
            return self.stacked["rgb"][g].flatten(0, 1), self.stacked["alpha"][g].flatten(0, 1)
        return (torch.cat([self.rgb[b][v] for b, v in enumerate(views)]),
                torch.cat([self.alpha[b][v] for b, v in enumerate(views)]))

    def sample(self, rng: np.random.Generator, n: int) -> list[np.ndarray]:
        """``n`` random training views of every object (without replacement)."""
        return [rng.choice(t, size=min(n, len(t)), replace=False) for t in self.train_idx]

    @torch.no_grad()
    def holdout(self, b: int, g: Gaussians) -> dict[str, Any]:
        """Held-out PSNR / SSIM of object ``b``'s Gaussians ``g`` (at the origin, on the device)."""
        tv = torch.as_tensor(self.test_idx[b], device=self.rgb[b].device)
        c2w = self.c2w[b][tv].clone()
        c2w[:, 0, 3] -= float(self.offsets[b])
        pred = render(g, c2w, self.K[b][tv], self.width, self.height, background=1.0).rgb.clamp(0, 1)
        gt = self.rgb[b][tv]
        return {"psnr": float(psnr(pred, gt)), "ssim": float(ssim(pred, gt)), "n_test_views": len(tv),
                "width": self.width, "height": self.height}


def pack_views(objects: Sequence[FitInput], cfg: FitConfig, device: torch.device
               ) -> tuple[list[FitInput], PackedViews]:
    """Resize the objects to ``cfg.resolution``, split views into train / held-out, shift cameras by the packing.

    Returns the resized objects and their :class:`PackedViews`. Raises ``ValueError``
    when the objects do not share one image size. The caller's cameras are not modified.
    """
    objects = [resize_views(o, cfg.resolution) for o in objects]
    sizes = {o.rgb.shape[1:3] for o in objects}
    if len(sizes) != 1:
        raise ValueError(f"objects fitted together must share one image size, got {sorted(sizes)}")
    (H, W), B = sizes.pop(), len(objects)
    offsets = torch.arange(B, dtype=torch.float32) * cfg.spacing  # [B]
    train_idx, test_idx, rgb, alpha, c2w, K = [], [], [], [], [], []
    for b, o in enumerate(objects):
        V = len(o.rgb)
        test = np.arange(V)[::cfg.holdout_every] if V >= cfg.holdout_every else np.array([0])
        train = np.setdiff1d(np.arange(V), test) if V > 1 else np.arange(V)
        train_idx.append(train)
        test_idx.append(test)
        rgb.append(torch.from_numpy(o.rgb).float())
        alpha.append(torch.from_numpy(o.alpha).float())
        m = torch.tensor(o.c2w, dtype=torch.float32)  # a copy: the caller's cameras stay unshifted
        m[:, 0, 3] += offsets[b]
        c2w.append(m)
        K.append(torch.from_numpy(o.K).float())
    stacked = None
    if len({len(o.rgb) for o in objects}) == 1:  # one [B, V, ...] tensor each; the lists become views into them
        stacked = {k: torch.stack(t).to(device) for k, t in (("rgb", rgb), ("alpha", alpha), ("c2w", c2w), ("K", K))}
        rgb, alpha, c2w, K = (list(stacked[k].unbind(0)) for k in ("rgb", "alpha", "c2w", "K"))
    else:
        rgb, alpha, c2w, K = ([t.to(device) for t in ts] for ts in (rgb, alpha, c2w, K))
    return objects, PackedViews(W, H, offsets, train_idx, test_idx, rgb, alpha, c2w, K, stacked)


def initial_points(obj: FitInput, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """``n`` starting points ``[n, 3]`` float32 of a representation: mesh surface samples when the object
    has them (and their indices into ``obj.surface_*``), else uniform random points in the unit ball (None)."""
    if obj.surface_points is not None and len(obj.surface_points):
        idx = rng.choice(len(obj.surface_points), size=n, replace=len(obj.surface_points) < n)
        return obj.surface_points[idx].astype(np.float32), idx
    d = rng.normal(size=(n, 3))
    return (d / np.linalg.norm(d, axis=1, keepdims=True) * rng.random((n, 1)) ** (1 / 3)).astype(np.float32), None


def mean_knn_distance(points: Tensor, alone: float) -> Tensor:
    """Mean distance of each point ``[n, 3]`` to its 3 nearest others ``[n]`` (3DGS's initial scale;
    ``alone`` for a single point), at least 1e-4."""
    n = len(points)
    if n < 2:
        return torch.full((n,), float(alone)).clamp_min(1e-4)
    knn = torch.cat([torch.cdist(c, points).topk(min(4, n), largest=False).values[:, 1:]
                     for c in points.split(2048)])  # [n, <=3]
    return knn.mean(dim=1).clamp_min(1e-4)
