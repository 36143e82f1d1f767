"""The whole evaluation: generate samples per prompt, decode the ceiling and the floor, render every source on
the same random views and score it (procedural fidelity, CLIP, VQA) with bootstrap intervals."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .clip_vqa import ClipScorer, VqaScorer, load_clip, load_vqa
from .colours import alpha_weighted_colour, object_palettes, on_white_u8, random_views, render_premultiplied
from .config import SOURCES, EvaluateConfig
from .prompts import CHANCE, PromptSpec
from .scoring import random_atlases, score_objects, summarise


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
    (see the package docstring, :mod:`gaussian_atlas.evaluate`).

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

    from ..atlas import atlas_to_gaussians
    from ..sample import generate

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
