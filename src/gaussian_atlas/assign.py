"""Linear assignment between two point sets (the transport steps of the Gaussian Atlas).

The atlas stage (paper Sec. 4) moves the N Gaussians of an object one-to-one onto N
points of the unit sphere ("sphere offsetting"), and once, for all objects, the N
equirectangular-projected sphere points onto a sqrt(N) x sqrt(N) grid ("plane
offsetting"). Both are optimal transport between uniform measures of equal size, i.e.
linear assignment with the squared Euclidean cost::

    min over permutations s of  sum_i || x_i - y_s(i) ||^2

:func:`assign` solves it with one of several back-ends chosen by a string (as POT's
``ot.emd`` does for transport): two exact CPU solvers (scipy's Jonker-Volgenant, POT's
network simplex) and a batched GPU auction that is the fast path for the 205K objects.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

__all__ = [
    "KERNELS",
    "METHODS",
    "AuctionInfo",
    "assign",
    "assignment_cost",
    "clear_cache",
    "fibonacci_sphere",
]

METHODS = ("auto", "scipy", "emd", "auction")
KERNELS = ("auto", "torch", "triton")

# "auto" on a CPU uses the exact scipy solver up to this size (scipy takes ~0.3 s at
# N=2048 on a 2-core CPU and grows ~N^2.7), the auction above it.
_AUTO_SCIPY_MAX_N = 2048

# smallest ε relative to the squared data diameter: float32 prices (~1e-7 relative)
# must still see each ε increment
_EPS_FLOOR = 1e-6
# a search stops once this fraction of its trees found a path (0.5 and 1.0 measured the same)
_STOP_FRAC = 1.0


def fibonacci_sphere(n: int, *, dtype: Any = np.float64) -> np.ndarray:
    """``n`` nearly uniform points on the unit sphere (the Fibonacci / golden-spiral lattice).

    Point k has height ``z_k = 1 - (2k + 1) / n`` and longitude ``k * pi * (3 - sqrt 5)``,
    so every point covers the same area ``4 pi / n``. Returns an ``[n, 3]`` array.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    k = np.arange(n, dtype=np.float64)  # [n]
    z = 1.0 - (2.0 * k + 1.0) / n  # [n]
    r = np.sqrt(np.clip(1.0 - z * z, 0.0, None))  # [n]
    phi = k * (math.pi * (3.0 - math.sqrt(5.0)))  # [n]
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1).astype(dtype)  # [n, 3]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _as_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _check_inputs(x: Any, y: Any) -> tuple[int, int, int, bool]:
    """Validate shapes; return (B or 0 when unbatched, N, D, y_shared)."""
    xs, ys = tuple(x.shape), tuple(y.shape)
    if len(xs) not in (2, 3):
        raise ValueError(f"x must be [N, D] or [B, N, D], got shape {xs}")
    n, d = xs[-2], xs[-1]
    if ys[-2:] != (n, d) or len(ys) not in (2, 3):
        raise ValueError(f"y must be [N, D] or [B, N, D] matching x {xs}, got {ys}")
    if len(xs) == 2 and len(ys) == 3:
        raise ValueError(f"batched y {ys} needs batched x, got {xs}")
    if len(xs) == 3 and len(ys) == 3 and ys[0] != xs[0]:
        raise ValueError(f"batch sizes differ: x {xs}, y {ys}")
    if n < 1:
        raise ValueError("need at least one point")
    return (xs[0] if len(xs) == 3 else 0), n, d, len(ys) == 2


def assignment_cost(x: Any, y: Any, perm: Any) -> Any:
    """Total squared distance ``sum_i ||x_i - y_perm[i]||^2`` of an assignment, in float64.

    ``x`` ``[N, D]`` or ``[B, N, D]``, ``y`` ``[N, D]`` or ``[B, N, D]``, ``perm`` ``[N]`` or
    ``[B, N]`` (numpy or torch). Returns a float, or a float64 array ``[B]`` when batched.
    """
    x64 = _as_numpy(x).astype(np.float64)
    y64 = _as_numpy(y).astype(np.float64)
    p = _as_numpy(perm).astype(np.int64)
    if x64.ndim == 2:
        return float(((x64 - y64[p]) ** 2).sum())
    if y64.ndim == 2:
        y64 = np.broadcast_to(y64, x64.shape)
    yp = np.take_along_axis(y64, p[..., None], axis=1)  # [B, N, D]
    return ((x64 - yp) ** 2).sum(axis=(1, 2))  # [B]


