"""Gaussian Atlas: N 3D Gaussians of one object as a ``[16, sqrt N, sqrt N]`` image (paper Sec. 4).

Pipeline of :func:`gaussians_to_atlas` (one object) and :func:`build_atlases` (a batch)
======================================================================================

1. **Check** the input (:func:`prepare_gaussians`): finite values, non-zero quaternions,
   at least one Gaussian, else :class:`ValueError` naming the problem (the stage
   quarantines the object).
2. **Count to exactly N** = ``side**2``:

   * more than N: keep the N **most visible** ones: ranked by ``g.visibility`` (the
     blending weight the fit records) when present, else by opacity; ties keep the
     earlier Gaussian (stable sort); the kept ones stay in their input order.
   * fewer than N: append ``N - n`` **transparent copies**: pad k copies real
     Gaussian ``k mod n`` (position, colour, rotation), with opacity logit
     ``cfg.pad_opacity_logit`` (<= -12, sigmoid 6e-6: every 3DGS renderer culls
     opacities below 1/255) and log-scale ``cfg.pad_log_scale`` (in the normalised
     frame). Cycling over the real Gaussians multiplies the point density evenly, so
     the pads sit where the object is and the sphere transport sees the same shape.

3. **Normalise into the unit ball** (computed on the kept real Gaussians, before
   padding): centre ``c`` = the **centre of the bounding box** of the centres (not the
   mean, which dense regions would pull towards themselves), scale ``k = 1 / max_i
   |x_i - c|`` (1 when all centres coincide), so the farthest centre lies at radius 1.
   ``x' = k (x - c)``, ``log s' = log s + log k``; ``meta`` records ``c`` and ``k``.
4. **Sphere offsetting**: ``perm = assign(x', fibonacci_sphere(N), cfg.method)``
   minimises ``sum_i |x'_i - s_perm[i]|^2`` (optimal transport between uniform
   measures). Gaussian i keeps only its offset ``x'_i - s_perm[i]``. The squared cost
   ``sum |a x + b - s|^2`` differs from ``sum |x - s|^2`` by ``-2 a sum x_i.s_perm(i)``
   plus constants, so the optimal ``perm`` does not depend on step 3's centre and
   (positive) scale: a ``gs2sphere`` index precomputed on raw positions stays valid.
5. **Equirectangular projection** of the sphere points (world +Z up): longitude
   ``lam = atan2(y, x)`` in (-pi, pi], colatitude ``theta = acos(z)`` in [0, pi];
   ``u = (lam + pi) / (2 pi)``, ``v = theta / pi``, both in [0, 1] (the 2:1 map
   squeezed into the unit square). Image row ~ v (north pole, +Z, at the top),
   column ~ u (longitude from -pi at the left, increasing counter-clockwise seen from +Z).
6. **Plane offsetting**: one assignment of the N points ``(u, v)`` to the grid vertices
   ``((col + 0.5) / S, (row + 0.5) / S)``, identical for every object, so it is
   computed **once per (N, method)** and cached in ``cache_dir/sphere2grid_<hash>.npy``
   (:func:`sphere_to_grid`). Gaussian i lands in pixel ``grid[perm[i]]`` (row-major).

Atlas channels (``[16, S, S]`` float32) and why these encodings
---------------------------------------------------------------
=========  =======  ==================================================================
channels   name     value
=========  =======  ==================================================================
0:3        x - s    offset from the pixel's sphere point, normalised frame (|.| <= 2)
3          o        opacity, **activated**: ``sigmoid(logit)`` in (0, 1)
4:7        c        albedo RGB ``0.5 + C0 sh0`` (not clamped, so exactly invertible)
7          o        opacity (copy)
8:11       s        **log**-scale in the normalised frame, ``log s + log k``
11         o        opacity (copy)
12:16      r        unit quaternion (w, x, y, z), sign chosen so that ``w >= 0``
=========  =======  ==================================================================

The paper pads each three-channel attribute with the opacity, so the UNet's 4-channel
``conv_in`` is repeated 4x (Sec. 5), and shows "albedo", "colour-coded opacity",
"normalized scale" and "normalized quaternion" (Fig. 6), i.e. activated values:

* **offsets, not positions**: the sphere point is implied by the pixel, so the model
  only generates a small residual that varies smoothly across the atlas;
* **opacity activated**: bounded in (0, 1) like an image channel, and an error there is
  an error in what the renderer composites; a logit would be unbounded (pads at -12,
  pruned-away Gaussians near -inf) and the model would spend capacity on invisible
  differences. Decoding clamps to [1e-6, 1 - 1e-6] before the logit;
* **colour as RGB albedo**: what Fig. 6 shows and what an image model knows; it is an
  affine map of sh0, so nothing is lost (Sec. 5's pixel-wise standardisation would
  remove any affine choice anyway);
* **log-scale**: the scales of a fit span orders of magnitude (heavy-tailed), their logs
  are close to normal; an error in the log is a relative size error, and every decoded
  value is a valid positive scale (``exp``), so no clamp is needed;
* **unit quaternion with w >= 0**: q and -q are the same rotation; fixing the sign makes
  the target single-valued (half the ambiguity a model would otherwise have to average).
  Decoding renormalises (a near-zero quaternion becomes the identity).

:func:`atlas_to_gaussians` inverts it: averages the three opacity copies, adds the
sphere points back, and undoes the normalisation when ``meta`` is given. It returns
all N Gaussians (pads included: they are transparent).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .assign import METHODS, assign, fibonacci_sphere
from .gaussians import SH_C0, Gaussians
from .io import atomic_path

__all__ = [
    "ATLAS_CODE_VERSION",
    "CODE_VERSION",
    "ATLAS_CHANNELS",
    "CHANNEL_NAMES",
    "OPACITY_CHANNELS",
    "AtlasConfig",
    "prepare_gaussians",
    "equirectangular",
    "grid_points",
    "sphere_to_grid",
    "sphere_grid_cache_path",
    "gaussians_to_atlas",
    "build_atlases",
    "atlas_to_gaussians",
    "LAYOUTS",
    "layout_perm",
    "neighbour_coherence",
    "atlas_problem",
    "training_rows",
    "input_stamp",
    "channel_images",
    "atlas_figure",
]

ATLAS_CODE_VERSION = "1"
"""Bump when the sphere lattice, the projection or the grid layout changes: it is part of the cache key."""

CODE_VERSION = 1
"""The atlas stage's code version, in every atlas's reuse key (:func:`atlas_stamp`, with :data:`ATLAS_CODE_VERSION`):
bump when a change of the atlas code (sphere assignment, layouts, packing of Gaussians into pixels) changes the
atlases it writes. An edit that does not (a docstring, a refactor) keeps finished atlases."""

ATLAS_CHANNELS = 16
CHANNEL_NAMES: tuple[str, ...] = (
    "dx", "dy", "dz", "opacity0",
    "r", "g", "b", "opacity1",
    "log_sx", "log_sy", "log_sz", "opacity2",
    "qw", "qx", "qy", "qz",
)
"""Name of each of the 16 atlas channels, in order."""

OFFSET = slice(0, 3)
ALBEDO = slice(4, 7)
LOG_SCALE = slice(8, 11)
ROTATION = slice(12, 16)
OPACITY_CHANNELS = (3, 7, 11)

_OPACITY_EPS = 1e-6  # decoded opacities are clamped to [eps, 1 - eps] before the logit
_MAX_PAD_LOGIT = -12.0


LAYOUTS = ("ot", "random", "morton")
"""Where each Gaussian goes (:func:`layout_perm`): the paper's optimal transport, and two controls."""


