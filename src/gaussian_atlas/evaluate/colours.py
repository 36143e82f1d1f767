"""Views and colour of the procedural prompt-fidelity score: the random evaluation views, the renders of the
Gaussians (premultiplied on black, pictures on white), their alpha-weighted colour and the palettes it is
compared with (each named colour as the mesh renderer shows the prompted object).

See :mod:`gaussian_atlas.evaluate.scoring` for how the score is defined.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .shapes import _canonical


def random_views(n: int, resolution: int, seed: int, elevation_min_deg: float = 0.0, elevation_max_deg: float = 45.0,
                 radius: float = 2.8, fov_deg: float = 45.0) -> tuple[Tensor, Tensor]:
    """``(c2w [n, 4, 4], K [n, 3, 3])``: cameras at random azimuths/elevations looking at the origin (+Z up)."""
    from ..cameras import look_at_c2w, spherical_to_cartesian

    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x71E5]))
    az = rng.uniform(0.0, 360.0, n)
    el = rng.uniform(elevation_min_deg, elevation_max_deg, n)
    c2w = np.stack([look_at_c2w(spherical_to_cartesian(a, e, radius)) for a, e in zip(az, el)])
    f = 0.5 * resolution / math.tan(0.5 * math.radians(fov_deg))
    K = np.array([[f, 0, 0.5 * resolution], [0, f, 0.5 * resolution], [0, 0, 1]])
    return torch.from_numpy(c2w).float(), torch.from_numpy(np.broadcast_to(K, (n, 3, 3)).copy()).float()


def rendered_palette(c2w: Tensor | np.ndarray, ambient: float | None = None,
                     lights: Sequence[tuple[Sequence[float], float]] | None = None,
                     n_points: int = 4096) -> dict[str, np.ndarray]:
    """Each named colour as the procedural renderer shows it: ``{name: rgb [3] in [0, 1]}``.

    The renderer shades ``clip(albedo * (ambient + sum_i I_i max(0, n . l_i)), 0, 1)`` with
    world-fixed lights (defaults: :class:`gaussian_atlas.meshrender.RenderConfig`'s). This
    averages that over the visible hemisphere of a unit sphere from each camera of ``c2w``
    ``[V, 4, 4]`` (weighted by projected area), then over the cameras.
    """
    from ..atlas import fibonacci_sphere
    from ..meshrender import RenderConfig
    from ..procedural import COLORS

    rc = RenderConfig()
    ambient = rc.ambient if ambient is None else float(ambient)
    lights = rc.lights if lights is None else lights
    n = fibonacci_sphere(n_points)  # [P, 3] normals = points of the unit sphere
    light = np.full(len(n), ambient)
    for d, intensity in lights:
        d = np.asarray(d, np.float64)
        light += float(intensity) * np.clip(n @ (d / np.linalg.norm(d)), 0.0, None)
    eyes = np.asarray(c2w, np.float64)[:, :3, 3]  # [V, 3]
    to_eye = eyes[:, None, :] - n[None]  # [V, P, 3]
    dist = np.linalg.norm(to_eye, axis=-1)
    w = np.clip(np.einsum("vpd,pd->vp", to_eye, n) / dist, 0.0, None) / dist ** 2  # visible, foreshortened
    w = w / w.sum(1, keepdims=True)  # each view counts once
    out = {}
    for name, rgb in COLORS.items():
        shaded = np.clip(np.asarray(rgb, np.float64)[None] / 255.0 * light[:, None], 0.0, 1.0)  # [P, 3]
        out[name] = (w @ shaded).mean(0)
    return out


def object_palettes(parts: Sequence[str], c2w: Tensor | np.ndarray, K: Tensor | np.ndarray,
                    resolution: int) -> list[dict[str, np.ndarray]]:
    """Per part of the prompted object (top first): ``{colour name: rgb [3]}``, each named colour
    as the procedural renderer shows that part from these views.

    The canonical object of ``parts`` (the generator's stack, no random stretch, normalised
    into the unit ball like every generated object) is ray cast by
    :func:`gaussian_atlas.meshrender.render_views` from cameras ``c2w [V, 4, 4]``, ``K [V, 3, 3]``
    with part k's albedo 0.5 in channel k, which gives each pixel's light factor ``L`` and
    part. Colour c of part k is then the alpha-weighted mean of ``clip(albedo_c * L)`` over
    that part's pixels (the renderer's shading is ``clip(albedo * L)``). Unlike one palette
    for all shapes, this knows that the upright sides of a prism under a part resting on it
    are seen only under the side lights.
    """
    from ..meshrender import RenderConfig, normalize_mesh, render_views
    from ..procedural import COLORS

    if len(parts) > 3:
        raise ValueError(f"object_palettes handles up to 3 parts, got {len(parts)}")
    mesh, _ = _canonical(parts, colours=[tuple(128 if c == k else 0 for c in range(3)) for k in range(len(parts))])
    mesh, _, _ = normalize_mesh(mesh, 1.0)
    c2w, K = np.asarray(c2w, np.float64), np.asarray(K, np.float64)
    rgba = render_views(mesh, list(c2w), {"w": resolution, "h": resolution, "fl_x": float(K[0, 0, 0]),
                                          "fl_y": float(K[0, 1, 1]), "cx": float(K[0, 0, 2]), "cy": float(K[0, 1, 2])},
                        RenderConfig(supersample=1))
    rgb = rgba[..., :3].reshape(-1, 3).astype(np.float64) / 255.0  # [P, 3]
    alpha = rgba[..., 3].reshape(-1).astype(np.float64) / 255.0
    out = []
    for k in range(len(parts)):
        mine = (rgb[:, k] > 0) & (alpha > 0)
        light = rgb[mine, k] / (128.0 / 255.0)  # [P_k] light factor of part k's pixels
        w = alpha[mine]
        pal = {}
        for name, c in COLORS.items():
            shaded = np.clip(np.asarray(c, np.float64)[None] / 255.0 * light[:, None], 0.0, 1.0)
            pal[name] = (w[:, None] * shaded).sum(0) / max(w.sum(), 1e-12) if len(w) else np.asarray(c) / 255.0
        out.append(pal)
    return out


def nearest_colour(rgb: np.ndarray, palette: Mapping[str, np.ndarray]) -> tuple[str | None, dict[str, float]]:
    """``(name of the nearest palette colour, {name: distance})``; None for a non-finite ``rgb``."""
    rgb = np.asarray(rgb, np.float64)
    if not np.isfinite(rgb).all():
        return None, {k: float("nan") for k in palette}
    d = {k: float(np.linalg.norm(rgb - np.asarray(v))) for k, v in palette.items()}
    return min(d, key=d.get), d


@torch.no_grad()
def render_premultiplied(g: Any, c2w: Tensor, K: Tensor, resolution: int) -> tuple[Tensor, Tensor]:
    """``(rgb [B, V, H, W, 3], alpha [B, V, H, W, 1])`` of Gaussians ``[B, N]`` on black (premultiplied colour).

    Cameras ``c2w [B, V, 4, 4]``, ``K [B, V, 3, 3]`` (or ``[V, ...]`` shared); one object at a
    time. The picture on white is ``rgb + (1 - alpha)``.
    """
    from ..render import render

    B = g.means.shape[0]
    rgbs, alphas = [], []
    for b in range(B):
        gb = g._map(lambda t: t[b])
        cb, kb = (c2w[b], K[b]) if c2w.dim() == 4 else (c2w, K)
        out = render(gb, cb.to(gb.means), kb.to(gb.means), resolution, resolution, background=None)
        rgbs.append(out.rgb.float().cpu())
        alphas.append(out.alpha.float().cpu())
    return torch.stack(rgbs), torch.stack(alphas)


def on_white_u8(rgb: Tensor, alpha: Tensor) -> np.ndarray:
    """uint8 pictures on white of premultiplied ``rgb [..., 3]`` and ``alpha [..., 1]``."""
    return ((rgb + (1.0 - alpha)).clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)


def alpha_weighted_colour(rgb: Tensor, alpha: Tensor, min_alpha: float = 1e-3) -> np.ndarray:
    """``[B, 3]``: ``sum(rgb) / sum(alpha)`` over the views and pixels of premultiplied renders ``[B, V, H, W, .]``.

    NaN when nothing is visible (``sum(alpha) < min_alpha``).
    """
    s = rgb.double().sum(dim=(1, 2, 3))  # [B, 3]
    a = alpha.double().sum(dim=(1, 2, 3))  # [B, 1]
    return torch.where(a > min_alpha, s / a.clamp_min(1e-12), torch.full_like(s, float("nan"))).numpy()


def object_colours(g: Any, c2w: Tensor, K: Tensor, resolution: int) -> np.ndarray:
    """``[B, 3]`` alpha-weighted rendered colour of Gaussians ``[B, N]`` (see :func:`alpha_weighted_colour`)."""
    return alpha_weighted_colour(*render_premultiplied(g, c2w, K, resolution))
