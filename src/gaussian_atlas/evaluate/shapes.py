"""Shape classification of the procedural prompt-fidelity score: points drawn from the Gaussians, their
turn-and-stretch-free frame, and the Chamfer distance to each of the generator's canonical primitives.

See :mod:`gaussian_atlas.evaluate.scoring` for how the score is defined.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor


def surface_points(g: Any, n: int = 1024, min_opacity: float = 0.05, seed: int = 0) -> Tensor | None:
    """``[n, 3]`` Gaussian centres drawn with probability ∝ opacity (one object ``[N]``), or None.

    Gaussians with opacity under ``min_opacity`` are never drawn; None when fewer than 8 remain.
    """
    op = g.opacities().detach().double().cpu()
    keep = op >= min_opacity
    if int(keep.sum()) < 8:
        return None
    w = torch.where(keep, op, torch.zeros_like(op))
    idx = torch.multinomial(w, n, replacement=True, generator=torch.Generator().manual_seed(int(seed)))
    return g.means.detach().double().cpu()[idx]


def normalise_points(p: Tensor, align: bool = True) -> Tensor:
    """Points ``[M, 3]`` in a frame free of the generator's random turn-and-stretch.

    Centred on their mean; with ``align``, turned about +Z so that the principal axes of
    the XY spread lie on X and Y; each axis then scaled to unit RMS. The generator stretches
    each primitive by 0.8-1.2 per axis before turning it about +Z, so this undoes both up to
    a turn that :func:`chamfer` searches (when the XY spread is nearly isotropic the
    principal axes are arbitrary). Candidates (canonical, axis-aligned) use ``align=False``.
    """
    p = p.double() - p.double().mean(0)
    if align:
        cov = p[:, :2].T @ p[:, :2] / len(p)  # [2, 2]
        _, vec = torch.linalg.eigh(cov)
        R = torch.eye(3, dtype=p.dtype)
        R[:2, :2] = vec
        p = p @ R
    return p / p.pow(2).mean(0).sqrt().clamp_min(1e-12)


def height_frame(p: Tensor) -> tuple[float, float]:
    """``(mean z, RMS radius)`` of points ``[M, 3]``: heights are compared as ``(z - mean z) / radius``."""
    p = p.double()
    return float(p[:, 2].mean()), float((p - p.mean(0)).pow(2).sum(-1).mean().sqrt().clamp_min(1e-12))


def _rot_z(k: int, angles: int) -> Tensor:
    t = 2.0 * math.pi * k / angles
    c, s = math.cos(t), math.sin(t)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _chamfer_rotated(a: Tensor, b: Tensor, R: Tensor) -> Tensor:
    """``[len(R)]`` symmetric Chamfer distances between ``a [M, 3]`` and ``b [K, 3]`` turned by each ``R [r, 3, 3]``."""
    br = torch.einsum("rij,kj->rki", R, b)  # [r, K, 3]
    d = torch.cdist(a[None].expand(len(R), -1, -1), br)  # [r, M, K]
    return d.min(2).values.mean(1) + d.min(1).values.mean(1)


def chamfer(a: Tensor, b: Tensor, rotations: int = 1, coarse: int = 128, keep: int = 3) -> float:
    """Symmetric Chamfer distance between point sets ``a [M, 3]`` and ``b [K, 3]``, minimised over turns of ``b`` about +Z.

    ``mean_a min_b |a - b| + mean_b min_a |a - b|`` (Euclidean, not squared), for ``b``
    turned by ``360 k / rotations`` degrees, k = 0 .. rotations - 1; the minimum. Coarse to
    fine: every turn is first scored on ``coarse`` points of each set, then the ``keep``
    best turns on all points (the result is the exact distance at the turn chosen).
    """
    a, b = a.float(), b.float()
    R = torch.stack([_rot_z(k, rotations) for k in range(rotations)]).float()  # [R, 3, 3]
    if rotations > keep and max(len(a), len(b)) > coarse:
        sub = lambda x: x[torch.linspace(0, len(x) - 1, min(coarse, len(x))).long()]  # noqa: E731
        best = torch.topk(_chamfer_rotated(sub(a), sub(b), R), keep, largest=False).indices
        R = R[best]
    return float(_chamfer_rotated(a, b, R).min())


def _canonical(parts: Sequence[str], colours: Sequence[Sequence[int]] | None = None) -> tuple[Any, float | None]:
    """The generator's stack of ``parts`` (top first) without random variation, and the height where parts meet.

    ``colours``: an RGB face colour per part (top first), else none.
    """
    import trimesh

    from ..procedural import STACK_TOP_SCALE, make_primitive

    meshes, top_z, center_xy, junction = [], None, None, None
    for level, shape in enumerate(reversed(list(parts))):  # bottom first, as build_object
        m = make_primitive(shape)
        if colours is not None:
            m.visual.face_colors = np.array([*colours[len(parts) - 1 - level], 255], dtype=np.uint8)
        if level > 0:
            m.apply_scale(STACK_TOP_SCALE)
        lo, hi = m.bounds
        if top_z is None:
            m.apply_translation([-(lo[0] + hi[0]) / 2, -(lo[1] + hi[1]) / 2, -lo[2]])
        else:
            junction = float(top_z)
            m.apply_translation([center_xy[0] - (lo[0] + hi[0]) / 2, center_xy[1] - (lo[1] + hi[1]) / 2,
                                 top_z - lo[2]])
        lo, hi = m.bounds
        top_z, center_xy = hi[2], (lo[:2] + hi[:2]) / 2
        meshes.append(m)
    return (meshes[0] if len(meshes) == 1 else trimesh.util.concatenate(meshes)), junction


_CACHE: dict[Any, Any] = {}


def candidate_clouds(n: int = 512, seed: int = 0, open_bottom: bool = False) -> dict[str, Tensor]:
    """``{shape: [n, 3]}``: surface samples of each of the generator's primitives, :func:`normalise_points`-ed.

    ``open_bottom``: without the flat faces that look straight down (normal z < -0.95): the
    top part of a stack rests on that face, so neither a render nor a fit sees it. Cached.
    """
    import trimesh

    from ..procedural import SHAPES

    key = ("cands", n, seed, open_bottom)
    if key not in _CACHE:
        out = {}
        for shape in SHAPES:
            mesh, _ = _canonical((shape,))
            if open_bottom:
                mesh = mesh.submesh([np.flatnonzero(mesh.face_normals[:, 2] >= -0.95)], append=True)
            pts, _ = trimesh.sample.sample_surface(mesh, n, seed=seed)
            out[shape] = normalise_points(torch.from_numpy(np.asarray(pts, np.float64)), align=False)
        _CACHE[key] = out
    return _CACHE[key]


def junction_height(parts: Sequence[str]) -> float:
    """Where the two parts of the stack ``parts`` (top first) meet, as ``(z - mean z) / RMS radius``
    of its surface (see :func:`height_frame`). Cached."""
    import trimesh

    key = ("junction", tuple(parts))
    if key not in _CACHE:
        mesh, junction = _canonical(parts)
        if junction is None:
            raise ValueError(f"{parts}: a junction needs two parts")
        pts, _ = trimesh.sample.sample_surface(mesh, 8192, seed=0)
        mz, r = height_frame(torch.from_numpy(np.asarray(pts, np.float64)))
        _CACHE[key] = (junction - mz) / r
    return _CACHE[key]


def split_height(z: Tensor, expected: float, window: float = 0.35, bins: int = 14) -> float:
    """The height at which to cut a stack into its parts, from normalised point heights ``z [M]``.

    The bottom part of every generator stack has a flat top face, which makes the densest
    height bin near the junction; the cut is at the upper edge of the densest of ``bins``
    bins in ``expected ± window`` (``expected``: :func:`junction_height` of the prompted stack).
    """
    lo, hi = expected - window, expected + window
    h = torch.histc(z.float(), bins, lo, hi)
    if float(h.sum()) == 0:
        return expected
    return lo + (int(h.argmax()) + 1) * (hi - lo) / bins


def classify_shape(points: Tensor | None, rotations: int = 24, n: int = 512, seed: int = 0,
                   open_bottom: bool = False) -> tuple[str | None, dict[str, float]]:
    """``(nearest primitive, {shape: Chamfer distance})`` of raw points ``[M, 3]`` (None/too few -> no prediction).

    ``open_bottom``: compare with :func:`candidate_clouds` without their bottom faces (the top part of a stack).
    """
    return classify_shapes([points], [open_bottom], rotations, n, seed)[0]


def _chamfer_padded(a: Tensor, a_len: Tensor, b: Tensor) -> Tensor:
    """``[P, S, T]`` symmetric Chamfer distances of padded point sets ``a [P, M, 3]`` (the first ``a_len [P]``
    points real) to point sets ``b [P or 1, S, T, K, 3]`` (candidate S under turn T) — :func:`_chamfer_rotated`
    batched."""
    P, M = a.shape[:2]
    S, T, K = b.shape[1:4]
    valid = torch.arange(M, device=a.device)[None] < a_len[:, None]  # [P, M]
    a = torch.where(valid[..., None], a, torch.full_like(a, 1e4))  # padding far from everything: never a nearest
    d = torch.cdist(a, b.expand(P, S, T, K, 3).reshape(P, S * T * K, 3))  # [P, M, S*T*K]
    a_to_b = (d.view(P, M, S * T, K).min(-1).values * valid[..., None]).sum(1) / a_len[:, None]  # [P, S*T]
    b_to_a = d.min(1).values.view(P, S * T, K).mean(-1)  # [P, S*T]
    return (a_to_b + b_to_a).view(P, S, T)


def classify_shapes(points: Sequence[Tensor | None], open_bottom: Sequence[bool], rotations: int = 24,
                    n: int = 512, seed: int = 0, device: str | torch.device = "cpu", coarse: int = 128,
                    keep: int = 3, max_elements: int | None = None) -> list[tuple[str | None, dict[str, float]]]:
    """:func:`classify_shape` of many point sets at once, batched over objects, primitives and turns on ``device``.

    For each set: its :func:`normalise_points` frame, then per primitive the symmetric Chamfer distance
    minimised over ``rotations`` turns about +Z, coarse to fine as :func:`chamfer` (every turn on ``coarse``
    points of each set, the ``keep`` best turns on all points). One batch holds at most ``max_elements``
    distances (default 2^22 on the CPU, where larger batches only add memory traffic; 2^27 on a GPU). Sets
    that are None or have fewer than 16 points get no prediction.
    """
    if max_elements is None:
        max_elements = 2**27 if torch.device(device).type == "cuda" else 2**22
    out: list[tuple[str | None, dict[str, float]] | None] = [None] * len(points)
    R = torch.stack([_rot_z(k, rotations) for k in range(rotations)]).float().to(device)  # [T, 3, 3]
    for ob in sorted(set(bool(o) for o in open_bottom)):
        cands = candidate_clouds(n, seed, ob)
        names = list(cands)
        C = torch.stack([cands[k] for k in names]).float().to(device)  # [S, K, 3]
        CR = torch.einsum("tij,skj->stki", R, C)  # [S, T, K, 3] every primitive under every turn
        S, T, K = CR.shape[:3]
        mine = [i for i, o in enumerate(open_bottom) if bool(o) == ob]
        for i in mine:
            if points[i] is None or len(points[i]) < 16:
                out[i] = (None, {k: float("nan") for k in names})
        todo = [i for i in mine if out[i] is None]
        sub = lambda m: torch.linspace(0, m - 1, min(coarse, m)).long()  # noqa: E731 - as chamfer()
        M_max = max([len(points[i]) for i in todo] or [1])
        per_object = S * max(T * min(coarse, M_max) * min(coarse, K), keep * M_max * K)
        step = max(1, max_elements // per_object)
        for start in range(0, len(todo), step):
            idx = todo[start:start + step]
            ps = [normalise_points(points[i]).float().to(device) for i in idx]
            lens = torch.tensor([len(p) for p in ps], device=device)
            A = torch.nn.utils.rnn.pad_sequence(ps, batch_first=True)  # [P, M, 3]
            if rotations > keep:  # coarse: every turn on <= coarse points of each set; fine: the keep best turns
                # (sets of <= coarse points are scored exactly by the coarse pass, and its best turn is kept)
                subs = [p[sub(len(p)).to(device)] for p in ps]
                As = torch.nn.utils.rnn.pad_sequence(subs, batch_first=True)
                rough = _chamfer_padded(As, torch.tensor([len(q) for q in subs], device=device),
                                        CR[:, :, sub(K).to(device)][None])  # [P, S, T]
                best = torch.topk(rough, keep, dim=-1, largest=False).indices  # [P, S, keep]
                s_idx = torch.arange(S, device=device)[None, :, None]
                dist = _chamfer_padded(A, lens, CR[s_idx, best]).min(-1).values  # [P, S]
            else:
                dist = _chamfer_padded(A, lens, CR[None]).min(-1).values  # [P, S]
            for j, i in enumerate(idx):
                d = {k: float(v) for k, v in zip(names, dist[j].cpu().tolist())}
                out[i] = (min(d, key=d.get), d)
    return out  # type: ignore[return-value]