@dataclass(frozen=True)
class AtlasConfig:
    """``params.yaml: atlas``.

    side : atlas side S; N = S² Gaussians per atlas (paper: 128, N = 16,384).
    method : solver of both assignments (:func:`gaussian_atlas.assign.assign`):
        "auto" | "scipy" | "emd" | "auction".
    pad_opacity_logit : opacity logit of padding Gaussians; must be <= -12
        (sigmoid = 6e-6, far under the 1/255 every renderer culls).
    pad_log_scale : log standard deviation of padding Gaussians, normalised (unit-sphere) frame.
    cache_dir : where the sphere -> grid index is cached (content-addressed file).
    layout : which sphere point (hence pixel) each Gaussian takes (:func:`layout_perm`):
        "ot" (the paper's sphere offsetting), or the controls "random" and "morton".
    max_log_scale : the largest log standard deviation a Gaussian may have in the unit-ball
        frame (1.0: e times the object's radius); an object with a larger one is refused
        (quarantined by the stage), since one such Gaussian covers the object and would shift
        every pixel's statistics in ``normalize``.
    grid : a plane index to use instead of solving one: an ``.npy`` permutation of N (a model
        folder's ``sphere2grid.npy``). A model fine-tuned from a pretrained one must see atlases laid
        out like the ones that model learned; solvers (and near-ties) can differ in a few % of pixels.
        None: solved with ``method`` and cached.
    """

    side: int = 128
    method: str = "auto"
    pad_opacity_logit: float = -12.0
    pad_log_scale: float = -9.0
    cache_dir: str = "data/atlas_cache"
    layout: str = "ot"
    max_log_scale: float = 1.0
    grid: str | None = None

    def __post_init__(self) -> None:
        if int(self.side) != self.side or self.side < 1:
            raise ValueError(f"side must be a positive integer, got {self.side!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if not self.pad_opacity_logit <= _MAX_PAD_LOGIT:
            raise ValueError(f"pad_opacity_logit must be <= {_MAX_PAD_LOGIT}, got {self.pad_opacity_logit}")
        if not math.isfinite(self.pad_log_scale):
            raise ValueError(f"pad_log_scale must be finite, got {self.pad_log_scale}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; expected one of {', '.join(LAYOUTS)}")

    @property
    def n(self) -> int:
        """Gaussians per atlas, ``side ** 2``."""
        return int(self.side) ** 2


# ---------------------------------------------------------------------------------------
# steps 1-3: check, count to N, normalise
# ---------------------------------------------------------------------------------------


def _check(g: Gaussians, what: str = "Gaussians") -> None:
    if not isinstance(g, Gaussians):
        raise TypeError(f"{what}: expected Gaussians, got {type(g).__name__}")
    problems = g.object_problems()
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def prepare_gaussians(g: Gaussians, cfg: AtlasConfig = AtlasConfig()) -> tuple[Gaussians, dict[str, Any]]:
    """Steps 1-3: check one object, bring it to exactly N Gaussians, normalise it into the unit ball.

    Parameters
    ----------
    g : Gaussians
        One object, ``[n, ...]`` (any device; computed in float64).
    cfg : AtlasConfig

    Returns
    -------
    g_norm : Gaussians
        ``[N, ...]`` float64, normalised frame (centres within radius 1); the first
        ``n_real`` are the kept real Gaussians (in input order), the rest the
        transparent pads. ``visibility`` is dropped.
    meta : dict
        ``center`` (list of 3 floats, world units), ``scale`` (float k: ``x' = k (x -
        center)``), ``n_real`` (real Gaussians in the atlas), ``n_input`` (Gaussians given).

    Raises
    ------
    ValueError
        Batched input, zero Gaussians, non-finite values or zero quaternions (the message
        names the field and the count); all kept Gaussians at one centre (no shape: a single
        Gaussian or a collapsed fit); a log-scale above ``cfg.max_log_scale`` in the unit-ball
        frame (the message names the Gaussian, the axis and the value).
    """
    _check(g)
    n_atlas = cfg.n
    g = g.to(dtype=torch.float64)
    n_in = len(g)
    # -- count: keep the N most visible --------------------------------------------------
    if n_in > n_atlas:
        rank_by = g.visibility if g.visibility is not None else g.opacity_logits  # [n]
        order = torch.sort(rank_by, descending=True, stable=True).indices[:n_atlas]  # [N]
        g = g.index(torch.sort(order).values)
    n_real = len(g)
    means, log_scales = g.means, g.log_scales  # [n, 3]
    # -- normalise: bounding-box centre, farthest centre at radius 1 --------------------
    center = 0.5 * (means.amin(0) + means.amax(0))  # [3]
    radius = float((means - center).norm(dim=-1).max())
    if not radius > 0:
        raise ValueError(f"all {n_real} kept Gaussian(s) share one centre: no shape to place on the sphere "
                         f"(a single Gaussian or a collapsed fit)")
    scale = 1.0 / radius
    means = (means - center) * scale  # [n, 3]
    log_scales = log_scales + math.log(scale)  # [n, 3]
    worst = int(torch.argmax(log_scales.max(-1).values))
    if float(log_scales[worst].max()) > cfg.max_log_scale:
        axis = int(torch.argmax(log_scales[worst]))
        raise ValueError(f"scale_{axis} of Gaussian {worst} is {float(log_scales[worst, axis]):.3g} (log) in the "
                         f"unit-ball frame, above atlas.max_log_scale {cfg.max_log_scale}: a Gaussian "
                         f"{math.exp(float(log_scales[worst, axis])):.3g} times the object's radius")
    quats, logits, sh0 = g.quats, g.opacity_logits, g.sh0
    # -- pad with transparent copies -------------------------------------------------------
    if n_real < n_atlas:
        src = torch.arange(n_atlas - n_real, device=means.device) % n_real  # [N - n]
        means = torch.cat([means, means[src]])
        quats = torch.cat([quats, quats[src]])
        sh0 = torch.cat([sh0, sh0[src]])
        log_scales = torch.cat([log_scales, torch.full_like(log_scales[src], cfg.pad_log_scale)])
        logits = torch.cat([logits, torch.full_like(logits[src], cfg.pad_opacity_logit)])
    out = Gaussians(means=means, quats=quats, log_scales=log_scales, opacity_logits=logits, sh0=sh0)
    meta = {"center": [float(v) for v in center], "scale": float(scale), "n_real": int(n_real),
            "n_input": int(n_in)}
    return out, meta


# ---------------------------------------------------------------------------------------
# steps 5-6: equirectangular projection and the cached plane assignment
# ---------------------------------------------------------------------------------------


def equirectangular(points: np.ndarray) -> np.ndarray:
    """``[N, 3]`` points on the unit sphere (world +Z up) -> ``[N, 2]`` (u, v) in [0, 1]².

    ``u = (atan2(y, x) + pi) / (2 pi)`` (longitude; 0 at -pi, increasing counter-clockwise
    seen from +Z), ``v = acos(z) / pi`` (colatitude; 0 at the north pole +Z, 1 at the south
    pole). Image column ~ u, row ~ v.
    """
    p = np.asarray(points, dtype=np.float64)
    lam = np.arctan2(p[:, 1], p[:, 0])  # [N] (-pi, pi]
    theta = np.arccos(np.clip(p[:, 2], -1.0, 1.0))  # [N] [0, pi]
    return np.stack([(lam + math.pi) / (2.0 * math.pi), theta / math.pi], axis=-1)  # [N, 2]


def grid_points(side: int) -> np.ndarray:
    """``[S², 2]`` (u, v) of the atlas pixel centres, row-major: pixel ``r * S + c`` at ``((c + .5) / S, (r + .5) / S)``."""
    t = (np.arange(side, dtype=np.float64) + 0.5) / side  # [S]
    vv, uu = np.meshgrid(t, t, indexing="ij")  # [S, S] row ~ v, col ~ u
    return np.stack([uu.reshape(-1), vv.reshape(-1)], axis=-1)  # [S², 2]


def sphere_grid_cache_path(side: int, method: str, cache_dir: str | os.PathLike,
                           source: str | os.PathLike | None = None) -> Path:
    """``cache_dir/sphere2grid_<hash>.npy``, the hash (sha256, 16 hex) of N, method and :data:`ATLAS_CODE_VERSION`
    (with ``source``, a given plane index file: of its content instead of the method)."""
    what: dict = {"n": int(side) ** 2, "method": str(method), "version": ATLAS_CODE_VERSION}
    if source is not None:
        what = {"n": int(side) ** 2, "source": hashlib.sha256(_read_source(source)).hexdigest()}
    key = json.dumps(what, sort_keys=True)
    return Path(cache_dir) / f"sphere2grid_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"


def _read_source(source: str | os.PathLike) -> bytes:
    try:
        return Path(source).read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"atlas.grid: cannot read the plane index {source}: {e.strerror or e}") from e


