"""Scoring of objects against their prompts, its summary over prompts with bootstrap intervals, and the
floor's random atlases.

Procedural prompt fidelity (needs no downloaded weights)
    For prompts of the built-in generator (:mod:`gaussian_atlas.procedural`): one part
    ``"a red torus"`` or two stacked parts ``"a red cube on top of a blue cylinder"``.

    *colour*: the **alpha-weighted rendered colour** of a part, ``sum(rgb) / sum(alpha)``
    over the pixels of the evaluation views rendered on black (so ``rgb`` is premultiplied),
    is compared with the generator's palette **as the mesh renderer shows the prompted
    object** from the same views (:func:`object_palettes`: the canonical prompted object is
    ray cast once to get each pixel's light factor, and every named colour is shaded with it
    as the renderer does, ``clip(albedo * light)``). Fits bake that shading into their
    colours, so comparing with raw albedos would misjudge dark and light colours (orange seen
    from the side reads as brown). Correct when the nearest of these colours (Euclidean, RGB
    in [0, 1]) is the prompted one; ``colour_distance`` is the distance to the prompted one.

    *shape*: points are drawn from the Gaussian centres with probability proportional to
    opacity (Gaussians under ``min_opacity`` dropped), centred on their mean, turned about +Z
    onto the principal axes of their XY spread and scaled to unit RMS per axis (the generator
    stretches every primitive by 0.8-1.2 per axis and turns it about +Z at random, so this
    frame makes a stretched cube a cube again); the surface samples of each of the 9 canonical,
    axis-aligned primitives are centred and scaled the same way. The score against a primitive is the symmetric Chamfer
    distance (mean nearest-neighbour Euclidean distance, both directions), minimised over
    ``rotations`` turns about +Z. Correct when the nearest primitive is the prompted one.

    *compositions*: the Gaussians are cut at the height where the prompted stack's parts
    meet (the densest height near that junction: the flat top of the bottom part); each part
    is classified on its own (the top part against primitives without their bottom face,
    which rests on the other part and is never seen) and rendered alone for its colour. A
    composition's colour / shape is correct only when both parts' are.

    *both*: colour and shape correct. Chance levels: 1/12 (colour), 1/9 (shape), 1/108 (both)
    for singles.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .colours import nearest_colour, object_colours, object_palettes
from .config import EvaluateConfig
from .prompts import PromptSpec
from .shapes import classify_shapes, height_frame, junction_height, split_height, surface_points


def random_atlases(n: int, mean: Tensor, std: Tensor, seed: int = 0) -> Tensor:
    """``[n, C, S, S]`` floor atlases: standard normal noise in the normalised space, de-normalised."""
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn((n,) + tuple(mean.shape), generator=gen)
    return z * std.cpu() + mean.cpu()


def _mask_opacity(g: Any, keep: Tensor) -> Any:
    """A copy of ``g`` [N] whose Gaussians outside ``keep`` [N] are fully transparent."""
    from ..gaussians import Gaussians

    logits = torch.where(keep, g.opacity_logits, torch.full_like(g.opacity_logits, -30.0))
    return Gaussians(means=g.means, quats=g.quats, log_scales=g.log_scales, opacity_logits=logits, sh0=g.sh0)


@torch.no_grad()
def score_objects(g: Any, specs: Sequence[PromptSpec], c2w: Tensor, K: Tensor, resolution: int,
                  palette: Mapping[str, np.ndarray] | Sequence[Sequence[Mapping[str, np.ndarray]]] | None = None,
                  cfg: EvaluateConfig = EvaluateConfig(), seed: int = 0,
                  colours: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Procedural colour/shape scores of objects ``g [B, N]`` (unit-ball frame) for ``specs [B]``.

    ``c2w [B, V, 4, 4]``, ``K [B, V, 3, 3]``: the evaluation views of each object. A
    two-part prompt's object is cut at the height where its parts meet
    (:func:`split_height` near the prompted stack's :func:`junction_height`); each part is
    classified and coloured on its own. Returns one dict per object (empty for free-text
    prompts): ``colour_pred`` / ``shape_pred`` ("red", or "red/blue" top first),
    ``colour_correct`` / ``shape_correct`` (every part), ``both_correct``,
    ``colour_distance`` (mean over parts, to the prompted rendered palette colour),
    ``chamfer`` (mean over parts, to the prompted primitive), ``chamfer_best`` (to the
    nearest). ``palette``: one palette for every part (``{name: rgb}``), or per object a list
    of per-part palettes; None = :func:`object_palettes` of each prompt from its views.
    ``colours [B, 3]``: the whole objects' alpha-weighted colours when already rendered
    (used for single-part prompts).
    """
    parsed: list[tuple[int, list, Any, Any]] = []  # (object, part points, colours, palettes) of generator prompts
    for b, spec in enumerate(specs):
        if spec.parts is None:
            continue
        gb = g._map(lambda t: t[b])
        n_parts = len(spec.parts)
        shapes = tuple(s for s, _ in spec.parts)
        pts = surface_points(gb, cfg.shape_points, cfg.min_opacity, seed=seed + b)
        if n_parts == 1:
            part_pts = [pts]
            subsets = None
        elif pts is None:
            part_pts, subsets = [None, None], [gb, gb]
        else:
            mz, r = height_frame(pts)
            cut = split_height((pts[:, 2] - mz) / r, junction_height(shapes))
            top_pts = (pts[:, 2] - mz) / r > cut
            part_pts = [pts[top_pts], pts[~top_pts]]
            top = ((gb.means[:, 2].double().cpu() - mz) / r > cut).to(gb.means.device)
            subsets = [_mask_opacity(gb, top), _mask_opacity(gb, ~top)]
        if subsets is None and colours is not None:
            cols = colours[b:b + 1]
        else:
            gs = type(gb).stack(subsets or [gb])
            cols = object_colours(gs, c2w[b].expand(len(gs.means), -1, -1, -1),
                                  K[b].expand(len(gs.means), -1, -1, -1), resolution)
        if palette is None:
            pals = object_palettes(shapes, c2w[b], K[b], resolution)
        elif isinstance(palette, Mapping):
            pals = [palette] * n_parts
        else:
            pals = palette[b]
        parsed.append((b, part_pts, cols, pals))
    # every part of every object classified in one batched call (the top part of a stack: open-bottom primitives)
    flat_pts = [pp for _, part_pts, _, _ in parsed for pp in part_pts]
    flat_open = [len(part_pts) == 2 and k == 0 for _, part_pts, _, _ in parsed for k in range(len(part_pts))]
    classes = iter(classify_shapes(flat_pts, flat_open, cfg.rotations, seed=seed, device=g.means.device))
    scored: dict[int, dict[str, Any]] = {}
    for b, part_pts, cols, pals in parsed:
        spec = specs[b]
        shape_pred, shape_ok, cd, cd_best, col_pred, col_ok, col_d = [], [], [], [], [], [], []
        for k, ((shape, colour), col) in enumerate(zip(spec.parts, cols)):
            name, d = next(classes)
            shape_pred.append(name)
            shape_ok.append(name == shape)
            cd.append(d[shape])
            cd_best.append(min(d.values()))
            cname, dist = nearest_colour(col, pals[k])
            col_pred.append(cname)
            col_ok.append(cname == colour)
            col_d.append(dist[colour])
        scored[b] = {
            "colour_pred": "/".join(str(p) for p in col_pred), "colour_correct": all(col_ok),
            "colour_distance": float(np.mean(col_d)),
            "shape_pred": "/".join(str(p) for p in shape_pred), "shape_correct": all(shape_ok),
            "chamfer": float(np.mean(cd)), "chamfer_best": float(np.mean(cd_best)),
            "both_correct": all(col_ok) and all(shape_ok),
        }
    return [scored.get(b, {}) for b in range(len(specs))]


