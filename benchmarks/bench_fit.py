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

use_prebuilt_gsplat()

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
    args = ap.parse_args()

    cfg = FitConfig(steps=args.steps, tau=args.tau, init_points=4096, views_per_step=4, resolution=args.resolution,
                    densify=DensifyConfig(refine_start_iter=100, refine_stop_iter=int(args.steps * 0.8),
                                          refine_every=100), lr_means_final=1.6e-6)
    report: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "steps": args.steps, "resolution": args.resolution, "torch": torch.__version__}
    objs = load_inputs(Path(args.data), max(args.batch, args.quality_objects, args.single_objects,
                                            args.histogram_objects))
    print(f"{len(objs)} objects, {objs[0].rgb.shape[0]} views, device {report['device']}", flush=True)
    fit_objects(objs[:1], replace(cfg, steps=20), device=args.device)  # warm-up (gsplat JIT, allocator)

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
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
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
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
