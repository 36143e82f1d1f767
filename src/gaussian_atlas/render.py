"""Render 3D Gaussians for a batch of cameras: gsplat on CUDA, a pure-torch compositor elsewhere.

One entry point, :func:`render`, for one object or a batch of objects
(leading batch dimensions on the Gaussians, ``[B, N, ...]``, with cameras
``[B, C, 4, 4]``), so a fitter can render many objects at once.

Camera convention
-----------------
``c2w`` is the **camera-to-world** matrix in the **OpenGL** camera convention
used by the data layer (camera looks down -Z, +Y up, +X right; world +Z up).
It must be rigid (rotation + translation). gsplat wants OpenCV
**world-to-camera** ``viewmats`` (looks down +Z, +Y down): the y and z camera
axes are negated and the transform inverted (:func:`viewmats_from_c2w`).
``K`` holds pixel intrinsics ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]``; pixel
(0, 0) is the top-left one and its centre is at (0.5, 0.5).

Backends
--------
``"gsplat"``
    ``gsplat.rasterization`` (CUDA only; RGB colours, ``sh_degree=None``,
    "classic" mode). Never called on CPU tensors: on a machine without CUDA
    any gsplat CUDA op tries to JIT-compile its extension and fails.
``"torch"``
    A differentiable compositor in plain torch (CPU tests, CPU fits, CPU
    rendering losses) that follows gsplat 1.5.3's ``classic`` rasteriser:

    * EWA projection ``Σ' = J W Σ Wᵀ Jᵀ`` with gsplat's clamp of the Jacobian
      to 1.3× the field of view, plus the ``eps2d`` (0.3 px²) low-pass;
    * Gaussians culled as gsplat does: depth outside ``[near, far]``,
      opacity < 1/255, screen bounding box outside the image; the box is
      opacity-aware, ``r = ceil(min(3.33, sqrt(2 ln(255 o))) sqrt(Σ'_ii))``,
      so no pixel outside it can reach alpha 1/255;
    * per-pixel ``alpha = min(0.999, o exp(-½ dᵀ Σ'⁻¹ d))``, zeroed below
      1/255, with ``d`` measured from the pixel centre (+0.5); ``Σ'`` is
      positive definite by construction (``eps2d`` > 0), so gsplat's
      ``σ < 0`` skip never applies;
    * front-to-back compositing in depth order (stable: equal depths keep
      list order), transmittance by ``cumprod``, and gsplat's early stop:
      a pixel stops *before* the Gaussian that would take its transmittance
      to 1e-4 or below; ``rgb = Σ wᵢ cᵢ + T·background``, ``alpha = 1 − T``.

    Pixels are processed in square tiles of ``tile_size`` (default 8). Each
    tile only sees the Gaussians whose bounding box touches it (a sorted
    tile-Gaussian intersection list, like gsplat's), and tiles are
    grouped so that a group's padded ``[tiles, pixels, Gaussians]`` work
    tensors hold at most ``max_pairs`` elements. See :func:`render` for the
    memory bound.
``"auto"``
    gsplat when the Gaussians are on a CUDA device, torch otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .gaussians import Gaussians

__all__ = ["BACKENDS", "RenderOutput", "viewmats_from_c2w", "project_gaussians", "render"]

BACKENDS = ("auto", "gsplat", "torch")

ALPHA_THRESHOLD = 1.0 / 255.0  # gsplat: Common.h ALPHA_THRESHOLD
MAX_ALPHA = 0.999  # gsplat: per-Gaussian alpha clamp
T_STOP = 1e-4  # gsplat: a pixel stops before its transmittance reaches this
MAX_EXTEND = 3.33  # gsplat: bounding box half-size in standard deviations


@dataclass(frozen=True)
class RenderOutput:
    """What :func:`render` returns.

    Attributes
    ----------
    rgb : Tensor
        ``[..., C, H, W, D]`` colour composited over the background (D = 3 for RGB).
    alpha : Tensor
        ``[..., C, H, W, 1]`` accumulated opacity ``1 − T``.
    meta : dict
        ``backend`` ("gsplat" or "torch"), ``width``, ``height``,
        ``n_cameras`` and the projection results in gsplat's unpacked layout:
        ``means2d [..., C, N, 2]`` (in the autograd graph: call
        ``retain_grad()`` on it for densification statistics), ``radii
        [..., C, N, 2]`` (int32, 0 = culled), ``depths``, ``conics``,
        ``opacities``. The gsplat backend returns gsplat's own meta dict
        (packed layout when ``packed=True``) with ``backend`` added.
    """

    rgb: Tensor  # [..., C, H, W, D]
    alpha: Tensor  # [..., C, H, W, 1]
    meta: dict[str, Any]


def viewmats_from_c2w(c2w: Tensor) -> Tensor:  # [..., 4, 4] -> [..., 4, 4]
    """OpenCV world-to-camera matrices of OpenGL camera-to-world ones.

    Negates the camera's y and z axes (columns 1 and 2 of the rotation) and
    inverts the rigid transform as ``[Rᵀ | −Rᵀ t]``.

    Parameters
    ----------
    c2w
        ``[..., 4, 4]`` rigid camera-to-world matrices, OpenGL camera axes.

    Returns
    -------
    Tensor
        ``[..., 4, 4]`` world-to-camera matrices, OpenCV camera axes (gsplat's ``viewmats``).
    """
    flip = torch.tensor([1.0, -1.0, -1.0], dtype=c2w.dtype, device=c2w.device)
    R = c2w[..., :3, :3] * flip  # [..., 3, 3] OpenCV camera axes in world coordinates
    t = c2w[..., :3, 3:4]  # [..., 3, 1]
    Rt = R.transpose(-1, -2)
    top = torch.cat([Rt, -Rt @ t], dim=-1)  # [..., 3, 4]
    bottom = torch.zeros_like(c2w[..., 3:4, :])
    bottom[..., 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def _quat_to_rotmat(quats: Tensor) -> Tensor:  # [..., 4] (w, x, y, z) -> [..., 3, 3]
    w, x, y, z = torch.unbind(F.normalize(quats, dim=-1), dim=-1)
    R = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1)
    return R.reshape(quats.shape[:-1] + (3, 3))


def project_gaussians(
    means: Tensor,  # [B, N, 3]
    quats: Tensor,  # [B, N, 4]
    scales: Tensor,  # [B, N, 3]
    opacities: Tensor,  # [B, N]
    viewmats: Tensor,  # [B, C, 4, 4]
    Ks: Tensor,  # [B, C, 3, 3]
    width: int,
    height: int,
    eps2d: float = 0.3,
    near: float = 0.01,
    far: float = 100.0,
) -> dict[str, Tensor]:
    """EWA projection of 3D Gaussians into pinhole cameras, as gsplat's fused projection.

    Returns
    -------
    dict
        ``means2d [B, C, N, 2]`` pixel coordinates of the centres,
        ``conics [B, C, N, 3]`` upper triangle (a, b, c) of ``Σ'⁻¹`` where
        ``Σ' = J W Σ Wᵀ Jᵀ + eps2d·I``, ``depths [B, C, N]`` camera-space z,
        ``radii [B, C, N, 2]`` int32 opacity-aware bounding-box half sizes in
        pixels (0 for culled Gaussians). Culled Gaussians have finite, unused
        values so gradients stay finite.
    """
    R = viewmats[..., :3, :3]  # [B, C, 3, 3]
    t = viewmats[..., :3, 3]  # [B, C, 3]
    means_c = torch.einsum("bcij,bnj->bcni", R, means) + t[:, :, None, :]  # [B, C, N, 3]
    x, y, z = means_c.unbind(-1)  # [B, C, N]
    in_depth = (z >= near) & (z <= far)
    z = torch.where(in_depth, z, torch.ones_like(z))  # keeps culled entries finite

    fx, fy = Ks[..., 0, 0, None], Ks[..., 1, 1, None]  # [B, C, 1]
    cx, cy = Ks[..., 0, 2, None], Ks[..., 1, 2, None]
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    tx = z * torch.minimum(torch.maximum(x / z, -lim_x_neg), lim_x_pos)
    ty = z * torch.minimum(torch.maximum(y / z, -lim_y_neg), lim_y_pos)
    zero = torch.zeros_like(z)
    J = torch.stack([fx / z, zero, -fx * tx / z**2, zero, fy / z, -fy * ty / z**2], dim=-1)
    J = J.reshape(z.shape + (2, 3))  # [B, C, N, 2, 3]

    M = _quat_to_rotmat(quats) * scales[..., None, :]  # [B, N, 3, 3] = R_q S, Σ = M Mᵀ
    JW = J @ R[:, :, None]  # [B, C, N, 2, 3]
    T = JW @ M[:, None]  # [B, C, N, 2, 3]
    cov2d = T @ T.transpose(-1, -2)  # [B, C, N, 2, 2]
    a = cov2d[..., 0, 0] + eps2d
    b = 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0])
    c = cov2d[..., 1, 1] + eps2d
    det = a * c - b * b
    ok_det = det > 0
    det = det.clamp_min(1e-10)
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)  # [B, C, N, 3]
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)  # [B, C, N, 2]

    with torch.no_grad():
        o = opacities.detach()[:, None, :].expand(z.shape)  # [B, C, N]
        extend = torch.sqrt(2.0 * torch.log(o.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD)).clamp_max(MAX_EXTEND)
        rx = torch.ceil(extend * torch.sqrt(a.detach().clamp_min(0)))
        ry = torch.ceil(extend * torch.sqrt(c.detach().clamp_min(0)))
        m2 = means2d.detach()
        inside = ((m2[..., 0] + rx > 0) & (m2[..., 0] - rx < width)
                  & (m2[..., 1] + ry > 0) & (m2[..., 1] - ry < height))
        valid = in_depth & ok_det & (o >= ALPHA_THRESHOLD) & ((rx > 0) | (ry > 0)) & inside
        valid &= torch.isfinite(m2).all(-1) & torch.isfinite(rx) & torch.isfinite(ry)
        radii = torch.stack([rx, ry], dim=-1).where(valid[..., None], torch.zeros_like(m2)).to(torch.int32)
    return {"means2d": means2d, "conics": conics, "depths": means_c[..., 2], "radii": radii}


def _background(background: Any, shape: tuple[int, ...], D: int, like: Tensor) -> Tensor:
    """``[*shape, D]`` background colours from a scalar, a ``[D]`` sequence or a broadcastable tensor."""
    if background is None:
        background = 0.0
    bg = torch.as_tensor(background, dtype=like.dtype, device=like.device)
    if bg.dim() == 0:
        bg = bg.expand(D)
    if bg.shape[-1] != D:
        raise ValueError(f"background has {bg.shape[-1]} channels, colours have {D}")
    return bg.expand(shape + (D,))


def render(
    gaussians: Gaussians | Sequence[Tensor],
    c2w: Tensor,  # [..., C, 4, 4]
    K: Tensor,  # [..., C, 3, 3]
    width: int,
    height: int,
    *,
    background: float | Sequence[float] | Tensor | None = (1.0, 1.0, 1.0),
    backend: str = "auto",
    near: float = 0.01,
    far: float = 100.0,
    eps2d: float = 0.3,
    tile_size: int = 8,
    max_pairs: int = 1 << 21,
    checkpoint: bool = False,
    packed: bool = False,
) -> RenderOutput:
    """Render Gaussians into a batch of pinhole cameras.

    Parameters
    ----------
    gaussians
        A :class:`~gaussian_atlas.gaussians.Gaussians` (pre-activation
        parameters, batch shape ``[...]``; colour = ``g.rgb()``), or a tuple
        of *activated* tensors ``(means [..., N, 3], quats [..., N, 4]
        (w, x, y, z, any norm), scales [..., N, 3], opacities [..., N],
        colors [..., N, D])``.
    c2w
        ``[..., C, 4, 4]`` OpenGL camera-to-world matrices (rigid). Leading
        dimensions are broadcast to the Gaussians' batch shape, so one set of
        cameras can serve a whole batch of objects.
    K
        ``[..., C, 3, 3]`` pixel intrinsics, broadcast like ``c2w``.
    width, height
        Image size in pixels.
    background
        Colour where nothing is: a scalar, ``[D]``, or a tensor broadcastable
        to ``[..., C, D]``; ``None`` = black (0). Default white.
    backend
        ``"auto"`` (gsplat on CUDA, torch otherwise), ``"gsplat"`` or ``"torch"``.
    near, far
        Gaussians whose centre's camera depth is outside ``[near, far]`` are culled.
    eps2d
        Low-pass added to the projected covariance's diagonal, px² (gsplat's 0.3).
    tile_size
        Torch backend: square pixel tile size (8 was fastest on CPU; the
        result does not depend on it). gsplat always uses its default, 16.
    max_pairs
        Torch backend: the most elements of one group's padded
        ``[tiles, tile_size², Gaussians]`` work tensors (a single tile that
        touches more than ``max_pairs / tile_size²`` Gaussians forms a larger
        group of its own). Memory, float32, measured on CPU (16,384
        Gaussians, 4 views of 256², 44M pixel-Gaussian pairs):

        * no grad: ~20 bytes × ``max_pairs`` of work tensors, plus ~100 bytes
          per tile-Gaussian intersection (``meta["n_isects"]``) for the
          sorted intersection list;
        * with grad, ``checkpoint=False``: autograd keeps ~30 bytes per
          (pixel, overlapping Gaussian) pair of *all* groups until backward
          (1.4 GB in that case), i.e. it grows with image size × overlap;
        * with grad, ``checkpoint=True``: ~60 bytes × ``max_pairs`` plus the
          intersection list (0.35 GB at 2**20): only the list grows with the image.
    checkpoint
        Torch backend: recompute each group in the backward pass
        (``torch.utils.checkpoint``) so training memory stays bounded as
        above; costs one more forward of the compositor (~1.3x time).
    packed
        gsplat backend: gsplat's packed mode (meta then in packed layout).

    Returns
    -------
    RenderOutput
        ``rgb [..., C, H, W, D]``, ``alpha [..., C, H, W, 1]``, ``meta``.

    Raises
    ------
    ValueError
        Unknown backend, gsplat asked for with CPU tensors, or shapes that do not fit.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if isinstance(gaussians, Gaussians):
        means, quats = gaussians.means, gaussians.quats
        scales, opacities, colors = gaussians.scales(), gaussians.opacities(), gaussians.rgb()
    else:
        if len(gaussians) != 5:
            raise ValueError("gaussians must be a Gaussians or (means, quats, scales, opacities, colors)")
        means, quats, scales, opacities, colors = gaussians
    bshape = tuple(means.shape[:-2])
    N, D = means.shape[-2], colors.shape[-1]
    for name, t, tail in (("quats", quats, (N, 4)), ("scales", scales, (N, 3)), ("opacities", opacities, (N,)),
                          ("colors", colors, (N, D))):
        if tuple(t.shape) != bshape + tail:
            raise ValueError(f"{name} must be {list(bshape + tail)}, got {list(t.shape)}")
    if c2w.shape[-2:] != (4, 4) or K.shape[-2:] != (3, 3) or c2w.dim() < 3:
        raise ValueError(f"c2w must be [..., C, 4, 4] and K [..., C, 3, 3], got {list(c2w.shape)}, {list(K.shape)}")
    C = c2w.shape[-3]
    try:
        c2w = c2w.to(means).expand(bshape + (C, 4, 4))
        K = K.to(means).expand(bshape + (C, 3, 3))
    except RuntimeError as e:
        raise ValueError(f"cameras {list(c2w.shape)}, {list(K.shape)} do not broadcast to batch {list(bshape)}") from e
    bg = _background(background, bshape + (C,), D, means)
    if N == 0:  # nothing to draw: the background, without a zero-size gsplat launch (suspected of the SIGFPE in
        # gsplat_cuda.so that stopped the anchor fitter on the H200: docs/paper_claims.md)
        rgb = bg[..., None, None, :].expand(bshape + (C, height, width, D)).clone()
        alpha = torch.zeros(bshape + (C, height, width, 1), dtype=means.dtype, device=means.device)
        return RenderOutput(rgb=rgb, alpha=alpha, meta={"backend": "empty", "width": width, "height": height,
                                                        "n_cameras": C})
    viewmats = viewmats_from_c2w(c2w)

    if backend == "auto":
        backend = "gsplat" if means.is_cuda else "torch"
    if backend == "gsplat":
        if not means.is_cuda:
            raise ValueError("backend 'gsplat' needs CUDA tensors; use backend='torch' on CPU")
        from gsplat import rasterization

        rgb, alpha, meta = rasterization(
            means, quats, scales, opacities, colors, viewmats, K, width, height,
            near_plane=near, far_plane=far, eps2d=eps2d, sh_degree=None, packed=packed,
            backgrounds=bg.contiguous(), render_mode="RGB", rasterize_mode="classic",
        )
        meta = dict(meta, backend="gsplat", n_cameras=C)
        return RenderOutput(rgb=rgb, alpha=alpha, meta=meta)

    B = math.prod(bshape)
    proj = project_gaussians(
        means.reshape(B, N, 3), quats.reshape(B, N, 4), scales.reshape(B, N, 3), opacities.reshape(B, N),
        viewmats.reshape(B, C, 4, 4), K.reshape(B, C, 3, 3), width, height, eps2d=eps2d, near=near, far=far,
    )
    # Views in the caller's batch shape first, so that meta["means2d"].retain_grad() sees the gradient.
    proj = {k: v.reshape(bshape + (C,) + tuple(v.shape[2:])) for k, v in proj.items()}
    opac = opacities.reshape(B, 1, N).expand(B, C, N)
    cols = colors.reshape(B, 1, N, D).expand(B, C, N, D)
    flat = lambda t: t.reshape((B * C,) + tuple(t.shape[len(bshape) + 1:]))  # noqa: E731
    rgb, alpha, n_isects = _composite(
        flat(proj["means2d"]), flat(proj["conics"]), opac.reshape(B * C, N), cols.reshape(B * C, N, D),
        flat(proj["depths"]), flat(proj["radii"]), bg.reshape(B * C, D), width, height, tile_size, max_pairs,
        checkpoint,
    )
    meta = {
        "backend": "torch", "width": width, "height": height, "n_cameras": C, "tile_size": tile_size,
        "n_isects": n_isects, "opacities": opac.reshape(bshape + (C, N)), **proj,
    }
    return RenderOutput(rgb=rgb.reshape(bshape + (C, height, width, D)),
                        alpha=alpha.reshape(bshape + (C, height, width, 1)), meta=meta)