def _mean(xs: Sequence[float]) -> float | None:
    xs = [float(x) for x in xs if x is not None and np.isfinite(float(x))]
    return round(float(np.mean(xs)), 6) if xs else None


def bootstrap_ci(values: Sequence[float], groups: Sequence[Any], n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``values``, resampling in two stages.

    ``groups`` (one label per value, e.g. the prompt) are drawn with replacement, then the
    values within each drawn group (e.g. its sampling seeds) with replacement; the mean of a
    resample weighs every value alike. Missing / non-finite values are dropped first.
    Returns ``(low, high)`` at ``level``, or None with no values.
    """
    v = np.asarray([np.nan if x is None else float(x) for x in values], dtype=np.float64)
    g = np.asarray(list(groups), dtype=object)
    ok = np.isfinite(v)
    v, g = v[ok], g[ok]
    if not len(v):
        return None
    labels = list(dict.fromkeys(g.tolist()))
    sizes = np.array([int((g == lab).sum()) for lab in labels])
    table = np.full((len(labels), sizes.max()), np.nan)  # [P, S_max] values per group
    for i, lab in enumerate(labels):
        table[i, :sizes[i]] = v[g == lab]
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(labels), size=(n_boot, len(labels)))  # [B, P] groups drawn
    within = (rng.random((n_boot, len(labels), sizes.max())) * sizes[pick][..., None]).astype(int)  # [B, P, S]
    mask = np.arange(sizes.max())[None, None, :] < sizes[pick][..., None]  # each drawn group's own size
    drawn = np.where(mask, table[pick[..., None], within], 0.0)
    means = drawn.sum((1, 2)) / mask.sum((1, 2))  # [B]
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return round(float(lo), 6), round(float(hi), 6)


def summarise(rows: Sequence[Mapping[str, Any]], specs: Sequence[PromptSpec], groups: Sequence[Any] | None = None,
              n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Accuracies and mean distances over the scored rows (all, seen, held-out, compositions), each with
    its 95 % bootstrap interval (``<metric>_ci95``: prompts, then samples within a prompt, resampled).

    ``groups``: the prompt of each row (rows of one prompt are its samples); default: one prompt per row.
    """
    groups = list(range(len(rows))) if groups is None else list(groups)

    def block(idx: list[int]) -> dict[str, Any]:
        idx = [i for i in idx if rows[i]]
        r = [rows[i] for i in idx]
        out: dict[str, Any] = {"n": len(r), "n_prompts": len({groups[i] for i in idx})}
        for name, key in (("colour_accuracy", "colour_correct"), ("shape_accuracy", "shape_correct"),
                          ("both_accuracy", "both_correct"), ("colour_distance", "colour_distance"),
                          ("chamfer", "chamfer")):
            vals = [x[key] for x in r]
            out[name] = _mean(vals)
            ci = bootstrap_ci(vals, [groups[i] for i in idx], n_boot, seed)
            out[f"{name}_ci95"] = list(ci) if ci else None
        return out

    all_idx = [i for i, s in enumerate(specs) if s.parts is not None]
    out = block(all_idx)
    out["seen"] = block([i for i in all_idx if not specs[i].held_out])
    out["held_out"] = block([i for i in all_idx if specs[i].held_out])
    out["seen_singles"] = block([i for i in all_idx if not specs[i].held_out and specs[i].kind == "single"])
    out["held_out_singles"] = block([i for i in all_idx if specs[i].held_out and specs[i].kind == "single"])
    out["compositions"] = block([i for i in all_idx if specs[i].kind == "composition"])
    return out
