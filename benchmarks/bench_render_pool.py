"""Procedural render workers with and without one BLAS thread each (``procedural.render_worker_init``), same run.

    python benchmarks/bench_render_pool.py --json docs/bench/render_pool_cpu.json      # 2 workers, 8 objects, 256²
    python benchmarks/bench_render_pool.py --workers 12 --objects 48 --json render_pool_gpu_host.json

The arms render the same ``--objects`` procedural objects (``--resolution`` px, ``--views`` views, the generate
stage's other render settings from params.yaml) in a spawn pool of ``--workers`` processes, each into its own
empty folder, alternating arms for ``--repeats`` rounds: ``default`` (no initializer: each worker's numpy keeps
its OpenBLAS thread pool, one thread per core) and ``limited`` (``render_worker_init``: one thread per worker
via threadpoolctl). Reported per arm: wall seconds of the pool (median over rounds), summed worker seconds per
object, objects per minute; ``speedup`` = default wall / limited wall. The images are identical between arms
(checked on the first object's first view).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write_record  # noqa: E402


def _timed_render(spec: dict, out_dir: str, render_cfg) -> float:
    from gaussian_atlas.procedural import _render_one

    t = time.perf_counter()
    _render_one(spec, out_dir, render_cfg)
    return time.perf_counter() - t


def run_arm(specs: list[dict], render_cfg, workers: int, limited: bool, out: Path) -> dict:
    import multiprocessing as mp

    from gaussian_atlas.procedural import render_worker_init

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                             initializer=render_worker_init if limited else None) as pool:
        list(pool.map(int, range(workers)))  # start every worker before the clock (spawn + imports are not renders)
        t = time.perf_counter()
        per = list(pool.map(_timed_render, specs, [str(out / s["id"]) for s in specs], [render_cfg] * len(specs)))
        wall = time.perf_counter() - t
    return {"wall_s": wall, "worker_s_per_object": sum(per) / len(per), "objects_per_min": 60.0 * len(specs) / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--objects", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--views", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of both arms (alternating)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import imageio.v3 as iio
    import numpy as np

    from gaussian_atlas.meshrender import RenderConfig
    from gaussian_atlas.procedural import HoldoutConfig, ProceduralConfig, object_specs
    from stages.common import load_params

    gen = load_params(None, args.params)["generate"]
    render = dict(gen["render"])
    views = {**render.pop("views"), "n_views": args.views, "resolution": args.resolution}
    views["n_ring"] = min(int(views["n_ring"]), args.views)
    render_cfg = RenderConfig(**render, views=views)
    specs = object_specs(ProceduralConfig(n_objects=args.objects, composition_fraction=float(gen["composition_fraction"]),
                                          seed=int(gen["seed"]), render=render_cfg, workers=0, holdout=HoldoutConfig()))
    tmp = Path(tempfile.mkdtemp(prefix="render_pool_"))
    rounds: dict[str, list[dict]] = {"default": [], "limited": []}
    try:
        for r in range(args.repeats):
            for arm in ("default", "limited"):
                rounds[arm].append(run_arm(specs, render_cfg, args.workers, arm == "limited", tmp / arm))
                print(f"round {r + 1} {arm:8s}: {rounds[arm][-1]['wall_s']:6.1f} s, "
                      f"{rounds[arm][-1]['worker_s_per_object']:.2f} worker-s per object", flush=True)
        first = sorted((tmp / "default" / specs[0]["id"] / "images").iterdir())[0].name
        same = bool(np.array_equal(iio.imread(tmp / "default" / specs[0]["id"] / "images" / first),
                                   iio.imread(tmp / "limited" / specs[0]["id"] / "images" / first)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"benchmark": "bench_render_pool", "workers": args.workers, "objects": args.objects,
           "resolution": args.resolution, "views": args.views, "repeats": args.repeats, "images_identical": same}
    for arm, rows in rounds.items():
        res[arm] = {"wall_s": statistics.median(x["wall_s"] for x in rows),
                    "worker_s_per_object": statistics.median(x["worker_s_per_object"] for x in rows),
                    "objects_per_min": statistics.median(x["objects_per_min"] for x in rows), "rounds": rows}
    res["speedup"] = res["default"]["wall_s"] / res["limited"]["wall_s"]
    print(f"{args.workers} workers, {args.objects} objects at {args.resolution}² x {args.views} views: default "
          f"{res['default']['objects_per_min']:.1f} objects/min, one thread per worker "
          f"{res['limited']['objects_per_min']:.1f} objects/min -> {res['speedup']:.2f}x (images identical: {same})")
    write_record(args.json, res)


if __name__ == "__main__":
    main()