def _grid_name(cfg: AtlasConfig) -> str:
    """File name of the plane index an atlas of ``cfg`` uses (recorded in ``meta["grid"]``)."""
    return sphere_grid_cache_path(cfg.side, cfg.method, ".", cfg.grid).name


def atlas_grid(cfg: AtlasConfig, device: str | torch.device = "cpu") -> Tensor:
    """The plane index of ``cfg``: :func:`sphere_to_grid` with its side, method, cache and ``grid`` file."""
    return sphere_to_grid(cfg.side, cfg.method, cfg.cache_dir, device=device, source=cfg.grid)


def atlas_grid_path(cfg: AtlasConfig) -> Path:
    """Where :func:`atlas_grid` caches the plane index of ``cfg`` (call :func:`atlas_grid` first)."""
    return sphere_grid_cache_path(cfg.side, cfg.method, cfg.cache_dir, cfg.grid)


def _is_perm(a: np.ndarray, n: int) -> bool:
    return a.shape == (n,) and np.issubdtype(a.dtype, np.integer) and np.array_equal(np.sort(a), np.arange(n))


def sphere_to_grid(side: int, method: str = "auto", cache_dir: str | os.PathLike | None = "data/atlas_cache",
                   *, device: str | torch.device = "cpu", source: str | os.PathLike | None = None) -> Tensor:
    """Grid cell of each Fibonacci-sphere point (plane offsetting), computed once and cached.

    Assigns the equirectangular projections (:func:`equirectangular`) of
    ``fibonacci_sphere(N)`` to the pixel centres (:func:`grid_points`) of an ``S x S``
    grid, minimising the total squared distance in the unit square.

    Parameters
    ----------
    side : int
        Grid side S (N = S²).
    method : str
        Assignment solver (:func:`~gaussian_atlas.assign.assign`); part of the cache key.
    cache_dir : path or None
        The index is read from / written to :func:`sphere_grid_cache_path` (atomically;
        a file that is not a permutation of N is recomputed). ``None``: no cache.
    device : str or torch.device
        Where the assignment runs when it is not cached (``"cuda"`` makes the auction at
        N = 16,384 fast; the result is cached, so later runs on any machine reuse it).
    source : path or None
        A given plane index (``.npy``, a permutation of N) used instead of solving one
        (``atlas.grid``); ``ValueError`` naming the file if it is not one. Cached like a solved one.

    Returns
    -------
    LongTensor ``[N]`` (CPU)
        ``grid[j]`` = row-major pixel index (``row * S + col``) of sphere point j; a permutation.
    """
    n = int(side) ** 2
    path = sphere_grid_cache_path(side, method, cache_dir, source) if cache_dir is not None else None
    if source is not None:
        import io

        try:
            given = np.load(io.BytesIO(_read_source(source)), allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"atlas.grid: {source} is not a .npy array ({e})") from e
        if not _is_perm(given, n):
            raise ValueError(f"atlas.grid: {source} is not a plane index of a {side}x{side} atlas (a permutation "
                             f"of {n} integers); shape {given.shape}, dtype {given.dtype}")
        perm = given.astype(np.int64)
        if path is not None and not path.exists():
            with atomic_path(path) as tmp:
                np.save(tmp, perm, allow_pickle=False)
        return torch.from_numpy(perm)
    if path is not None and path.exists():
        try:
            cached = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            cached = None
        if cached is not None and _is_perm(cached, n):
            return torch.from_numpy(cached.astype(np.int64))
    p = torch.from_numpy(equirectangular(fibonacci_sphere(n))).to(device)  # [N, 2]
    q = torch.from_numpy(grid_points(side)).to(device)  # [N, 2]
    perm = assign(p, q, method).cpu().numpy().astype(np.int64)  # [N]
    if not _is_perm(perm, n):  # pragma: no cover - assign guarantees it
        raise RuntimeError(f"sphere_to_grid: the {method!r} assignment is not a permutation")
    if path is not None:
        with atomic_path(path) as tmp:
            np.save(tmp, perm, allow_pickle=False)
    return torch.from_numpy(perm)


