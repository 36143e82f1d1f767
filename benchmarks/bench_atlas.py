"""Benchmark of gaussian_atlas.assign (the atlas stage's assignment) -- see docs/benchmarks.md.

    PYTHONUNBUFFERED=1 python benchmarks/bench_atlas.py --n 16384 --batch 8 --device cuda

Inputs are made here without extra dependencies: "Gaussians" sampled on a torus shell plus
a cube's surface, normalised into the unit sphere, assigned to N Fibonacci-sphere points;
and the atlas' plane offsetting: N equirectangular-projected sphere points onto a
sqrt(N) x sqrt(N) grid.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def torus_cube(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 3]`` points: 5/8 in a thin shell of a torus, 3/8 on a cube's faces above it.

    Centred and scaled so the farthest point has norm 1 (the atlas' normalisation).
    """
    rng = np.random.default_rng(seed)
    n_t = n * 5 // 8
    n_c = n - n_t
    u, v = rng.uniform(0.0, 2.0 * np.pi, (2, n_t))
    big_r = 0.6
    rr = 0.2 * np.sqrt(rng.uniform(0.8, 1.0, n_t))  # radius within the shell
    torus = np.stack(
        [(big_r + rr * np.cos(v)) * np.cos(u), (big_r + rr * np.cos(v)) * np.sin(u), rr * np.sin(v)], -1
    )  # [n_t, 3]
    cube = rng.uniform(-0.25, 0.25, (n_c, 3))  # [n_c, 3]
    face_axis = rng.integers(0, 3, n_c)
    cube[np.arange(n_c), face_axis] = rng.choice([-0.25, 0.25], n_c)  # onto a face
    cube += np.array([0.0, 0.0, 0.55])
    pts = np.concatenate([torus, cube])[rng.permutation(n)]  # [n, 3]
    pts -= pts.mean(0)
    pts /= np.linalg.norm(pts, axis=1).max()
    return pts