def _tile_group(
    pix: Tensor,  # [G, P, 2] pixel centres relative to the tile's centre
    mu: Tensor,  # [G, M, 2] Gaussian centres relative to the tile's centre
    conic: Tensor,  # [G, M, 3]
    opac: Tensor,  # [G, M] (0 for padding)
    col: Tensor,  # [G, M, D]
) -> Tensor:  # [G, P, D + 1]: Σ w c and Σ w
    """Front-to-back compositing of depth-sorted Gaussians over the pixels of a group of tiles.

    ``log(o) − ½ dᵀ Q d`` is a quadratic polynomial in the pixel position, so
    it is evaluated for all (pixel, Gaussian) pairs by one batched matmul of
    pixel monomials ``[x², y², xy, x, y, 1]`` with per-Gaussian coefficients.
    Coordinates are relative to the tile centre to keep the cancellation
    error small (|x|, |y| <= tile_size / 2).
    """
    ca, cb, cc = conic.unbind(-1)  # [G, M]
    mx, my = mu.unbind(-1)
    # log o - ½(a (x-mx)² + 2b (x-mx)(y-my) + c (y-my)²), expanded in x, y
    coef = torch.stack([
        -0.5 * ca, -0.5 * cc, -cb,
        ca * mx + cb * my, cc * my + cb * mx,
        torch.log(opac.clamp_min(1e-30)) - 0.5 * (ca * mx * mx + cc * my * my) - cb * mx * my,
    ], dim=-2)  # [G, 6, M]
    px, py = pix.unbind(-1)  # [G, P]
    mono = torch.stack([px * px, py * py, px * py, px, py, torch.ones_like(px)], dim=-1)  # [G, P, 6]
    alpha = torch.exp(torch.bmm(mono, coef)).clamp_max(MAX_ALPHA)  # [G, P, M] = min(0.999, o exp(-σ))
    alpha = alpha.masked_fill(alpha < ALPHA_THRESHOLD, 0.0)
    trans_incl = torch.cumprod(1.0 - alpha, dim=-1)  # transmittance after each Gaussian
    trans = torch.cat([torch.ones_like(trans_incl[..., :1]), trans_incl[..., :-1]], dim=-1)  # before it
    w = (alpha * trans).masked_fill(trans_incl.detach() <= T_STOP, 0.0)  # gsplat's early stop, exclusive
    acc = torch.bmm(w, col)  # [G, P, D]
    return torch.cat([acc, w.sum(-1, keepdim=True)], dim=-1)


