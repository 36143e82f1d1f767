"""Every object's views for one packed fit: resizing, the train / held-out split, cameras shifted by the packing.

**Many objects at once.** Objects are *packed in space*: object ``b`` is
translated by ``b · spacing`` along x, together with its cameras. One
parameter set then holds every object's Gaussians, one ``render`` call draws
every object's views (each camera sees only its own object: the others are
far outside its frustum and depth range), and gsplat's strategy works
unchanged on the whole set. The object a Gaussian belongs to is read back from
its x coordinate (:func:`gaussian_atlas.prune.object_groups`). On a GPU this
turns many small launches into few large ones; on a CPU fit one object at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..gaussians import Gaussians
from ..render import render
from .config import FitConfig, FitInput
from .losses import psnr, ssim


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

    def cameras(self, views: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
        """Cameras of ``views[b]`` of every object b, concatenated: ``[ΣV_b, 4, 4]``, ``[ΣV_b, 3, 3]``."""
        return (torch.cat([self.c2w[b][v] for b, v in enumerate(views)]),
                torch.cat([self.K[b][v] for b, v in enumerate(views)]))

    def targets(self, views: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
        """Reference images of ``views``: rgb ``[ΣV_b, H, W, 3]``, alpha ``[ΣV_b, H, W]``."""
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
        rgb.append(torch.from_numpy(o.rgb).float().to(device))
        alpha.append(torch.from_numpy(o.alpha).float().to(device))
        m = torch.tensor(o.c2w, dtype=torch.float32)  # a copy: the caller's cameras stay unshifted
        m[:, 0, 3] += offsets[b]
        c2w.append(m.to(device))
        K.append(torch.from_numpy(o.K).float().to(device))
    return objects, PackedViews(W, H, offsets, train_idx, test_idx, rgb, alpha, c2w, K)


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
