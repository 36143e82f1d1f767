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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "METHODS",
    "AuctionInfo",
    "assign",
    "assignment_cost",
    "fibonacci_sphere",
]

METHODS = ("auto", "scipy", "emd", "auction")

# "auto" on a CPU uses the exact scipy solver up to this size (scipy takes ~0.3 s at
# N=2048 on a 2-core CPU and grows ~N^2.7), the auction above it.
_AUTO_SCIPY_MAX_N = 2048


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
    rtol: float = 1e-4,
    eps_start: float | None = None,
    eps_factor: float = 8.0,
    max_bidders: int = 4096,
    rounds_per_sync: int = 16,
    cuda_graphs: bool = True,
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
        exact, CPU, O(N^3) time and a dense O(N^2) cost matrix).
        ``"emd"``: POT's :func:`ot.emd` network simplex (exact, CPU; POT is imported
        only here). ``"auction"``: the ε-scaling auction below, in torch, on ``x``'s
        device (CUDA or CPU). ``"auto"``: the auction for CUDA inputs and for CPU
        inputs with N > 2048, scipy otherwise.
    eps : float, optional
        Final ε of the auction (absolute, in the units of the cost). The result then
        satisfies ``cost <= optimum + N * eps`` for every item. By default the
        ε-scaling runs until the certified gap is below ``rtol`` instead, with
        ``eps = 1e-7 * scale`` as the floor (``scale`` = squared diameter of the data).
    rtol : float
        Stop refining an item once its certified relative gap ``(cost - lower_bound) /
        cost`` is at most ``rtol`` (checked after each ε phase; ``0`` disables it). The
        lower bound is the dual value of the auction prices, so this is a guarantee,
        not an estimate (up to float32 rounding of the bids, ~1e-6 relative).
    eps_start : float, optional
        ε of the first phase; default ``scale / 32``.
    eps_factor : float
        ε is divided by this between phases (Bertsekas' θ; 4-10 are usual).
    max_bidders : int
        At most this many unassigned bidders per item bid in one round (bounds the
        ``[B, K, N]`` work buffer; the others bid in later rounds).
    rounds_per_sync : int
        Bidding rounds between two reads of the unassigned count (each read is a
        device-to-host sync); on CUDA these rounds are one captured CUDA graph.
    cuda_graphs : bool
        Capture the bidding rounds into CUDA graphs (CUDA only).
    return_info : bool
        Also return an :class:`AuctionInfo` (auction only; other methods give ``None``).

    Returns
    -------
    perm : ndarray or LongTensor, ``[N]`` or ``[B, N]``
        ``perm[..., i]`` is the index of the y assigned to x_i; always a permutation.
        Same library (numpy/torch) as ``x``; a tensor is on ``x``'s device.

    Notes
    -----
    *Auction* (Bertsekas 1988; ε-scaling as in Bertsekas & Eckstein 1988; see
    D. P. Bertsekas, "Auction algorithms for network flow problems: a tutorial
    introduction", Comput. Optim. Appl. 1:7-66, 1992). Each y_j ("object") carries a
    price p_j. Every unassigned x_i ("bidder") finds its best object
    j1 = argmax_j (-c_ij - p_j) and the second-best value, and bids
    p_j1 + (best - second) + ε for it; each object goes to its highest bidder, whose
    previous owner becomes unassigned. All unassigned bidders bid at once (the
    Jacobi variant), so one round is a handful of batched tensor ops:
    ``[B, K, D] @ [B, D, N]`` for the values (the cost is never stored: c_ij =
    |x_i|^2 + |y_j|^2 - 2 x_i.y_j), a top-2 along N, and two scatter-max's.
    A phase ends when everyone is assigned; the assignment then satisfies ε-complementary
    slackness, which bounds ``cost <= optimum + N ε``. Phases are run with ε divided by
    ``eps_factor`` each time, keeping the prices (warm start) and unassigning only the
    pairs that violate the new ε-CS; after each phase the dual value
    ``sum_i min_j (c_ij + p_j) - sum_j p_j`` (a lower bound on the optimum) gives a
    certified gap, and an item stops once that gap is within ``rtol``.

    *Why it is fast on a GPU*: the number of rounds, not the arithmetic, sets the time
    (a round with K bidders costs K·N·D flops). So a batch of B objects bids in the same
    kernels, rounds run ``rounds_per_sync`` at a time from a captured CUDA graph with no
    host sync inside, and the unassigned bidders are compacted into a fixed-capacity
    list (K = the next power of two above the count, re-chosen at each sync) so the
    shapes are static.

    *Complexity*: each phase is O(N^2 · C/ε) bids in the worst case; in practice the
    whole solve takes a few thousand rounds of O(B·K·N·D) work (see docs/benchmarks.md).
    Memory is O(B·K·N) for the bid values, never O(N^2) per object.

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(size=(64, 3))
    >>> perm = assign(x, fibonacci_sphere(64), "auction")
    >>> sorted(perm.tolist()) == list(range(64))
    True
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
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
            perm_np = np.stack([solve(xn[b], yn if yn.ndim == 2 else yn[b]) for b in range(batch)])
        out: Any = torch.from_numpy(perm_np).to(device) if is_torch else perm_np
        return (out, None) if return_info else out

    # --- auction -----------------------------------------------------------------------
    xt = torch.as_tensor(x, dtype=torch.float32, device=device)
    yt = torch.as_tensor(y, dtype=torch.float32, device=device)
    if batch == 0:
        xt, yt = xt[None], yt[None]  # [1, N, D]
    elif yt.dim() == 2:
        yt = yt[None]  # [1, N, D], shared
    perm_t, info = _auction(
        xt,
        yt,
        eps=eps,
        rtol=rtol,
        eps_start=eps_start,
        eps_factor=eps_factor,
        max_bidders=max_bidders,
        rounds_per_sync=rounds_per_sync,
        cuda_graphs=cuda_graphs,
    )
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
    rounds: int = 0  # bidding rounds run (batch-wide)
    syncs: int = 0  # device-to-host reads of the unassigned count
    history: list = field(default_factory=list)  # (eps, rounds in phase) per phase

    @property
    def rel_gap(self) -> np.ndarray:
        """Certified relative gap ``(cost - lower_bound) / cost`` per item."""
        return (self.cost - self.lower_bound) / np.maximum(self.cost, 1e-300)


class _AuctionState:
    """Batched auction state on one device; all updates are in place (CUDA-graph safe)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int):
        b, n, d = batch, x.shape[1], x.shape[2]
        dev = x.device
        self.b, self.n, self.d = b, n, d
        self.x = x.expand(b, n, d).contiguous()  # [B, N, D] bidders
        self.yt = (2.0 * y).transpose(1, 2).expand(b, d, n).contiguous()  # [B, D, N] 2·y
        self.y2 = (y * y).sum(-1).expand(b, n).contiguous()  # [B, N] |y_j|^2
        self.price = torch.zeros(b, n, device=dev)  # [B, N] object prices
        self.owner = torch.full((b, n), -1, dtype=torch.long, device=dev)  # [B, N] object -> bidder
        self.obj = torch.full((b, n + 1), -1, dtype=torch.long, device=dev)  # [B, N+1] bidder -> object (col N: trash)
        self.eps = torch.zeros(b, 1, device=dev)  # [B, 1] current ε per item
        self.ar = torch.arange(n, device=dev).expand(b, n)  # [B, N]
        self.neg_inf = torch.tensor(float("-inf"), device=dev)

    # values v_ij = 2 x_i.y_j - |y_j|^2 - p_j = -(c_ij + p_j) + |x_i|^2, for K bidders
    def values(self, xb: torch.Tensor) -> torch.Tensor:
        bias = (-self.y2 - self.price)[:, None, :]  # [B, 1, N]
        return torch.baddbmm(bias, xb, self.yt)  # [B, K, N]

    def bid_round(self, k: int) -> None:
        """One Jacobi bidding round for up to ``k`` unassigned bidders per item."""
        b, n, d = self.b, self.n, self.d
        free = self.obj[:, :n] < 0  # [B, N] unassigned bidders
        rank = free.long().cumsum(1) - 1  # [B, N]
        slot = torch.where(free & (rank < k), rank, k)  # [B, N] position in the bid list
        bidders = torch.full((b, k + 1), n, dtype=torch.long, device=self.x.device)
        bidders.scatter_(1, slot, self.ar)  # [B, K+1]; slot k collects the rest (dropped)
        bidders = bidders[:, :k]  # [B, K]
        active = bidders < n  # [B, K]
        bi = bidders.clamp(max=n - 1)  # [B, K]
        xb = self.x.gather(1, bi[..., None].expand(b, k, d))  # [B, K, D]
        top_v, top_j = self.values(xb).topk(2, dim=2)  # [B, K, 2]
        j1 = top_j[..., 0]  # [B, K] best object
        bid = self.price.gather(1, j1) + (top_v[..., 0] - top_v[..., 1]) + self.eps  # [B, K]
        bid = torch.where(active, bid, self.neg_inf)  # [B, K]
        best = torch.full((b, n), float("-inf"), device=self.x.device)
        best.scatter_reduce_(1, j1, bid, "amax")  # [B, N] highest bid per object
        top = active & (bid >= best.gather(1, j1))  # [B, K] highest bidders
        win = torch.full((b, n), -1, dtype=torch.long, device=self.x.device)
        win.scatter_reduce_(1, j1, torch.where(top, bidders, -1), "amax")  # [B, N] winner
        got = win >= 0  # [B, N] objects that changed hands
        old = torch.where(got, self.owner, -1)  # [B, N] displaced owners
        self.obj.scatter_(1, torch.where(old >= 0, old, n), -1)  # displaced: unassigned
        self.obj.scatter_(1, torch.where(got, win, n), self.ar)  # winners: assigned
        self.owner.copy_(torch.where(got, win, self.owner))
        self.price.copy_(torch.where(got, best, self.price))

    @torch.no_grad()
    def slack(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-bidder (max_j v_ij, v_i,obj(i)) over all objects, in row chunks.

        ``max - assigned`` is bidder i's ε-CS slack; its sum is the duality gap.
        Unassigned bidders get ``-inf`` as their assigned value.
        """
        b, n, d = self.b, self.n, self.d
        vmax = torch.empty(b, n, device=self.x.device)  # [B, N]
        vown = torch.empty(b, n, device=self.x.device)  # [B, N]
        obj = self.obj[:, :n]  # [B, N]
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            v = self.values(self.x[:, s:e])  # [B, c, N]
            vmax[:, s:e] = v.amax(2)
            o = obj[:, s:e]
            vo = v.gather(2, o.clamp(min=0)[..., None])[..., 0]  # [B, c]
            vown[:, s:e] = torch.where(o >= 0, vo, self.neg_inf)
        return vmax, vown


def _auction(
    x: torch.Tensor,  # [Bx, N, D]
    y: torch.Tensor,  # [By, N, D], By in {1, Bx}
    *,
    eps: float | None,
    rtol: float,
    eps_start: float | None,
    eps_factor: float,
    max_bidders: int,
    rounds_per_sync: int,
    cuda_graphs: bool,
) -> tuple[torch.Tensor, AuctionInfo]:
    b, n, _ = x.shape
    dev = x.device
    if n == 1:
        z = np.zeros(b)
        cost = np.asarray(assignment_cost(x.cpu(), y.expand_as(x).cpu(), np.zeros((b, 1), np.int64)))
        return torch.zeros(b, 1, dtype=torch.long, device=dev), AuctionInfo(cost, cost.copy(), z)
    if eps_factor <= 1:
        raise ValueError(f"eps_factor must be > 1, got {eps_factor}")

    # centre each item (translation changes every assignment's cost by the same amount
    # only when x and y move together; here we move both by x's centroid)
    # -> keeps |x|,|y| small so float32 values 2x.y - |y|^2 stay accurate
    shift = x.mean(1, keepdim=True)  # [B, 1, D]
    xs = x - shift  # [B, N, D]
    ys = y - shift  # [B, N, D] (broadcast when y is shared)
    st = _AuctionState(xs, ys, b)

    # scale of the costs: squared diameter of the union's bounding box, per item
    lo = torch.minimum(xs.amin(1), ys.amin(1))  # [B, D]
    hi = torch.maximum(xs.amax(1), ys.amax(1))  # [B, D]
    scale = ((hi - lo) ** 2).sum(-1).clamp(min=1e-12)  # [B]
    e0 = scale / 32.0 if eps_start is None else torch.full_like(scale, float(eps_start))
    e_min = scale * 1e-7 if eps is None else torch.full_like(scale, float(eps))
    st.eps.copy_(e0[:, None])
    rtol_eff = rtol if eps is None else 0.0

    chunk = max(1, min(n, (1 << 26) // max(1, b * n)))  # rows per slack chunk: <= 64M values
    k_cap = max(1, min(max_bidders, n))
    use_graphs = cuda_graphs and dev.type == "cuda"
    graphs: dict[int, Any] = {}

    def run_rounds(k: int) -> None:
        if not use_graphs:
            for _ in range(rounds_per_sync):
                st.bid_round(k)
            return
        g = graphs.get(k)
        if g is None:
            s = torch.cuda.Stream(device=dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):  # warm-up outside capture (allocator, cuBLAS handles)
                st.bid_round(k)
            torch.cuda.current_stream(dev).wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(rounds_per_sync):
                    st.bid_round(k)
            graphs[k] = g
            # the warm-up round was a real round: fine, auction rounds are idempotent steps
        g.replay()

    done = torch.zeros(b, dtype=torch.bool, device=dev)  # [B] items that reached rtol / eps
    info = AuctionInfo(np.zeros(b), np.zeros(b), np.zeros(b))
    rounds_total = 0
    while True:
        # ---- bidding until every bidder of every item is assigned ----------------------
        rounds_phase = 0
        while True:
            n_free = int((st.obj[:, :n] < 0).sum(1).max())  # sync
            info.syncs += 1
            if n_free == 0:
                break
            k = min(k_cap, 1 << (n_free - 1).bit_length())  # next power of two
            run_rounds(k)
            rounds_phase += rounds_per_sync
        rounds_total += rounds_phase
        info.history.append((float(st.eps.max()), rounds_phase))

        # ---- certificate: gap = sum_i (max_j v_ij - v_i,obj(i)) <= N ε -----------------
        vmax, vown = st.slack(chunk)  # [B, N] each
        gap = (vmax - vown).double().sum(1)  # [B]
        cost = st.x.new_zeros(b, dtype=torch.float64)
        perm = st.obj[:, :n]  # [B, N]
        yb = ys.expand(b, n, -1)
        cost = ((xs - yb.gather(1, perm[..., None].expand_as(xs))) ** 2).double().sum((1, 2))  # [B]
        e_now = st.eps[:, 0]
        done |= (gap <= rtol_eff * cost) | (e_now <= e_min * (1 + 1e-6))
        if bool(done.all()):
            break
        # ---- next phase: smaller ε; unassign the pairs violating the new ε-CS -----------
        st.eps.copy_(torch.where(done, e_now, torch.maximum(e_now / eps_factor, e_min))[:, None])
        bad = (vmax - vown > st.eps) & ~done[:, None]  # [B, N] bidders to re-bid
        objs = torch.where(bad, perm, n)  # [B, N]
        owner_pad = torch.cat([st.owner, st.owner.new_full((b, 1), -1)], 1)  # [B, N+1]
        owner_pad.scatter_(1, objs, -1)
        st.owner.copy_(owner_pad[:, :n])
        st.obj[:, :n].masked_fill_(bad, -1)
        info.phases += 1

    info.phases += 1
    info.rounds = rounds_total
    info.cost = cost.cpu().numpy()
    info.lower_bound = (cost - gap).cpu().numpy()
    info.eps = st.eps[:, 0].double().cpu().numpy()
    return st.obj[:, :n].clone(), info
