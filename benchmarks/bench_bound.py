"""The bounding-rule ablation of issue #14 (paper Sec. 3): which Gaussians go first at the bound tau.

    python benchmarks/bench_bound.py --data W/proc256 --meshes W/meshes256 --make-data --json OUT.json

Arms (one :func:`gaussian_atlas.fit.fit_objects` call per arm, every object packed into one batch, the
same objects, steps, schedule and seed):

- ``plain/visibility`` — the paper's rule (Σ α·T over training views; ``fit.bound_rank: visibility``);
- ``plain/opacity``    — lowest opacity removed first (``fit.bound_rank: opacity``);
- ``plain/random``     — a random choice (``fit.bound_rank: random``);
- ``anchors/rank-average`` — the paper's anchor fitter with its rank-averaged bound (``fit.method: anchors``);
- ``plain/unbounded``  — the same plain fit with tau = 10⁹ (the reference every bound is measured against),
- (only when named in ``--arms``) ``plain/visibility-all`` — the paper's rule measured over every training view,

each bounded arm at every ``--taus`` value. Metric: held-out PSNR / SSIM (every 8th view, never trained
on), Gaussians per object and seconds of the arm's batch (divided by its objects). Means with 95 %
bootstrap intervals over objects, per set (procedural, mesh), and each rule's *paired* difference
against ``plain/visibility`` at the same tau (bootstrap over objects) — all printed as markdown and
written to ``--json`` with every per-object row.

``--make-data`` first renders ``--objects`` procedural objects (``gatlas procedural``'s generator) and
the 6 meshes of ``bench_fit.render_meshes`` (4 vertex-coloured, 2 UV-textured, through
``gatlas render-mesh``) at ``--resolution``; both are skipped when present. ``--arms`` picks a subset
(e.g. to run the arms in parallel processes; ``--merge`` joins their JSON files afterwards).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _prebuilt import use_prebuilt_gsplat  # noqa: E402

use_prebuilt_gsplat()

from gaussian_atlas.fit import AnchorConfig, DensifyConfig, FitConfig, fit_objects  # noqa: E402

UNBOUNDED = 10**9
RULES = ("visibility", "opacity", "random")
REFERENCE = "plain/visibility"


def arm_names(taus: list[int]) -> list[str]:
    """Every arm as ``<fitter>/<rule>@<tau>``, the reference first."""
    return ([f"plain/unbounded@{UNBOUNDED}"] + [f"plain/{r}@{t}" for t in taus for r in RULES]
            + [f"anchors/rank-average@{t}" for t in taus])


def extra_arms(taus: list[int]) -> list[str]:
    """Arms outside the registered design, run only when named in ``--arms``: ``plain/visibility-all`` measures
    Σ α·T over *every* training view at each bound event (``fit.measure_views`` = all) instead of 8 sampled ones."""
    return [f"plain/visibility-all@{t}" for t in taus]


def arm_config(arm: str, base: FitConfig) -> FitConfig:
    fitter, rest = arm.split("/", 1)
    rule, tau = rest.split("@")
    if fitter == "anchors":
        return replace(base, method="anchors", tau=int(tau))
    if rule == "visibility-all":  # views are sampled without replacement, min(n, training views)
        return replace(base, method="plain", tau=int(tau), bound_rank="visibility", measure_views=10**6)
    return replace(base, method="plain", tau=int(tau), bound_rank="visibility" if rule == "unbounded" else rule)


def base_config(args) -> FitConfig:
    stop = int(0.8 * args.steps)
    return FitConfig(steps=args.steps, init_points=args.init_points, views_per_step=args.views_per_step,
                     resolution=args.resolution, lr_means_final=1.6e-6, batch_objects=10**6, seed=args.seed,
                     densify=DensifyConfig(refine_start_iter=100, refine_stop_iter=stop, refine_every=100),
                     anchors=AnchorConfig(refine_start_iter=100, refine_stop_iter=stop, refine_every=100))


def make_data(args) -> None:
    from bench_fit import render_meshes

    from gaussian_atlas.cameras import ViewConfig
    from gaussian_atlas.meshrender import RenderConfig
    from gaussian_atlas.procedural import ProceduralConfig, generate_dataset

    t = time.perf_counter()
    views = ViewConfig(n_views=args.views, n_ring=min(16, args.views), resolution=args.resolution)
    pcfg = ProceduralConfig(n_objects=args.objects, composition_fraction=0.25, seed=args.seed, workers=args.workers,
                            render=RenderConfig(views=views, supersample=2, n_surface_samples=4096))
    generate_dataset(pcfg, Path(args.data), progress=False)
    if args.meshes:
        render_meshes(Path(args.meshes), args.resolution, args.views)
    print(f"data: {args.objects} procedural objects + meshes in {time.perf_counter() - t:.0f} s", flush=True)


def load_sets(args) -> dict[str, list]:
    from bench_fit import load_inputs

    sets = {"procedural": load_inputs(Path(args.data), args.objects)}
    if args.meshes:
        sets["mesh"] = load_inputs(Path(args.meshes), 10**6)
    return sets


def run_arms(sets: dict[str, list], arms: list[str], base: FitConfig, device: str) -> list[dict]:
    objs = [o for s in sets.values() for o in s]
    kind = {o.id: name for name, s in sets.items() for o in s}
    rows = []
    for arm in arms:
        cfg = arm_config(arm, base)
        torch.cuda.synchronize() if device == "cuda" else None
        t0 = time.perf_counter()
        res = fit_objects(objs, cfg, device=device)
        torch.cuda.synchronize() if device == "cuda" else None
        sec = time.perf_counter() - t0
        for o, r in zip(objs, res):
            rows.append({"arm": arm.split("@")[0], "tau": cfg.tau, "set": kind[o.id], "id": o.id,
                         "psnr": float(r.metrics["psnr"]), "ssim": float(r.metrics["ssim"]),
                         "n_gaussians": int(r.metrics["n_gaussians"]), "batch_seconds": sec,
                         "seconds_per_object": sec / len(objs), "steps": int(r.metrics.get("steps", cfg.steps))})
        mean = np.mean([r["psnr"] for r in rows[-len(objs):]])
        print(f"{arm}: {len(objs)} objects in {sec:.1f} s, held-out PSNR mean {mean:.2f} dB, max Gaussians "
              f"{max(r['n_gaussians'] for r in rows[-len(objs):])}", flush=True)
    return rows


def bootstrap(values: np.ndarray) -> list[float]:
    """95 % percentile interval of the mean over objects (one value each: the evaluate stage's bootstrap with
    every object its own group)."""
    from gaussian_atlas.evaluate import bootstrap_ci

    ci = bootstrap_ci(values, range(len(values)), n_boot=4000) if len(values) > 1 else None
    return list(ci) if ci else [float("nan"), float("nan")]


def summarize(rows: list[dict]) -> dict:
    """Per (set, arm, tau): means with 95 % CIs; paired differences against ``plain/visibility`` at the
    same tau and against ``plain/unbounded`` (same objects)."""
    out: dict = {}
    sets = sorted({r["set"] for r in rows}) + ["all"]
    order = [a.split("@")[0] for a in arm_names([])] + [f"plain/{r}" for r in RULES] + ["plain/visibility-all",
                                                                                          "anchors/rank-average"]
    keys = sorted({(r["arm"], r["tau"]) for r in rows}, key=lambda k: (k[1] < UNBOUNDED, k[1], order.index(k[0])))
    for s in sets:
        sel = [r for r in rows if s == "all" or r["set"] == s]
        by = {k: {r["id"]: r for r in sel if (r["arm"], r["tau"]) == k} for k in keys}
        unb = next((v for (a, _), v in by.items() if a == "plain/unbounded"), {})
        for (arm, tau), objs in by.items():
            if not objs:
                continue
            ids = sorted(objs)
            e: dict = {"n": len(ids)}
            for m in ("psnr", "ssim", "n_gaussians", "seconds_per_object"):
                v = np.array([objs[i][m] for i in ids], float)
                e[m] = {"mean": float(v.mean()), "ci95": bootstrap(v)}
            for ref_name, ref in (("vs_visibility", by.get((REFERENCE, tau), {})), ("vs_unbounded", unb)):
                common = [i for i in ids if i in ref]
                if ref is objs or not common:
                    continue
                for m in ("psnr", "ssim"):
                    d = np.array([objs[i][m] - ref[i][m] for i in common], float)
                    e[f"{m}_{ref_name}"] = {"mean": float(d.mean()), "ci95": bootstrap(d), "n": len(common)}
            out[f"{s}|{arm}|{tau}"] = e
    return out


def table(summary: dict) -> str:
    def f(b, nd=2):
        return "–" if not b else f"{b['mean']:.{nd}f} [{b['ci95'][0]:.{nd}f}, {b['ci95'][1]:.{nd}f}]"

    lines = ["| set | arm | τ | objects | held-out PSNR (dB) | − visibility (dB) | − unbounded (dB) | SSIM | "
             "Gaussians | s / object |", "|---|---|---:|---:|---|---|---|---|---:|---:|"]
    for key, e in summary.items():
        s, arm, tau = key.split("|")
        tau_s = "∞" if int(tau) >= UNBOUNDED else f"{int(tau):,}"
        lines.append(f"| {s} | {arm} | {tau_s} | {e['n']} | {f(e['psnr'])} | {f(e.get('psnr_vs_visibility'))} | "
                     f"{f(e.get('psnr_vs_unbounded'))} | {f(e['ssim'], 4)} | {e['n_gaussians']['mean']:,.0f} | "
                     f"{e['seconds_per_object']['mean']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="procedural render folder (made by --make-data when missing)")
    ap.add_argument("--meshes", default=None, help="mesh render folder (made by --make-data when missing)")
    ap.add_argument("--make-data", action="store_true", help="render the procedural objects and the meshes first")
    ap.add_argument("--only-data", action="store_true", help="with --make-data: render, then stop (no fits)")
    ap.add_argument("--objects", type=int, default=16, help="procedural objects")
    ap.add_argument("--views", type=int, default=32, help="views per object (every 8th held out)")
    ap.add_argument("--workers", type=int, default=8, help="render processes of --make-data")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1500, help="fit steps (the paper-scale key of docs/benchmarks.md)")
    ap.add_argument("--views-per-step", type=int, default=4)
    ap.add_argument("--init-points", type=int, default=4096)
    ap.add_argument("--taus", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--arms", default="", help="comma-separated subset of the arm names (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="write the rows, the summary and the run's settings here")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="instead of fitting: join the rows of these --json files and summarise them")
    ap.add_argument("--table", default=None, help="also write the markdown table here")
    args = ap.parse_args()

    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        rows = [r for p in parts for r in p["rows"]]
        report = {k: v for k, v in parts[0].items() if k not in ("rows", "summary", "arms")}
        report["arms"] = [a for p in parts for a in p["arms"]]
        report["parts"] = [{"file": str(p), "arms": q["arms"], "seconds": q.get("seconds")} for p, q in zip(args.merge, parts)]
    else:
        if not args.data:
            ap.error("--data is required unless --merge")
        if args.make_data:
            make_data(args)
            if args.only_data:
                return
        sets = load_sets(args)
        every = arm_names(args.taus)
        arms = [a for a in args.arms.split(",") if a] or every
        unknown = sorted(set(arms) - set(every) - set(extra_arms(args.taus)))
        if unknown:
            ap.error(f"unknown arms {unknown}; choose from {every + extra_arms(args.taus)}")
        base = base_config(args)
        print(f"{sum(map(len, sets.values()))} objects ({', '.join(f'{k}: {len(v)}' for k, v in sets.items())}), "
              f"arms {arms}, device {args.device}", flush=True)
        t = time.perf_counter()
        rows = run_arms(sets, arms, base, args.device)
        report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                  "torch": torch.__version__, "cuda": torch.version.cuda, "command": " ".join(sys.argv),
                  "config": asdict(base), "arms": arms, "seconds": time.perf_counter() - t,
                  "objects": {k: [o.id for o in v] for k, v in sets.items()}}
    report["rows"] = rows
    report["summary"] = summarize(rows)
    md = table(report["summary"])
    print(md)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.table:
        Path(args.table).write_text(md)


if __name__ == "__main__":
    main()
