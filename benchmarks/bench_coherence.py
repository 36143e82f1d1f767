"""The atlas stage's per-object ``neighbour_coherence``: the k-d tree against the dense distances it replaced.

    python benchmarks/bench_coherence.py --json docs/bench/coherence_cpu.json        # side 128 (N = 16,384)

Each arm scores the same atlases: ``--objects`` synthetic objects (torus-like point sets of ``--real`` real Gaussians,
the rest of the N = side² pixels transparent padding, laid out by a random plane index, as a fitted object's
atlas is shaped: 8-15 K real Gaussians at the paper's keys). ``dense`` is the code ``write_atlases`` ran per object
until 2026-12-08: ``[4096, R]`` chunks of ``torch.cdist`` in float64 and ``topk`` (on the H100 e2e run that step, in
the atlas worker process beside 12 renderers, was most of the atlas's 2.3 s per object). ``kdtree`` is
``gaussian_atlas.atlas.neighbour_coherence`` now (``scipy.spatial.cKDTree``). Prints the seconds per object of each
(median of ``--repeats``), the ratio, and the largest difference of the two numbers they return; writes the raw
timings (machine, versions, commit, command) as JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write_record  # noqa: E402


def synthetic_atlas(side: int, n_real: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An atlas ``[16, S, S]`` whose real Gaussians lie on a noisy torus, and its plane index ``[S*S]``."""
    from gaussian_atlas.assign import fibonacci_sphere
    from gaussian_atlas.atlas import ALBEDO, LOG_SCALE, OFFSET, OPACITY_CHANNELS, ROTATION

    rng = np.random.default_rng(seed)
    n = side * side
    grid = torch.from_numpy(rng.permutation(n))
    u, v = rng.uniform(0, 2 * np.pi, (2, n))
    pts = np.stack([(0.7 + 0.25 * np.cos(v)) * np.cos(u), (0.7 + 0.25 * np.cos(v)) * np.sin(u), 0.25 * np.sin(v)], 1)
    pts += rng.normal(0, 0.01, pts.shape)
    sphere_at_pixel = np.empty((n, 3))
    sphere_at_pixel[grid.numpy()] = fibonacci_sphere(n)
    feats = np.zeros((n, 16))
    feats[:, OFFSET] = pts - sphere_at_pixel
    feats[:, ALBEDO] = 0.5
    feats[:, LOG_SCALE] = -4.0
    feats[:, ROTATION] = [1.0, 0.0, 0.0, 0.0]
    real = np.zeros(n, bool)
    real[rng.choice(n, n_real, replace=False)] = True
    feats[:, list(OPACITY_CHANNELS)] = np.where(real, 0.9, 6e-6)[:, None]
    return torch.from_numpy(feats.T.reshape(16, side, side)).float(), grid


def dense_coherence(atlas: torch.Tensor, cfg, grid: torch.Tensor, k: int = 8, min_opacity: float = 1e-4,
                    chunk: int = 4096) -> dict:
    """The baseline: neighbour_coherence as it was (dense chunked distances + topk)."""
    from gaussian_atlas.atlas import atlas_to_gaussians

    S = cfg.side
    g = atlas_to_gaussians(atlas.float().cpu(), None, cfg, grid=grid)
    x = g.means.double()
    real = torch.sigmoid(g.opacity_logits.double()) >= min_opacity
    idx = torch.arange(S * S).reshape(S, S)
    pairs = torch.cat([torch.stack([idx[:, :-1].reshape(-1), idx[:, 1:].reshape(-1)], 1),
                       torch.stack([idx[:-1, :].reshape(-1), idx[1:, :].reshape(-1)], 1)])
    pairs = pairs[real[pairs[:, 0]] & real[pairs[:, 1]]]
    rid = torch.nonzero(real).squeeze(1)
    xr = x[rid]
    kk = min(k, len(rid) - 1)
    nn_idx, kth = [], []
    for s0 in range(0, len(rid), chunk):
        d = torch.cdist(xr[s0:s0 + chunk], xr)
        d[torch.arange(d.shape[0]), torch.arange(s0, s0 + d.shape[0])] = float("inf")
        vals, ids = torch.topk(d, kk, dim=1, largest=False)
        nn_idx.append(rid[ids])
        kth.append(vals[:, -1])
    nn = torch.full((S * S, kk), -1, dtype=torch.long)
    nn[rid] = torch.cat(nn_idx)
    hit = (nn[pairs[:, 0]] == pairs[:, 1:2]).any(1)
    dist = (x[pairs[:, 0]] - x[pairs[:, 1]]).norm(dim=1)
    return {"coherence": float(hit.double().mean()),
            "distance_ratio": float(dist.median() / torch.cat(kth).median().clamp_min(1e-12)),
            "n_pairs": int(len(pairs))}


def main() -> None:
    from gaussian_atlas.atlas import AtlasConfig, neighbour_coherence

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=128)
    ap.add_argument("--real", type=int, nargs="+", default=[8192, 13000, 16384],
                    help="real Gaussians per object (the rest is padding)")
    ap.add_argument("--objects", type=int, default=2, help="objects per real count")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    cfg = AtlasConfig(side=args.side)
    rows = []
    for n_real in args.real:
        for o in range(args.objects):
            atlas, grid = synthetic_atlas(args.side, min(n_real, args.side ** 2), seed=1000 * n_real + o)
            t, out = {"dense": [], "kdtree": []}, {}
            for _ in range(args.repeats):  # the arms alternate
                for arm, fn in (("dense", dense_coherence), ("kdtree", neighbour_coherence)):
                    t0 = time.perf_counter()
                    out[arm] = fn(atlas, cfg, grid=grid)
                    t[arm].append(time.perf_counter() - t0)
            dense_res, kd_res = out["dense"], out["kdtree"]
            row = {"n_real": n_real, "object": o, "dense_s": statistics.median(t["dense"]),
                   "kdtree_s": statistics.median(t["kdtree"]), "dense": dense_res, "kdtree": kd_res,
                   "coherence_diff": abs(dense_res["coherence"] - kd_res["coherence"]),
                   "distance_ratio_rel_diff": abs(dense_res["distance_ratio"] / kd_res["distance_ratio"] - 1)}
            row["ratio"] = row["dense_s"] / row["kdtree_s"]
            rows.append(row)
            print(f"R {n_real:6d} object {o}: dense {row['dense_s']:.3f} s, k-d tree {row['kdtree_s']:.4f} s "
                  f"({row['ratio']:.0f}x); coherence {kd_res['coherence']:.4f} (|diff| {row['coherence_diff']:.1e}), "
                  f"distance ratio rel. diff {row['distance_ratio_rel_diff']:.1e}", flush=True)
    summary = {"benchmark": "bench_coherence", "side": args.side, "repeats": args.repeats,
               "torch_threads": torch.get_num_threads(), "rows": rows,
               "ratio_min": min(r["ratio"] for r in rows), "ratio_max": max(r["ratio"] for r in rows)}
    print(f"k-d tree vs dense: {summary['ratio_min']:.0f}x - {summary['ratio_max']:.0f}x faster "
          f"({torch.get_num_threads()} torch threads)")
    write_record(args.json, summary)


if __name__ == "__main__":
    main()
