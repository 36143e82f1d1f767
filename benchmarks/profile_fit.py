"""Where a packed fitting step spends its time: the per-object layout (each object drawn into its own views,
memory linear in the batch) against the flat set drawn into every view (the pre-#19 path), same batch, same
objects; torch.profiler over a few steps of each (host and GPU time by op).

    python benchmarks/profile_fit.py --objects 8 --batch 32 --resolution 256 --views 32 --json OUT.json   # GPU
    python benchmarks/profile_fit.py --objects 32 --batch 128 --steps 300 --profile-from 200 --paths per-object
        # GPU: steps 200-300 of a 1,500-step fit's schedule (densifying every 100 steps from step 50)
    python benchmarks/profile_fit.py --objects 2 --batch 4 --resolution 32 --views 8 --steps 6 --device cpu  # smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _prebuilt import use_prebuilt_gsplat  # noqa: E402
from _record import write_record  # noqa: E402

use_prebuilt_gsplat()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/w/pf")
    ap.add_argument("--objects", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--views", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="fit steps per path")
    ap.add_argument("--profile-from", type=int, default=0, help="profile (and time) the steps from this one on")
    ap.add_argument("--schedule-steps", type=int, default=1500,
                    help="refine on the schedule of a fit of this many steps (bench_fit.scheduled), whatever --steps")
    ap.add_argument("--paths", default="per-object,flat", help="comma-separated: per-object, flat")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    import bench_fit
    from gaussian_atlas.cameras import ViewConfig
    from gaussian_atlas.fit import FitConfig, fit_objects
    from gaussian_atlas.fit import plain as plain_mod
    from gaussian_atlas.meshrender import RenderConfig
    from gaussian_atlas.procedural import ProceduralConfig, generate_dataset

    t = time.perf_counter()
    views = ViewConfig(n_views=args.views, n_ring=min(16, args.views), resolution=args.resolution)
    generate_dataset(ProceduralConfig(n_objects=args.objects, composition_fraction=0.25, seed=0, workers=args.workers,
                                      render=RenderConfig(views=views, supersample=2, n_surface_samples=4096)),
                     Path(args.data), progress=False)
    pool = bench_fit.load_inputs(Path(args.data), args.objects)
    objs = bench_fit.fill_batch(pool, args.batch)
    print(f"data: {len(pool)} objects in {time.perf_counter() - t:.0f} s; batch {args.batch}", flush=True)
    res = {"batch": args.batch, "resolution": args.resolution, "steps": args.steps, "paths": {}}
    cfg = replace(bench_fit.scheduled(FitConfig(views_per_step=4, tau=36864, batch_objects=args.batch, seed=0),
                                      args.schedule_steps), steps=args.steps)
    res["schedule_steps"], res["profile_from"] = args.schedule_steps, args.profile_from
    orig = plain_mod.PlainFit.layout
    for path in [p for p in args.paths.split(",") if p]:
        if path == "flat":
            plain_mod.PlainFit.layout = lambda self: None  # the flat set drawn into every view
        fit_objects(objs, replace(cfg, steps=3), device=args.device)  # warm-up
        stamps: list[float] = []

        active = max(1, args.steps - args.profile_from - 1)
        counts: list[int] = []

        def on_step(step, m, stamps=stamps, counts=counts):
            if args.device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            counts.append(int(m.get("n_gaussians", 0)))
            prof.step()

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sched = torch.profiler.schedule(wait=args.profile_from, warmup=1, active=active, repeat=1)
        with profile(activities=acts, schedule=sched) as prof:
            fit_objects(objs, cfg, device=args.device, on_step=on_step)
        plain_mod.PlainFit.layout = orig
        gaps = [b - a for a, b in zip(stamps, stamps[1:])][args.profile_from + 1:] or [float("nan")]
        r = res["paths"][path] = {"ms_per_step": 1e3 * sorted(gaps)[len(gaps) // 2], "profiled_steps": active,
                                  "gaussians_at_end": counts[-1] if counts else None,
                                  "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30
                                  if args.device == "cuda" else None}
        ka = prof.key_averages()
        cpu = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:15]
        r["top_self_cpu_ms_per_step"] = [{"op": e.key[:90], "ms": e.self_cpu_time_total / 1e3 / active,
                                          "calls_per_step": e.count / active} for e in cpu]
        if args.device == "cuda":
            gpu = sorted([e for e in ka if getattr(e, "self_device_time_total", 0) > 0],
                         key=lambda e: -e.self_device_time_total)[:15]
            r["top_gpu_ms_per_step"] = [{"op": e.key[:90], "ms": e.self_device_time_total / 1e3 / active,
                                         "calls_per_step": e.count / active} for e in gpu]
            r["gpu_ms_per_step"] = sum(e.self_device_time_total for e in ka) / 1e3 / active
        print(f"== {path}: {r['ms_per_step']:.1f} ms per step (batch {args.batch}; "
              f"{60e3 / r['ms_per_step'] * args.batch / 1500:.1f} objects/min at 1,500 steps), "
              f"GPU busy {r.get('gpu_ms_per_step', float('nan')):.1f} ms/step, peak {r['peak_memory_gib']} GiB", flush=True)
        for k in ("top_self_cpu_ms_per_step", "top_gpu_ms_per_step"):
            for e in r.get(k, [])[:10]:
                print(f"   {k[4:12]} {e['ms']:8.2f} ms  x{e['calls_per_step']:6.1f}  {e['op']}", flush=True)
        write_record(args.json, res)


if __name__ == "__main__":
    main()
