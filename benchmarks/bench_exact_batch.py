"""Exact CPU assignments of a batch (the atlas stage on a CPU): items solved on every core at once (threads)
against one after another, the loop ``assign`` ran until 2026-12-03.

    python benchmarks/bench_exact_batch.py --n 4096 --batch 4 --json docs/bench/exact_batch_cpu.json

Both solve the same ``--batch`` random point clouds against one Fibonacci sphere of N points with the same
solver (``--method`` emd or scipy) and must give the same assignments. Prints the ratio; writes the raw
timings (device, versions, commit, command) as JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write_record  # noqa: E402


def main() -> None:
    from gaussian_atlas import assign as A
    from gaussian_atlas.atlas import fibonacci_sphere

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--method", default="emd", choices=["emd", "scipy"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.n, 3)) * np.array([1.0, 0.7, 0.5])
    y = fibonacci_sphere(args.n)
    solve = A._solve_emd if args.method == "emd" else A._solve_scipy
    solve(x[0, :8], y[:8])  # warm-up: the solver's import is not part of either timing
    t = time.perf_counter()
    seq = np.stack([solve(x[b], y) for b in range(args.batch)])  # the former loop
    t_seq = time.perf_counter() - t
    t = time.perf_counter()
    par = A.assign(x, y, args.method)  # threads
    t_par = time.perf_counter() - t
    same = bool(np.array_equal(seq, par))
    res = {"what": f"exact CPU assignment ({args.method}) of a batch: threads vs one after another",
           "n": args.n, "batch": args.batch, "method": args.method,
           "sequential_s": t_seq, "threads_s": t_par, "speedup": t_seq / t_par, "same_assignments": same}
    print(f"{args.batch} x N={args.n} {args.method} on {os.cpu_count()} cores: one after another {t_seq:.2f} s, "
          f"threads {t_par:.2f} s -> {t_seq / t_par:.2f}x (same assignments: {same})")
    write_record(args.json, res)


if __name__ == "__main__":
    main()
