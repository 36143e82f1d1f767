"""The fused Triton steps of the auction (gaussian_atlas._assign_triton) against the torch steps.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, numpy on the CPU:
slow, so the problems are small). Without triton (CI) every test here is skipped.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # must be set before the kernels are decorated (module import)
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="triton is not installed (CI has none); the fused kernels need it")

from gaussian_atlas.assign import _Solver, assign, assignment_cost  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


_CUDA_TIES = pytest.mark.skipif(
    DEV.type == "cuda", reason="torch's CUDA max/min pick any of tied entries: exact-tie comparisons need the CPU")


def _interpreter_compat() -> None:
    """Triton <= 3.6's interpreter casts scalars with ``int(array[1])``, an error since numpy 2.4."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton.runtime.interpreter as ti

    if getattr(ti, "_gatlas_compat", False) or not hasattr(ti, "_patch_lang_tensor"):
        return
    orig = ti._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    ti._patch_lang_tensor = patched
    ti._gatlas_compat = True


_interpreter_compat()
from gaussian_atlas.assign import _triton_solver_class  # noqa: E402

TritonSolver = _triton_solver_class()


def _problem(b: int, n: int, d: int, seed: int, integer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    if integer:  # exact float32 values 2 x.y and |y|^2: many exact ties, bitwise-equal arithmetic
        x, y = rng.integers(0, 6, (2, b, n, d))
        return (torch.tensor(x, dtype=torch.float32, device=DEV), torch.tensor(y, dtype=torch.float32, device=DEV))
    x = torch.tensor(rng.normal(size=(b, n, d)) * 0.5, dtype=torch.float32, device=DEV)
    y = torch.tensor(rng.uniform(-1.0, 1.0, (b, n, d)), dtype=torch.float32, device=DEV)
    return x, y


def _pair(b: int, n: int, d: int, seed: int, integer: bool = False) -> tuple[_Solver, TritonSolver]:
    x, y = _problem(b, n, d, seed, integer)
    ref, fused = _Solver(b, n, d, DEV, False), TritonSolver(b, n, d, DEV, False)
    for st in (ref, fused):
        st.load(x, y)
        st.eps.fill_(0.01)
    return ref, fused


def _copy_state(src: _Solver, dst: _Solver) -> None:
    for name in ("price", "owner", "obj", "eps"):
        getattr(dst, name).copy_(getattr(src, name))


def _random_partial_assignment(st: _Solver, n_free: int, seed: int) -> None:
    """Every item: n - n_free random bidders own random objects; random prices."""
    rng = np.random.default_rng(seed)
    n = st.n
    for b in range(st.b):
        bidders = rng.permutation(n)[: n - n_free]
        objects = rng.permutation(n)[: n - n_free]
        st.obj[b, torch.as_tensor(bidders)] = torch.as_tensor(objects, device=DEV)
        st.owner[b, torch.as_tensor(objects)] = torch.as_tensor(bidders, device=DEV)
    st.price.copy_(torch.tensor(rng.uniform(0.0, 0.2, (st.b, n)), dtype=torch.float32, device=DEV))


def _free_set(st: TritonSolver, b: int) -> set[int]:
    p = st._par
    return set(st.flist[p, b, : int(st.fcnt[p, b])].tolist())


@pytest.mark.parametrize("b,n,d,n_free,seed,integer", [(1, 64, 3, 64, 0, False), (2, 96, 3, 20, 1, False),
                                                       (1, 200, 2, 7, 2, False),
                                                       pytest.param(2, 80, 3, 80, 3, True, marks=_CUDA_TIES)])
def test_bid_rounds_match_torch(b, n, d, n_free, seed, integer):
    """Same bids, same winners (largest bid, ties to the largest bidder), same displaced owners.

    On float data the values w_ij may differ from torch's baddbmm by ~1 ulp, so prices are
    compared to 1e-5 (values are O(1)); on integer data (exact values, many ties) bitwise.
    Owners and assignments must be equal.
    """
    ref, fused = _pair(b, n, d, seed, integer)
    _random_partial_assignment(ref, n_free, seed)
    _copy_state(ref, fused)
    fused.start_bidding()
    for _ in range(4):
        ref.bid_round(n)
        fused.bid_round(n)
        assert torch.equal(ref.owner, fused.owner)
        assert torch.equal(ref.obj[:, :n], fused.obj[:, :n])  # column N is a trash slot
        torch.testing.assert_close(fused.price, ref.price, rtol=0, atol=0 if integer else 1e-5)
        for i in range(b):  # the next round's free list is exactly the unassigned bidders
            assert _free_set(fused, i) == set(torch.nonzero(fused.obj[i, :n] < 0)[:, 0].tolist())
        assert bool((fused.key == -(2**63) + 2**32 - 1).all())  # keys cleared for the next round


def _near_end_state(b: int, n: int, d: int, seed: int, max_free: int, integer: bool) -> tuple[_Solver, TritonSolver]:
    """Bid with the torch solver until at most ``max_free`` bidders are free, copy the state."""
    ref, fused = _pair(b, n, d, seed, integer)
    while int((ref.obj[:, :n] < 0).sum(1).max()) > max_free:
        ref.bid_round(n)
    _copy_state(ref, fused)
    return ref, fused


@pytest.mark.parametrize("b,n,d,seed,integer", [(1, 64, 3, 3, False), (2, 128, 3, 4, False),
                                                pytest.param(1, 160, 2, 5, True, marks=_CUDA_TIES),
                                                pytest.param(2, 96, 3, 6, True, marks=_CUDA_TIES)])
def test_search_steps_match_torch(b, n, d, seed, integer):
    """Step by step: the same forest, slacks, dual updates, predecessors, pending rows and paths.

    On integer data (exact values, many exact ties) the arithmetic is bitwise the same as torch's
    and so must be every tie-break (smallest forest row per column, largest column per path end).
    On float data the values differ by ~1 ulp (another summation order): slacks and prices are
    compared to 1e-5; the predecessors are equal unless two rows are within an ulp (not in these cases).
    """
    ref, fused = _near_end_state(b, n, d, seed, max_free=3, integer=integer)
    for st in (ref, fused):
        st.mode.zero_()
        st.search_init()
    for step in range(200):
        if not bool((ref.mode == 1).any()):
            break
        ref.search_step(n)  # k = n: every pending row is expanded, as the fused step does
        fused.search_step(0)
        assert torch.equal(ref.mode, fused.mode), step
        assert torch.equal(ref.in_tree, fused.in_tree), step
        torch.testing.assert_close(fused.price, ref.price, rtol=0, atol=1e-5)
        finite = torch.isfinite(ref.slack) & ~ref.in_tree
        assert torch.equal(torch.isfinite(fused.slack) & ~fused.in_tree, finite)
        torch.testing.assert_close(fused.slack[finite], ref.slack[finite], rtol=0, atol=1e-5)
        reached = finite | ref.in_tree  # predecessors of every reached column
        assert torch.equal(fused.pred[reached], ref.pred[reached]), step
        assert torch.equal(fused.end_of_tree[:, :n], ref.end_of_tree[:, :n]), step
        p = fused._spar
        for i in range(b):  # (a stopped item's lists are stale in both solvers)
            if int(ref.mode[i]) != 1:
                continue
            pending = set(torch.nonzero(ref.pending[i, :n])[:, 0].tolist())
            assert set(fused.plist[p, i, : int(fused.pcnt[p, i])].tolist()) == pending, step
    assert bool((ref.mode == 2).all()), "the reference search did not finish"
    ref.augment()
    fused.augment()
    assert torch.equal(ref.obj[:, :n], fused.obj[:, :n]) and torch.equal(ref.owner, fused.owner)


@pytest.mark.parametrize("tail", [None, 0, 10_000])  # default, auction only, searches only
def test_fused_assign_is_certified(tail):
    """End to end: a permutation per item, within the certified gap, which bounds the true error."""
    from scipy.optimize import linear_sum_assignment

    x, y = _problem(2, 48, 3, seed=7)
    perm, info = assign(x, y, "auction", kernels="triton", tail=tail, return_info=True)
    assert perm.shape == (2, 48)
    for b in range(2):
        assert sorted(perm[b].tolist()) == list(range(48))
        xb, yb = x[b].double().cpu().numpy(), y[b].double().cpu().numpy()
        c = ((xb[:, None] - yb[None]) ** 2).sum(-1)
        r, cols = linear_sum_assignment(c)
        opt = c[r, cols].sum()
        cost = assignment_cost(xb, yb, perm[b].cpu().numpy())
        assert info.rel_gap[b] <= 1e-3
        assert cost <= opt * (1 + 1e-3) + 1e-9
        assert info.lower_bound[b] <= opt * (1 + 1e-5)


def test_fused_exact_on_integer_costs():
    """Integer costs and N·ε < 1: the fused solver must return an optimal assignment."""
    rng = np.random.default_rng(11)
    x, y = rng.integers(0, 8, (2, 40, 2)).astype(np.float64)
    opt = assignment_cost(x, y, assign(x, y, "scipy"))
    p = assign(torch.tensor(x, device=DEV), torch.tensor(y, device=DEV), "auction", eps=0.9 / 40, kernels="triton")
    assert assignment_cost(x, y, p.cpu().numpy()) == pytest.approx(opt, abs=1e-9)


def test_kernels_compile_for_sm90():
    """The interpreter does not type or lower the kernels: compile them for an H100/H200 (sm_90) here."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from gaussian_atlas._assign_triton import compile_check; print(compile_check(90))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    sizes = eval(r.stdout.strip().splitlines()[-1])  # {kernel: cubin bytes}
    assert len(sizes) == 6 and min(sizes.values()) > 0
