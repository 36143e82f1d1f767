"""The evaluate stage's shape score: batched ``classify_shapes`` against the per-pair ``chamfer`` loop it replaced.

    python benchmarks/bench_classify.py                  # CPU; --device cuda on a GPU machine
    python benchmarks/bench_classify.py --objects 112 --json docs/bench/classify_cpu.json

Both classify the same point sets (``--objects`` sets of ``--points`` opacity-weighted centres, the
stage's ``shape_points``) against the 9 primitives under ``--rotations`` turns, coarse to fine. The
baseline is the loop the stage ran until 2026-12-03: one ``chamfer`` call per (object, primitive), on the
CPU tensors ``surface_points`` returns. Prints the ratio and checks both give the same distances; writes the
raw timings (device, versions, commit, command) as JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write_record  # noqa: E402


def main() -> None:
    from gaussian_atlas.evaluate import candidate_clouds, chamfer, classify_shapes, normalise_points

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=56)
    ap.add_argument("--points", type=int, default=512)
    ap.add_argument("--rotations", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(0)
    sets = [torch.randn(args.points, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 0.8, 0.6],
                                                                                          dtype=torch.float64)
            for _ in range(args.objects)]
    ob = [i % 4 == 0 for i in range(args.objects)]  # some top parts of stacks (open-bottom primitives)
    for o in (False, True):
        candidate_clouds(args.points, 0, o)  # cached, as in the stage

    def per_pair():
        return [{k: chamfer(normalise_points(p), c, args.rotations) for k, c in
                 candidate_clouds(args.points, 0, o).items()} for p, o in zip(sets, ob)]

    def batched():
        out = classify_shapes(sets, ob, args.rotations, args.points, device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    def timed(fn):
        fn()  # warm-up
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            r = fn()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2], ts, r

    t_ref, ts_ref, ref = timed(per_pair)
    t_new, ts_new, new = timed(batched)
    err = max(abs(d[k] - r[k]) for (_, d), r in zip(new, ref) for k in r)
    res = {"what": "shape classification of the evaluate stage: batched classify_shapes vs per-pair chamfer",
           "objects": args.objects, "points": args.points, "rotations": args.rotations, "device": args.device,
           "baseline_per_pair_s": t_ref, "baseline_runs_s": ts_ref, "batched_s": t_new, "batched_runs_s": ts_new,
           "speedup": t_ref / t_new, "max_abs_distance_difference": err}
    print(f"{args.objects} objects x 9 primitives x {args.rotations} turns on {args.device}: per-pair chamfer "
          f"{t_ref:.2f} s, batched {t_new:.2f} s -> {t_ref / t_new:.1f}x (max |distance difference| {err:.1e})")
    write_record(args.json, res)


if __name__ == "__main__":
    main()
