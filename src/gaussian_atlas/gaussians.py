"""3D Gaussians (SH degree 0) and their PLY files.

A :class:`Gaussians` holds the **pre-activation** parameters of 3D Gaussian
Splatting (Kerbl et al. 2023), exactly what an optimiser updates and what the
INRIA PLY layout stores:

============== ============ ==========================================
field          shape        activation
============== ============ ==========================================
means          [..., N, 3]  none (world units, world +Z up)
quats          [..., N, 4]  ``unit_quats()``: normalised, order (w, x, y, z)
log_scales     [..., N, 3]  ``scales()`` = exp
opacity_logits [..., N]     ``opacities()`` = sigmoid
sh0            [..., N, 3]  ``rgb()`` = max(0, 0.5 + C0 * sh0), C0 = 0.28209479177387814
visibility     [..., N]     none; optional accumulated visibility recorded by the fit
============== ============ ==========================================

Leading batch dimensions ``[...]`` (several objects with the same N, as the
batched fitter uses them) are allowed everywhere except in the PLY writer,
which writes one object. ``len(g)`` is N, the number of Gaussians per object.

PLY layouts
-----------
INRIA (:func:`write_ply`, :func:`read_ply`)
    ``binary_little_endian 1.0``, one ``vertex`` element, float32 properties
    ``x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 opacity scale_0 scale_1 scale_2
    rot_0 rot_1 rot_2 rot_3`` (opacity = logit, scale = log, rot = w, x, y, z;
    normals are zero). This is what the INRIA viewer, SuperSplat and gsplat
    read. Positions are written in the pipeline's world frame, **+Z up**
    (Blender / NeRF-synthetic); viewers that assume +Y up show the object
    lying on its back.
GaussianVerse (:func:`read_gaussianverse_ply`)
    ``point_cloud.ply`` of the release, read **by name** as the dataset authors'
    loader reads it (tiangexiang/3DGen-Playground,
    ``dataloaders/standard_3dgen_loader.py``, ``load_ply``): the INRIA names
    ``x y z opacity f_dc_0..2 f_rest_0..44 scale_0..2 rot_0..3`` (SH degree 3),
    any order, other properties (normals) ignored. The loader's ``[N, 59]``
    array (xyz ``0:3``, opacity ``3``, SH ``4:52`` channel-major with each
    channel's DC first, so DC at ``4, 20, 36``, scale ``52:55``, rotation
    ``55:59``) is built from those names; it is not the file's property order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .io import atomic_path

__all__ = [
    "SH_C0",
    "INRIA_PROPERTIES",
    "GAUSSIANVERSE_PROPERTIES",
    "PlyError",
    "Gaussians",
    "rgb_to_sh0",
    "sh0_to_rgb",
    "write_ply",
    "read_ply",
    "read_gaussianverse_ply",
]

SH_C0 = 0.28209479177387814
"""Degree-0 real spherical-harmonic basis constant, 1 / (2 sqrt(pi))."""

INRIA_PROPERTIES: tuple[str, ...] = (
    "x", "y", "z", "nx", "ny", "nz",
    "f_dc_0", "f_dc_1", "f_dc_2",
    "opacity",
    "scale_0", "scale_1", "scale_2",
    "rot_0", "rot_1", "rot_2", "rot_3",
)
"""Vertex properties of the INRIA 3DGS PLY (SH degree 0), in file order."""

_REQUIRED = tuple(p for p in INRIA_PROPERTIES if p not in ("nx", "ny", "nz"))

GAUSSIANVERSE_PROPERTIES: tuple[str, ...] = (
    "x", "y", "z", "opacity", "f_dc_0", "f_dc_1", "f_dc_2", *(f"f_rest_{i}" for i in range(45)),
    "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
)
"""The 59 vertex properties the GaussianVerse authors' loader reads by name (SH degree 3: 45 ``f_rest_*``), in the
order of the ``[N, 59]`` array it builds, except that it interleaves each colour channel's DC with its 15
``f_rest_*``; a file may hold them in any order, and more (normals)."""

_OPACITY_EPS = 1e-6


class PlyError(ValueError):
    """A PLY file that cannot be read or written: the message names the file and the problem."""


def sh0_to_rgb(sh0: Tensor) -> Tensor:
    """RGB of degree-0 SH coefficients, ``0.5 + C0 * sh0`` (not clamped)."""
    return 0.5 + SH_C0 * sh0


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    """Degree-0 SH coefficients of an RGB colour, ``(rgb - 0.5) / C0``."""
    return (rgb - 0.5) / SH_C0


@dataclass(eq=False)
class Gaussians:
    """Pre-activation 3DGS parameters of one object (``[N, ...]``) or a batch (``[..., N, ...]``).

    Attributes
    ----------
    means : Tensor
        ``[..., N, 3]`` centres, world units.
    quats : Tensor
        ``[..., N, 4]`` rotations as quaternions (w, x, y, z), any non-zero norm.
    log_scales : Tensor
        ``[..., N, 3]`` log of the standard deviations along the local axes.
    opacity_logits : Tensor
        ``[..., N]`` logit of the opacity.
    sh0 : Tensor
        ``[..., N, 3]`` SH degree-0 (DC) coefficients; ``rgb = 0.5 + C0 * sh0``.
    visibility : Tensor or None
        ``[..., N]`` accumulated visibility recorded by the fit, or ``None``.

    Not frozen (an optimiser's parameters can be assigned in place); ``==`` is
    identity, compare tensors explicitly.
    """

    means: Tensor  # [..., N, 3]
    quats: Tensor  # [..., N, 4]
    log_scales: Tensor  # [..., N, 3]
    opacity_logits: Tensor  # [..., N]
    sh0: Tensor  # [..., N, 3]
    visibility: Tensor | None = None  # [..., N]

    # ---- shapes ------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.means.shape[-2])

    @property
    def batch_shape(self) -> torch.Size:
        """Leading batch dimensions (``torch.Size([])`` for one object)."""
        return self.means.shape[:-2]

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    # ---- activations -------------------------------------------------------
    def rgb(self) -> Tensor:
        """``[..., N, 3]`` colour ``0.5 + C0 * sh0``, clamped to >= 0 (as the INRIA viewer does)."""
        return sh0_to_rgb(self.sh0).clamp_min(0.0)

    def scales(self) -> Tensor:
        """``[..., N, 3]`` standard deviations, ``exp(log_scales)``."""
        return torch.exp(self.log_scales)

    def opacities(self) -> Tensor:
        """``[..., N]`` opacities in (0, 1), ``sigmoid(opacity_logits)``."""
        return torch.sigmoid(self.opacity_logits)

    def unit_quats(self) -> Tensor:
        """``[..., N, 4]`` normalised quaternions (w, x, y, z)."""
        return F.normalize(self.quats, dim=-1)

    @classmethod
    def from_activated(
        cls,
        means: Tensor,  # [..., N, 3]
        quats: Tensor,  # [..., N, 4]
        scales: Tensor,  # [..., N, 3]
        opacities: Tensor,  # [..., N]
        rgb: Tensor,  # [..., N, 3]
        visibility: Tensor | None = None,  # [..., N]
    ) -> "Gaussians":
        """Build from activated values (the inverse of the activations).

        Opacities are clamped to ``[1e-6, 1 - 1e-6]`` before the logit so an
        opacity of exactly 0 or 1 stays finite. Scales are not clamped: a zero
        scale gives ``-inf``, which :meth:`validate` reports.
        """
        return cls(
            means=means,
            quats=quats,
            log_scales=torch.log(scales),
            opacity_logits=torch.logit(opacities, eps=_OPACITY_EPS),
            sh0=rgb_to_sh0(rgb),
            visibility=visibility,
        )

    # ---- containers --------------------------------------------------------
    def as_dict(self) -> dict[str, Tensor]:
        """The tensors by field name (``visibility`` left out when ``None``); ``Gaussians(**d)`` inverts it."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["visibility"] is None:
            del out["visibility"]
        return out

    def _map(self, fn) -> "Gaussians":
        return Gaussians(**{k: fn(v) for k, v in self.as_dict().items()})

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "Gaussians":
        """A copy on ``device`` (and in ``dtype`` when given)."""
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def detach(self) -> "Gaussians":
        """A copy whose tensors are detached from the autograd graph (storage shared)."""
        return self._map(lambda t: t.detach())

    def index(self, idx: Tensor | Sequence[int] | slice) -> "Gaussians":
        """Select Gaussians along the Gaussian axis N.

        Parameters
        ----------
        idx
            A slice, a 1-D ``[N']`` index / ``[N]`` boolean mask applied to
            every object of the batch, or a ``[..., N']`` integer tensor with
            the same batch shape, gathering different Gaussians per object
            (e.g. the top-k of a per-object ranking).
        """
        bshape = self.batch_shape
        if isinstance(idx, slice):
            return self._map(lambda t: t[(slice(None),) * len(bshape) + (idx,)])
        idx = torch.as_tensor(idx, device=self.device)
        if idx.numel() == 0 and idx.dtype != torch.bool:
            idx = idx.long()
        if idx.dtype == torch.bool:
            if idx.dim() != 1 or idx.shape[0] != len(self):
                raise ValueError(f"boolean mask must be [N={len(self)}], got {list(idx.shape)}")
            idx = torch.nonzero(idx, as_tuple=False)[:, 0]
        if idx.dim() <= 1:
            return self._map(lambda t: t.index_select(len(bshape), idx.reshape(-1)))
        if idx.shape[:-1] != bshape:
            raise ValueError(f"batched index must be [{', '.join(map(str, bshape))}, N'], got {list(idx.shape)}")

        def gather(t: Tensor) -> Tensor:
            tail = t.shape[len(bshape) + 1:]
            i = idx.reshape(idx.shape + (1,) * len(tail)).expand(idx.shape + tail)
            return torch.gather(t, len(bshape), i)

        return self._map(gather)

    @staticmethod
    def cat(items: Sequence["Gaussians"]) -> "Gaussians":
        """Concatenate along the Gaussian axis (same batch shape; ``visibility`` kept only if all have it)."""
        if not items:
            raise ValueError("Gaussians.cat needs at least one item")
        nb = len(items[0].batch_shape)
        keep_vis = all(g.visibility is not None for g in items)
        out = {}
        for f in fields(Gaussians):
            if f.name == "visibility" and not keep_vis:
                continue
            out[f.name] = torch.cat([getattr(g, f.name) for g in items], dim=nb)
        return Gaussians(**out)

    @staticmethod
    def stack(items: Sequence["Gaussians"]) -> "Gaussians":
        """Stack objects with the same N into a batch ``[B, N, ...]`` (``visibility`` kept only if all have it)."""
        if not items:
            raise ValueError("Gaussians.stack needs at least one item")
        keep_vis = all(g.visibility is not None for g in items)
        out = {}
        for f in fields(Gaussians):
            if f.name == "visibility" and not keep_vis:
                continue
            out[f.name] = torch.stack([getattr(g, f.name) for g in items], dim=0)
        return Gaussians(**out)

    def unstack(self) -> list["Gaussians"]:
        """Split the first batch dimension: ``[B, N, ...]`` -> B objects ``[N, ...]``."""
        if not self.batch_shape:
            raise ValueError("unstack needs a batch dimension")
        return [self._map(lambda t, b=b: t[b]) for b in range(self.batch_shape[0])]

    # ---- checks ------------------------------------------------------------
    def object_problems(self) -> list[str]:
        """:meth:`validate` for one object: also refuses batched and empty Gaussians."""
        if self.batch_shape:
            return [f"one object [N, ...] expected, got batched means {list(self.means.shape)}"]
        problems = self.validate()
        return problems or (["zero Gaussians"] if len(self) == 0 else [])

    def validate(self) -> list[str]:
        """Problems that make these Gaussians unusable; an empty list when there are none.

        Checks shapes (every field against ``means``' ``[..., N]``), dtype
        (floating point), finiteness of every value, and quaternions of zero norm.
        """
        problems: list[str] = []
        if self.means.dim() < 2 or self.means.shape[-1] != 3:
            return [f"means must be [..., N, 3], got {list(self.means.shape)}"]
        lead = tuple(self.means.shape[:-1])
        want = {"quats": lead + (4,), "log_scales": lead + (3,), "opacity_logits": lead,
                "sh0": lead + (3,), "visibility": lead}
        ok_shapes = True
        for name, shape in want.items():
            t = getattr(self, name)
            if t is None:
                continue
            if tuple(t.shape) != shape:
                problems.append(f"{name} must be {list(shape)}, got {list(t.shape)}")
                ok_shapes = False
        for name, t in self.as_dict().items():
            if not torch.is_floating_point(t):
                problems.append(f"{name} must be floating point, got {t.dtype}")
                continue
            bad = int((~torch.isfinite(t.detach())).sum())
            if bad:
                problems.append(f"{name} has {bad} non-finite values")
        if ok_shapes and torch.is_floating_point(self.quats):
            zero = int((self.quats.detach().norm(dim=-1) == 0).sum())
            if zero:
                problems.append(f"quats has {zero} zero-norm quaternions")
        return problems


# ---- PLY ------------------------------------------------------------------

def _f32(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def write_ply(path: str | os.PathLike, g: Gaussians) -> Path:
    """Write one object as an INRIA-layout 3DGS PLY (SH degree 0), atomically.

    The file is ``binary_little_endian``, one ``vertex`` element with exactly
    ``len(g)`` rows and the float32 properties :data:`INRIA_PROPERTIES`
    (``x y z nx ny nz f_dc_0..2 opacity scale_0..2 rot_0..3``; opacity is the
    logit, scale the log, rot = (w, x, y, z) as stored, normals zero). When
    ``g.visibility`` is set, one more float32 property ``visibility`` follows
    ``rot_3``; viewers ignore unknown properties. Positions are in the
    pipeline's +Z-up world frame.

    Raises
    ------
    PlyError
        If ``g`` is batched, empty, or fails :meth:`Gaussians.validate`
        (non-finite values, wrong shapes, zero quaternions) — nothing is
        written then. (gsplat's ``export_splats`` silently drops non-finite
        rows instead; this writer never writes fewer than N rows.)
    """
    path = Path(path)
    problems = g.object_problems()
    if problems:
        raise PlyError(f"cannot write {path}: " + "; ".join(problems))
    cols = {
        "xyz": _f32(g.means), "f_dc": _f32(g.sh0), "opacity": _f32(g.opacity_logits)[:, None],
        "scale": _f32(g.log_scales), "rot": _f32(g.quats),
    }
    n = len(g)
    names = list(INRIA_PROPERTIES) + (["visibility"] if g.visibility is not None else [])
    arr = np.zeros(n, dtype=[(name, "<f4") for name in names])
    for i, name in enumerate("xyz"):
        arr[name] = cols["xyz"][:, i]
    for i in range(3):
        arr[f"f_dc_{i}"] = cols["f_dc"][:, i]
        arr[f"scale_{i}"] = cols["scale"][:, i]
    arr["opacity"] = cols["opacity"][:, 0]
    for i in range(4):
        arr[f"rot_{i}"] = cols["rot"][:, i]
    if g.visibility is not None:
        arr["visibility"] = _f32(g.visibility)
    # float64 -> float32 can overflow to inf: check what is actually written.
    bad = int((~np.isfinite(arr.view("<f4").reshape(n, len(names)))).any(axis=1).sum())
    if bad:
        raise PlyError(f"cannot write {path}: {bad} rows are not finite in float32")

    from plyfile import PlyData, PlyElement

    el = PlyElement.describe(arr, "vertex")
    with atomic_path(path) as tmp:
        PlyData([el], text=False, byte_order="<").write(str(tmp))
    return path


def _read_vertex(path: Path) -> tuple[list[str], np.ndarray]:
    """Parse ``path`` and return the vertex property names and a float32 ``[N, P]`` table."""
    from plyfile import PlyData, PlyListProperty

    try:
        with open(path, "rb") as fh:
            ply = PlyData.read(fh, mmap=False)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # plyfile raises several types on malformed input
        raise PlyError(f"{path}: cannot parse: {type(e).__name__}: {e}") from e
    names = [el.name for el in ply.elements]
    if "vertex" not in names:
        raise PlyError(f"{path}: no vertex element (elements: {names})")
    vertex = ply["vertex"]
    props = [p.name for p in vertex.properties]
    lists = [p.name for p in vertex.properties if isinstance(p, PlyListProperty)]
    if lists:
        raise PlyError(f"{path}: list properties are not supported: {lists}")
    data = vertex.data
    n = len(data)
    if n == 0:
        raise PlyError(f"{path}: zero Gaussians")
    table = np.empty((n, len(props)), dtype=np.float32)
    for j, p in enumerate(props):
        table[:, j] = np.asarray(data[p], dtype=np.float32)
    return props, table


def _check_finite(path: Path, table: np.ndarray) -> None:
    bad = int((~np.isfinite(table)).any(axis=1).sum())
    if bad:
        raise PlyError(f"{path}: {bad} rows contain NaN/inf")


def _from_columns(xyz: np.ndarray, dc: np.ndarray, opacity: np.ndarray, scale: np.ndarray,
                  rot: np.ndarray, visibility: np.ndarray | None) -> Gaussians:
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return Gaussians(means=t(xyz), quats=t(rot), log_scales=t(scale), opacity_logits=t(opacity),
                     sh0=t(dc), visibility=None if visibility is None else t(visibility))


def read_ply(path: str | os.PathLike) -> Gaussians:
    """Read an INRIA-layout 3DGS PLY into float32 :class:`Gaussians` on the CPU.

    Properties are found by name, in any order, binary or ASCII. Files of any
    SH degree are accepted: ``f_rest_*`` are ignored and only the degree-0
    (DC) colour is kept. Normals are ignored. An extra ``visibility``
    property, when present, is read into ``g.visibility``.

    Raises
    ------
    PlyError
        With the file name and the problem: "cannot parse: ...", "no vertex
        element", "missing properties [...]", "zero Gaussians", "k rows
        contain NaN/inf", "k zero-norm quaternions".
    FileNotFoundError
        If ``path`` does not exist.
    """
    path = Path(path)
    props, table = _read_vertex(path)
    missing = [p for p in _REQUIRED if p not in props]
    if missing:
        raise PlyError(f"{path}: missing properties {missing}")
    col = {p: j for j, p in enumerate(props)}
    pick = lambda names: table[:, [col[p] for p in names]]  # noqa: E731
    used = list(_REQUIRED) + (["visibility"] if "visibility" in col else [])
    _check_finite(path, pick(used))
    rot = pick(["rot_0", "rot_1", "rot_2", "rot_3"])
    _check_quats(path, rot)
    return _from_columns(
        xyz=pick(["x", "y", "z"]), dc=pick(["f_dc_0", "f_dc_1", "f_dc_2"]), opacity=table[:, col["opacity"]],
        scale=pick(["scale_0", "scale_1", "scale_2"]), rot=rot,
        visibility=table[:, col["visibility"]] if "visibility" in col else None,
    )


def _check_quats(path: Path, rot: np.ndarray) -> None:
    zero = int((np.linalg.norm(rot, axis=1) == 0).sum())
    if zero:
        raise PlyError(f"{path}: {zero} zero-norm quaternions")


def read_gaussianverse_ply(path: str | os.PathLike) -> Gaussians:
    """Read a GaussianVerse fitting (``<id>/point_cloud.ply``) into float32 :class:`Gaussians` (DC colour only).

    Properties are found **by name**, as the dataset authors' loader finds them
    (tiangexiang/3DGen-Playground, ``dataloaders/standard_3dgen_loader.py``, ``load_ply``:
    ``x y z``, ``opacity``, ``f_dc_0..2``, every ``f_rest_*`` sorted by index and reshaped to
    ``(3, 15)``, every ``scale_*`` and ``rot*`` sorted by index): :data:`GAUSSIANVERSE_PROPERTIES`, in
    any order; other properties (``nx ny nz``) are ignored. Values are pre-activation, as that
    loader's renderer reads them (``utils/gsplat_render_util.py``: sigmoid of opacity, exp of
    scale, normalised quaternion w, x, y, z). The 45 higher-order SH coefficients must be there
    (SH degree 3, what the loader's reshape needs) but are not kept nor checked.

    Raises
    ------
    PlyError
        With the file name and the problem, as :func:`read_ply`; a file that is not SH degree 3 is
        "expected 45 f_rest_* properties (SH degree 3, as GaussianVerse fittings are), found k".
    """
    path = Path(path)
    props, table = _read_vertex(path)
    missing = [p for p in GAUSSIANVERSE_PROPERTIES if p not in props and not p.startswith("f_rest_")]
    if missing:
        raise PlyError(f"{path}: missing properties {missing}")
    rest = [p for p in props if p.startswith("f_rest_")]
    if sorted(rest) != sorted(p for p in GAUSSIANVERSE_PROPERTIES if p.startswith("f_rest_")):
        raise PlyError(f"{path}: expected 45 f_rest_* properties f_rest_0..44 (SH degree 3, as GaussianVerse "
                       f"fittings are), found {len(rest)}")
    col = {p: j for j, p in enumerate(props)}
    pick = lambda names: table[:, [col[p] for p in names]]  # noqa: E731
    _check_finite(path, pick([p for p in GAUSSIANVERSE_PROPERTIES if not p.startswith("f_rest_")]))
    rot = pick(["rot_0", "rot_1", "rot_2", "rot_3"])
    _check_quats(path, rot)
    return _from_columns(xyz=pick(["x", "y", "z"]), opacity=table[:, col["opacity"]],
                         dc=pick(["f_dc_0", "f_dc_1", "f_dc_2"]), scale=pick(["scale_0", "scale_1", "scale_2"]),
                         rot=rot, visibility=None)