# ---------------------------------------------------------------------------------------
# step 4 + packing
# ---------------------------------------------------------------------------------------


def _morton_codes(x: Tensor, bits: int = 10) -> Tensor:
    """Z-order (Morton) codes ``[..., N]`` of points ``x [..., N, 3]`` in [-1, 1]^3, ``bits`` per axis."""
    q = ((x.clamp(-1, 1) + 1) * 0.5 * (2**bits - 1)).round().long()  # [..., N, 3]
    code = torch.zeros(q.shape[:-1], dtype=torch.long, device=x.device)
    for b in range(bits):
        for a in range(3):
            code |= ((q[..., a] >> b) & 1) << (3 * b + a)
    return code


def layout_perm(means: Tensor, sphere: Tensor, grid: Tensor, layout: str = "ot", method: str = "auto") -> Tensor:
    """Sphere point of each Gaussian ``perm [..., N]`` under ``layout`` (pixel = ``grid[perm]``).

    means : ``[..., N, 3]`` normalised centres (unit ball); sphere : ``[N, 3]``; grid : ``[N]``
    (:func:`sphere_to_grid`).

    * ``"ot"``: the paper's sphere offsetting, ``assign(means, sphere, method)``: Gaussians
      close in 3D land on close sphere points, hence (plane offsetting) close pixels.
    * ``"random"``: a fixed random permutation (seeded by N alone): no structure at all.
    * ``"morton"``: the Gaussians sorted by the Z-order code of their centres fill the pixels
      row-major: 3D locality without any transport (a Z-curve's jumps break it at every scale).

    Every layout keeps every Gaussian and the packing; offsets are taken from the sphere point of
    the pixel, so :func:`atlas_to_gaussians` inverts all of them exactly.
    """
    n = sphere.shape[0]
    if layout == "ot":
        return assign(means, sphere, method).to(means.device).long()
    if layout == "random":
        g = torch.Generator().manual_seed(n)
        return torch.randperm(n, generator=g).to(means.device).expand(means.shape[:-1]).clone()
    if layout == "morton":
        rank = torch.argsort(torch.argsort(_morton_codes(means), dim=-1, stable=True), dim=-1)  # [..., N] pixel
        point_at_pixel = torch.empty_like(grid)
        point_at_pixel[grid] = torch.arange(n, device=grid.device)
        return point_at_pixel.to(means.device)[rank]
    raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def _check_gs2sphere(gs2sphere: Any, n: int, n_input: int) -> Tensor:
    idx = torch.as_tensor(np.asarray(gs2sphere.cpu() if isinstance(gs2sphere, Tensor) else gs2sphere))
    if n_input != n:
        raise ValueError(f"gs2sphere given for an object of {n_input} Gaussians; it needs exactly N = {n}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.shape != (n,):
        raise ValueError(f"gs2sphere must be an integer [N = {n}] index, got {idx.dtype} {list(idx.shape)}")
    idx = idx.long()
    if not torch.equal(torch.sort(idx).values, torch.arange(n)):
        raise ValueError("gs2sphere is not a permutation of the N sphere points")
    return idx


def _pack(g: Gaussians, sphere: Tensor, perm: Tensor, grid: Tensor, side: int) -> Tensor:
    """Pack normalised Gaussians ``[..., N]`` into atlases ``[..., 16, S, S]`` float32.

    ``perm [..., N]``: sphere point of each Gaussian; ``grid [N]``: pixel of each sphere point.
    """
    offset = g.means - sphere[perm]  # [..., N, 3]
    opac = torch.sigmoid(g.opacity_logits)[..., None]  # [..., N, 1]
    rgb = 0.5 + SH_C0 * g.sh0  # [..., N, 3]
    q = F.normalize(g.quats, dim=-1)  # [..., N, 4]
    q = torch.where(q[..., :1] < 0, -q, q)
    feats = torch.cat([offset, opac, rgb, opac, g.log_scales, opac, q], dim=-1)  # [..., N, 16]
    pix = grid.to(perm.device)[perm]  # [..., N] pixel of each Gaussian
    out = torch.empty_like(feats)
    out.scatter_(-2, pix[..., None].expand_as(feats), feats)  # [..., N(pixels), 16]
    lead = out.shape[:-2]
    return out.transpose(-1, -2).reshape(*lead, ATLAS_CHANNELS, side, side).to(torch.float32).contiguous()


def gaussians_to_atlas(
    g: Gaussians,
    cfg: AtlasConfig = AtlasConfig(),
    *,
    gs2sphere: Any = None,
    grid: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """One object's Gaussians -> its atlas ``[16, S, S]`` (see the module docstring for every step).

    Parameters
    ----------
    g : Gaussians
        One object, ``[n, ...]``, any n >= 1 (counted to N = S² as described above).
    cfg : AtlasConfig
    gs2sphere : array-like ``[N]`` of int, optional
        A precomputed sphere index per Gaussian (GaussianVerse's ``gs2sphere.npy``): skips
        the sphere assignment. Needs exactly ``len(g) == N`` and must index the points of
        this module's lattice, :func:`~gaussian_atlas.assign.fibonacci_sphere` (N) (an
        index built on another lattice or ordering must be converted first).
    grid : LongTensor ``[N]``, optional
        :func:`sphere_to_grid`'s result, when the caller already holds it.

    Returns
    -------
    atlas : Tensor ``[16, S, S]`` float32, on ``g``'s device
    meta : dict
        ``center``, ``scale``, ``n_real``, ``n_input`` (:func:`prepare_gaussians`) and
        ``grid``, the file name of the plane index used (:func:`atlas_to_gaussians` checks it).

    Raises
    ------
    ValueError
        Bad input (see :func:`prepare_gaussians`) or a ``gs2sphere`` that is not a
        permutation of N / given for a count other than N.
    """
    n = cfg.n
    idx = _check_gs2sphere(gs2sphere, n, len(g)) if gs2sphere is not None else None
    gn, meta = prepare_gaussians(g, cfg)
    dev = gn.device
    sphere = torch.from_numpy(fibonacci_sphere(n)).to(dev)  # [N, 3] float64
    if grid is None:
        grid = atlas_grid(cfg, dev)
    perm = idx.to(dev) if idx is not None else layout_perm(gn.means, sphere, grid.to(dev), cfg.layout, cfg.method)
    meta["grid"] = _grid_name(cfg)
    return _pack(gn, sphere, perm, grid, cfg.side), meta


def build_atlases(
    gs: Sequence[Gaussians],
    cfg: AtlasConfig = AtlasConfig(),
    *,
    device: str | torch.device | None = None,
    gs2sphere: Sequence[Any] | None = None,
) -> tuple[Tensor, list[dict[str, Any]]]:
    """Atlases of many objects, with one **batched** sphere assignment ``[B, N, 3]``.

    Same result as calling :func:`gaussians_to_atlas` on each object with an exact
    solver ("scipy", "emd"); the auction stops within its tolerance (``rtol`` 1e-4 of
    the cost), so batched and single runs may pick different near-optimal assignments.
    ``assign`` runs once on the stacked objects (the auction bids for all of them in the
    same kernels on a GPU). Measured on one H100 (N = 16,384, method "auto" = auction):
    B = 8 objects in 21 s; the plane index (once per N) in 8.6 s.

    Parameters
    ----------
    gs : sequence of B Gaussians (each ``[n_b, ...]``, any n_b >= 1)
    cfg : AtlasConfig
    device : where to compute (default: the first object's device); ``"cuda"`` with
        ``method="auto"`` uses the GPU auction.
    gs2sphere : optional sequence of B precomputed indices (``None`` entries are solved).

    Returns
    -------
    atlases : Tensor ``[B, 16, S, S]`` float32 on ``device``
    metas : list of B dicts (as :func:`gaussians_to_atlas`'s ``meta``)

    Raises
    ------
    ValueError
        An empty list, or a bad object: the message starts with ``object <b>:``.
    """
    if len(gs) == 0:
        raise ValueError("build_atlases needs at least one object")
    if gs2sphere is not None and len(gs2sphere) != len(gs):
        raise ValueError(f"gs2sphere has {len(gs2sphere)} entries for {len(gs)} objects")
    n = cfg.n
    dev = torch.device(device) if device is not None else gs[0].device
    preps, metas, fixed = [], [], {}
    for b, g in enumerate(gs):
        try:
            if gs2sphere is not None and gs2sphere[b] is not None:
                fixed[b] = _check_gs2sphere(gs2sphere[b], n, len(g))
            gn, meta = prepare_gaussians(g.to(dev), cfg)
        except ValueError as e:
            raise ValueError(f"object {b}: {e}") from e
        preps.append(gn)
        metas.append(meta)
    gb = Gaussians.stack(preps)  # [B, N, ...]
    sphere = torch.from_numpy(fibonacci_sphere(n)).to(dev)  # [N, 3]
    todo = [b for b in range(len(gs)) if b not in fixed]
    perm = torch.empty(len(gs), n, dtype=torch.long, device=dev)  # [B, N]
    grid = atlas_grid(cfg, dev)  # once per N, on this device
    if todo:
        sel = torch.as_tensor(todo, device=dev)
        perm[sel] = layout_perm(gb.means[sel], sphere, grid.to(dev), cfg.layout, cfg.method)
    for b, idx in fixed.items():
        perm[b] = idx.to(dev)
    for meta in metas:
        meta["grid"] = _grid_name(cfg)
    return _pack(gb, sphere, perm, grid, cfg.side), metas


# ---------------------------------------------------------------------------------------
# inverse
# ---------------------------------------------------------------------------------------


def _meta_arrays(meta: Mapping[str, Any] | Sequence[Mapping[str, Any]], batch: tuple[int, ...],
                 like: Tensor) -> tuple[Tensor, Tensor]:
    """``center [..., 1, 3]`` and ``scale [..., 1, 1]`` from one meta dict or a list of them."""
    metas = [meta] if isinstance(meta, Mapping) else list(meta)
    b = int(np.prod(batch)) if batch else 1
    if len(metas) != b:
        raise ValueError(f"{len(metas)} meta dict(s) for {b} atlas(es)")
    center = torch.tensor([list(map(float, m["center"])) for m in metas], dtype=like.dtype, device=like.device)
    scale = torch.tensor([float(m["scale"]) for m in metas], dtype=like.dtype, device=like.device)
    if not bool((scale > 0).all()) or not bool(torch.isfinite(center).all()):
        raise ValueError("meta: scale must be > 0 and center finite")
    return center.reshape(*batch, 1, 3), scale.reshape(*batch, 1, 1)


def atlas_to_gaussians(
    atlas: Tensor,
    meta: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    cfg: AtlasConfig = AtlasConfig(),
    *,
    grid: Tensor | None = None,
) -> Gaussians:
    """Atlas(es) ``[..., 16, S, S]`` -> Gaussians ``[..., N, ...]`` (the inverse of :func:`gaussians_to_atlas`).

    Gaussian k is pixel k in row-major order. Opacity = mean of the three copies,
    clamped to [1e-6, 1 - 1e-6], then the logit; sh0 = (rgb - 0.5) / C0; quaternions are
    renormalised (norm < 1e-12 -> identity); means = offset + the pixel's sphere point.
    With ``meta`` (one dict, or one per atlas of a batch) the normalisation is undone
    (``x = x' / k + center``, ``log s = log s' - log k``); without it the Gaussians stay
    in the unit-sphere frame (e.g. generated atlases). All N Gaussians are returned:
    padding ones are transparent (opacity ~6e-6, culled by every renderer).

    Decoding must use the plane index the atlas was built with: the same ``cfg`` (side,
    method, cache_dir; the cached file is the source of truth, so ship it with a model),
    or that index passed as ``grid``. A ``meta["grid"]`` other than ``cfg``'s raises.

    Raises
    ------
    ValueError
        Wrong shape (not 16 channels, not S x S with S = ``cfg.side``), non-finite
        values, or a meta that does not match.
    """
    atlas = torch.as_tensor(atlas)
    side = cfg.side
    if atlas.dim() < 3 or tuple(atlas.shape[-3:]) != (ATLAS_CHANNELS, side, side):
        raise ValueError(f"atlas must be [..., {ATLAS_CHANNELS}, {side}, {side}], got {list(atlas.shape)}")
    bad = int((~torch.isfinite(atlas)).sum())
    if bad:
        raise ValueError(f"atlas has {bad} non-finite values")
    a = atlas.to(torch.float64)
    batch = tuple(a.shape[:-3])
    n = side * side
    feats = a.reshape(*batch, ATLAS_CHANNELS, n).transpose(-1, -2)  # [..., N(pixels), 16]
    if grid is None:
        if meta is not None:
            built = {m.get("grid") for m in ([meta] if isinstance(meta, Mapping) else meta)} - {None}
            if built and built != {_grid_name(cfg)}:
                raise ValueError(f"the atlas was built with plane index {sorted(built)}, but cfg (side "
                                 f"{side}, method {cfg.method!r}) gives {_grid_name(cfg)}: decode with the same cfg")
        grid = atlas_grid(cfg)
    sphere = torch.from_numpy(fibonacci_sphere(n)).to(a.device)  # [N, 3]
    sphere_at_pixel = torch.empty_like(sphere)
    sphere_at_pixel[grid.to(a.device)] = sphere  # [N(pixels), 3]
    means = feats[..., OFFSET] + sphere_at_pixel  # [..., N, 3]
    opac = feats[..., list(OPACITY_CHANNELS)].mean(-1).clamp(_OPACITY_EPS, 1.0 - _OPACITY_EPS)  # [..., N]
    sh0 = (feats[..., ALBEDO] - 0.5) / SH_C0  # [..., N, 3]
    log_scales = feats[..., LOG_SCALE]  # [..., N, 3]
    q = feats[..., ROTATION]  # [..., N, 4]
    norm = q.norm(dim=-1, keepdim=True)
    identity = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=q.dtype, device=q.device)
    q = torch.where(norm > 1e-12, q / norm.clamp_min(1e-12), identity)
    if meta is not None:
        center, scale = _meta_arrays(meta, batch, a)
        means = means / scale + center
        log_scales = log_scales - torch.log(scale)
    return Gaussians(means=means, quats=q, log_scales=log_scales, opacity_logits=torch.logit(opac),
                     sh0=sh0).to(dtype=atlas.dtype if atlas.dtype.is_floating_point else torch.float32)


# ---------------------------------------------------------------------------------------
# pictures (paper Fig. 6)
# ---------------------------------------------------------------------------------------

# viridis at 0, .25, .5, .75, 1 (matplotlib's values), linearly interpolated
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)