def _composite(
    means2d: Tensor,  # [I, N, 2]
    conics: Tensor,  # [I, N, 3]
    opacities: Tensor,  # [I, N]
    colors: Tensor,  # [I, N, D]
    depths: Tensor,  # [I, N]
    radii: Tensor,  # [I, N, 2] int32, 0 = culled
    backgrounds: Tensor,  # [I, D]
    width: int,
    height: int,
    tile_size: int,
    max_pairs: int,
    checkpoint: bool,
) -> tuple[Tensor, Tensor, int]:  # [I, H, W, D], [I, H, W, 1], number of tile-Gaussian intersections
    I, N = opacities.shape
    D = colors.shape[-1]
    dev, dt = means2d.device, means2d.dtype
    ts = tile_size
    tw, th = -(-width // ts), -(-height // ts)
    n_tiles, P = tw * th, ts * ts

    # Depth order per image (stable: equal depths keep list order); culled Gaussians last.
    with torch.no_grad():
        valid = (radii > 0).any(-1)  # [I, N]
        order = torch.argsort(torch.where(valid, depths.detach(), torch.full_like(depths, math.inf)),
                              dim=-1, stable=True)  # [I, N]
        flat = (order + torch.arange(I, device=dev)[:, None] * N).reshape(-1)  # [I*N] sorted -> flat index
        valid_s = valid.reshape(-1)[flat].reshape(I, N)
        m2 = means2d.detach().reshape(-1, 2)[flat].reshape(I, N, 2)
        r2 = radii.reshape(-1, 2)[flat].reshape(I, N, 2).to(dt)

        # Tile rectangles [x0, x1) x [y0, y1) touched by each Gaussian's bounding box (as gsplat's isect_tiles).
        lo = torch.floor((m2 - r2) / ts)
        hi = torch.ceil((m2 + r2) / ts)
        x0, x1 = lo[..., 0].clamp(0, tw).long(), hi[..., 0].clamp(0, tw).long()
        y0, y1 = lo[..., 1].clamp(0, th).long(), hi[..., 1].clamp(0, th).long()
        nx, ny = x1 - x0, y1 - y0
        per_g = (nx * ny * valid_s).reshape(-1)  # [I*N] tiles per (image, sorted Gaussian)
        n_isects = int(per_g.sum())

        # The intersection list, sorted by (image, tile, depth rank) = gsplat's isect ids.
        src = torch.repeat_interleave(torch.arange(I * N, device=dev), per_g)  # [n_isects] sorted-flat index
        start = torch.cumsum(per_g, 0) - per_g
        k = torch.arange(n_isects, device=dev) - start[src]
        nxf = nx.reshape(-1)[src]
        tile_x = x0.reshape(-1)[src] + k % nxf.clamp_min(1)
        tile_y = y0.reshape(-1)[src] + torch.div(k, nxf.clamp_min(1), rounding_mode="floor")
        img = torch.div(src, N, rounding_mode="floor")
        tile_id = img * n_tiles + tile_y * tw + tile_x  # [n_isects] global tile id
        key = tile_id * N + (src - img * N)
        key, perm = torch.sort(key)
        isect_src = src[perm]  # sorted-flat Gaussian per intersection, tile-major, front to back
        counts = torch.bincount(tile_id, minlength=I * n_tiles)  # [I * n_tiles]
        offsets = torch.cumsum(counts, 0) - counts

        # Group non-empty tiles of similar counts so that G * P * max count <= max_pairs.
        by_count = torch.argsort(counts, descending=True, stable=True)
        counts_sorted = counts[by_count].tolist()
        n_nonempty = sum(1 for c in counts_sorted if c > 0)
        groups: list[tuple[int, int]] = []
        i = 0
        while i < n_nonempty:
            g = max(1, min(n_nonempty - i, max_pairs // (P * counts_sorted[i])))
            groups.append((i, i + g))
            i += g

    # Attributes in depth order, plus one padding row (opacity 0) at index I*N.
    def sorted_rows(t: Tensor, width_: int) -> Tensor:
        rows = t.reshape(I * N, width_)[flat]
        return torch.cat([rows, torch.zeros_like(rows[:1])], dim=0)

    mu_all, conic_all = sorted_rows(means2d, 2), sorted_rows(conics, 3)
    opac_all, col_all = sorted_rows(opacities, 1)[:, 0], sorted_rows(colors, D)
    pad = I * N

    iy, ix = torch.meshgrid(torch.arange(ts, device=dev, dtype=dt), torch.arange(ts, device=dev, dtype=dt),
                            indexing="ij")
    local = torch.stack([ix, iy], dim=-1).reshape(P, 2) + 0.5  # [P, 2] pixel centres within a tile

    outs, ids = [], []
    for a, b in groups:
        tiles = by_count[a:b]  # [G] global tile ids
        M = counts_sorted[a]
        with torch.no_grad():
            j = torch.arange(M, device=dev)
            idx = offsets[tiles, None] + j  # [G, M]
            inside = j < counts[tiles, None]
            gidx = torch.where(inside, isect_src[idx.clamp_max(max(n_isects - 1, 0))], torch.full_like(idx, pad))
            t_local = tiles % n_tiles
            origin = torch.stack([(t_local % tw) * ts, torch.div(t_local, tw, rounding_mode="floor") * ts], -1)
            centre = origin.to(dt)[:, None, :] + 0.5 * ts  # [G, 1, 2]
            pix = (local - 0.5 * ts).expand(len(tiles), P, 2)  # [G, P, 2] relative to the tile centre
        args = (pix, mu_all[gidx] - centre, conic_all[gidx], opac_all[gidx], col_all[gidx])
        if checkpoint and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint as ckpt

            out = ckpt(_tile_group, *args, use_reentrant=False)
        else:
            out = _tile_group(*args)
        outs.append(out)
        ids.append(tiles)

    acc = torch.zeros(I * n_tiles, P, D + 1, device=dev, dtype=dt)
    if outs:
        acc = acc.index_copy(0, torch.cat(ids), torch.cat(outs))
    acc = acc.reshape(I, th, tw, ts, ts, D + 1).permute(0, 1, 3, 2, 4, 5).reshape(I, th * ts, tw * ts, D + 1)
    acc = acc[:, :height, :width]
    alpha = acc[..., D:]  # [I, H, W, 1]
    rgb = acc[..., :D] + (1.0 - alpha) * backgrounds[:, None, None, :]
    return rgb, alpha, n_isects
