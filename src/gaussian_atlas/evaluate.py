"""Evaluation of text -> Gaussian Atlas -> 3D Gaussians (paper Sec. 6) and an offline prompt-fidelity benchmark.

Three families of scores, each computed for the **generated** objects, for the
**ceiling** (the training atlases whose caption is the prompt, decoded the same way)
and for the **floor** (random atlases: standard normal noise in the normalised space,
de-normalised with the model's statistics and decoded the same way):

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

CLIP score (weights on disk only)
    ``100 * max(cos(image, text), 0)`` per view (the torchmetrics ``CLIPScore``
    convention), averaged over the views of a prompt, then over prompts. The model is
    whatever CLIP folder ``clip_model`` names (transformers ``CLIPModel`` layout; the
    usual choice is openai/clip-vit-large-patch14 downloaded beforehand), loaded with
    ``local_files_only``. No folder -> ``{"status": "skipped", "reason": ...}``.

VQA score (weights on disk only)
    CLIP-FlanT5 VQAScore through ``t2v_metrics`` (P("Yes") to "Does this figure show
    '<prompt>'?"), averaged like the CLIP score. ``t2v_metrics`` pins torch 2.5.1 and
    transformers 4.49, which this project's environment does not have: it is used when it
    imports (an environment built for it) and the weights folder exists, otherwise recorded
    as skipped with the reason; never a number from a random network.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .sample import SampleConfig

__all__ = ["EvaluateConfig", "PromptSpec", "parse_caption", "benchmark_prompts", "index_prompts", "read_prompts", "random_views",
           "rendered_palette", "object_palettes", "nearest_colour", "render_premultiplied", "alpha_weighted_colour", "object_colours",
           "surface_points", "normalise_points", "height_frame", "chamfer", "candidate_clouds", "junction_height",
           "split_height", "classify_shape", "random_atlases", "score_objects", "summarise", "bootstrap_ci",
           "ClipScorer", "load_clip", "VqaScorer", "load_vqa", "Evaluation", "evaluate", "skipped", "gallery_html", "slug", "CHANCE"]

SOURCES = ("generated", "ceiling", "floor")


@dataclass(frozen=True)
class EvaluateConfig:
    """``params.yaml: evaluate``.

    prompts : a text file with one prompt per line (``#`` comments), or None for the
        built-in benchmark prompts (:func:`benchmark_prompts`).
    n_seen, n_held_out, n_compositions : the built-in prompts: single-part captions seen
        in training, shape x colour combinations never seen in training (neither alone nor
        as a part), and two-part compositions (alternately seen and new). Paper: 100 prompts.
    samples_per_prompt : objects generated per prompt (sampling seeds); the ceiling and the
        floor get as many. Confidence intervals resample prompts, then samples within them.
    n_bootstrap : bootstrap resamples of the 95 % confidence intervals.
    n_views : random views per prompt (paper: 10).
    resolution : side of the evaluation views in pixels.
    elevation_min_deg, elevation_max_deg, radius, fov_deg : the random views (azimuth
        uniform in [0, 360), elevation uniform in the range; the object is in the unit ball).
    seed : seed of the prompt choice, the views and the random (floor) atlases.
    sample : the sampler (:class:`gaussian_atlas.sample.SampleConfig`: steps, guidance,
        batch size, the generation seed, turntable frames/resolution).
    min_opacity : Gaussians under this opacity are not shape evidence.
    shape_points : Gaussian centres drawn per object (by opacity) for the Chamfer distance.
    rotations : turns about +Z tried per candidate.
    clip_model : local CLIP folder (transformers layout) or None (-> skipped).
    vqa_model : local folder with t2v_metrics' CLIP-FlanT5 weights (its ``cache_dir``) or None.
    vqa_name : the t2v_metrics model name.
    device : "auto" | "cpu" | "cuda".
    """

    prompts: str | None = None
    n_seen: int = 6
    n_held_out: int = 4
    n_compositions: int = 2
    samples_per_prompt: int = 4
    n_bootstrap: int = 2000
    n_views: int = 10
    resolution: int = 128
    elevation_min_deg: float = 0.0
    elevation_max_deg: float = 45.0
    radius: float = 2.8
    fov_deg: float = 45.0
    seed: int = 0
    sample: SampleConfig = field(default_factory=SampleConfig)
    min_opacity: float = 0.05
    shape_points: int = 1024
    rotations: int = 24
    clip_model: str | None = None
    vqa_model: str | None = None
    vqa_name: str = "clip-flant5-xxl"
    device: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.sample, Mapping):
            object.__setattr__(self, "sample", SampleConfig(**self.sample))
        for k in ("n_seen", "n_held_out", "n_compositions"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.samples_per_prompt < 1 or self.n_bootstrap < 100:
            raise ValueError(f"samples_per_prompt must be >= 1 and n_bootstrap >= 100, got {self.samples_per_prompt}, "
                             f"{self.n_bootstrap}")
        if self.n_views < 1 or self.resolution < 8:
            raise ValueError(f"n_views must be >= 1 and resolution >= 8, got {self.n_views}, {self.resolution}")
        if not self.elevation_min_deg <= self.elevation_max_deg:
            raise ValueError("elevation_min_deg must be <= elevation_max_deg")
        if self.rotations < 1 or self.shape_points < 16:
            raise ValueError(f"rotations must be >= 1 and shape_points >= 16, got {self.rotations}, "
                             f"{self.shape_points}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


CHANCE = {"colour": 1.0 / 12, "shape": 1.0 / 9, "both": 1.0 / 108}
"""Chance accuracy of a single-part prompt (12 colours, 9 shapes)."""


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptSpec:
    """One evaluation prompt.

    parts : ``((shape, colour), ...)`` top first as in the caption, or None when the prompt
        is not a generator caption (then only CLIP/VQA apply).
    held_out : the caption never occurs among the training captions (for singles: the
        shape x colour combination never occurs as any part of any training caption).
    kind : "single", "composition" or "free".
    """

    prompt: str
    parts: tuple[tuple[str, str], ...] | None
    held_out: bool
    kind: str


def _caption_re() -> re.Pattern:
    from .procedural import COLORS, SHAPE_NOUNS

    colours = "|".join(sorted(map(re.escape, COLORS), key=len, reverse=True))
    nouns = "|".join(sorted(map(re.escape, SHAPE_NOUNS.values()), key=len, reverse=True))
    return re.compile(rf"^(?:a|an)\s+({colours})\s+({nouns})$")


def parse_caption(text: str) -> tuple[tuple[str, str], ...] | None:
    """``"a red cube on top of a blue cylinder"`` -> ``(("cube", "red"), ("cylinder", "blue"))``.

    Parts are ``(shape key, colour)``, top first. None when ``text`` is not a caption of
    the built-in generator (case and surrounding whitespace are ignored).
    """
    from .procedural import SHAPE_NOUNS

    noun_to_shape = {v: k for k, v in SHAPE_NOUNS.items()}
    pat = _caption_re()
    parts = []
    for phrase in re.split(r"\s+on\s+top\s+of\s+", " ".join(text.lower().split())):
        m = pat.match(phrase)
        if m is None:
            return None
        parts.append((noun_to_shape[m.group(2)], m.group(1)))
    return tuple(parts) if 1 <= len(parts) <= 2 else None


def _caption_of(parts: Sequence[tuple[str, str]]) -> str:
    from .procedural import _caption

    return _caption([{"shape": s, "color": c} for s, c in parts])


def _round_robin(items: list, key, rng: np.random.Generator, n: int) -> list:
    """``n`` items spread over the values of ``key`` (e.g. one shape after another), shuffled by ``rng``."""
    groups: dict[Any, list] = {}
    for i in rng.permutation(len(items)):
        groups.setdefault(key(items[int(i)]), []).append(items[int(i)])
    order = [groups[k] for k in sorted(groups, key=lambda k: str(k))]
    order = [order[int(i)] for i in rng.permutation(len(order))]
    out: list = []
    while len(out) < n and any(order):
        for g in order:
            if g and len(out) < n:
                out.append(g.pop(0))
    return out


def benchmark_prompts(train_captions: Sequence[str], n_seen: int = 6, n_held_out: int = 4,
                      n_compositions: int = 2, seed: int = 0,
                      held_out_captions: Sequence[str] | None = None) -> list[PromptSpec]:
    """The built-in evaluation prompts, deterministic in ``(train_captions, counts, seed, held_out_captions)``.

    * ``n_seen`` single-part captions that occur in training (spread over shapes);
    * ``n_held_out`` shape x colour combinations that occur in **no** training caption,
      neither alone nor as a part of a composition, though the shape and the colour each do
      (so every word is known to the text encoder): compositional generalisation;
    * ``n_compositions`` two-part stacks, alternately a training caption and a new one
      (top: any shape, bottom: a flat-topped one, two colours).

    ``held_out_captions``: the prompts the data set declares held out (the captions of its
    ``split == "ceiling"`` objects, :func:`gaussian_atlas.procedural.holdout_sets`). When
    given, held-out singles and new stacks are taken from them (a ceiling exists for each),
    and a declared prompt found among the training captions raises ``ValueError`` (a leak).

    Fewer prompts come back when the training set does not have enough of a kind (e.g.
    every combination seen): the caller records the counts.
    """
    from .procedural import COLORS, SHAPES, STACK_BOTTOM_SHAPES

    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xE7A1]))
    parsed = [p for p in (parse_caption(c) for c in train_captions) if p]
    train_set = {_caption_of(p) for p in parsed}
    seen_parts = {part for p in parsed for part in p}
    seen_shapes = {s for s, _ in seen_parts}
    seen_colours = {c for _, c in seen_parts}
    singles = sorted({p for p in parsed if len(p) == 1})
    out = [PromptSpec(_caption_of(p), p, False, "single")
           for p in _round_robin(singles, lambda p: p[0][0], rng, n_seen)]
    declared = None
    if held_out_captions is not None:
        declared = sorted({p for p in (parse_caption(c) for c in held_out_captions) if p})
        leaks = [_caption_of(p) for p in declared
                 if _caption_of(p) in train_set or (len(p) == 1 and p[0] in seen_parts)]
        if leaks:
            raise ValueError(f"held-out prompts occur in the training captions (split leak): {leaks[:5]}")
        novel = [p for p in declared if len(p) == 1]
    else:
        novel = [((s, c),) for s in SHAPES for c in COLORS
                 if (s, c) not in seen_parts and s in seen_shapes and c in seen_colours]
    out += [PromptSpec(_caption_of(p), p, True, "single")
            for p in _round_robin(novel, lambda p: p[0][0], rng, n_held_out)]
    comps_seen = sorted({p for p in parsed if len(p) == 2})
    comps_seen = [comps_seen[int(i)] for i in rng.permutation(len(comps_seen))]
    colours = sorted(COLORS)
    comps_new: list = []
    if declared is not None:
        comps_new = [p for p in declared if len(p) == 2]
    while declared is None and len(comps_new) < n_compositions and seen_shapes:
        top = SHAPES[int(rng.integers(len(SHAPES)))]
        bottom = STACK_BOTTOM_SHAPES[int(rng.integers(len(STACK_BOTTOM_SHAPES)))]
        c1, c2 = (colours[int(j)] for j in rng.choice(len(colours), size=2, replace=False))
        p = ((top, c1), (bottom, c2))
        if _caption_of(p) not in train_set and p not in comps_new:
            comps_new.append(p)
    for i in range(n_compositions):
        src = comps_seen if (i % 2 == 0 and comps_seen) else comps_new
        if not src:
            src = comps_new or comps_seen
        if not src:
            break
        p = src.pop(0)
        out.append(PromptSpec(_caption_of(p), p, _caption_of(p) not in train_set, "composition"))
    return out


def index_prompts(index: Any, cfg: "EvaluateConfig") -> list[PromptSpec]:
    """The built-in prompts for an atlas stage's ``index.parquet`` (a DataFrame): seen prompts from
    the training split's captions; held-out prompts from the captions of its ``split == "ceiling"``
    objects when it has any (the data set's declared held-out prompts), else from the shape x colour
    pairs no training caption has (:func:`benchmark_prompts`)."""
    from .atlas import training_rows

    captions = [str(c) for c in training_rows(index)["caption"].fillna("")]
    held = None
    if "split" in index.columns and (index["split"] == "ceiling").any():
        held = sorted(set(index.loc[index["split"] == "ceiling", "caption"].astype(str)))
    return benchmark_prompts(captions, cfg.n_seen, cfg.n_held_out, cfg.n_compositions, cfg.seed, held)


def read_prompts(path: str | Path, train_captions: Sequence[str] = ()) -> list[PromptSpec]:
    """Prompts of a text file (one per line; blank lines and ``#`` comments skipped).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file when it is missing or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file does not exist: {path}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line expected)")
    train = {" ".join(c.lower().split()) for c in train_captions}
    train_parts = {part for c in train_captions for part in (parse_caption(c) or ())}
    out = []
    for p in prompts:
        parts = parse_caption(p)
        kind = "free" if parts is None else ("single" if len(parts) == 1 else "composition")
        if parts is not None and len(parts) == 1:
            held = parts[0] not in train_parts
        else:
            held = " ".join(p.lower().split()) not in train
        out.append(PromptSpec(p, parts, held, kind))
    return out


# --------------------------------------------------------------------------- views and colour


def random_views(n: int, resolution: int, seed: int, elevation_min_deg: float = 0.0, elevation_max_deg: float = 45.0,
                 radius: float = 2.8, fov_deg: float = 45.0) -> tuple[Tensor, Tensor]:
    """``(c2w [n, 4, 4], K [n, 3, 3])``: cameras at random azimuths/elevations looking at the origin (+Z up)."""
    from .cameras import look_at_c2w, spherical_to_cartesian

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
    from .atlas import fibonacci_sphere
    from .meshrender import RenderConfig
    from .procedural import COLORS

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
    from .meshrender import RenderConfig, normalize_mesh, render_views
    from .procedural import COLORS

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
    from .render import render

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


# --------------------------------------------------------------------------- shape


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

    from .procedural import STACK_TOP_SCALE, make_primitive

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

    from .procedural import SHAPES

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


# --------------------------------------------------------------------------- scoring


def random_atlases(n: int, mean: Tensor, std: Tensor, seed: int = 0) -> Tensor:
    """``[n, C, S, S]`` floor atlases: standard normal noise in the normalised space, de-normalised."""
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn((n,) + tuple(mean.shape), generator=gen)
    return z * std.cpu() + mean.cpu()


def _mask_opacity(g: Any, keep: Tensor) -> Any:
    """A copy of ``g`` [N] whose Gaussians outside ``keep`` [N] are fully transparent."""
    from .gaussians import Gaussians

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


# --------------------------------------------------------------------------- CLIP / VQA


def skipped(reason: str) -> dict[str, str]:
    return {"status": "skipped", "reason": reason}


def _weights_problem(path: str | None, key: str) -> str | None:
    if not path:
        return f"no weights configured (evaluate.{key} is null)"
    if not Path(path).is_dir():
        return f"no weights at {path}"
    return None


@dataclass
class ClipScorer:
    """A CLIP model with its tokenizer and image processor, loaded from a local folder (:func:`load_clip`)."""

    model: Any
    tokenizer: Any
    processor: Any
    path: str
    device: torch.device

    @torch.no_grad()
    def __call__(self, views: np.ndarray, prompts: Sequence[str], batch: int = 32) -> np.ndarray:
        """``[B]`` CLIP scores of uint8 views ``[B, V, H, W, 3]`` against ``prompts [B]``.

        ``100 * max(cos(image, text), 0)`` per view (torchmetrics ``CLIPScore``), mean over the views.
        """
        views = np.asarray(views)
        B, V = views.shape[:2]
        if B != len(prompts):
            raise ValueError(f"{B} objects but {len(prompts)} prompts")
        if B == 0:
            return np.zeros(0)
        cfg = self.model.config.text_config
        max_len = min(int(getattr(self.tokenizer, "model_max_length", 77) or 77), cfg.max_position_embeddings)
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_len,
                             return_tensors="pt")
        kw = {"input_ids": enc["input_ids"].to(self.device)}
        if enc.get("attention_mask") is not None:
            kw["attention_mask"] = enc["attention_mask"].to(self.device)
        t = self.model.get_text_features(**kw)
        t = torch.nn.functional.normalize(getattr(t, "pooler_output", t).float(), dim=-1)  # [B, D]
        flat = views.reshape(B * V, *views.shape[2:])
        feats = []
        for i in range(0, len(flat), batch):
            px = self.processor(images=list(flat[i:i + batch]), return_tensors="pt")["pixel_values"]
            f = self.model.get_image_features(pixel_values=px.to(self.device))
            feats.append(torch.nn.functional.normalize(getattr(f, "pooler_output", f).float(), dim=-1))
        img = torch.cat(feats).reshape(B, V, -1)  # [B, V, D]
        return (100.0 * (img * t[:, None]).sum(-1).clamp_min(0.0)).mean(1).cpu().numpy()


def load_clip(path: str | None, device: str | torch.device = "cpu") -> ClipScorer | dict[str, str]:
    """A :class:`ClipScorer` from the local folder ``path`` (``CLIPModel`` + tokenizer + image processor,
    ``local_files_only``), or :func:`skipped` with the reason when ``path`` is None or not a folder.

    Raises ``ValueError`` naming the folder when it exists but does not load.
    """
    problem = _weights_problem(path, "clip_model")
    if problem:
        return skipped(problem)
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        proc = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load CLIP from {path} (CLIPModel weights, a tokenizer and an image processor "
                         f"expected): {exc}") from None
    return ClipScorer(model=model, tokenizer=tok, processor=proc, path=str(path), device=torch.device(device))


@dataclass
class VqaScorer:
    """VQAScore through ``t2v_metrics`` (:func:`load_vqa`)."""

    scorer: Any
    name: str
    path: str

    def __call__(self, views: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """``[B]`` mean VQAScore (P("Yes"), in [0, 1]) over the views ``[B, V, H, W, 3]`` of each prompt."""
        import tempfile

        from PIL import Image

        out = []
        with tempfile.TemporaryDirectory(prefix="gatlas-vqa-") as tmp:
            for b, (v, p) in enumerate(zip(np.asarray(views), prompts)):
                paths = []
                for k, im in enumerate(v):
                    paths.append(str(Path(tmp) / f"{b:04d}-{k:02d}.png"))
                    Image.fromarray(im).save(paths[-1])
                out.append(float(self.scorer(images=paths, texts=[p]).float().mean()))
        return np.asarray(out)


def load_vqa(path: str | None, name: str = "clip-flant5-xxl", device: str | torch.device = "cpu") -> VqaScorer | dict[str, str]:
    """A :class:`VqaScorer` (``t2v_metrics.VQAScore(name, cache_dir=path)``), or :func:`skipped` with the reason.

    Skipped when ``path`` is None / not a folder, or when ``t2v_metrics`` does not import:
    it pins torch 2.5.1 and transformers 4.49, which this project's environment does not
    have, so it is not a dependency and this path is not exercised by the tests.
    """
    problem = _weights_problem(path, "vqa_model")
    if problem:
        return skipped(f"VQA score needs t2v_metrics + {name} weights: {problem}")
    try:
        import t2v_metrics  # type: ignore[import-not-found]
    except Exception as exc:  # ImportError, or its import-time ffmpeg check
        return skipped(f"t2v_metrics is not usable here ({type(exc).__name__}: {exc}); it pins torch==2.5.1 and "
                       f"transformers==4.49.0, so it needs an environment of its own")
    return VqaScorer(scorer=t2v_metrics.VQAScore(model=name, device=str(device), cache_dir=str(path)), name=name,
                     path=str(path))


# --------------------------------------------------------------------------- the whole evaluation


@dataclass
class Evaluation:
    """What :func:`evaluate` returns (the stage writes it out).

    Objects are generated ``samples_per_prompt`` times per prompt: entry ``j`` of ``seeds``,
    ``atlases``, ``gaussians`` and the views is sample ``sample_of[j] = (prompt index, k)``;
    prompt ``i``'s first sample is entry ``i * samples_per_prompt``.
    """

    specs: list[PromptSpec]  # the distinct prompts
    seeds: list[int]  # generation seed of each sample
    atlases: Tensor  # [P*S, 16, S, S] generated, de-normalised (CPU)
    gaussians: Any  # Gaussians [P*S, N] generated, unit-ball frame (CPU)
    objects: dict[str, list[int]]  # source -> the sample indices it has an object for
    views: dict[str, np.ndarray]  # source -> uint8 [B_source, V, H, W, 3] on white
    rows: list[dict[str, Any]]  # one per (sample, source)
    metrics: dict[str, Any]  # metrics/evaluate.json
    sample_of: list[tuple[int, int]] = field(default_factory=list)  # sample -> (prompt index, k)
    palettes: list = field(default_factory=list)  # per sample, per part: {colour name: rgb [3]} (object_palettes)
    fixed_key: str = ""  # what the model-independent parts depend on (see evaluate's ``reuse``)


def _fixed_key(model: Any, specs: Sequence[PromptSpec], cfg: "EvaluateConfig",
               ceiling: Mapping[int, Tensor]) -> str:
    """A digest of everything the palettes, the ceiling and the floor of :func:`evaluate` depend on."""
    import hashlib

    h = hashlib.sha256(repr([vars(s) for s in specs]).encode())
    h.update(repr({k: v for k, v in vars(cfg).items() if k != "sample"}).encode())
    for t in (model.mean, model.std, model.grid, *[ceiling[i] for i in sorted(ceiling)]):
        h.update(np.ascontiguousarray(torch.as_tensor(t).detach().cpu().numpy()).tobytes())
    h.update(repr(sorted(ceiling)).encode())
    return h.hexdigest()


def ceiling_atlases(index: Any, atlas_dir: str | Path, specs: Sequence[PromptSpec],
                    limit: int = 1) -> dict[int, np.ndarray]:
    """``{prompt index: atlases [K, 16, S, S]}``: for each prompt, up to ``limit`` atlases (by id) of
    objects whose caption is the prompt (case and spacing ignored): training objects for a seen
    prompt, the ``split == "ceiling"`` objects rendered for a held-out one. Prompts without any are absent.

    index : the atlas stage's ``index.parquet`` as a DataFrame (``id``, ``caption``, ``path``).
    """
    by_caption: dict[str, list[str]] = {}
    for r in index.sort_values("id").itertuples(index=False):
        by_caption.setdefault(" ".join(str(r.caption).lower().split()), []).append(r.path)
    out: dict[int, np.ndarray] = {}
    for i, s in enumerate(specs):
        rels = by_caption.get(" ".join(s.prompt.lower().split()), [])[:max(1, limit)]
        if rels:
            arrays = []
            for rel in rels:
                with np.load(Path(atlas_dir) / rel) as z:
                    arrays.append(z["atlas"].astype(np.float32))
            out[i] = np.stack(arrays)
    return out


def _view_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1)[0] & 0x7FFFFFFF)


def evaluate(model: Any, specs: Sequence[PromptSpec], cfg: EvaluateConfig = EvaluateConfig(),
             ceiling: Mapping[int, Tensor] | None = None, progress: bool = False,
             reuse: Evaluation | None = None) -> Evaluation:
    """Generate ``cfg.samples_per_prompt`` objects per prompt and score them, the ceiling and the floor
    (see the module docstring).

    model : an :class:`~gaussian_atlas.sample.AtlasModel`.
    specs : the prompts (:func:`benchmark_prompts` or :func:`read_prompts`).
    ceiling : ``{prompt index: de-normalised atlas [16, S, S] or atlases [K, 16, S, S]}`` of objects
        whose caption is the prompt (decoded with the model's atlas grid, like generated atlases);
        sample ``k`` of the prompt is compared with atlas ``k mod K``.

    Sample ``j`` (prompt ``i = j // S``, its ``k``-th) is generated with seed ``sample.seed + j``;
    every source is scored on the same random views per sample (``cfg.n_views`` views, seeded by
    ``(cfg.seed, j)``). Accuracies come with 95 % bootstrap intervals over prompts x samples.

    reuse : an earlier :class:`Evaluation` of the same prompts, config and ceiling with a model of
        the same statistics and atlas grid (e.g. an earlier checkpoint of one training run): its
        palettes and its ceiling and floor renders and scores, which do not depend on the network,
        are taken over instead of recomputed (``ValueError`` if any of those inputs differ).
    """
    import time

    from .atlas import atlas_to_gaussians
    from .sample import generate

    if not specs:
        raise ValueError("no prompts to evaluate")
    t0 = time.perf_counter()
    dev = cfg.torch_device()
    S = cfg.samples_per_prompt
    sample_of = [(i, k) for i in range(len(specs)) for k in range(S)]
    flat = [specs[i] for i, _ in sample_of]  # one spec per sample
    groups = [i for i, _ in sample_of]
    B = len(flat)
    atl, g_gen, seeds = generate(model, [s.prompt for s in flat], cfg.sample, progress=progress)
    t_sample = time.perf_counter() - t0
    decode = lambda a: atlas_to_gaussians(a.float(), None, model.atlas_cfg, grid=model.grid)  # noqa: E731
    ceiling = {i: torch.as_tensor(np.asarray(a)) for i, a in dict(ceiling or {}).items()}
    ceiling = {i: (a[None] if a.dim() == 3 else a) for i, a in ceiling.items()}  # [K, 16, S, S]
    key = _fixed_key(model, specs, cfg, ceiling)
    if reuse is not None and reuse.fixed_key != key:
        raise ValueError("evaluate(reuse=...): the earlier evaluation had other prompts, settings, ceiling "
                         "atlases or model statistics; its ceiling/floor scores do not apply")
    sources: dict[str, tuple[list[int], Any]] = {"generated": (list(range(B)), g_gen)}
    if reuse is None:
        if ceiling:
            idx = [j for j, (i, _) in enumerate(sample_of) if i in ceiling]
            cat = torch.stack([ceiling[sample_of[j][0]][sample_of[j][1] % len(ceiling[sample_of[j][0]])]
                               for j in idx])
            sources["ceiling"] = (idx, decode(cat.to(dev)))
        sources["floor"] = (list(range(B)), decode(random_atlases(B, model.mean, model.std, cfg.seed).to(dev)))

    cams = [random_views(cfg.n_views, cfg.resolution, _view_seed(cfg.seed, j), cfg.elevation_min_deg,
                         cfg.elevation_max_deg, cfg.radius, cfg.fov_deg) for j in range(B)]
    c2w = torch.stack([c for c, _ in cams])  # [B, V, 4, 4]
    K = torch.stack([k for _, k in cams])  # [B, V, 3, 3]
    t1 = time.perf_counter()
    palettes = reuse.palettes if reuse is not None else [
        object_palettes([p for p, _ in s.parts], c2w[j], K[j], cfg.resolution) if s.parts else []
        for j, s in enumerate(flat)]  # the prompted object as the renderer shows it, per part
    timing = {"sample": round(t_sample, 2), "palettes": round(time.perf_counter() - t1, 2)}
    clip = load_clip(cfg.clip_model, dev)
    vqa = load_vqa(cfg.vqa_model, cfg.vqa_name, dev)

    rows: list[dict[str, Any]] = []
    views: dict[str, np.ndarray] = {}
    objects: dict[str, list[int]] = {}
    clip_means: dict[str, float | None] = {}
    vqa_means: dict[str, float | None] = {}
    summaries: dict[str, Any] = {}
    for source, (idx, g) in sources.items():
        t1 = time.perf_counter()
        rgb, alpha = render_premultiplied(g, c2w[idx], K[idx], cfg.resolution)
        views[source] = on_white_u8(rgb, alpha)
        objects[source] = list(idx)
        sub = [flat[j] for j in idx]
        t2 = time.perf_counter()
        scores = score_objects(g, sub, c2w[idx], K[idx], cfg.resolution, [palettes[j] for j in idx], cfg, seed=cfg.seed,
                               colours=alpha_weighted_colour(rgb, alpha))
        timing[f"render_{source}"] = round(t2 - t1, 2)
        timing[f"score_{source}"] = round(time.perf_counter() - t2, 2)
        if progress:
            print(f"evaluate: {source}: {len(idx)} objects rendered in {t2 - t1:.1f} s, scored in "
                  f"{time.perf_counter() - t2:.1f} s", flush=True)
        cs = clip(views[source], [s.prompt for s in sub]) if isinstance(clip, ClipScorer) else None
        vs = vqa(views[source], [s.prompt for s in sub]) if isinstance(vqa, VqaScorer) else None
        clip_means[source] = None if cs is None else round(float(np.mean(cs)), 4)
        vqa_means[source] = None if vs is None else round(float(np.mean(vs)), 4)
        summaries[source] = summarise(scores, sub, [groups[j] for j in idx], cfg.n_bootstrap, cfg.seed)
        for n, (j, sc) in enumerate(zip(idx, scores)):
            s = flat[j]
            rows.append({
                "index": sample_of[j][0], "sample": sample_of[j][1], "prompt": s.prompt, "kind": s.kind,
                "held_out": s.held_out,
                "parts": ";".join(f"{c} {sh}" for sh, c in s.parts) if s.parts else "",
                "seed": seeds[j] if source == "generated" else None, "source": source,
                "colour_pred": sc.get("colour_pred"), "colour_correct": sc.get("colour_correct"),
                "colour_distance": sc.get("colour_distance"), "shape_pred": sc.get("shape_pred"),
                "shape_correct": sc.get("shape_correct"), "chamfer": sc.get("chamfer"),
                "chamfer_best": sc.get("chamfer_best"), "both_correct": sc.get("both_correct"),
                "clip_score": None if cs is None else round(float(cs[n]), 4),
                "vqa_score": None if vs is None else round(float(vs[n]), 4),
            })
    if reuse is not None:  # the ceiling and floor of the earlier evaluation, unchanged
        for source in ("ceiling", "floor"):
            if source in reuse.objects:
                views[source], objects[source] = reuse.views[source], reuse.objects[source]
                summaries[source] = reuse.metrics[source]
                clip_means[source] = (reuse.metrics.get("clip_score") or {}).get(source)
                vqa_means[source] = (reuse.metrics.get("vqa_score") or {}).get(source)
                rows += [r for r in reuse.rows if r["source"] == source]
        timing["reused"] = "palettes, ceiling, floor"
    kinds = [s.kind for s in specs]
    metrics: dict[str, Any] = {
        "n_prompts": len(specs), "samples_per_prompt": S, "n_samples": B,
        "n_single_seen": sum(1 for s in specs if s.kind == "single" and not s.held_out),
        "n_single_held_out": sum(1 for s in specs if s.kind == "single" and s.held_out),
        "n_compositions": kinds.count("composition"), "n_free": kinds.count("free"),
        "n_ceiling": len(ceiling), "n_views": cfg.n_views, "resolution": cfg.resolution,
        "steps": cfg.sample.steps, "guidance": cfg.sample.guidance,
        "ci": f"95 % percentile bootstrap, {cfg.n_bootstrap} resamples of prompts, then of samples within a prompt",
        **{src: summaries[src] for src in SOURCES if src in summaries},
        "chance": {k: round(v, 6) for k, v in CHANCE.items()},
        "clip_score": (clip if isinstance(clip, dict) else
                       {"status": "ok", "model": clip.path, "convention": "100 * max(cos, 0), mean over views "
                        "then prompts (torchmetrics CLIPScore)", **{k: v for k, v in clip_means.items()}}),
        "vqa_score": (vqa if isinstance(vqa, dict) else
                      {"status": "ok", "model": vqa.name, "weights": vqa.path, **{k: v for k, v in vqa_means.items()}}),
        "seconds": {**timing, "total": round(time.perf_counter() - t0, 2)},
    }
    g_cpu = g_gen.to("cpu")
    return Evaluation(specs=list(specs), seeds=list(seeds), atlases=atl.detach().cpu(), gaussians=g_cpu,
                      objects=objects, views=views, rows=rows, metrics=metrics, sample_of=sample_of,
                      palettes=palettes, fixed_key=key)


# --------------------------------------------------------------------------- gallery


def slug(text: str, max_len: int = 60) -> str:
    """File-name-safe form of a prompt: ``"a red torus" -> "a-red-torus"``."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].strip("-")
    return s or "prompt"


def gallery_html(items: Sequence[Mapping[str, Any]], summary: Mapping[str, Any] | None = None,
                 title: str = "Gaussian Atlas evaluation") -> str:
    """A self-contained HTML page: per prompt its turntable, atlas picture and scores.

    ``items``: ``{"prompt", "turntable" (relative path), "atlas" (relative path or None),
    "scores" ({label: value})}``; ``summary``: shown as a table of key/values on top.
    """
    e = html.escape
    head = ("<!doctype html><html><head><meta charset='utf-8'><title>" + e(title) + "</title><style>"
            "body{font-family:sans-serif;margin:1em} .g{display:flex;flex-wrap:wrap;gap:12px}"
            ".c{border:1px solid #ccc;padding:8px;width:300px} .c img{max-width:100%;image-rendering:pixelated}"
            "table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #ddd;padding:2px 6px}"
            ".ok{color:#080}.bad{color:#b00}</style></head><body><h1>" + e(title) + "</h1>")
    parts = [head]
    if summary:
        parts.append("<table>" + "".join(f"<tr><th>{e(str(k))}</th><td>{e(_fmt(v))}</td></tr>"
                                         for k, v in summary.items()) + "</table>")
    parts.append("<div class='g'>")
    for it in items:
        cells = "".join(f"<tr><th>{e(str(k))}</th><td class='{_cls(v)}'>{e(_fmt(v))}</td></tr>"
                        for k, v in (it.get("scores") or {}).items())
        atlas = f"<img src='{e(str(it['atlas']))}' alt='atlas channels'>" if it.get("atlas") else ""
        parts.append(f"<div class='c'><b>{e(str(it['prompt']))}</b><br><img src='{e(str(it['turntable']))}' "
                     f"alt='turntable'>{atlas}<table>{cells}</table></div>")
    parts.append("</div></body></html>\n")
    return "".join(parts)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.3f}"
    return "n/a" if v is None else str(v)


def _cls(v: Any) -> str:
    return ("ok" if v else "bad") if isinstance(v, bool) else ""
