"""Fitting benchmark (GPU machine): the bounded fit against gsplat's unbounded DefaultStrategy,
and the batched (packed) fitter against one object at a time.

    python benchmarks/bench_fit.py --data DIR --steps 1000 --tau 36864 --quality-objects 4 --batch 16

DIR holds render folders (NeRF-synthetic layout, e.g. made by `gatlas procedural --resolution 256`).

(a) quality, same objects, same steps, one object at a time:
    ours  = BoundedVisibilityStrategy(tau) around gsplat DefaultStrategy
    base  = gsplat DefaultStrategy alone (the same loop with the bound switched off: tau = 10**9)
    -> held-out PSNR / SSIM, Gaussian count, seconds; the PSNR gap (target: within 0.3 dB at <= tau)
(b) throughput: objects per GPU-minute of the packed fitter (``--batch`` objects per launch) against
    one object at a time, on the same objects and settings; ratio printed.
(d) fitters (issue #8), with ``--methods plain,anchors``: the plain fitter against the paper's anchor
    fitter (fit.method: anchors), same tau and the same wall-clock budget per object (``--budget`` s):
    each method's step count is calibrated to the budget (two short timed fits), its refinement
    schedule scaled to those steps, and ``max_seconds`` stops it at the budget. On ``--compare-objects``
    procedural objects and on every render folder under ``--meshes`` (``--make-meshes DIR`` builds 6
    demo meshes with trimesh and renders them through ``gatlas render-mesh`` into DIR first):
    held-out PSNR / SSIM, Gaussian count, steps, seconds per object; anchors - plain printed.

    python benchmarks/bench_fit.py --data .bench/proc256 --make-meshes .bench/meshes256 \
        --meshes .bench/meshes256 --methods plain,anchors --budget 30 --tau 36864 --compare-objects 4 \
        --skip-quality --skip-throughput
(r) reference (issue #19), with ``--reference``: a plain gsplat fit, written the way gsplat's
    examples/simple_trainer.py runs it, NOT our loop: gsplat ``DefaultStrategy`` (its defaults, unbounded),
    one random training view per step (``--reference-steps``, 7,000), white background, SH degree 0,
    Adam with simple_trainer's learning rates (means 1.6e-4 x scene scale decaying to 1 %, scales 5e-3,
    quats 1e-3, opacities 5e-2, sh0 2.5e-3), loss 0.8 L1 + 0.2 (1 - SSIM), one object at a time; started
    from our initial points (surface samples; simple_trainer starts from SfM points). Held-out PSNR / SSIM on
    the same test views as ours, Gaussians, seconds per object. ``--reference-objects`` procedural objects
    and ``--reference-meshes`` meshes, in ``--reference-procs`` processes side by side (the loop is
    launch-bound: one process leaves the GPU mostly idle). Needs gsplat's CUDA rasterizer: skipped on CPU
    unless ``--reference-on-cpu`` (the loop through our torch renderer: a smoke test, timings meaningless).
(e) throughput (issue #19): our packed fitter at each ``--batches`` size (the meshes then the procedural
    objects, cycled to fill the batch), objects per GPU-minute, peak GPU memory
    (``torch.cuda.max_memory_allocated``), held-out PSNR per object, and per object the PSNR difference to
    (r) (target >= reference - 0.3 dB) and objects/minute (target >= 50).

    python benchmarks/bench_fit.py --data W/proc256 --meshes W/meshes256 --skip-quality --skip-throughput \
        --steps 1500 --reference --reference-objects 4 --reference-meshes 4 --reference-procs 8 \
        --batches 32,64,128 --json W/fit_speed.json

``--json`` gets the raw record through benchmarks/_record.py (device, versions, commit, command), rewritten
after every section, so a run stopped by its time limit keeps what it finished. ``--deadline S`` skips a
unit (a batch size, the reference) that its estimate says would end more than S seconds after the start.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _prebuilt import use_prebuilt_gsplat  # noqa: E402
from _overrides import parse_overrides, with_overrides  # noqa: E402
from _record import write_record  # noqa: E402

use_prebuilt_gsplat()

from gaussian_atlas.fit import AnchorConfig  # noqa: E402
from gaussian_atlas.data import load_object  # noqa: E402
from gaussian_atlas.fit import DensifyConfig, FitConfig, FitInput, fit_objects  # noqa: E402


def load_inputs(root: Path, n: int) -> list[FitInput]:
    dirs = sorted(p.parent for p in root.glob("**/transforms.json"))[:n]
    out = []
    for d in dirs:
        o = load_object(d)
        out.append(FitInput.from_loaded(d.name, o))
    return out


def timed_fit(objs: list[FitInput], cfg: FitConfig, device: str) -> tuple[list, float]:
    torch.cuda.synchronize() if device == "cuda" else None
    t0 = time.perf_counter()
    res = fit_objects(objs, cfg, device=device)
    torch.cuda.synchronize() if device == "cuda" else None
    return res, time.perf_counter() - t0


# --------------------------------------------------------------------------- (d) plain vs anchors


def scheduled(cfg: FitConfig, steps: int) -> FitConfig:
    """``cfg`` with ``steps`` and both methods' refinement schedules scaled to them: every
    ``min(100, max(50, steps / 8))`` steps from then on, until 80% of the steps (refining more
    often than every 50 steps hurt the plain fitter on CPU: 13.1 vs 16.4 dB at 136 steps)."""
    every = min(100, max(50, steps // 8))
    stop, start = int(0.8 * steps), every // 2  # first refinement at step `every` (gsplat: step > start)
    return replace(cfg, steps=steps,
                   densify=replace(cfg.densify, refine_start_iter=start, refine_every=every, refine_stop_iter=stop),
                   anchors=replace(cfg.anchors, refine_start_iter=start, refine_every=every, refine_stop_iter=stop))


def steps_for_budget(obj: FitInput, cfg: FitConfig, budget: float, device: str) -> int:
    """Steps of ``cfg`` that fit ``budget`` seconds on ``obj``: two short timed fits (the longer one
    past a first refinement, so the count has grown) give the fixed cost (initialisation, final
    visibility, held-out renders) and the cost per step; 90% of the estimate is returned."""
    n1, n2 = 20, 80
    _, t1 = timed_fit([obj], scheduled(cfg, n1), device)
    _, t2 = timed_fit([obj], replace(scheduled(cfg, n2), densify=replace(cfg.densify, refine_start_iter=25,
                      refine_every=50, refine_stop_iter=60), anchors=replace(cfg.anchors, refine_start_iter=25,
                      refine_every=50, refine_stop_iter=60)), device)
    per_step = max((t2 - t1) / (n2 - n1), 1e-5)
    fixed = max(t1 - n1 * per_step, 0.0)
    return max(n1, int(0.9 * (budget - fixed) / per_step))


MESHES = {  # id: caption (built by demo_meshes)
    "vase": "a striped ceramic vase",
    "chair": "a wooden chair with a red seat",
    "bumpy_ball": "a bumpy multicoloured ball",
    "star_prism": "a yellow star-shaped prism",
    "globe": "a globe with a blue and white checkered texture",  # UV-textured (GLB)
    "donut": "a striped donut with a printed texture",  # UV-textured (GLB)
}


def _uv_surface(xyz, n_u: int, n_v: int, texture: np.ndarray):
    """A UV-textured mesh of the parametric surface ``xyz(u, v) -> [..., 3]`` on ``[0, 1]²``: a grid of
    ``(n_u + 1) x (n_v + 1)`` vertices (the seam column duplicated, so UVs do not wrap), ``texture``
    ``[H, W, 3]`` uint8 as its PBR base colour (what a GLB carries)."""
    import trimesh
    from PIL import Image
    from trimesh.visual.material import PBRMaterial

    u, v = np.meshgrid(np.linspace(0, 1, n_u + 1), np.linspace(0, 1, n_v + 1), indexing="ij")  # [n_u+1, n_v+1]
    verts = xyz(u, v).reshape(-1, 3)
    idx = np.arange((n_u + 1) * (n_v + 1)).reshape(n_u + 1, n_v + 1)
    a, b, c, d = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    mesh = trimesh.Trimesh(verts, faces, process=False)
    mesh.visual = trimesh.visual.TextureVisuals(uv=np.stack([u, v], -1).reshape(-1, 2),
                                                material=PBRMaterial(baseColorTexture=Image.fromarray(texture)))
    return mesh


def textured_meshes(out: Path) -> dict[str, Path]:
    """Two UV-textured meshes (GLB, +Z up coordinates): a checkered globe and a striped donut."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    # a globe: 8 x 16 checker of blue / white, a red band at the equator
    h, w = 128, 256
    r, c = np.mgrid[0:h, 0:w]
    tex = np.where(((r // 16) + (c // 16)) % 2 == 0, 1, 0)[..., None] * np.array([30, 70, 200]) + \
        np.where(((r // 16) + (c // 16)) % 2 == 1, 1, 0)[..., None] * np.array([240, 240, 235])
    tex[(r > 60) & (r < 68)] = [200, 30, 30]

    def sphere(u, v):  # u: longitude, v: latitude (0 = south pole)
        th, ph = np.pi * v, 2 * np.pi * u
        return np.stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), -np.cos(th)], -1)

    paths["globe"] = out / "globe.glb"
    _uv_surface(sphere, 64, 32, tex.astype(np.uint8)).export(paths["globe"])
    # a donut: diagonal stripes of three colours around the tube
    r, c = np.mgrid[0:128, 0:256]
    palette = np.array([[230, 120, 170], [250, 230, 120], [90, 50, 30]])
    tex = palette[((r + c) // 12) % 3]

    def torus(u, v):  # u around the ring, v around the tube
        a, b = 2 * np.pi * u, 2 * np.pi * v
        rr = 1.0 + 0.4 * np.cos(b)
        return np.stack([rr * np.cos(a), rr * np.sin(a), 0.4 * np.sin(b)], -1)

    paths["donut"] = out / "donut.glb"
    _uv_surface(torus, 96, 32, tex.astype(np.uint8)).export(paths["donut"])
    return paths


def demo_meshes(out: Path) -> dict[str, Path]:
    """Four vertex-coloured meshes (PLY, +Z up) with more structure than the procedural primitives."""
    import trimesh

    out.mkdir(parents=True, exist_ok=True)
    paths = {}

    def save(name: str, mesh: "trimesh.Trimesh", colors: np.ndarray) -> None:
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.clip(colors, 0, 255).astype(np.uint8))
        paths[name] = out / f"{name}.ply"
        mesh.export(paths[name])

    # a vase: a revolved profile with colour bands along its height
    z = np.linspace(0.0, 2.0, 40)
    r = 0.45 + 0.25 * np.sin(2.2 * z + 0.3) - 0.15 * (z > 1.7)
    vase = trimesh.creation.revolve(np.stack([r, z], 1), sections=64)
    band = (np.floor(vase.vertices[:, 2] * 5) % 2)[:, None]
    save("vase", vase, band * [[30, 60, 160, 255]] + (1 - band) * [[235, 225, 200, 255]])

    # a chair: boxes of different colours (seat, legs, back)
    parts, cols = [], []
    for ext, pos, col in [((1.0, 1.0, 0.12), (0, 0, 1.0), (200, 40, 40)),
                          ((1.0, 0.12, 1.1), (0, 0.44, 1.6), (120, 80, 40))] + \
            [((0.1, 0.1, 1.0), (x, y, 0.5), (90, 60, 30)) for x in (-0.43, 0.43) for y in (-0.43, 0.43)]:
        b = trimesh.creation.box(extents=ext)
        b.apply_translation(pos)
        parts.append(b)
        cols.append(np.tile([*col, 255], (len(b.vertices), 1)))
    save("chair", trimesh.util.concatenate(parts), np.concatenate(cols))

    # a bumpy ball: a displaced icosphere coloured by its normal
    ball = trimesh.creation.icosphere(subdivisions=5, radius=1.0)
    v = ball.vertices
    theta, phi = np.arccos(np.clip(v[:, 2], -1, 1)), np.arctan2(v[:, 1], v[:, 0])
    ball.vertices = v * (1.0 + 0.12 * np.sin(6 * theta) * np.sin(5 * phi))[:, None]
    save("bumpy_ball", ball, np.concatenate([(v * 0.5 + 0.5) * 255, np.full((len(v), 1), 255)], 1))

    # a star prism: an extruded five-pointed star (fan-triangulated caps: the star is star-shaped about its centre)
    ang = np.linspace(0, 2 * np.pi, 11)[:-1] + np.pi / 2
    rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    ring = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)  # [10, 2] counter-clockwise
    verts = np.concatenate([np.c_[ring, np.zeros(10)], np.c_[ring, np.full(10, 0.4)], [[0, 0, 0], [0, 0, 0.4]]])
    faces = []
    for i in range(10):
        j = (i + 1) % 10
        faces += [[i, j, 10 + j], [i, 10 + j, 10 + i], [20, j, i], [21, 10 + i, 10 + j]]  # side, side, bottom, top
    star = trimesh.Trimesh(verts, np.array(faces), process=True)
    star.fix_normals()
    shade = 0.75 + 0.25 * (star.vertices[:, 2:3] > 0.2)
    save("star_prism", star, np.concatenate([shade * [[250, 200, 20]], np.full((len(star.vertices), 1), 255)], 1))
    return paths


def render_meshes(out: Path, resolution: int, views: int) -> None:
    """Build :func:`demo_meshes` (vertex colours) and :func:`textured_meshes` (UV textures) and render each
    through ``gatlas render-mesh`` into ``out/objects/<id>`` (one process per mesh, side by side)."""
    import shutil
    import subprocess

    gatlas = Path(sys.executable).with_name("gatlas")
    cmd = [str(gatlas)] if gatlas.exists() else [shutil.which("gatlas") or "gatlas"]
    jobs = []
    for name, path in {**demo_meshes(out / "meshes"), **textured_meshes(out / "meshes")}.items():
        if (out / "objects" / name / "transforms.json").exists():
            continue
        jobs.append(subprocess.Popen(cmd + ["render-mesh", str(path), "--caption", MESHES[name], "--out",
                                            str(out / "objects" / name), "--resolution", str(resolution), "--views",
                                            str(views), "--ring", str(min(16, views)), "--up-axis", "z"]))
    codes = [j.wait() for j in jobs]  # the six renders side by side
    if any(codes):
        raise RuntimeError(f"gatlas render-mesh failed: exit codes {codes}")


def compare_methods(sets: dict[str, list[FitInput]], cfg: FitConfig, methods: list[str], budget: float,
                    device: str) -> tuple[list[dict], dict]:
    """(d): every method on every object, same tau, ``budget`` seconds each."""
    rows = []
    steps = {m: steps_for_budget(next(iter(sets.values()))[0], replace(cfg, method=m), budget, device)
             for m in methods}
    print(f"(d) steps fitting {budget:g} s: {steps}", flush=True)
    for set_name, objs in sets.items():
        for o in objs:
            for m in methods:
                c = replace(scheduled(replace(cfg, method=m), steps[m]), max_seconds=budget)
                (r,), s = timed_fit([o], c, device)
                rows.append({"set": set_name, "id": o.id, "method": m, "tau": cfg.tau, "budget_s": budget,
                             "steps": r.metrics["steps"], "psnr": r.metrics["psnr"], "ssim": r.metrics["ssim"],
                             "n_gaussians": r.metrics["n_gaussians"], "seconds": s})
                print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for set_name in sets:
        for m in methods:
            sel = [r for r in rows if r["set"] == set_name and r["method"] == m]
            summary[f"{set_name}/{m}"] = {k: float(np.mean([r[k] for r in sel]))
                                          for k in ("psnr", "ssim", "n_gaussians", "seconds", "steps")}
            summary[f"{set_name}/{m}"]["max_gaussians"] = max(r["n_gaussians"] for r in sel)
            s = summary[f"{set_name}/{m}"]
            print(f"(d) {set_name:10s} {m:8s} PSNR {s['psnr']:.2f} dB  SSIM {s['ssim']:.4f}  Gaussians "
                  f"{s['n_gaussians']:.0f} (max {s['max_gaussians']} <= {cfg.tau})  {s['seconds']:.1f} s  "
                  f"{s['steps']:.0f} steps", flush=True)
        if {"plain", "anchors"} <= set(methods):
            a, p = summary[f"{set_name}/anchors"], summary[f"{set_name}/plain"]
            summary[f"{set_name}/anchors_vs_plain"] = d = {
                "psnr_db": a["psnr"] - p["psnr"], "ssim": a["ssim"] - p["ssim"],
                "gaussians_ratio": a["n_gaussians"] / max(p["n_gaussians"], 1), "seconds_ratio": a["seconds"] / p["seconds"]}
            print(f"(d) {set_name}: anchors - plain {d['psnr_db']:+.2f} dB PSNR, {d['ssim']:+.4f} SSIM; Gaussians "
                  f"x{d['gaussians_ratio']:.2f}; seconds x{d['seconds_ratio']:.2f}", flush=True)
    return rows, summary


# --------------------------------------------------------------------------- (r) the plain gsplat reference


def reference_fit(obj: FitInput, cfg: FitConfig, steps: int, device: str, seed: int = 0) -> dict:
    """One object fitted the way gsplat's examples/simple_trainer.py fits a scene (see (r) above); held-out
    metrics on our test views (``pack_views``' split at ``cfg.resolution`` and ``cfg.holdout_every``)."""
    import math

    from gsplat.strategy import DefaultStrategy

    from gaussian_atlas.fit import pack_views
    from gaussian_atlas.fit.losses import ssim
    from gaussian_atlas.fit.plain import init_gaussians
    from gaussian_atlas.gaussians import Gaussians
    from gaussian_atlas.render import render, viewmats_from_c2w

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    (o,), pv = pack_views([obj], cfg, dev)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    train = pv.train_idx[0]
    g0 = init_gaussians(o, cfg.init_points, 0.1, rng, views=train)  # our start: surface samples (no SfM here)
    pts = g0.means
    d2 = torch.cdist(pts, pts).topk(4, largest=False).values[:, 1:] ** 2  # simple_trainer: knn(points, 4)
    cams = pv.c2w[0][:, :3, 3]
    scene_scale = 1.1 * float((cams - cams.mean(0)).norm(dim=-1).max())  # simple_trainer: Parser.scene_scale
    n = len(pts)
    params = torch.nn.ParameterDict({
        "means": torch.nn.Parameter(pts.to(dev)),  # [N, 3]
        "scales": torch.nn.Parameter(torch.log(torch.sqrt(d2.mean(-1)))[:, None].repeat(1, 3).to(dev)),  # [N, 3]
        "quats": torch.nn.Parameter(torch.rand(n, 4).to(dev)),  # [N, 4] random, as simple_trainer
        "opacities": torch.nn.Parameter(torch.logit(torch.full((n,), 0.1)).to(dev)),  # [N]
        "sh0": torch.nn.Parameter(g0.sh0[:, None, :].to(dev)),  # [N, 1, 3] SH degree 0
    })
    lrs = {"means": 1.6e-4 * scene_scale, "scales": 5e-3, "quats": 1e-3, "opacities": 5e-2, "sh0": 2.5e-3}
    opts = {k: torch.optim.Adam([{"params": params[k], "lr": lr, "name": k}], eps=1e-15,
                                fused=dev.type == "cuda" or None) for k, lr in lrs.items()}  # simple_trainer: fused
    sched = torch.optim.lr_scheduler.ExponentialLR(opts["means"], gamma=0.01 ** (1.0 / steps))
    strategy = DefaultStrategy()  # gsplat's defaults: refine 500..15,000 every 100, reset every 3,000
    strategy.check_sanity(params, opts)
    state = strategy.initialize_state(scene_scale=scene_scale)
    W, H = pv.width, pv.height
    viewmats, Ks = viewmats_from_c2w(pv.c2w[0]), pv.K[0]  # [V, 4, 4], [V, 3, 3]
    white = torch.ones(1, 3, device=dev)
    order: list[int] = []
    for step in range(steps):
        if not order:  # one view per step, a fresh shuffle every epoch (simple_trainer's DataLoader)
            order = list(rng.permutation(train))
        v = order.pop()
        means, quats = params["means"], params["quats"]
        scales, opac = torch.exp(params["scales"]), torch.sigmoid(params["opacities"])
        if dev.type == "cuda":
            from gsplat import rasterization

            rgb, _, info = rasterization(means, quats, scales, opac, params["sh0"], viewmats[v:v + 1], Ks[v:v + 1],
                                         W, H, sh_degree=0, packed=False, backgrounds=white, far_plane=1e10)
        else:  # smoke test only: our torch renderer, colours as gsplat's SH degree 0
            cols = torch.clamp_min(0.28209479177387814 * params["sh0"][:, 0] + 0.5, 0.0)
            out = render((means, quats, scales, opac, cols), pv.c2w[0][v:v + 1], Ks[v:v + 1], W, H, background=1.0,
                         backend="torch")
            rgb, info = out.rgb, dict(out.meta, gaussian_ids=None)
        strategy.step_pre_backward(params, opts, state, step, info)
        gt = pv.rgb[0][v:v + 1]
        loss = 0.8 * torch.abs(rgb - gt).mean() + 0.2 * (1.0 - ssim(rgb, gt))
        loss.backward()
        for opt in opts.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        sched.step()
        strategy.step_post_backward(params, opts, state, step, info, packed=False)
    sync()
    seconds = time.perf_counter() - t0
    g = Gaussians(means=params["means"].detach(), quats=params["quats"].detach(), log_scales=params["scales"].detach(),
                  opacity_logits=params["opacities"].detach(), sh0=params["sh0"][:, 0].detach())
    m = pv.holdout(0, g)
    return {"id": obj.id, "psnr": m["psnr"], "ssim": m["ssim"], "n_gaussians": len(g), "steps": steps,
            "seconds": seconds, "n_test_views": m["n_test_views"], "scene_scale": scene_scale,
            "finite": bool(math.isfinite(m["psnr"]))}


def run_reference(args, objs: list[tuple[str, FitInput]], cfg: FitConfig) -> dict:
    """(r) on ``objs`` ((set, object) pairs): in this process, or in ``--reference-procs`` processes side by side."""
    import signal
    import subprocess
    import tempfile

    procs = max(1, min(args.reference_procs, len(objs)))
    t0 = time.perf_counter()
    if procs == 1:
        rows = []
        for set_name, o in objs:
            rows.append({"set": set_name, **reference_fit(o, cfg, args.reference_steps, args.device)})
            print("(r) " + json.dumps(rows[-1]), flush=True)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench_fit_ref_"))
        base = [sys.executable, str(Path(__file__).resolve()), "--data", args.data, "--steps", str(args.steps),
                "--tau", str(args.tau), "--resolution", str(args.resolution), "--device", args.device,
                "--init-points", str(args.init_points), "--reference", "--reference-steps", str(args.reference_steps),
                "--reference-objects", str(args.reference_objects), "--reference-meshes", str(args.reference_meshes),
                "--threads", str(args.threads or 1)] + (["--meshes", args.meshes] if args.meshes else []) + \
               (["--reference-on-cpu"] if args.reference_on_cpu else [])
        jobs = [subprocess.Popen(base + ["--reference-worker", f"{k}/{procs}", "--json", str(tmp / f"{k}.json")])
                for k in range(procs)]

        def stop(signum, frame):  # stopped by a time limit: take the workers along (by their pids)
            for j in jobs:
                j.terminate()
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, stop)
        codes = [j.wait() for j in jobs]
        rows = []
        for k in range(procs):
            f = tmp / f"{k}.json"
            rows += json.loads(f.read_text())["reference_rows"] if f.exists() else []
        if any(codes) or len(rows) != len(objs):
            print(f"(r) worker exit codes {codes}: {len(rows)} of {len(objs)} reference fits came back", flush=True)
    wall = time.perf_counter() - t0
    out = {"rows": rows, "steps": args.reference_steps, "processes": procs, "wall_seconds": wall,
           "objects_per_minute_wall": 60.0 * len(rows) / wall if rows else None,
           "note": "gsplat DefaultStrategy, simple_trainer's loop and learning rates, 1 view/step, unbounded, "
                   "white background, SH degree 0, our initial points; seconds per object measured with "
                   f"{procs} processes side by side"}
    for set_name in sorted({r["set"] for r in rows}):
        sel = [r for r in rows if r["set"] == set_name]
        print(f"(r) reference {set_name:10s} {len(sel)} objects: PSNR {np.mean([r['psnr'] for r in sel]):.2f} dB, "
              f"SSIM {np.mean([r['ssim'] for r in sel]):.4f}, Gaussians {np.mean([r['n_gaussians'] for r in sel]):.0f}, "
              f"{np.mean([r['seconds'] for r in sel]):.1f} s/object ({procs} processes side by side)", flush=True)
    return out


# --------------------------------------------------------------------------- (e) packed throughput


def fill_batch(pool: list[FitInput], size: int) -> list[FitInput]:
    """``size`` objects: ``pool`` cycled, copies renamed ``<id>#k`` (the same work as distinct objects)."""
    return [o if k < len(pool) else replace(o, id=f"{o.id}#{k // len(pool)}")
            for k, o in ((k, pool[k % len(pool)]) for k in range(size))]


@torch.no_grad()
def check_per_object_render(objs: list[FitInput], cfg: FitConfig, device: str) -> dict:
    """Before timing: three packed objects drawn per object (gsplat batch dimensions) vs the flat set into every
    view, and vs our torch compositor, on the same views: the largest pixel differences."""
    from gaussian_atlas.fit import pack_views
    from gaussian_atlas.fit.plain import PlainFit

    dev = torch.device(device)
    objs3, pv = pack_views(objs[:3], replace(cfg, batch_objects=3), dev)
    rep = PlainFit(objs3, pv, cfg, np.random.default_rng(0), dev)
    views = pv.sample(np.random.default_rng(1), cfg.views_per_step)
    splats, extra = rep.splats()
    flat = pv.render(splats, views, None, background=1.0).rgb
    per_object = pv.render(splats, views, extra["layout"], background=1.0).rgb
    torch_backend = pv.render(splats, views, extra["layout"], background=1.0, backend="torch").rgb
    out = {"objects": 3, "views_each": cfg.views_per_step,
           "max_abs_diff_per_object_vs_flat": float((per_object - flat).abs().max()),
           "max_abs_diff_per_object_vs_torch_compositor": float((per_object - torch_backend).abs().max())}
    print(f"(e) per-object render check: max |per-object - flat| {out['max_abs_diff_per_object_vs_flat']:.2e}, "
          f"|per-object - torch compositor| {out['max_abs_diff_per_object_vs_torch_compositor']:.2e}", flush=True)
    return out


def throughput_batches(args, pool: list[FitInput], cfg: FitConfig, report: dict, t_start: float,
                       variant: str = "", overrides: dict | None = None) -> None:
    """(e): our packed fitter at every ``--batches`` size (rows in ``report["batches"]``), with the settings of
    ``variant`` (``overrides`` already applied to ``cfg``; recorded in each row)."""
    report["batches"] = rows = report.get("batches", [])
    last: tuple[int, float] | None = None
    tag = {"variant": variant, "overrides": overrides or {}} if variant else {}
    for size in [int(b) for b in args.batches.split(",") if b]:
        if args.deadline and last is not None:
            estimate = last[1] * size / last[0]
            if time.perf_counter() - t_start + estimate > args.deadline:
                rows.append({"batch": size, **tag, "skipped": f"estimated {estimate:.0f} s would pass --deadline "
                                                              f"{args.deadline:.0f} s"})
                print(f"(e) batch {size}: skipped ({rows[-1]['skipped']})", flush=True)
                continue
        objs = fill_batch(pool, size)
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        # the first unit has no estimate: past the deadline its fit stops early (max_seconds), so its memory and
        # speed are still recorded (objects/minute then extrapolated to the full steps, marked as such)
        cap = max(1.0, args.deadline - (time.perf_counter() - t_start)) if args.deadline else 0.0
        try:
            res, s = timed_fit(objs, replace(cfg, batch_objects=size, max_seconds=cap), args.device)
        except torch.OutOfMemoryError as e:  # a batch too large is a result too
            rows.append({"batch": size, **tag, "error": f"out of memory: {e}"[:300]})
            print(f"(e) batch {size}: out of GPU memory", flush=True)
            continue
        done = int(res[0].metrics["steps"])
        per = [{"id": o.id, "psnr": r.metrics["psnr"], "ssim": r.metrics["ssim"], "n_gaussians": r.metrics["n_gaussians"]}
               for o, r in zip(objs, res)]
        if done < cfg.steps:
            rows.append({"batch": size, **tag, "stopped_early": f"{done} of {cfg.steps} steps in {s:.0f} s (--deadline)",
                         "objects_per_minute_extrapolated": 60.0 * size * done / (s * cfg.steps),
                         "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
                         "objects_partial_fit": per})
            print(f"(e) batch {size}: stopped at step {done} of {cfg.steps} after {s:.0f} s; ~"
                  f"{rows[-1]['objects_per_minute_extrapolated']:.1f} objects/min extrapolated, peak memory "
                  f"{rows[-1]['peak_memory_gib']} GiB", flush=True)
            write_record(Path(args.json) if args.json else None, report)
            break
        last = (size, s)
        row = {"batch": size, **tag, "distinct_objects": min(size, len(pool)), "steps": cfg.steps, "seconds": s,
               "objects_per_minute": 60.0 * size / s,
               "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
               "psnr_mean": float(np.mean([p["psnr"] for p in per])), "psnr_min": float(np.min([p["psnr"] for p in per])),
               "n_gaussians_mean": float(np.mean([p["n_gaussians"] for p in per])),
               "n_gaussians_max": int(np.max([p["n_gaussians"] for p in per])), "objects": per}
        rows.append(row)
        if args.save_plys and not report.get("saved_plys"):  # fitted objects for the atlas benchmark
            from gaussian_atlas.gaussians import write_ply

            out = Path(args.save_plys)
            out.mkdir(parents=True, exist_ok=True)
            distinct = [(o, r) for o, r in zip(objs, res) if "#" not in o.id]  # meshes first, then procedural
            picked = distinct[::max(1, len(distinct) // max(1, args.save_plys_max))][:args.save_plys_max]
            report["saved_plys"] = [str(write_ply(out / f"{o.id}.ply", r.gaussians)) for o, r in picked]
            print(f"(e) saved {len(picked)} fitted objects to {out} (batch {size})", flush=True)
        mem = f"{row['peak_memory_gib']:.1f} GiB peak" if row["peak_memory_gib"] is not None else "CPU"
        print(f"(e) batch {size:4d}{' ' + variant if variant else ''}: {row['objects_per_minute']:.1f} objects/min "
              f"(target >= 50), {s:.0f} s, {mem}, "
              f"PSNR mean {row['psnr_mean']:.2f} min {row['psnr_min']:.2f} dB, Gaussians mean "
              f"{row['n_gaussians_mean']:.0f} max {row['n_gaussians_max']} <= {cfg.tau}", flush=True)
        write_record(Path(args.json) if args.json else None, report)


def _ci(ci: list[float] | None) -> str:
    return f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "n/a"


def parse_variants(text: str) -> list[tuple[str, dict]]:
    """``"a:k=v,k=v;b:k=v"`` -> ``[("a", {...}), ("b", {...})]``; empty text: one arm without a name or changes."""
    out = []
    for part in (p.strip() for p in text.split(";")):
        if part:
            name, sep, rest = part.partition(":")
            if not sep or not name.strip():
                raise SystemExit(f"--variants item {part!r}: expected name:key=value,...")
            out.append((name.strip(), parse_overrides(rest)))
    return out or [("", {})]


def compare_to_reference(report: dict) -> None:
    """Per object and batch size: our held-out PSNR minus the reference's (target >= -0.3 dB); copies of an
    object (``id#k``) compare with the object's reference fit."""
    ref = {r["id"]: r for r in report.get("reference", {}).get("rows", [])} \
        if isinstance(report.get("reference"), dict) else {}
    out = []
    for row in report.get("batches", []):
        if "objects" not in row:
            continue
        diffs = {}
        for p in row["objects"]:
            base = p["id"].split("#")[0]
            if base in ref:
                p["psnr_minus_reference"] = p["psnr"] - ref[base]["psnr"]
                diffs.setdefault(base, []).append(p["psnr_minus_reference"])
        if not diffs:
            continue
        per = {b: float(np.mean(d)) for b, d in diffs.items()}
        d = np.array(list(per.values()))
        row["psnr_minus_reference_per_object"] = per  # each object's copies averaged
        row["psnr_minus_reference_mean"] = float(d.mean())
        row["psnr_minus_reference_min"] = float(d.min())
        row["objects_at_or_above_target"] = int((d >= -0.3).sum())
        if len(d) > 1:  # 95 % CI of the mean over the objects (t, n - 1 degrees of freedom)
            from scipy import stats

            h = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
            row["psnr_minus_reference_ci95"] = [float(d.mean()) - h, float(d.mean()) + h]
        row["meets_psnr_target"] = row["psnr_minus_reference_min"] >= -0.3
        row["meets_speed_target"] = row["objects_per_minute"] >= 50
        out.append(row)
        print(f"(e) batch {row['batch']:4d}{' ' + row['variant'] if row.get('variant') else ''} vs reference: "
              f"{row['objects_per_minute']:.1f} objects/min "
              f"(reference {60.0 / np.mean([r['seconds'] for r in ref.values()]):.2f} per process); PSNR difference "
              f"mean {row['psnr_minus_reference_mean']:+.2f} (95 % CI {_ci(row.get('psnr_minus_reference_ci95'))}), worst "
              f"{row['psnr_minus_reference_min']:+.2f} dB, {row['objects_at_or_above_target']} of {len(d)} objects "
              f">= -0.30 dB", flush=True)
        for b, d in per.items():
            print(f"(e)   {b:24s} ours {ref[b]['psnr'] + d:.2f} dB vs reference {ref[b]['psnr']:.2f} dB: {d:+.2f} dB"
                  f"{'' if d >= -0.3 else '  BELOW target'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--tau", type=int, default=36_864)
    ap.add_argument("--small-tau", type=int, default=8192, help="a second, tighter bound for (a)")
    ap.add_argument("--quality-objects", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--single-objects", type=int, default=4, help="objects timed one at a time in (b)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--skip-quality", action="store_true", help="only run (b)")
    ap.add_argument("--skip-throughput", action="store_true", help="skip (b)")
    ap.add_argument("--histogram-objects", type=int, default=0,
                    help="(c) paper check: fit this many objects (packed) and record Gaussians per fit")
    ap.add_argument("--methods", default="", help="(d) compare fitters, e.g. plain,anchors")
    ap.add_argument("--budget", type=float, default=30.0, help="(d) wall-clock seconds per object and method")
    ap.add_argument("--compare-objects", type=int, default=4, help="(d) procedural objects compared")
    ap.add_argument("--meshes", default=None, help="(d) also compare on the render folders under this folder")
    ap.add_argument("--make-meshes", default=None,
                    help="(d) first build 6 demo meshes (2 UV-textured) and render them with `gatlas render-mesh` into this folder")
    ap.add_argument("--mesh-resolution", type=int, default=256, help="render side of --make-meshes")
    ap.add_argument("--mesh-views", type=int, default=24, help="views per mesh of --make-meshes")
    ap.add_argument("--init-points", type=int, default=4096)
    ap.add_argument("--views-per-step", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--reference", action="store_true", help="(r) the plain gsplat reference (simple_trainer's way)")
    ap.add_argument("--reference-steps", type=int, default=7000, help="(r) steps (1 view each)")
    ap.add_argument("--reference-objects", type=int, default=4, help="(r) procedural objects (the first ones)")
    ap.add_argument("--reference-meshes", type=int, default=4, help="(r) meshes of --meshes (the first ones)")
    ap.add_argument("--reference-procs", type=int, default=1, help="(r) processes side by side")
    ap.add_argument("--reference-on-cpu", action="store_true",
                    help="(r) without CUDA: run the loop through our torch renderer (a smoke test)")
    ap.add_argument("--reference-worker", default=None, help=argparse.SUPPRESS)  # "k/n": shard k of n, then exit
    ap.add_argument("--save-plys", default="", help="(e) write the first completed batch's first fitted objects "
                    "(PLY) here, e.g. for bench_atlas --ply-dir")
    ap.add_argument("--save-plys-max", type=int, default=4, help="(e) how many objects --save-plys writes")
    ap.add_argument("--batches", default="", help="(e) packed batch sizes to time, e.g. 32,64,128")
    ap.add_argument("--variants", default="",
                    help="(e) settings arms, each timed at every --batches size: 'name:key=value,key=value;name2:...' "
                         "(dotted FitConfig keys, e.g. 'refine50:densify.refine_every=50'; 'base:' = no change)")
    ap.add_argument("--reference-json", default=None,
                    help="(r) take the reference rows from this earlier bench_fit record (same renders) instead of "
                         "fitting them again; its path and commit are recorded")
    ap.add_argument("--throughput-objects", type=int, default=32, help="(e) procedural objects (+ all meshes)")
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="skip a unit estimated to end later than this many seconds after the start (0: none)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    cfg = FitConfig(steps=args.steps, tau=args.tau, init_points=args.init_points, views_per_step=args.views_per_step,
                    resolution=args.resolution,
                    densify=DensifyConfig(refine_start_iter=100, refine_stop_iter=int(args.steps * 0.8),
                                          refine_every=100), lr_means_final=1.6e-6,
                    anchors=AnchorConfig(refine_start_iter=100, refine_stop_iter=int(args.steps * 0.8),
                                         refine_every=100))
    report: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else
                    f"cpu ({torch.get_num_threads()} threads)",
                    "steps": args.steps, "resolution": args.resolution, "torch": torch.__version__}
    json_path = Path(args.json) if args.json else None
    meshes = load_inputs(Path(args.meshes), 10**6) if args.meshes and (args.reference or args.batches) else []
    ref_set = [("procedural", o) for o in load_inputs(Path(args.data), args.reference_objects)] + \
        [("mesh", o) for o in meshes[:args.reference_meshes]] if args.reference else []
    reference_ok = args.device == "cuda" or args.reference_on_cpu
    if args.reference_worker:  # one shard of (r), written for the parent process
        k, n = (int(x) for x in args.reference_worker.split("/"))
        rows = [{"set": sn, **reference_fit(o, cfg, args.reference_steps, args.device)} for sn, o in ref_set[k::n]]
        for r in rows:
            print("(r) " + json.dumps(r), flush=True)
        write_record(json_path, {"reference_rows": rows})
        return

    objs = load_inputs(Path(args.data), max(args.batch, args.quality_objects, args.single_objects,
                                            args.histogram_objects, args.compare_objects if args.methods else 0,
                                            args.throughput_objects if args.batches else 0))
    print(f"{len(objs)} objects, {objs[0].rgb.shape[0]} views, {len(meshes)} meshes, device {report['device']}",
          flush=True)
    fit_objects(objs[:1], replace(cfg, steps=20), device=args.device)  # warm-up (gsplat JIT, allocator)

    # (e) our packed fitter at each batch size, then (r) the plain gsplat reference, then the comparison
    if args.batches:
        report["render_check"] = check_per_object_render(meshes + objs, cfg, args.device)
        for name, over in parse_variants(args.variants):  # meshes in every batch
            report.setdefault("variants", {})[name or "-"] = over
            throughput_batches(args, meshes + objs[:args.throughput_objects], with_overrides(cfg, over), report,
                               t_start, variant=name, overrides=over)
    if args.reference_json:
        earlier = json.loads(Path(args.reference_json).read_text())
        if not isinstance(earlier.get("reference"), dict) or not earlier["reference"].get("rows"):
            raise SystemExit(f"--reference-json {args.reference_json}: no reference rows in that record")
        report["reference"] = {**earlier["reference"], "source": {"path": str(args.reference_json),
                                                                  "commit": earlier.get("commit")}}
        print(f"(r) reference: {len(report['reference']['rows'])} rows from {args.reference_json} "
              f"(commit {earlier.get('commit')})", flush=True)
    elif args.reference and not reference_ok:
        report["reference"] = {"skipped": "needs gsplat's CUDA rasterizer and this run has no CUDA device "
                                          "(--reference-on-cpu runs the loop through the torch renderer as a smoke test)"}
        print(f"(r) reference skipped: {report['reference']['skipped']}", flush=True)
    elif args.reference:
        report["reference"] = run_reference(args, ref_set, cfg)
    compare_to_reference(report)
    report["seconds_total"] = time.perf_counter() - t_start
    write_record(json_path, report)

    # (a) quality: bounded vs unbounded, one object at a time
    rows = []
    for o in ([] if args.skip_quality else objs[:args.quality_objects]):
        for name, tau in (("unbounded", 10**9), ("bounded", args.tau), ("bounded_small", args.small_tau)):
            (r,), s = timed_fit([o], replace(cfg, tau=tau), args.device)
            rows.append({"id": o.id, "method": name, "tau": tau, "psnr": r.metrics["psnr"], "ssim": r.metrics["ssim"],
                         "n_gaussians": r.metrics["n_gaussians"], "seconds": s})
            print(json.dumps(rows[-1]), flush=True)
    report["quality"] = rows
    for name, tau in (() if args.skip_quality else (("bounded", args.tau), ("bounded_small", args.small_tau))):
        ours = [r for r in rows if r["method"] == name]
        base = [r for r in rows if r["method"] == "unbounded"]
        gap = float(np.mean([b["psnr"] - a["psnr"] for a, b in zip(ours, base)]))
        print(f"(a) {name} tau={tau}: mean PSNR {np.mean([r['psnr'] for r in ours]):.2f} dB vs unbounded "
              f"{np.mean([r['psnr'] for r in base]):.2f} dB (gap {gap:+.2f} dB); Gaussians {np.mean([r['n_gaussians'] for r in ours]):.0f} "
              f"vs {np.mean([r['n_gaussians'] for r in base]):.0f}; max {max(r['n_gaussians'] for r in ours)} <= {tau}",
              flush=True)
        report[f"gap_{name}"] = gap

    # (d) fitters: plain vs anchors, same tau, same wall-clock budget per object
    methods = [m for m in args.methods.split(",") if m]
    if methods:
        sets = {"procedural": objs[:args.compare_objects]}
        if args.make_meshes:
            render_meshes(Path(args.make_meshes), args.mesh_resolution, args.mesh_views)
        if args.meshes:
            sets["mesh"] = load_inputs(Path(args.meshes), 10**6)
        rows_d, summary = compare_methods(sets, cfg, methods, args.budget, args.device)
        report["methods"] = {"rows": rows_d, "summary": summary, "budget_s": args.budget, "tau": args.tau}

    # (c) paper check (Fig. 2d): Gaussians per fit, simple vs composite objects
    if args.histogram_objects:
        hist = []
        for start in range(0, args.histogram_objects, args.batch):
            part = objs[start:min(start + args.batch, args.histogram_objects)]
            res, _ = timed_fit(part, cfg, args.device)
            for o, r in zip(part, res):
                caption = json.loads((Path(args.data) / "objects" / o.id / "object.json").read_text())["caption"]
                hist.append({"id": o.id, "caption": caption, "n_gaussians": r.metrics["n_gaussians"],
                             "psnr": round(r.metrics["psnr"], 2), "composite": " on top of " in caption})
        report["histogram"] = hist
        for kind in (False, True):
            n = [h["n_gaussians"] for h in hist if h["composite"] == kind]
            if n:
                print(f"(c) {'composite' if kind else 'single'} objects: {len(n)}, Gaussians per fit mean "
                      f"{np.mean(n):.0f}, median {np.median(n):.0f}, range {min(n)}-{max(n)}", flush=True)
    if args.skip_throughput:
        report["seconds_total"] = time.perf_counter() - t_start
        write_record(json_path, report)
        return

    # (b) throughput: packed batch vs one at a time
    batch_objs = objs[:args.batch]
    res_b, s_b = timed_fit(batch_objs, cfg, args.device)
    single = []
    for o in objs[:args.single_objects]:
        (r,), s = timed_fit([o], cfg, args.device)
        single.append((r, s))
    s_single = float(np.mean([s for _, s in single]))
    opm_batch = 60.0 * len(batch_objs) / s_b
    opm_single = 60.0 / s_single
    report["throughput"] = {
        "batch": len(batch_objs), "batch_seconds": s_b, "objects_per_minute_batched": opm_batch,
        "objects_per_minute_single": opm_single, "ratio": opm_batch / opm_single,
        "psnr_batched": [round(r.metrics["psnr"], 2) for r in res_b],
        "psnr_single": [round(r.metrics["psnr"], 2) for r, _ in single],
        "psnr_batched_mean": float(np.mean([r.metrics["psnr"] for r in res_b])),
        "psnr_batched_min": float(np.min([r.metrics["psnr"] for r in res_b])),
        "psnr_single_mean": float(np.mean([r.metrics["psnr"] for r, _ in single])),
        "n_gaussians_batched_mean": float(np.mean([r.metrics["n_gaussians"] for r in res_b])),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
    }
    t = report["throughput"]
    print(f"(b) packed batch of {t['batch']}: {opm_batch:.1f} objects/GPU-minute (held-out PSNR mean "
          f"{t['psnr_batched_mean']:.2f}, min {t['psnr_batched_min']:.2f} dB) vs one at a time {opm_single:.1f} "
          f"objects/minute (PSNR {t['psnr_single_mean']:.2f} dB): ratio {t['ratio']:.1f}x", flush=True)
    report["seconds_total"] = time.perf_counter() - t_start
    write_record(json_path, report)


if __name__ == "__main__":
    main()