def _colormap(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0) * (len(_VIRIDIS) - 1)
    i = np.minimum(t.astype(np.int64), len(_VIRIDIS) - 2)
    f = (t - i)[..., None]
    return _VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _robust_unit(x: np.ndarray) -> np.ndarray:
    """Per-channel 1st-99th percentile -> [0, 1] (``x`` ``[H, W, C]``)."""
    lo = np.percentile(x, 1, axis=(0, 1), keepdims=True)
    hi = np.percentile(x, 99, axis=(0, 1), keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-12)


def channel_images(atlas: Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Pictures of one atlas ``[16, S, S]`` (raw, not standardised), like the paper's Fig. 6.

    Returns ``{name: [S, S, 3] uint8}``:

    * ``offset``: x - s, 0.5 + offset / (2 max|offset|) per image (grey = on the sphere);
    * ``albedo``: RGB clipped to [0, 1];
    * ``opacity``: the mean opacity, colour-coded (viridis, 0 -> purple, 1 -> yellow);
    * ``scale``: log-scales, each axis stretched from its 1st to 99th percentile;
    * ``rotation``: the quaternion's (x, y, z), ``(v + 1) / 2``.
    """
    a = atlas.detach().cpu().numpy() if isinstance(atlas, Tensor) else np.asarray(atlas)
    if a.ndim != 3 or a.shape[0] != ATLAS_CHANNELS:
        raise ValueError(f"channel_images needs one atlas [16, S, S], got {list(a.shape)}")
    a = np.nan_to_num(a.astype(np.float64).transpose(1, 2, 0))  # [S, S, 16]
    off = a[..., OFFSET]
    m = max(float(np.abs(off).max()), 1e-12)
    return {
        "offset": _u8(0.5 + off / (2.0 * m)),
        "albedo": _u8(a[..., ALBEDO]),
        "opacity": _colormap(a[..., list(OPACITY_CHANNELS)].mean(-1)).round().astype(np.uint8),
        "scale": _u8(_robust_unit(a[..., LOG_SCALE])),
        "rotation": _u8((a[..., 13:16] + 1.0) / 2.0),
    }


def atlas_figure(atlas: Tensor | np.ndarray, scale: int = 1, pad: int = 2) -> np.ndarray:
    """:func:`channel_images` side by side on white, ``[S*scale, 5*(S*scale) + 4*pad, 3]`` uint8 (for MLflow)."""
    imgs = [np.repeat(np.repeat(im, scale, 0), scale, 1) for im in channel_images(atlas).values()]
    h = imgs[0].shape[0]
    gap = np.full((h, pad, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for i, im in enumerate(imgs):
        parts += ([gap] if i else []) + [im]
    return np.concatenate(parts, axis=1)


# --------------------------------------------------------------------------- structure


def neighbour_coherence(atlas: Tensor | np.ndarray, cfg: AtlasConfig = AtlasConfig(), *, grid: Tensor | None = None,
                        k: int = 8, min_opacity: float = 1e-4) -> dict[str, float]:
    """How much an atlas's pixel neighbourhood is a 3D neighbourhood (the structure a UNet can use).

    For each pair of horizontally or vertically adjacent pixels (right and down neighbours) that
    both hold a real Gaussian (opacity >= ``min_opacity``; padding sits at ~6e-6):

    * ``coherence``: share of the pairs whose second Gaussian is among the ``k`` nearest real
      Gaussians (by centre) of the first;
    * ``distance_ratio``: median centre distance over the pairs / median distance from a real
      Gaussian to its ``k``-th nearest real Gaussian (~1 or below: pixel neighbours are 3D
      neighbours; a random layout gives the object's typical inter-point distance, many times more).

    atlas : ``[16, S, S]`` (the normalised frame is enough: both numbers are scale-free).
    Returns ``{"coherence", "distance_ratio", "n_pairs"}`` (NaN when there is no pair).

    The ``k`` nearest neighbours come from a k-d tree (``scipy.spatial.cKDTree``, exact, float64) on the CPU:
    at N = 16,384 it takes tens of milliseconds where the dense ``[R, R]`` distances took ~1.7 s on two cores
    (``benchmarks/bench_coherence.py``); on the GPU machine that dense step, run per object in the atlas worker,
    was most of the atlas stage's 2.3 s per object (docs/benchmarks.md, the end-to-end run).
    """
    from scipy.spatial import cKDTree

    a = torch.as_tensor(np.asarray(atlas) if not isinstance(atlas, Tensor) else atlas).float().cpu()
    S = cfg.side
    g = atlas_to_gaussians(a, None, cfg, grid=grid)
    x = g.means.double()  # [N, 3], pixel k = Gaussian k (row-major)
    real = torch.sigmoid(g.opacity_logits.double()) >= min_opacity  # [N]
    idx = torch.arange(S * S).reshape(S, S)
    pairs = torch.cat([torch.stack([idx[:, :-1].reshape(-1), idx[:, 1:].reshape(-1)], 1),
                       torch.stack([idx[:-1, :].reshape(-1), idx[1:, :].reshape(-1)], 1)])  # [P, 2]
    pairs = pairs[real[pairs[:, 0]] & real[pairs[:, 1]]]
    nan = {"coherence": float("nan"), "distance_ratio": float("nan"), "n_pairs": 0}
    rid = torch.nonzero(real).squeeze(1)
    if not len(pairs) or len(rid) <= k:
        return nan
    xr = x[rid].numpy()  # [R, 3]
    kk = min(k, len(rid) - 1)
    dist_k, ids = cKDTree(xr).query(xr, k=kk + 1)  # [R, kk+1], nearest first; oneself among them (distance 0)
    own = ids == np.arange(len(xr))[:, None]  # [R, kk+1]
    # drop oneself; where a duplicate point took one's place in the kk+1 (oneself not listed), drop the farthest
    own[~own.any(1), -1] = True
    keep = ~own
    nn_r = ids[keep].reshape(len(xr), kk)  # [R, kk] row ids of each real Gaussian's kk nearest others
    kth = dist_k[keep].reshape(len(xr), kk)[:, -1]  # [R]
    nn = torch.full((S * S, kk), -1, dtype=torch.long)
    nn[rid] = rid[torch.from_numpy(nn_r)]  # [N, kk] pixel ids
    hit = (nn[pairs[:, 0]] == pairs[:, 1:2]).any(1)
    dist = (x[pairs[:, 0]] - x[pairs[:, 1]]).norm(dim=1)
    return {"coherence": float(hit.double().mean()),
            "distance_ratio": float(dist.median() / torch.from_numpy(kth).median().clamp_min(1e-12)),
            "n_pairs": int(len(pairs))}


# --------------------------------------------------------------------------- many objects on disk


def atlas_stamp(cfg: AtlasConfig) -> str:
    """Hash of the atlas settings and the atlas code's explicit versions (:data:`CODE_VERSION`,
    :data:`ATLAS_CODE_VERSION`): a finished atlas is reused only when both match (and its input, :func:`input_stamp`)."""
    import dataclasses
    import hashlib
    import json

    return hashlib.sha256(json.dumps({**dataclasses.asdict(cfg), "code_version": [CODE_VERSION, ATLAS_CODE_VERSION]},
                                     sort_keys=True).encode()).hexdigest()[:16]


def input_stamp(cfg_stamp: str, src: str | os.PathLike, use_gs2sphere: bool = False) -> str:
    """Reuse key of one object's atlas: the settings/code stamp and the content of its inputs.

    ``cfg_stamp`` is :func:`atlas_stamp`; the PLY's bytes (and, with ``use_gs2sphere``, the
    ``gs2sphere.npy`` beside it) are hashed, so a refit object gets a new atlas even when its
    file name, the atlas settings and the code are unchanged.
    """
    import hashlib

    h = hashlib.sha256(cfg_stamp.encode())
    paths = [Path(src)] + ([Path(src).with_name("gs2sphere.npy")] if use_gs2sphere else [])
    for p in paths:
        if p.exists():
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:24]


def atlas_problem(atlas: np.ndarray, cfg: AtlasConfig = AtlasConfig()) -> str | None:
    """Why an atlas ``[16, S, S]`` read from disk cannot be a valid atlas of ``cfg``, or None: the shape,
    non-finite values, offsets beyond 2 (both points lie in the unit ball), opacities outside [0, 1],
    log-scales above ``cfg.max_log_scale`` (the bound :func:`prepare_gaussians` enforces)."""
    a = np.asarray(atlas)
    if a.shape != (ATLAS_CHANNELS, cfg.side, cfg.side):
        return f"shape {list(a.shape)}, expected [{ATLAS_CHANNELS}, {cfg.side}, {cfg.side}]"
    if not np.isfinite(a).all():
        return f"{int((~np.isfinite(a)).sum())} non-finite values"
    checks = ((OFFSET, -2.0 - 1e-3, 2.0 + 1e-3, "offset"), (list(OPACITY_CHANNELS), -1e-6, 1.0 + 1e-6, "opacity"),
              (LOG_SCALE, -np.inf, cfg.max_log_scale + 1e-6, "log-scale"))
    for sl, lo, hi, name in checks:
        v = a[sl]
        if v.min() < lo or v.max() > hi:
            bad = float(v.max()) if v.max() > hi else float(v.min())
            return f"{name} {bad:.4g} outside [{lo:.4g}, {hi:.4g}]"
    return None


def training_rows(index: Any) -> Any:
    """The rows of an atlas ``index.parquet`` DataFrame that may be trained on and enter the statistics:
    every row but the ``split == "ceiling"`` ones (objects rendered for held-out prompts). An index
    without a ``split`` column (older runs, external datasets) is all training data."""
    if "split" not in index.columns:
        return index
    return index[index["split"].fillna("train") != "ceiling"].reset_index(drop=True)


def _index_row(item: Mapping[str, Any], rel: str, z: Any) -> dict[str, Any]:
    c = np.asarray(z["center"], dtype=np.float64)
    return {"id": str(item["id"]), "caption": str(item.get("caption", "") or ""), "path": rel,
            "shard": str(item.get("shard", "")), "center_x": float(c[0]), "center_y": float(c[1]),
            "center_z": float(c[2]), "scale": float(z["scale"]), "n_real": int(z["n_real"]),
            "n_input": int(z["n_input"]), "split": str(item.get("split") or "train"),
            "coherence": float(z["coherence"]) if "coherence" in z else float("nan"),
            "distance_ratio": float(z["distance_ratio"]) if "distance_ratio" in z else float("nan")}


def write_atlases(items: Sequence[Mapping[str, Any]], cfg: AtlasConfig, out_dir: str | os.PathLike, *,
                  reader: Any = None, device: str | torch.device = "cpu", batch: int = 8,
                  use_gs2sphere: bool = False, progress: bool = True,
                  timings: dict[str, float] | None = None) -> tuple[list[dict], list[dict]]:
    """Build and save the atlases of many objects; broken ones are quarantined, the rest go on.

    items : ``{"id", "src" (PLY path), "shard" (sub-folder), "caption"[, "split"]}`` per object
        (``split``: "train", or "ceiling" for objects that are scored but never trained on).
    reader : PLY reader (default :func:`~gaussian_atlas.gaussians.read_ply`; use
        :func:`~gaussian_atlas.gaussians.read_gaussianverse_ply` for GaussianVerse fittings).
    use_gs2sphere : use a ``gs2sphere.npy`` next to each PLY as its sphere assignment
        (it must index this module's Fibonacci sphere; see :func:`gaussians_to_atlas`).
    timings : when given, the seconds spent are added to its keys ``read_s`` (PLYs), ``build_s`` (assignment and
        layout, :func:`build_atlases`, device work included), ``coherence_s`` and ``write_s`` (the ``.npz`` files).

    Writes ``out_dir/atlases/<shard>/<id>.npz`` (``atlas [16,S,S]`` float32, ``center``,
    ``scale``, ``n_real``, ``n_input``, ``stamp``, and :func:`neighbour_coherence`'s ``coherence``
    and ``distance_ratio``) atomically; an existing file is kept
    (resume) only when its ``stamp`` equals :func:`input_stamp`: same settings, code
    and input PLY bytes. Returns ``(index rows, quarantine rows)``;
    a quarantine row is ``{"id", "reason"}`` (unreadable file, missing properties,
    NaN/inf, zero Gaussians).
    """
    from tqdm.auto import tqdm

    from . import io as gio
    from .gaussians import read_ply

    reader = reader or read_ply
    out_dir = Path(out_dir)
    cfg_stamp = atlas_stamp(cfg)
    rows: list[dict] = []
    quarantine: list[dict] = []
    todo = []
    for shard in {it.get("shard") or "shard-00000" for it in items}:  # leftovers of a killed run
        gio.remove_stale_temps(out_dir / "atlases" / shard)
    for it in items:
        rel = f"atlases/{it.get('shard') or 'shard-00000'}/{it['id']}.npz"
        path = out_dir / rel
        it = {**it, "stamp": input_stamp(cfg_stamp, it["src"], use_gs2sphere)}
        if path.exists():
            try:
                with np.load(path) as z:
                    if str(z["stamp"]) == it["stamp"]:
                        rows.append(_index_row(it, rel, z))
                        continue
            except (OSError, ValueError, KeyError):
                pass  # unreadable leftover: rebuild it
        todo.append((it, rel))
    bar = tqdm(total=len(todo), desc="atlas", unit="obj", disable=not progress)
    grid = atlas_grid(cfg, device) if todo else None  # once, for coherence
    spent = {"read_s": 0.0, "build_s": 0.0, "coherence_s": 0.0, "write_s": 0.0}
    clock = [time.perf_counter()]

    def lap(key: str) -> None:
        now = time.perf_counter()
        spent[key] += now - clock[0]
        clock[0] = now

    for start in range(0, len(todo), max(1, batch)):
        lap("write_s")  # (the loop's own bookkeeping, counted with the writes)
        good, gs, idx = [], [], []
        for it, rel in todo[start:start + max(1, batch)]:
            try:
                g = reader(it["src"])
                _check(g, f"{it['src']}")
                gidx = None
                if use_gs2sphere:
                    p = Path(it["src"]).with_name("gs2sphere.npy")
                    gidx = np.load(p) if p.exists() else None
                good.append((it, rel))
                gs.append(g)
                idx.append(gidx)
            except (OSError, ValueError) as exc:
                quarantine.append({"id": str(it["id"]), "reason": str(exc)})
        lap("read_s")
        if gs:
            try:
                atlases, metas = build_atlases(gs, cfg, device=device,
                                               gs2sphere=idx if any(i is not None for i in idx) else None)
                results = list(zip(good, atlases.detach().cpu().numpy(), metas))
            except ValueError:  # one bad object in the batch: build one by one so the rest go on
                results = []
                for (it, rel), g, gi in zip(good, gs, idx):
                    try:
                        a, m = gaussians_to_atlas(g, cfg, gs2sphere=gi)
                        results.append(((it, rel), a.numpy(), m))
                    except ValueError as exc:
                        quarantine.append({"id": str(it["id"]), "reason": str(exc)})
            lap("build_s")
            for (it, rel), a, m in results:
                coh = neighbour_coherence(a, cfg, grid=grid)  # how much pixel neighbours are 3D neighbours
                lap("coherence_s")
                with gio.atomic_path(out_dir / rel, suffix=".npz") as tmp:
                    np.savez(tmp, atlas=np.asarray(a, dtype=np.float32), center=np.asarray(m["center"]),
                             scale=m["scale"], n_real=m["n_real"], n_input=m["n_input"], stamp=it["stamp"],
                             coherence=coh["coherence"], distance_ratio=coh["distance_ratio"])
                with np.load(out_dir / rel) as z:
                    rows.append(_index_row(it, rel, z))
                lap("write_s")
        bar.update(len(todo[start:start + max(1, batch)]))
    bar.close()
    lap("write_s")
    if timings is not None:
        for key, sec in spent.items():
            timings[key] = timings.get(key, 0.0) + sec
    return rows, quarantine
