"""Benchmark of gaussian_atlas.assign (the atlas stage's assignment) -- see docs/benchmarks.md.

    PYTHONUNBUFFERED=1 python benchmarks/bench_assign.py --n 16384 --batch 8 --device cuda

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
