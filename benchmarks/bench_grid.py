"""The atlas stage's first call on a fresh machine: the plane index (sphere -> grid assignment) solved on the
stage's device against the CPU, the path every first call took until ``build_atlases`` passed its device.

    python benchmarks/bench_grid.py --side 128 --json docs/bench/grid_h200.json   # on the GPU machine

Each variant runs in a fresh process state as far as the index goes (``cache_dir=None``: solved, not read),
the GPU one first, including CUDA's start-up (what a first atlas call pays). Both use ``method: auto`` (the
stage's default). Prints the ratio and whether the two indices agree in total cost (they are both optimal or
near it; the exact permutation may differ among ties). Writes the raw timings (device, versions, commit,
command) as JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write_record  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=128, help="atlas side (N = side^2; the paper's 128)")
    ap.add_argument("--method", default="auto")
    ap.add_argument("--devices", default="cuda,cpu", help="first one is the stage's device, last the baseline")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from gaussian_atlas.atlas import equirectangular, fibonacci_sphere, grid_points, sphere_to_grid

    n = args.side ** 2
    uv = equirectangular(fibonacci_sphere(n))  # [N, 2]
    cells = grid_points(args.side)  # [N, 2]
    times, costs = {}, {}
    for dev in args.devices.split(","):
        t = time.perf_counter()
        grid = sphere_to_grid(args.side, args.method, None, device=dev)
        if dev == "cuda":
            torch.cuda.synchronize()
        times[dev] = time.perf_counter() - t
        costs[dev] = float(((torch.as_tensor(uv) - torch.as_tensor(cells)[grid]) ** 2).sum())
        print(f"{dev}: {times[dev]:.2f} s, total squared distance {costs[dev]:.6f}", flush=True)
    devs = list(times)
    if len(devs) > 1:
        print(f"{devs[-1]} / {devs[0]}: {times[devs[-1]] / times[devs[0]]:.1f}x")
    write_record(args.json, {"benchmark": "bench_grid", "side": args.side, "n": n, "method": args.method,
                             "seconds": times, "total_squared_distance": costs})


if __name__ == "__main__":
    main()
