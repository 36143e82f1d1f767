"""Fused Triton kernels for the auction of :mod:`gaussian_atlas.assign` (``kernels="triton"``).

Imported only when triton imports (``assign`` falls back to its torch steps otherwise). The
torch solver spends 25-50 small kernels on one bidding round or search step (step latency,
not arithmetic, sets its speed: docs/benchmarks.md); here a bidding round is 2 kernels and a
search step 4, with the same state layout as :class:`gaussian_atlas.assign._Solver` so the
certificate, the phase logic and the path flips (``augment``) are shared.

Bidding round (Jacobi auction), per item b and bidder i of the current free list:

1. ``_bid_kernel`` (one program per list slot, strided): one pass over the N objects computes
   w_ij = 2 x_i.y_j - |y_j|^2 - p_j, keeping the best value, its object j1 and the second
   best; bids ``p_j1 + (v1 - v2) + ε`` and records it with one 64-bit ``atomic_max`` of the
   key ``(ord(bid) << 32) | i`` at object j1 (``ord`` maps float32 to int32 with the same
   order): the largest key is the highest bid, ties going to the largest bidder index,
   exactly as the torch round's two scatter-max's.
2. ``_resolve_kernel``: a bidder whose index is in its object's key won it: it takes the
   object, sets the price to its bid, unassigns the old owner and clears the key; losers and
   displaced owners are appended to the next free list (an ``atomic_add`` slot counter).
   The lists are double-buffered (parity of the round), so no round reads what it writes.

Search step (parallel Hungarian forest over ε-tight edges), per item, pending rows from a
double-buffered list; every pending row is expanded in every step:

1. ``_rowmax_kernel``: max_j w_ij per pending row.
2. ``_colmin_kernel`` (one program per column block): the row-min of the reduced costs
   ``rowmax_i - w_ij`` over the pending rows, merged into ``slack``/``pred`` of the columns
   outside the forest; a per-block minimum of the slack outside the forest.
3. ``_update_kernel`` (one program per column block): δ = min of those block minima (the
   dual update, once every pending row is expanded: always, here); prices of forest columns
   += δ, other slacks -= δ; columns with slack <= ε join the forest: a free one ends its
   tree's path (``atomic_max`` of the column index per root, as the torch step's scatter
   amax), an owned one appends its owner to the next pending list.
4. ``_finish_kernel`` (one program per item): stop (mode 2) once every tree has a path or
   no free column is left outside the forest.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# keys of the bid atomics: (ord(bid) << 32) | bidder; EMPTY is below every real key and its
# low 32 bits (0xFFFFFFFF) are no bidder's index
_EMPTY = -(2**63) + 2**32 - 1
_BID_BLOCK = 2048  # columns per iteration of a row scan
_COL_BLOCK = 128  # columns per program of the column kernels (N = 16,384: 128 programs, ~1 per SM)
_ROWS = 16  # pending rows per tile of the column-min kernel
_WARPS = 8  # warps of the row-scan kernels


@triton.jit
def _ord(v):
    """float32 -> int32 with the same order (for the packed 64-bit atomic keys)."""
    bits = v.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _values(x_ptr, yt_ptr, y2_ptr, price_ptr, b, i, j, m, N, D: tl.constexpr, BLOCK: tl.constexpr):
    """w_ij = 2 x_i.y_j - |y_j|^2 - p_j for one bidder i and a block of columns j ``[BLOCK]``.

    As torch's ``baddbmm(bias, x, 2y)``: the dot product first, then the bias ``-|y|^2 - p``.
    """
    dot = tl.zeros([BLOCK], tl.float32)
    for d in tl.static_range(D):
        xd = tl.load(x_ptr + (b * N + i) * D + d)
        dot += xd * tl.load(yt_ptr + (b * D + d) * N + j, mask=m, other=0.0)
    bias = -tl.load(y2_ptr + b * N + j, mask=m, other=0.0) - tl.load(price_ptr + b * N + j, mask=m, other=0.0)
    return tl.where(m, dot + bias, -float("inf"))


@triton.jit
def _bid_kernel(x_ptr, yt_ptr, y2_ptr, price_ptr, eps_ptr, list_ptr, cnt_ptr, cnt_next_ptr,
                j1_ptr, bid_ptr, key_ptr, N, KG, D: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    k0 = tl.program_id(1)
    cnt = tl.load(cnt_ptr + b)
    if k0 == 0:
        tl.store(cnt_next_ptr + b, 0)  # the list the resolve kernel appends to (read last round)
    eps = tl.load(eps_ptr + b)
    offs = tl.arange(0, BLOCK)
    for k in range(k0, cnt, KG):
        i = tl.load(list_ptr + b * N + k)
        v1 = tl.full([], -float("inf"), tl.float32)
        v2 = tl.full([], -float("inf"), tl.float32)
        j1 = tl.full([], 0, tl.int32)
        for s in range(0, N, BLOCK):
            j = s + offs
            w = _values(x_ptr, yt_ptr, y2_ptr, price_ptr, b, i, j, j < N, N, D, BLOCK)
            bm = tl.max(w, 0)
            barg = tl.min(tl.where(w == bm, j, 2147483647), 0)  # first column of the block max
            bsec = tl.max(tl.where(j == barg, -float("inf"), w), 0)
            take = bm > v1  # ties keep the earlier column
            v2 = tl.where(take, tl.maximum(v1, bsec), tl.maximum(v2, bm))
            j1 = tl.where(take, barg, j1)
            v1 = tl.where(take, bm, v1)
        bid = tl.load(price_ptr + b * N + j1) + (v1 - v2) + eps
        tl.store(j1_ptr + b * N + k, j1)
        tl.store(bid_ptr + b * N + k, bid)
        key = (_ord(bid).to(tl.int64) << 32) | i.to(tl.int64)
        tl.atomic_max(key_ptr + b * N + j1, key)


@triton.jit
def _resolve_kernel(list_ptr, cnt_ptr, list_next_ptr, cnt_next_ptr, j1_ptr, bid_ptr, key_ptr,
                    owner_ptr, obj_ptr, price_ptr, N, KG, EMPTY):
    b = tl.program_id(0)
    k0 = tl.program_id(1)
    cnt = tl.load(cnt_ptr + b)
    for k in range(k0, cnt, KG):
        i = tl.load(list_ptr + b * N + k).to(tl.int64)
        j = tl.load(j1_ptr + b * N + k)
        key = tl.load(key_ptr + b * N + j)  # the winner may clear it meanwhile: then EMPTY, not ours
        won = (key - ((key >> 32) << 32)) == i
        who = i  # appended to the next free list: a loser, or the winner's displaced owner
        if won:
            old = tl.load(owner_ptr + b * N + j)
            if old >= 0:
                tl.store(obj_ptr + b * (N + 1) + old, -1)
            tl.store(obj_ptr + b * (N + 1) + i, j.to(tl.int64))
            tl.store(owner_ptr + b * N + j, i)
            tl.store(price_ptr + b * N + j, tl.load(bid_ptr + b * N + k))
            tl.store(key_ptr + b * N + j, EMPTY)
            who = old
        if who >= 0:
            slot = tl.atomic_add(cnt_next_ptr + b, 1)
            tl.store(list_next_ptr + b * N + slot, who.to(tl.int32))


@triton.jit
def _rowmax_kernel(x_ptr, yt_ptr, y2_ptr, price_ptr, mode_ptr, list_ptr, cnt_ptr, rowmax_ptr,
                   N, KG, D: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    k0 = tl.program_id(1)
    cnt = tl.where(tl.load(mode_ptr + b) == 1, tl.load(cnt_ptr + b), 0)
    offs = tl.arange(0, BLOCK)
    for k in range(k0, cnt, KG):
        i = tl.load(list_ptr + b * N + k)
        vmax = tl.full([BLOCK], -float("inf"), tl.float32)
        for s in range(0, N, BLOCK):
            j = s + offs
            vmax = tl.maximum(vmax, _values(x_ptr, yt_ptr, y2_ptr, price_ptr, b, i, j, j < N, N, D, BLOCK))
        tl.store(rowmax_ptr + b * N + k, tl.max(vmax, 0))


@triton.jit
def _colmin_kernel(x_ptr, yt_ptr, y2_ptr, price_ptr, mode_ptr, list_ptr, cnt_ptr, rowmax_ptr,
                   slack_ptr, pred_ptr, in_tree_ptr, part_ptr, N, NBLK, D: tl.constexpr, BLOCK: tl.constexpr,
                   ROWS: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    searching = tl.load(mode_ptr + b) == 1
    cnt = tl.where(searching, tl.load(cnt_ptr + b), 0)
    j = blk * BLOCK + tl.arange(0, BLOCK)
    m = j < N
    bias = -tl.load(y2_ptr + b * N + j, mask=m, other=0.0) - tl.load(price_ptr + b * N + j, mask=m, other=0.0)
    rmin = tl.full([BLOCK], float("inf"), tl.float32)
    rarg = tl.full([BLOCK], 2**62, tl.int64)
    for k0 in range(0, cnt, ROWS):  # ROWS pending rows at a time: a [ROWS, BLOCK] tile of reduced costs
        ks = k0 + tl.arange(0, ROWS)
        mk = ks < cnt
        i = tl.load(list_ptr + b * N + ks, mask=mk, other=0)
        w = tl.zeros([ROWS, BLOCK], tl.float32)
        for d in tl.static_range(D):  # same order of operations as _values: bitwise the same w
            xd = tl.load(x_ptr + (b * N + i) * D + d, mask=mk, other=0.0)
            w += xd[:, None] * tl.load(yt_ptr + (b * D + d) * N + j, mask=m, other=0.0)[None, :]
        w = w + bias[None, :]
        rm = tl.load(rowmax_ptr + b * N + ks, mask=mk, other=0.0)
        red = tl.where(mk[:, None], tl.maximum(rm[:, None] - w, 0.0), float("inf"))
        cmin = tl.min(red, 0)  # [BLOCK]
        carg = tl.min(tl.where(red == cmin[None, :], i.to(tl.int64)[:, None], 2**62), 0)  # ties: smallest row
        upd = (cmin < rmin) | ((cmin == rmin) & (carg < rarg))  # ties: the smallest row, as torch's min
        rarg = tl.where(upd, carg, rarg)
        rmin = tl.where(upd, cmin, rmin)
    if searching:
        slack = tl.load(slack_ptr + b * N + j, mask=m, other=float("inf"))
        tree = tl.load(in_tree_ptr + b * N + j, mask=m, other=1) != 0
        better = (rmin < slack) & ~tree & m
        slack = tl.where(better, rmin, slack)
        tl.store(slack_ptr + b * N + j, slack, mask=better)
        tl.store(pred_ptr + b * N + j, rarg, mask=better)  # better => rmin finite => a real row
        tl.store(part_ptr + b * NBLK + blk, tl.min(tl.where(tree | ~m, float("inf"), slack), 0))


@triton.jit
def _update_kernel(price_ptr, eps_ptr, mode_ptr, slack_ptr, pred_ptr, in_tree_ptr, owner_ptr, root_ptr,
                   end_ptr, part_ptr, list_next_ptr, cnt_next_ptr, left_ptr, N, NBLK,
                   NBLK_P2: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    if tl.load(mode_ptr + b) == 1:
        q = tl.arange(0, NBLK_P2)
        delta = tl.min(tl.load(part_ptr + b * NBLK + q, mask=q < NBLK, other=float("inf")), 0)
        delta = tl.where(delta == float("inf"), 0.0, tl.maximum(delta, 0.0))  # dual update
        eps = tl.load(eps_ptr + b)
        j = blk * BLOCK + tl.arange(0, BLOCK)
        m = j < N
        tree = tl.load(in_tree_ptr + b * N + j, mask=m, other=1) != 0
        price = tl.load(price_ptr + b * N + j, mask=m, other=0.0)
        tl.store(price_ptr + b * N + j, price + delta, mask=m & tree)
        slack = tl.load(slack_ptr + b * N + j, mask=m, other=float("inf")) - delta
        tl.store(slack_ptr + b * N + j, slack, mask=m & ~tree)
        new = m & ~tree & (slack <= eps)
        tl.store(in_tree_ptr + b * N + j, new.to(tl.int1), mask=new)
        pred = tl.load(pred_ptr + b * N + j, mask=new, other=0)
        root = tl.load(root_ptr + b * (N + 1) + pred, mask=new, other=0)  # tree of the parent
        owner = tl.load(owner_ptr + b * N + j, mask=m, other=0)
        free_new = new & (owner < 0)
        tl.atomic_max(end_ptr + b * (N + 1) + root, j.to(tl.int64), mask=free_new)  # a path for that tree
        grow = new & (owner >= 0)  # owners join the tree as pending rows
        g = grow.to(tl.int32)
        n_grow = tl.sum(g, 0)
        base = tl.atomic_add(cnt_next_ptr + b, n_grow)
        pos = base + tl.cumsum(g, 0) - 1
        tl.store(list_next_ptr + b * N + pos, owner.to(tl.int32), mask=grow)
        tl.store(root_ptr + b * (N + 1) + owner, root, mask=grow)
        n_left = tl.sum((m & ~tree & ~new & (owner < 0)).to(tl.int32), 0)  # free columns outside
        tl.atomic_add(left_ptr + b, n_left)


@triton.jit
def _finish_kernel(mode_ptr, roots_ptr, n_roots_ptr, end_ptr, left_ptr, cnt_ptr, N, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    if tl.load(mode_ptr + b) == 1:
        n_roots = tl.load(n_roots_ptr + b)
        n_paths = tl.full([], 0, tl.int32)
        for s in range(0, n_roots, BLOCK):
            r = s + tl.arange(0, BLOCK)
            mr = r < n_roots
            root = tl.load(roots_ptr + b * N + r, mask=mr, other=0)
            e = tl.load(end_ptr + b * (N + 1) + root, mask=mr, other=-1)
            n_paths += tl.sum((mr & (e >= 0)).to(tl.int32), 0)
        left = tl.load(left_ptr + b)
        if (n_paths >= tl.maximum(n_roots, 1)) | (left == 0):
            tl.store(mode_ptr + b, 2)
        tl.store(left_ptr + b, 0)
        tl.store(cnt_ptr + b, 0)  # the list this step read: the next step appends to it


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


class TritonSteps:
    """The fused steps, mixed in before :class:`~gaussian_atlas.assign._Solver` (``assign._triton_solver_class``
    builds ``TritonSolver(TritonSteps, _Solver)``; this module does not import ``assign``): its bidding rounds
    and search steps are fused kernels.

    Extra state (per item b): free-bidder lists ``flist [2, B, N]`` with counts ``fcnt [2, B]``
    (double-buffered by round parity), bid keys ``key [B, N]`` (EMPTY between rounds),
    pending-row lists ``plist [2, B, N]`` / ``pcnt [2, B]`` and the search roots.
    ``rounds_per_sync`` must be even so that every captured graph ends at parity 0.
    """

    def __init__(self, b: int, n: int, d: int, dev: torch.device, use_graphs: bool, compile: bool = False):
        super().__init__(b, n, d, dev, use_graphs, False)
        self.flist = torch.zeros(2, b, n, dtype=torch.int32, device=dev)  # [2, B, N] free bidders
        self.fcnt = torch.zeros(2, b, dtype=torch.int32, device=dev)  # [2, B]
        self.key = torch.full((b, n), _EMPTY, dtype=torch.int64, device=dev)  # [B, N] highest bid key
        self.j1 = torch.zeros(b, n, dtype=torch.int32, device=dev)  # [B, N] per list slot: best object
        self.bid = torch.zeros(b, n, device=dev)  # [B, N] per list slot: bid
        self.plist = torch.zeros(2, b, n, dtype=torch.int32, device=dev)  # [2, B, N] pending forest rows
        self.pcnt = torch.zeros(2, b, dtype=torch.int32, device=dev)  # [2, B]
        self.roots = torch.zeros(b, n, dtype=torch.int32, device=dev)  # [B, N] the trees' roots
        self.rowmax = torch.zeros(b, n, device=dev)  # [B, N] per pending slot: max_j w_ij
        self.nblk = triton.cdiv(n, _COL_BLOCK)
        self.part = torch.zeros(b, self.nblk, device=dev)  # [B, NBLK] min slack outside the forest per block
        self.left = torch.zeros(b, dtype=torch.int32, device=dev)  # [B] free columns outside the forest
        self._par = 0  # parity of the next bidding round (host side; 0 at every graph boundary)
        self._spar = 0  # parity of the next search step
        self.search_grid = min(512, _next_pow2(n))

    def load(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().load(x, y)
        self.key.fill_(_EMPTY)

    def _free_list(self, mask: torch.Tensor, lst: torch.Tensor, cnt: torch.Tensor) -> None:
        """Write the indices of ``mask`` ``[B, N]`` (ascending) into ``lst`` ``[B, N]``, their count into ``cnt``."""
        n = self.n
        rank = mask.long().cumsum(1) - 1  # [B, N]
        buf = torch.zeros(self.b, n + 1, dtype=torch.int32, device=self.dev)  # [B, N+1]; col N: trash
        buf.scatter_(1, torch.where(mask, rank, n), self.ar.int())
        lst.copy_(buf[:, :n])
        cnt.copy_(mask.sum(1).int())

    def start_bidding(self) -> None:
        """Free list of the current parity from ``obj < 0`` (once per phase, not in a graph)."""
        self._free_list(self.obj[:, : self.n] < 0, self.flist[self._par], self.fcnt[self._par])
        self.fcnt[1 - self._par].zero_()

    def bid_round(self, k: int) -> None:
        """One Jacobi round by two kernels; ``k`` (>= the free bidders of every item) sizes the grid."""
        b, n, p = self.b, self.n, self._par
        grid = (b, max(1, min(k, n)))
        _bid_kernel[grid](self.x, self.yt, self.y2, self.price, self.eps, self.flist[p], self.fcnt[p],
                          self.fcnt[1 - p], self.j1, self.bid, self.key, n, grid[1], D=self.d, BLOCK=_BID_BLOCK,
                          num_warps=_WARPS)
        _resolve_kernel[grid](self.flist[p], self.fcnt[p], self.flist[1 - p], self.fcnt[1 - p], self.j1, self.bid,
                              self.key, self.owner, self.obj, self.price, n, grid[1], _EMPTY)
        self._par = 1 - p

    def search_init(self) -> None:
        n, p = self.n, self._spar
        fresh = self.mode != 1  # [B] idle or just augmented
        free = self.obj[:, :n] < 0  # [B, N] the roots
        f = fresh[:, None]
        self.in_tree.masked_fill_(f, False)
        self.slack.masked_fill_(f, float("inf"))
        lst = torch.empty_like(self.roots)
        cnt = torch.empty_like(self.n_roots, dtype=torch.int32)
        self._free_list(free, lst, cnt)
        self.plist[p].copy_(torch.where(f, lst, self.plist[p]))
        self.roots.copy_(torch.where(f, lst, self.roots))
        self.pcnt[p].copy_(torch.where(fresh, cnt, self.pcnt[p]))
        self.pcnt[1 - p].copy_(torch.where(fresh, 0, self.pcnt[1 - p]))
        self.left.copy_(torch.where(fresh, 0, self.left))
        self.root_of_row[:, :n].copy_(torch.where(f, self.ar, self.root_of_row[:, :n]))
        self.end_of_tree.masked_fill_(f, -1)
        self.n_roots.copy_(torch.where(fresh, free.sum(1), self.n_roots))
        self.mode.copy_(torch.where(fresh, (free.any(1)).long(), self.mode))

    def search_step(self, k: int) -> None:
        """One Hungarian step by four kernels; every pending row is expanded (``k`` is unused)."""
        b, n, p = self.b, self.n, self._spar
        kg = self.search_grid
        _rowmax_kernel[(b, kg)](self.x, self.yt, self.y2, self.price, self.mode, self.plist[p], self.pcnt[p],
                                self.rowmax, n, kg, D=self.d, BLOCK=_BID_BLOCK, num_warps=_WARPS)
        _colmin_kernel[(b, self.nblk)](self.x, self.yt, self.y2, self.price, self.mode, self.plist[p], self.pcnt[p],
                                       self.rowmax, self.slack, self.pred, self.in_tree, self.part, n, self.nblk,
                                       D=self.d, BLOCK=_COL_BLOCK, ROWS=_ROWS)
        _update_kernel[(b, self.nblk)](self.price, self.eps, self.mode, self.slack, self.pred, self.in_tree, self.owner,
                                       self.root_of_row, self.end_of_tree, self.part, self.plist[1 - p],
                                       self.pcnt[1 - p], self.left, n, self.nblk,
                                       NBLK_P2=_next_pow2(self.nblk), BLOCK=_COL_BLOCK)
        _finish_kernel[(b,)](self.mode, self.roots, self.n_roots, self.end_of_tree, self.left, self.pcnt[p], n,
                             BLOCK=256)
        self._spar = 1 - p

    def capture_all(self, k_cap: int, reps: int) -> None:
        """Capture the bidding graphs of every grid size, the one search graph and the path flip."""
        if not self.use_graphs:
            return
        for k in self.step_sizes(k_cap):
            self.run(("bid", k), lambda: self.step_bid(k), reps)
        self.run(("search", 0), lambda: self.step_search(0), reps)
        self.run(("aug",), self.augment, 1)
        torch.cuda.current_stream(self.dev).synchronize()


def compile_check(arch: int = 90, d: int = 3) -> dict[str, int]:
    """Compile every kernel ahead of time for CUDA ``sm_<arch>`` (front end, LLVM and ptxas), no GPU needed.

    Catches what Triton's interpreter cannot (typing of the control flow, lowering, register
    allocation). Needs the compiled (not interpreted) kernels: run it without ``TRITON_INTERPRET=1``.
    Returns the cubin size of each kernel, in bytes.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    f32, i32, i64, b1 = "*fp32", "*i32", "*i64", "*i1"
    xy = dict(x_ptr=f32, yt_ptr=f32, y2_ptr=f32, price_ptr=f32)
    c = "constexpr"
    specs = {
        _bid_kernel: (dict(**xy, eps_ptr=f32, list_ptr=i32, cnt_ptr=i32, cnt_next_ptr=i32, j1_ptr=i32, bid_ptr=f32,
                           key_ptr=i64, N="i32", KG="i32", D=c, BLOCK=c), dict(D=d, BLOCK=_BID_BLOCK), _WARPS),
        _resolve_kernel: (dict(list_ptr=i32, cnt_ptr=i32, list_next_ptr=i32, cnt_next_ptr=i32, j1_ptr=i32, bid_ptr=f32,
                               key_ptr=i64, owner_ptr=i64, obj_ptr=i64, price_ptr=f32, N="i32", KG="i32", EMPTY="i64"),
                          {}, 4),
        _rowmax_kernel: (dict(**xy, mode_ptr=i64, list_ptr=i32, cnt_ptr=i32, rowmax_ptr=f32, N="i32", KG="i32", D=c,
                              BLOCK=c), dict(D=d, BLOCK=_BID_BLOCK), _WARPS),
        _colmin_kernel: (dict(**xy, mode_ptr=i64, list_ptr=i32, cnt_ptr=i32, rowmax_ptr=f32, slack_ptr=f32, pred_ptr=i64,
                              in_tree_ptr=b1, part_ptr=f32, N="i32", NBLK="i32", D=c, BLOCK=c, ROWS=c),
                         dict(D=d, BLOCK=_COL_BLOCK, ROWS=_ROWS), 4),
        _update_kernel: (dict(price_ptr=f32, eps_ptr=f32, mode_ptr=i64, slack_ptr=f32, pred_ptr=i64, in_tree_ptr=b1,
                              owner_ptr=i64, root_ptr=i64, end_ptr=i64, part_ptr=f32, list_next_ptr=i32,
                              cnt_next_ptr=i32, left_ptr=i32, N="i32", NBLK="i32", NBLK_P2=c, BLOCK=c),
                         dict(NBLK_P2=128, BLOCK=_COL_BLOCK), 4),
        _finish_kernel: (dict(mode_ptr=i64, roots_ptr=i32, n_roots_ptr=i64, end_ptr=i64, left_ptr=i32, cnt_ptr=i32,
                              N="i32", BLOCK=c), dict(BLOCK=256), 4),
    }
    out = {}
    for fn, (sig, const, warps) in specs.items():
        k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
        out[fn.__name__] = len(k.asm["cubin"])
    return out