def equirect_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Plane offsetting: Fibonacci points -> (lon, lat) in [0,1]^2 ``[n, 2]``, and the grid ``[n, 2]``."""
    from gaussian_atlas.assign import fibonacci_sphere

    s = fibonacci_sphere(n)
    lon = (np.arctan2(s[:, 1], s[:, 0]) + np.pi) / (2.0 * np.pi)
    lat = (np.arcsin(np.clip(s[:, 2], -1.0, 1.0)) + np.pi / 2) / np.pi
    side = int(round(math.sqrt(n)))
    assert side * side == n, "n must be a square for the grid problem"
    g = (np.arange(side) + 0.5) / side
    gu, gv = np.meshgrid(g, g, indexing="xy")
    grid = np.stack([gu.ravel(), gv.ravel()], -1)  # [n, 2]
    return np.stack([lon, lat], -1), grid


def _exact(method: str, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """(seconds, perm) of one exact CPU solve; runs in a child process."""
    from gaussian_atlas.assign import assign

    t = time.perf_counter()
    p = assign(x, y, method)
    return time.perf_counter() - t, p


def _timed(fn, sync, repeats: int = 1):
    """(median seconds, last result) of ``repeats`` calls."""
    times, out = [], None
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def main(argv: list[str] | None = None) -> dict:
    import multiprocessing as mp
    import os
    import threading
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from gaussian_atlas.assign import assign, assignment_cost, fibonacci_sphere

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384, help="points per object (a square for --grid)")
    ap.add_argument("--batch", type=int, default=8, help="objects per batched auction call")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--emd", action=argparse.BooleanOptionalAction, default=True, help="time POT ot.emd (CPU)")
    ap.add_argument("--scipy", action=argparse.BooleanOptionalAction, default=True, help="time scipy LSA (CPU)")
    ap.add_argument("--exact-timeout", type=float, default=480.0,
                    help="seconds (from the start) to wait for the exact CPU solvers; they run in child "
                         "processes, one CPU core each, while the GPU runs the auction")
    ap.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True, help="also the equirect->grid problem")
    ap.add_argument("--grid-exact", action=argparse.BooleanOptionalAction, default=False,
                    help="also solve the grid problem exactly (POT, ~1.5 min more)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the auction with torch.compile'd steps (one object)")
    ap.add_argument("--rtol", type=float, default=None, help="auction rtol (default: the library's)")
    ap.add_argument("--repeats", type=int, default=3, help="timed auction calls per measurement (median)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here (after every section)")
    args = ap.parse_args(argv)

    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    kw = {} if args.rtol is None else {"rtol": args.rtol}
    n, nb = args.n, args.batch
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    where = "GPU" if dev.type == "cuda" else dev.type.upper()
    print(f"device: {name}; torch {torch.__version__}; n={n} batch={nb}; cpu cores {os.cpu_count()}", flush=True)
    res: dict = {"device": name, "n": n, "batch": nb, "torch": torch.__version__, "argv": sys.argv[1:]}

    def save() -> None:
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(res, indent=2, default=float))

    y = fibonacci_sphere(n)  # [N, 3]
    xs = np.stack([torus_cube(n, seed=s) for s in range(nb)])  # [B, N, 3]

    # exact references: started now, in child processes (single-threaded solvers)
    t_start = time.perf_counter()
    todo = [m for m, flag in (("emd", args.emd), ("scipy", args.scipy)) if flag]
    pool = ProcessPoolExecutor(max_workers=max(1, len(todo)), mp_context=mp.get_context("spawn")) if todo else None
    futures = {m: pool.submit(_exact, m, xs[0], y) for m in todo}

    x_dev = torch.tensor(xs, dtype=torch.float32, device=dev)  # [B, N, 3]
    y_dev = torch.tensor(y, dtype=torch.float32, device=dev)  # [N, 3]

    # ---- auction, one object at a time ----------------------------------------------------------
    t0 = time.perf_counter()
    assign(x_dev[0], y_dev, "auction", **kw)  # first call: captures the CUDA graphs
    res["auction_first_call_s"] = time.perf_counter() - t0
    t1, (p1, info1) = _timed(lambda: assign(x_dev[0], y_dev, "auction", return_info=True, **kw), sync, args.repeats)
    cost1 = assignment_cost(xs[0], y, p1.cpu().numpy())
    res.update(auction_s_per_object=t1, auction_cost=cost1, auction_certified_gap=float(info1.rel_gap[0]),
               auction_rounds=info1.rounds, auction_search_steps=info1.search_steps, auction_phases=info1.phases,
               auction_syncs=info1.syncs)
    print(f"auction  1 object : {t1:.3f} s  cost {cost1:.6f}  certified gap {info1.rel_gap[0]:.2e}  "
          f"({info1.phases} phases, {info1.rounds} rounds, {info1.search_steps} search steps; "
          f"first call {res['auction_first_call_s']:.2f} s)", flush=True)
    save()

    # ---- compiled steps -----------------------------------------------------------------------
    if args.compile and dev.type == "cuda":
        try:
            t0 = time.perf_counter()
            assign(x_dev[0], y_dev, "auction", compile=True, **kw)
            res["compiled_first_call_s"] = time.perf_counter() - t0
            tc, (pc, infoc) = _timed(lambda: assign(x_dev[0], y_dev, "auction", compile=True, return_info=True, **kw),
                                     sync, args.repeats)
            res.update(compiled_s_per_object=tc, compiled_cost=assignment_cost(xs[0], y, pc.cpu().numpy()))
            print(f"auction compiled  : {tc:.3f} s  cost {res['compiled_cost']:.6f} "
                  f"(first call, compiling: {res['compiled_first_call_s']:.1f} s)", flush=True)
        except Exception as e:  # torch.compile is optional
            print(f"auction compiled  : failed: {e!r:.300}", flush=True)
        save()

    # ---- plane offsetting: equirectangular points -> sqrt(N) x sqrt(N) grid --------------------
    if args.grid:
        gp, gg = equirect_grid(n)  # [N, 2] each
        gp_dev = torch.tensor(gp, dtype=torch.float32, device=dev)
        gg_dev = torch.tensor(gg, dtype=torch.float32, device=dev)
        assign(gp_dev, gg_dev, "auction", **kw)
        tg, (pg, infog) = _timed(lambda: assign(gp_dev, gg_dev, "auction", return_info=True, **kw), sync, args.repeats)
        cg = assignment_cost(gp, gg, pg.cpu().numpy())
        res.update(grid_auction_s=tg, grid_auction_cost=cg, grid_certified_gap=float(infog.rel_gap[0]))
        print(f"grid auction      : {tg:.3f} s  cost {cg:.6f}  certified gap {infog.rel_gap[0]:.2e}", flush=True)
        if args.grid_exact:
            te, pe = _timed(lambda: assign(gp, gg, "emd"), lambda: None)
            ce = assignment_cost(gp, gg, pe)
            res.update(grid_emd_s=te, grid_optimum=ce, grid_rel_cost=cg / ce - 1)
            print(f"grid emd          : {te:.1f} s  cost {ce:.6f}", flush=True)
        save()

    # ---- batched: one solve over [B, N, 3] (every item waits for the slowest) ------------------
    def batched(streams: int, tag: str) -> None:
        t0 = time.perf_counter()
        assign(x_dev, y_dev, "auction", streams=streams, **kw)
        res[f"{tag}_first_call_s"] = time.perf_counter() - t0
        tb, (pb, infob) = _timed(lambda: assign(x_dev, y_dev, "auction", streams=streams, return_info=True, **kw),
                                 sync, max(1, args.repeats - 1))
        costs = assignment_cost(xs, y, pb.cpu().numpy())  # [B]
        res.update({f"{tag}_s": tb, f"{tag}_objects_per_s": nb / tb, f"{tag}_cert_max": float(infob.rel_gap.max()),
                    f"{tag}_cost0": float(costs[0])})
        print(f"auction {nb} objects ({tag}): {tb:.3f} s -> {nb / tb:.2f} objects/s ({tb / nb:.3f} s/object); "
              f"certified gaps <= {infob.rel_gap.max():.2e}; first call {res[f'{tag}_first_call_s']:.1f} s", flush=True)
        save()

    batched(1, "batch")

    # ---- exact references on the CPU (started at the beginning) -------------------------------
    opt = None
    for method, fut in futures.items():
        try:
            t, p = fut.result(timeout=max(1.0, args.exact_timeout - (time.perf_counter() - t_start)))
        except Exception as e:
            print(f"{method:6s} 1 object : not finished in --exact-timeout / failed ({e!r:.100})", flush=True)
            continue
        c = assignment_cost(xs[0], y, p)
        opt = c if opt is None else min(opt, c)
        res[f"{method}_s"], res[f"{method}_cost"] = t, c
        print(f"{method:6s} 1 object : {t:.1f} s  cost {c:.6f}", flush=True)
    if pool is not None:
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()  # an unfinished reference solve
        pool.shutdown(wait=False, cancel_futures=True)
    save()

    # ---- batched over CUDA streams (last: a hang here loses nothing above) ----------------------
    if dev.type == "cuda" and nb > 1:
        dog = threading.Timer(90.0, lambda: (print("watchdog: streamed batch hung", flush=True), os._exit(3)))
        dog.start()
        try:
            batched(nb, "streams")
        except Exception as e:
            print(f"streamed batch failed: {e!r:.300}", flush=True)
        dog.cancel()

    # ---- summary ------------------------------------------------------------------------------
    def rel(c):
        return f"{c / opt - 1:.2e}" if opt is not None and c is not None else "n/a"

    print("\n| solver | s / object | relative cost (cost/opt - 1) |")
    print("| --- | --- | --- |")
    print(f"| auction ({where}, 1 object) | {t1:.3f} | {rel(cost1)} |")
    if "compiled_s_per_object" in res:
        print(f"| auction, compiled steps ({where}, 1 object) | {res['compiled_s_per_object']:.3f} | "
              f"{rel(res['compiled_cost'])} |")
    for tag, label in (("batch", f"batch of {nb}, one solve"), ("streams", f"batch of {nb}, {nb} streams")):
        if f"{tag}_s" in res:
            print(f"| auction ({where}, {label}) | {res[f'{tag}_s'] / nb:.3f} | item 0: {rel(res[f'{tag}_cost0'])} |")
    for method in ("emd", "scipy"):
        if f"{method}_s" in res:
            print(f"| {method} (CPU, 1 core) | {res[f'{method}_s']:.1f} | {rel(res[f'{method}_cost'])} |")
    if opt is not None:
        res["optimum"] = opt
        res["auction_rel_cost"] = cost1 / opt - 1
    if "emd_s" in res:
        best = min(res.get(f"{t}_s", np.inf) for t in ("batch", "streams")) / nb
        res.update(speedup_vs_emd=res["emd_s"] / t1, speedup_vs_emd_batched=res["emd_s"] / best)
        print(f"speed-up vs ot.emd: {res['speedup_vs_emd']:.0f}x (1 object), "
              f"{res['speedup_vs_emd_batched']:.0f}x (best batched); "
              f"throughput {1 / best:.2f} objects/s")
    save()
    return res


if __name__ == "__main__":
    main()