def _sqdist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Dense squared-distance matrix ``[N, N]`` in float64."""
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    c = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.maximum(c, 0.0)


def _solve_scipy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(_sqdist(x, y))
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


def _solve_emd(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    try:
        import ot  # POT, imported lazily: the rest of the module needs only numpy/scipy/torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("method='emd' needs POT (pip install POT)") from e
    n = len(x)
    a = np.full(n, 1.0 / n)
    plan = ot.emd(a, a, _sqdist(x, y), numItermax=max(100_000, 50 * n * n))  # [N, N]
    # a vertex of the Birkhoff polytope: one entry 1/n per row; argmax reads it off
    return np.asarray(plan).argmax(axis=1).astype(np.int64)


# --------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------


def assign(
    x: Any,
    y: Any,
    method: str = "auto",
    *,
    eps: float | None = None,
    rtol: float = 1e-3,
    eps_start: float | None = None,
    eps_factor: float = 8.0,
    max_bidders: int = 4096,
    tail: int | None = None,
    rounds_per_sync: int = 16,
    cuda_graphs: bool = True,
    compile: bool = False,
    streams: int = 8,
    kernels: str = "auto",
    return_info: bool = False,
) -> Any:
    r"""Assign each x_i to a distinct y_j, minimising the total squared distance.

    Solves the linear assignment (optimal transport between two uniform point clouds of
    the same size)

    .. math::  \min_{\sigma \in S_N} \sum_{i=1}^{N} \lVert x_i - y_{\sigma(i)} \rVert_2^2 .

    Parameters
    ----------
    x : array or Tensor, ``[N, D]`` or ``[B, N, D]``
        Source points (the Gaussians' centres; a batch of B objects).
    y : array or Tensor, ``[N, D]`` or ``[B, N, D]``
        Target points; an ``[N, D]`` ``y`` is shared by every item of a batched ``x``.
    method : {"auto", "scipy", "emd", "auction"}
        ``"scipy"``: :func:`scipy.optimize.linear_sum_assignment` (Jonker-Volgenant,
        exact, CPU, O(N^3) time, dense O(N^2) cost matrix). ``"emd"``: POT's
        :func:`ot.emd` network simplex (exact, CPU; POT is imported only here).
        ``"auction"``: the ε-scaling auction below, in torch, on ``x``'s device (CUDA
        or CPU). ``"auto"``: the auction for CUDA inputs and for CPU inputs with
        N > 2048, scipy otherwise.
    eps : float, optional
        Final ε of the auction (absolute, in the units of the cost). The result then
        satisfies ``cost <= optimum + N * eps`` for every item (``eps`` is raised to
        ``1e-6 * scale`` at least, ``scale`` = squared diameter of the data, the
        resolution of float32 prices). By default the ε-scaling stops at ``rtol``.
    rtol : float
        Stop refining an item once its certified relative gap ``(cost - lower_bound) /
        cost`` is at most ``rtol`` (checked after each ε phase; ignored when ``eps`` is
        given). The lower bound is the dual value of the final prices, so the result is
        within ``rtol`` of the optimum, a guarantee up to the float32 rounding of the
        values (~1e-6 relative); measured errors are 5-10x smaller than the bound.
    eps_start : float, optional
        ε of the first phase; default ``scale / 32``.
    eps_factor : float
        ε is divided by this between phases (Bertsekas' θ); the last step is gentler
        when the gap is already close to ``rtol``.
    max_bidders : int
        At most this many bidders (or forest rows) per item are handled in one step
        (bounds the ``[B, K, N]`` float32 work buffer).
    tail : int, optional
        Bidding stops, and the parallel Hungarian searches take over, once at most
        this many bidders of every item are unassigned (default ``max(16, N // 1024)``;
        0 = auction only, >= N = searches only).
    rounds_per_sync : int
        Steps between two reads of the solver's progress (each read is a host sync);
        on CUDA these steps are one captured CUDA graph.
    cuda_graphs : bool
        Capture the steps as CUDA graphs (CUDA only). The graphs and buffers of the
        last few problem shapes are cached (:func:`clear_cache` frees them).
    compile : bool
        Fuse each step with :func:`torch.compile` (first call compiles for tens of
        seconds; ~1.5x faster steps on an H100).
    streams : int
        CUDA, batched input: solve the items as up to this many independent solves on
        their own streams and host threads (they overlap on the GPU).
    kernels : {"auto", "torch", "triton"}
        How the auction's steps run. ``"torch"``: each bidding round / search step is a
        few dozen torch ops. ``"triton"``: each is 2 / 4 fused Triton kernels
        (``gaussian_atlas._assign_triton``; same algorithm and certificate, every pending
        forest row expanded per step). ``"auto"``: triton on CUDA when it imports, torch
        otherwise (``"triton"`` on a CPU tensor needs ``TRITON_INTERPRET=1``: tests only).
    return_info : bool
        Also return an :class:`AuctionInfo` (auction only; other methods give ``None``).

    Returns
    -------
    perm : ndarray or LongTensor, ``[N]`` or ``[B, N]``
        ``perm[..., i]`` is the index of the y assigned to x_i; always a permutation.
        Same library (numpy/torch) as ``x``; a tensor is on ``x``'s device.

    Notes
    -----
    *Auction* (D. P. Bertsekas, "The auction algorithm: a distributed relaxation method
    for the assignment problem", Ann. Oper. Res. 14:105-123, 1988; ε-scaling as in
    Bertsekas & Eckstein, Math. Prog. 42:203-243, 1988). Each y_j ("object") carries a
    price p_j. Every unassigned x_i ("bidder") finds its best object
    j1 = argmax_j (-c_ij - p_j) and the second-best value and bids
    p_j1 + (best - second) + ε for it; each object goes to its highest bidder, whose
    previous owner becomes unassigned. All unassigned bidders bid at once (Jacobi), so
    a round is a handful of batched tensor ops: ``[B, K, D] @ [B, D, N]`` for the values
    (the cost matrix is never stored: c_ij = |x_i|^2 + |y_j|^2 - 2 x_i.y_j), a top-2
    along N and two scatter-max's. At the end of a phase every bidder is within ε of
    its best object (ε-complementary slackness), which bounds
    ``cost <= optimum + N ε``. Phases divide ε by ``eps_factor``, keep the prices and
    unassign only the bidders that violate the new ε-CS.

    *Tail by parallel Hungarian searches*: the last few unassigned bidders of a phase
    need augmenting paths through thousands of other bidders; bidding walks them one
    bidder per round (a "price war", >90% of the rounds of a plain auction). Instead,
    once at most ``tail`` bidders are unassigned, a forest of alternating trees grows
    from all of them at once over the edges with reduced cost <= ε (a whole layer per
    step), with dual updates (raise the forest's prices by the smallest reduced cost
    leaving it) when it is stuck -- the Hungarian method (Kuhn 1955) with ε-tight
    edges, treating the current pairs as tight. Every tree that reaches a free object
    flips its path (trees are disjoint, so all paths flip at once, found by pointer
    doubling). Dual updates keep every reduced cost >= 0 and new pairs within ε, so
    ε-CS, and the bound above, still hold.

    *Fused steps* (``kernels="triton"``, ``gaussian_atlas._assign_triton``): a bidding round
    is 2 Triton kernels (a row scan per bidder for the top-2 and a packed 64-bit
    ``atomic_max`` of (bid, bidder) per object; then the winners' updates and the next free
    list) and a search step 4 (row max, column-block row-min into the slacks, dual update and
    forest growth, stop test) instead of a few dozen torch ops each; every pending forest row
    is expanded in every step. Same state, phases and certificate as the torch steps.

    *Certificate*: after each phase the dual value
    ``sum_i min_j (c_ij + p_j) - sum_j p_j`` is a lower bound on the optimum, so
    ``cost - lower_bound = sum_i slack_i <= N ε`` is a certified gap; ``rtol`` stops on it.

    *Complexity*: worst case O(N^2 C/ε) bids per phase (pseudo-polynomial); measured at
    N=16,384 on the atlas data, ~5 phases of a few thousand steps of O(K N D) work with
    K (bidders per step) mostly < 64, and O(B K N) memory -- never O(N^2) per object.
    Speed is set by the number of steps (each a few dozen small kernels), not by
    arithmetic; see docs/benchmarks.md.

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(size=(64, 3))
    >>> perm = assign(x, fibonacci_sphere(64), "auction")
    >>> sorted(perm.tolist()) == list(range(64))
    True
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; expected one of {', '.join(KERNELS)}")
    batch, n, d, _ = _check_inputs(x, y)
    is_torch = isinstance(x, torch.Tensor)
    device = x.device if is_torch else torch.device("cpu")

    if method == "auto":
        method = "auction" if (device.type != "cpu" or n > _AUTO_SCIPY_MAX_N) else "scipy"

    if method in ("scipy", "emd"):
        solve = _solve_scipy if method == "scipy" else _solve_emd
        xn, yn = _as_numpy(x), _as_numpy(y)
        if batch == 0:
            perm_np = solve(xn, yn)
        else:
            # the exact solvers release the GIL: items of a batch are solved on every core at once
            import os
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max(1, min(batch, os.cpu_count() or 1))) as pool:
                perm_np = np.stack(list(pool.map(lambda b: solve(xn[b], yn if yn.ndim == 2 else yn[b]), range(batch))))
        out: Any = torch.from_numpy(perm_np).to(device) if is_torch else perm_np
        return (out, None) if return_info else out

    # --- auction -----------------------------------------------------------------------
    xt = torch.as_tensor(x, dtype=torch.float32, device=device)
    yt = torch.as_tensor(y, dtype=torch.float32, device=device)
    if batch == 0:
        xt, yt = xt[None], yt[None]  # [1, N, D]
    elif yt.dim() == 2:
        yt = yt[None]  # [1, N, D], shared
    auto = kernels == "auto"
    if auto:
        kernels = "triton" if device.type == "cuda" and triton_available() else "torch"
    elif kernels == "triton" and not triton_available():
        raise ImportError("kernels='triton' needs triton (pip install triton)")

    def solve(kern: str) -> tuple[torch.Tensor, AuctionInfo]:
        fn = partial(_auction, kernels=kern)
        if device.type == "cuda" and xt.shape[0] > 1 and streams > 1:
            fn = partial(_auction_streams, streams=streams, kernels=kern)
        return fn(xt, yt, eps=eps, rtol=rtol, eps_start=eps_start, eps_factor=eps_factor, max_bidders=max_bidders,
                  tail=tail, rounds_per_sync=rounds_per_sync, cuda_graphs=cuda_graphs, compile=compile)

    try:
        perm_t, info = solve(kernels)
    except Exception as e:  # "auto" only: a triton that cannot build these kernels here
        if not (auto and kernels == "triton"):
            raise
        import warnings

        global _TRITON_OK
        _TRITON_OK = False
        warnings.warn(f"assign: the fused Triton steps failed ({e!r:.300}); using the torch steps", stacklevel=2)
        perm_t, info = solve("torch")
    if return_info:  # report the cost of the caller's data in float64 (the solver ran in float32)
        x64 = torch.as_tensor(x, device=device).double().reshape(xt.shape)  # [B, N, D]
        y64 = torch.as_tensor(y, device=device).double().reshape(yt.shape).expand_as(x64)
        yp = y64.gather(1, perm_t[..., None].expand_as(x64))  # [B, N, D]
        cost64 = ((x64 - yp) ** 2).sum((1, 2)).cpu().numpy()  # [B]
        info.lower_bound = info.lower_bound + (cost64 - info.cost)
        info.cost = cost64
    if batch == 0:
        perm_t = perm_t[0]
    out = perm_t if is_torch else perm_t.cpu().numpy()
    return (out, info) if return_info else out


# --------------------------------------------------------------------------------------
# auction
# --------------------------------------------------------------------------------------


@dataclass
class AuctionInfo:
    """What the auction did, per item of the batch (float64 numpy arrays ``[B]``)."""

    cost: np.ndarray  # primal cost sum_i c_{i, perm(i)}
    lower_bound: np.ndarray  # dual value of the final prices, <= optimum
    eps: np.ndarray  # ε of the last phase each item ran
    phases: int = 0  # ε phases run (batch-wide)
    rounds: int = 0  # Jacobi bidding rounds run (batch-wide)
    searches: int = 0  # augmenting-path searches started (batch-wide, summed over items)
    search_steps: int = 0  # steps of the parallel Hungarian searches (batch-wide)
    syncs: int = 0  # device-to-host reads of the solver's progress
    # per phase: dict(eps, rounds, search_steps, augments, gap, bid_s, search_s); the stage times are
    # host wall times between progress reads (the GPU is idle at each read)
    history: list = field(default_factory=list)

    @property
    def rel_gap(self) -> np.ndarray:
        """Certified relative gap ``(cost - lower_bound) / cost`` per item."""
        return (self.cost - self.lower_bound) / np.maximum(self.cost, 1e-300)


_INF = float("inf")


class _Solver:
    """Batched ε-scaling auction + parallel Hungarian tail, all state on one device.

    Notation (per item b of the batch; B items, N bidders x_i and N objects y_j):
      w_ij = 2 x_i.y_j - |y_j|^2 - p_j  ("value" = -(c_ij + p_j) + |x_i|^2, never stored
      for more than K rows at a time). Every method updates the state in place with
      static shapes and no host sync, so it can be captured in a CUDA graph.
    """

    @staticmethod
    def step_sizes(cap: int) -> list[int]:
        """The step sizes a graph is captured for (:func:`_step_sizes`; for subclasses' ``capture_all``)."""
        return _step_sizes(cap)

    def __init__(self, b: int, n: int, d: int, dev: torch.device, use_graphs: bool, compile: bool = False):
        self.b, self.n, self.d, self.dev = b, n, d, dev
        self.x = torch.zeros(b, n, d, device=dev)  # [B, N, D] bidders
        self.yt = torch.zeros(b, d, n, device=dev)  # [B, D, N] 2·y
        self.y2 = torch.zeros(b, n, device=dev)  # [B, N] |y_j|^2
        self.price = torch.zeros(b, n, device=dev)  # [B, N] object prices
        self.owner = torch.full((b, n), -1, dtype=torch.long, device=dev)  # [B, N] object -> bidder
        self.obj = torch.full((b, n + 1), -1, dtype=torch.long, device=dev)  # [B, N+1] bidder -> object; col N: trash
        self.eps = torch.zeros(b, 1, device=dev)  # [B, 1] ε of the current phase
        self.ar = torch.arange(n, device=dev).expand(b, n)  # [B, N]
        # parallel Hungarian search state: a forest of alternating trees, one per free bidder
        self.mode = torch.zeros(b, dtype=torch.long, device=dev)  # [B] 0 idle, 1 searching, 2 paths found
        self.in_tree = torch.zeros(b, n, dtype=torch.bool, device=dev)  # [B, N] objects in the forest
        self.pending = torch.zeros(b, n + 1, dtype=torch.bool, device=dev)  # [B, N+1] bidders to expand; col N: trash
        self.slack = torch.full((b, n), _INF, device=dev)  # [B, N] min reduced cost from the forest
        self.pred = torch.zeros(b, n, dtype=torch.long, device=dev)  # [B, N] forest bidder reaching object j
        self.root_of_row = torch.zeros(b, n + 1, dtype=torch.long, device=dev)  # [B, N+1] tree of each forest bidder
        self.end_of_tree = torch.full((b, n + 1), -1, dtype=torch.long, device=dev)  # [B, N+1] free object found, per root
        self.n_roots = torch.zeros(b, dtype=torch.long, device=dev)  # [B] trees in the forest
        self.use_graphs = use_graphs
        self._graphs: dict[tuple, Any] = {}
        self._pool = None
        # torch.compile fuses the dozens of small element-wise kernels of a step
        self.step_bid = torch.compile(self.bid_round, dynamic=False) if compile else self.bid_round
        self.step_search = torch.compile(self.search_step, dynamic=False) if compile else self.search_step

    def load(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Copy a new problem (x ``[B, N, D]``, y ``[B, N, D]``) into the buffers and reset.

        Buffers keep their addresses, so the captured CUDA graphs stay valid.
        """
        self.x.copy_(x)
        self.yt.copy_(2.0 * y.transpose(1, 2))
        self.y2.copy_((y * y).sum(-1))
        self.price.zero_()
        self.owner.fill_(-1)
        self.obj.fill_(-1)
        self.mode.zero_()

    # ---- shared pieces ------------------------------------------------------------------

    def values(self, xb: torch.Tensor) -> torch.Tensor:
        """``w`` for the bidders ``xb`` ``[B, K, D]`` against all objects -> ``[B, K, N]``."""
        bias = (-self.y2 - self.price)[:, None, :]  # [B, 1, N]
        return torch.baddbmm(bias, xb, self.yt)  # [B, K, N]

    def _compact(self, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the first ``k`` True entries of ``mask`` ``[B, N]`` -> (idx ``[B, k]``, valid ``[B, k]``).

        Static-shape replacement of ``nonzero``: invalid slots hold N.
        """
        b, n = self.b, self.n
        rank = mask.long().cumsum(1) - 1  # [B, N]
        slot = torch.where(mask & (rank < k), rank, k)  # [B, N]; slot k collects the rest
        idx = torch.full((b, k + 1), n, dtype=torch.long, device=self.dev)
        idx.scatter_(1, slot, self.ar)  # [B, k+1]
        idx = idx[:, :k]  # [B, k]
        return idx, idx < n

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Gather bidder positions ``[B, K, D]`` (invalid index N -> row N-1, masked later)."""
        i = idx.clamp(max=self.n - 1)
        return self.x.gather(1, i[..., None].expand(self.b, idx.shape[1], self.d))  # [B, K, D]

    def run(self, key: tuple, fn, reps: int) -> None:
        """Run ``fn`` ``reps`` times; on CUDA the first call captures them as one graph."""
        if not self.use_graphs:
            for _ in range(reps):
                fn()
            return
        g = self._graphs.get(key)
        if g is not None:
            g.replay()
            return
        for _ in range(reps):  # eager first call: the work is done, and it warms up
            fn()  # allocator, cuBLAS and kernel caches before the capture
        # capture on a private stream, thread-locally: other solvers may run meanwhile
        # on other streams and threads (see _auction_streams)
        cur = torch.cuda.current_stream(self.dev)
        cap = torch.cuda.Stream(self.dev)
        cap.wait_stream(cur)
        g = torch.cuda.CUDAGraph()
        if self._pool is None:  # one memory pool for all graphs of this solver: they only
            self._pool = torch.cuda.graph_pool_handle()  # write into the state, never concurrently
        with _CAPTURE_LOCK, torch.cuda.stream(cap):  # one capture at a time per process
            g.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                for _ in range(reps):  # recorded, not executed
                    fn()
            finally:
                g.capture_end()
        cur.wait_stream(cap)
        self._graphs[key] = g

    def capture_all(self, k_cap: int, reps: int) -> None:
        """Capture the graphs of every step size up front (and leave the state dirty)."""
        if not self.use_graphs:
            return
        for k in _step_sizes(k_cap):
            self.run(("bid", k), lambda: self.step_bid(k), reps)
            self.run(("search", k), lambda: self.step_search(k), reps)
        self.run(("aug",), self.augment, 1)
        torch.cuda.current_stream(self.dev).synchronize()

    # ---- 1. Jacobi auction round ----------------------------------------------------------

    def bid_round(self, k: int) -> None:
        """Up to ``k`` unassigned bidders per item bid at once; each object goes to its highest bid."""
        b, n = self.b, self.n
        bidders, active = self._compact(self.obj[:, :n] < 0, k)  # [B, K]
        w = self.values(self._rows(bidders))  # [B, K, N]
        # top-2 as max, mask, max: torch.topk's radix select is ~70 us for N=16K on an H100
        v1, j1 = w.max(2)  # [B, K] best value and object
        v2 = w.scatter_(2, j1[..., None], -_INF).amax(2)  # [B, K] second best
        # bid = p_j1 + (best - second best) + ε: the price at which j1 stops being the best
        bid = self.price.gather(1, j1) + (v1 - v2) + self.eps  # [B, K]
        bid = torch.where(active, bid, -_INF)
        best = torch.full((b, n), -_INF, device=self.dev)
        best.scatter_reduce_(1, j1, bid, "amax")  # [B, N] highest bid per object
        top = active & (bid >= best.gather(1, j1))  # [B, K] highest bidders (ties: largest index)
        win = torch.full((b, n), -1, dtype=torch.long, device=self.dev)
        win.scatter_reduce_(1, j1, torch.where(top, bidders, -1), "amax")  # [B, N] winning bidder
        got = win >= 0  # [B, N] objects that change hands
        old = torch.where(got, self.owner, -1)  # [B, N] displaced owners
        self.obj.scatter_(1, torch.where(old >= 0, old, n), -1)  # displaced -> unassigned
        self.obj.scatter_(1, torch.where(got, win, n), self.ar)  # winners -> assigned
        self.owner.copy_(torch.where(got, win, self.owner))
        self.price.copy_(torch.where(got, best, self.price))

    # ---- 2. parallel Hungarian search (the tail) ------------------------------------------

    def search_init(self) -> None:
        """Start a forest, one tree per free bidder, for the items not already searching."""
        n = self.n
        fresh = (self.mode != 1)[:, None]  # [B, 1] idle or just augmented
        free = self.obj[:, :n] < 0  # [B, N] the roots
        self.in_tree.masked_fill_(fresh, False)
        self.slack.masked_fill_(fresh, _INF)
        self.pending[:, :n].copy_(torch.where(fresh, free, self.pending[:, :n]))
        self.root_of_row[:, :n].copy_(torch.where(fresh, self.ar, self.root_of_row[:, :n]))
        self.end_of_tree.masked_fill_(fresh, -1)
        self.n_roots.copy_(torch.where(fresh[:, 0], free.sum(1), self.n_roots))
        self.mode.copy_(torch.where(fresh[:, 0], (free.any(1)).long(), self.mode))

    def search_step(self, k: int) -> None:
        """One step of the Hungarian method on a forest: expand pending bidders, or a dual update.

        Reduced costs r_ij = (c_ij + p_j) - min_l (c_il + p_l) = max_l w_il - w_ij >= 0.
        ``slack[j]`` = min over forest bidders of r_ij (minus the dual updates since).
        Up to ``k`` pending bidders are expanded; once none is pending, the forest's prices
        rise by δ = min slack outside it (dual update, keeps every r_ij >= 0). Objects with
        slack <= ε join the tree of the bidder that reached them; their owners become
        pending bidders of that tree. A free object ends its tree's path (the first one
        per tree is kept). The search stops once every tree has a path or no free object
        is left outside the forest; :meth:`augment` then flips all paths at once (trees
        are disjoint, so are their paths).
        """
        b, n = self.b, self.n
        searching = self.mode == 1  # [B]
        rows, valid = self._compact(self.pending[:, :n] & searching[:, None], k)  # [B, K]
        w = self.values(self._rows(rows))  # [B, K, N]
        red = torch.where(valid[..., None], w.amax(2, keepdim=True) - w, _INF)  # [B, K, N]
        rmin, rarg = red.min(1)  # [B, N] best forest bidder per object
        better = (rmin < self.slack) & ~self.in_tree  # [B, N]
        self.slack.copy_(torch.where(better, rmin, self.slack))
        self.pred.copy_(torch.where(better, rows.gather(1, rarg), self.pred))
        self.pending.scatter_(1, torch.where(valid, rows, n), False)
        # dual update: raise the forest's prices by δ = min slack outside it
        # (only once every forest bidder is expanded, so that `slack` is exact)
        ready = searching & ~self.pending[:, :n].any(1)  # [B]
        delta = torch.where(self.in_tree, _INF, self.slack).amin(1)  # [B]
        delta = torch.where(ready, delta.clamp(min=0.0), 0.0)[:, None]  # [B, 1]
        self.price.add_(torch.where(self.in_tree, delta, 0.0))
        self.slack.sub_(torch.where(self.in_tree, 0.0, delta))
        # grow the forest by every object within ε
        new = ~self.in_tree & (self.slack <= self.eps) & searching[:, None]  # [B, N]
        self.in_tree.logical_or_(new)
        tree = self.root_of_row.gather(1, self.pred)  # [B, N] tree of each object's parent
        free_new = new & (self.owner < 0)  # [B, N] a path for that tree
        self.end_of_tree.scatter_reduce_(1, torch.where(free_new, tree, n), self.ar, "amax")
        grow = new & (self.owner >= 0)  # [B, N] owners join the tree
        to = torch.where(grow, self.owner, n)  # [B, N]
        self.pending.scatter_(1, to, True)
        self.root_of_row.scatter_(1, to, tree)
        # stop when every tree has a path, or when no free object is left to reach
        n_paths = (self.end_of_tree[:, :n] >= 0).sum(1)  # [B]
        left = (~self.in_tree & (self.owner < 0)).any(1)  # [B]
        need = (self.n_roots.double() * _STOP_FRAC).ceil().long().clamp(min=1)  # [B]
        stop = searching & ((n_paths >= need) | ~left)  # [B]
        self.mode.copy_(torch.where(stop, 2, self.mode))

    def augment(self) -> None:
        """Flip the paths found by each item in mode 2 and restart its search.

        A path runs free object -> its parent bidder -> that bidder's object -> ... -> a
        root. Its objects are collected by pointer doubling in ceil(log2(N+1)) static
        steps; then every bidder on a path takes the object it reached, all at once.
        """
        b, n = self.b, self.n
        flip = self.mode == 2  # [B]
        up = self.obj.gather(1, self.pred)  # [B, N] next object towards the root (-1 at a root)
        up = torch.where((up >= 0) & self.in_tree, up, n)  # [B, N]; N: sink
        jump = torch.cat([up, up.new_full((b, 1), n)], 1)  # [B, N+1]
        on = torch.zeros(b, n + 1, dtype=torch.bool, device=self.dev)  # [B, N+1] objects on a path
        end = self.end_of_tree[:, :n]  # [B, N] per root (column N is the trash slot)
        ends = torch.where(flip[:, None] & (end >= 0), end, n)  # [B, N]
        on.scatter_(1, ends, True)
        for _ in range(max(1, math.ceil(math.log2(n + 1)))):
            on.scatter_(1, torch.where(on, jump, n), True)  # add the images of the paths so far
            jump = jump.gather(1, jump)  # jump twice as far
        path = on[:, :n] & flip[:, None]  # [B, N]
        self.owner.copy_(torch.where(path, self.pred, self.owner))
        self.obj.scatter_(1, torch.where(path, self.pred, n), self.ar)
        self.mode.copy_(torch.where(flip, 3, self.mode))  # 3: restart
        self.search_init()

    # ---- 3. certificate ------------------------------------------------------------------

    def slacks(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per bidder (max_j w_ij, w_i,obj(i)) over all objects, in row chunks.

        ``max - own`` is bidder i's ε-CS slack and its sum the duality gap of the prices.
        Unassigned bidders get ``-inf`` as ``own``.
        """
        b, n = self.b, self.n
        vmax = torch.empty(b, n, device=self.dev)  # [B, N]
        vown = torch.empty(b, n, device=self.dev)  # [B, N]
        obj = self.obj[:, :n]  # [B, N]
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            v = self.values(self.x[:, s:e])  # [B, c, N]
            vmax[:, s:e] = v.amax(2)
            o = obj[:, s:e]
            vo = v.gather(2, o.clamp(min=0)[..., None])[..., 0]  # [B, c]
            vown[:, s:e] = torch.where(o >= 0, vo, -_INF)
        return vmax, vown


# Solvers (buffers + captured CUDA graphs) of the last few problem shapes: capturing
# costs tens of ms, so a dataset loop over equal-sized batches captures only once.
_SOLVERS: dict[tuple, _Solver] = {}
_SOLVER_CACHE_SIZE = 16
_SOLVER_LOCK = threading.Lock()
_CAPTURE_LOCK = threading.Lock()


def _get_solver(b: int, n: int, d: int, dev: torch.device, graphs: bool, compile: bool, slot: int = 0,
                kernels: str = "torch") -> _Solver:
    key = (b, n, d, str(dev), graphs, compile, slot, kernels)
    with _SOLVER_LOCK:
        return _get_solver_locked(key, b, n, d, dev, graphs, compile, kernels)


def _get_solver_locked(key, b, n, d, dev, graphs, compile, kernels="torch") -> _Solver:
    st = _SOLVERS.pop(key, None)
    if st is None:
        while len(_SOLVERS) >= _SOLVER_CACHE_SIZE:
            _SOLVERS.pop(next(iter(_SOLVERS)))
        if kernels == "triton":
            st = _triton_solver_class()(b, n, d, dev, graphs, compile)
        else:
            st = _Solver(b, n, d, dev, graphs, compile)
    _SOLVERS[key] = st  # most recent last
    return st


def _triton_solver_class() -> type:
    """``TritonSolver``: :class:`_Solver` with the fused steps of ``_assign_triton.TritonSteps`` (imports triton)."""
    global _TRITON_SOLVER
    if _TRITON_SOLVER is None:
        from ._assign_triton import TritonSteps

        class TritonSolver(TritonSteps, _Solver):
            __doc__ = TritonSteps.__doc__

        _TRITON_SOLVER = TritonSolver
    return _TRITON_SOLVER


_TRITON_SOLVER: type | None = None


def triton_available() -> bool:
    """Whether the fused Triton kernels of the auction can be used (triton imports)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401

            from . import _assign_triton  # noqa: F401

            _TRITON_OK = True
        except Exception:  # ImportError, or a triton that does not fit this torch
            _TRITON_OK = False
    return _TRITON_OK


_TRITON_OK: bool | None = None


def clear_cache() -> None:
    """Free the auction's cached device buffers and CUDA graphs."""
    _SOLVERS.clear()


def _auction_streams(
    x: torch.Tensor, y: torch.Tensor, *, streams: int, kernels: str = "torch", **kw
) -> tuple[torch.Tensor, AuctionInfo]:
    """Batched auction on CUDA as up to ``streams`` independent solves on their own streams.

    One step of the solver is a few dozen small kernels that leave most of the GPU idle,
    and in a single batched solve every item waits for the slowest at each phase. So the
    items are split over ``streams`` host threads, each replaying its own CUDA graphs
    on its own stream: the GPU overlaps them, and each item runs its own schedule.
    """
    b = x.shape[0]
    s = max(1, min(streams, b))
    dev = x.device
    main = torch.cuda.current_stream(dev)
    lanes = [torch.cuda.Stream(dev) for _ in range(s)]
    n, d = x.shape[1], x.shape[2]
    graphs = kw["cuda_graphs"]
    for w in range(s):  # capture every graph here, so the lanes only replay them
        st = _get_solver(1, n, d, dev, graphs, kw.get("compile", False), slot=1 + w, kernels=kernels)
        if graphs and not st._graphs:
            reps = kw["rounds_per_sync"] + kw["rounds_per_sync"] % 2 if kernels == "triton" else kw["rounds_per_sync"]
            st.capture_all(max(1, min(kw["max_bidders"], n)), reps)

    def lane(w: int) -> list:
        out = []
        with torch.cuda.device(dev), torch.cuda.stream(lanes[w]):
            lanes[w].wait_stream(main)
            for i in range(w, b, s):
                yi = y[i : i + 1] if y.shape[0] > 1 else y
                out.append((i, _auction(x[i : i + 1], yi, slot=1 + w, kernels=kernels, **kw)))
        return out

    with ThreadPoolExecutor(max_workers=s) as pool:
        results = [r for part in pool.map(lane, range(s)) for r in part]
    for ln in lanes:
        main.wait_stream(ln)
    results.sort(key=lambda r: r[0])
    perms = torch.cat([r[1][0] for r in results])  # [B, N]
    infos = [r[1][1] for r in results]
    info = AuctionInfo(
        cost=np.concatenate([i.cost for i in infos]),
        lower_bound=np.concatenate([i.lower_bound for i in infos]),
        eps=np.concatenate([i.eps for i in infos]),
        phases=max(i.phases for i in infos),
        rounds=max(i.rounds for i in infos),
        searches=sum(i.searches for i in infos),
        search_steps=max(i.search_steps for i in infos),
        syncs=sum(i.syncs for i in infos),
        history=infos[0].history,
    )
    return perms, info


def _step_sizes(cap: int) -> list[int]:
    """Every value :func:`_pow2_at_least` can return for this cap."""
    return sorted({_pow2_at_least(4**i, cap) for i in range(1, 17)})


def _pow2_at_least(m: int, cap: int) -> int:
    """Smallest power of 4 >= max(m, 4) (few distinct sizes: few CUDA graphs), at most ``cap``."""
    k = 4
    while k < m:
        k *= 4
    return max(1, min(k, cap))


@torch.no_grad()
def _auction(
    x: torch.Tensor,  # [Bx, N, D]
    y: torch.Tensor,  # [By, N, D], By in {1, Bx}
    *,
    eps: float | None,
    rtol: float,
    eps_start: float | None,
    eps_factor: float,
    max_bidders: int,
    tail: int | None,
    rounds_per_sync: int,
    cuda_graphs: bool,
    compile: bool = False,
    slot: int = 0,
    kernels: str = "torch",
) -> tuple[torch.Tensor, AuctionInfo]:
    b, n, _ = x.shape
    dev = x.device
    if eps_factor <= 1:
        raise ValueError(f"eps_factor must be > 1, got {eps_factor}")
    if n == 1:
        z = np.zeros(b)
        cost = ((x - y) ** 2).double().sum((1, 2)).cpu().numpy()
        return torch.zeros(b, 1, dtype=torch.long, device=dev), AuctionInfo(cost, cost.copy(), z)

    # Distances are translation invariant: centre both sets on x's centroid so that the
    # float32 values 2 x.y - |y|^2 stay as accurate as the data allow.
    shift = x.mean(1, keepdim=True)  # [B, 1, D]
    xs = x - shift  # [B, N, D]
    ys = (y - shift).expand(b, n, -1)  # [B, N, D]
    st = _get_solver(b, n, xs.shape[2], dev, cuda_graphs and dev.type == "cuda", compile, slot, kernels)
    fused = kernels == "triton"
    if fused:  # every captured graph must end at list parity 0
        rounds_per_sync += rounds_per_sync % 2
    st.load(xs, ys)

    # cost scale: squared diameter of the bounding box of both sets, per item
    lo = torch.minimum(xs.amin(1), ys.amin(1))  # [B, D]
    hi = torch.maximum(xs.amax(1), ys.amax(1))  # [B, D]
    scale = ((hi - lo) ** 2).sum(-1).clamp(min=1e-30)  # [B]
    e_floor = scale * _EPS_FLOOR  # [B] below this float32 prices cannot resolve ε
    e0 = scale / 32.0 if eps_start is None else torch.full_like(scale, float(eps_start))
    e_min = e_floor if eps is None else torch.maximum(torch.full_like(scale, float(eps)), e_floor)
    e0 = torch.maximum(e0, e_min)
    st.eps.copy_(e0[:, None])
    rtol_eff = rtol if eps is None else 0.0

    k_cap = max(1, min(max_bidders, n))
    t_tail = max(16, n // 1024) if tail is None else max(0, int(tail))  # switch to the searches
    chunk = max(1, min(n, (1 << 26) // max(1, b * n)))  # rows per slack chunk: <= 64M values
    info = AuctionInfo(np.zeros(b), np.zeros(b), np.zeros(b))
    done = torch.zeros(b, dtype=torch.bool, device=dev)  # [B]

    while True:
        # ---- 1. Jacobi auction while many bidders are free -----------------------------
        rounds = 0
        t_phase = time.perf_counter()  # stage times below are host times between syncs
        if fused:
            st.start_bidding()
        while True:
            n_free = int((st.obj[:, :n] < 0).sum(1).max())  # host sync
            info.syncs += 1
            if n_free <= t_tail:
                break
            k = _pow2_at_least(n_free, k_cap)
            st.run(("bid", k), lambda: st.step_bid(k), rounds_per_sync)
            rounds += rounds_per_sync
        # ---- 2. the last few by parallel Hungarian searches -----------------------------
        t_bid = time.perf_counter()
        steps = augments = 0
        if n_free > 0:
            st.mode.zero_()
            st.search_init()
            while True:
                modes = st.mode.cpu()  # host sync
                info.syncs += 1
                if bool((modes == 0).all()):
                    break
                if bool((modes == 2).any()):
                    info.searches += int((modes == 2).sum())
                    augments += 1
                    st.run(("aug",), st.augment, 1)
                    continue
                # fused steps expand every pending row: one graph
                k = 0 if fused else _pow2_at_least(int(st.pending[:, :n].sum(1).max()), k_cap)
                st.run(("search", k), lambda: st.step_search(k), rounds_per_sync)
                steps += rounds_per_sync
        info.rounds += rounds
        info.search_steps += steps
        t_search = time.perf_counter()

        # ---- 3. certificate: gap = sum_i (max_j w_ij - w_i,obj(i)) <= N ε ----------------
        vmax, vown = st.slacks(chunk)  # [B, N] each
        slack = vmax - vown  # [B, N] ε-CS slack per bidder
        gap = slack.double().sum(1)  # [B]
        perm = st.obj[:, :n]  # [B, N]
        cost = ((xs - ys.gather(1, perm[..., None].expand_as(xs))) ** 2).double().sum((1, 2))  # [B]
        e_now = st.eps[:, 0]
        info.history.append(
            dict(eps=float(e_now.max()), rounds=rounds, search_steps=steps, augments=augments,
                 gap=(gap / cost).cpu().numpy(), bid_s=t_bid - t_phase, search_s=t_search - t_bid)
        )
        info.phases += 1
        done |= (gap <= rtol_eff * cost) | (e_now <= e_min * (1 + 1e-6))
        if bool(done.all()):
            break
        # ---- next phase: smaller ε; unassign the bidders violating the new ε-CS ---------
        e_next = e_now / eps_factor  # [B]
        if rtol_eff > 0:  # gap ~ linear in ε: a gentler last step when the gap is near rtol
            rel = (gap / cost).float().clamp(min=1e-30)  # [B]
            e_next = torch.maximum(e_next, e_now * (0.5 * rtol_eff / rel).clamp(max=0.5))
        st.eps.copy_(torch.where(done, e_now, torch.maximum(e_next, e_min))[:, None])
        bad = (slack > st.eps) & ~done[:, None]  # [B, N]
        owner_pad = torch.cat([st.owner, st.owner.new_full((b, 1), -1)], 1)  # [B, N+1]
        owner_pad.scatter_(1, torch.where(bad, perm, n), -1)
        st.owner.copy_(owner_pad[:, :n])
        st.obj[:, :n].masked_fill_(bad, -1)

    info.cost = cost.cpu().numpy()
    info.lower_bound = (cost - gap).cpu().numpy()
    info.eps = st.eps[:, 0].double().cpu().numpy()
    return st.obj[:, :n].clone(), info
