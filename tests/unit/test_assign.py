"""Properties of gaussian_atlas.assign: permutations, optimality bounds, API contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gaussian_atlas.assign import KERNELS, METHODS, assign, assignment_cost, fibonacci_sphere, triton_available


def _problem(n: int, d: int, seed: int, batch: int | None = None, integer: bool = False):
    rng = np.random.default_rng(seed)
    shape = (n, d) if batch is None else (batch, n, d)
    if integer:  # integer coordinates -> integer squared distances, many ties
        return rng.integers(0, 8, shape).astype(np.float64), rng.integers(0, 8, shape).astype(np.float64)
    return rng.normal(size=shape) * 0.5, rng.uniform(-1.0, 1.0, shape)


def _is_perm(p) -> bool:
    p = np.asarray(p)
    return np.array_equal(np.sort(p, axis=-1), np.broadcast_to(np.arange(p.shape[-1]), p.shape))


def _optimum(x, y) -> float:
    return assignment_cost(x, y, assign(x, y, "scipy"))


# ---- permutations ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["scipy", "emd", "auction", "auto"])
@pytest.mark.parametrize("n,d", [(16, 2), (64, 3), (256, 3)])
def test_result_is_permutation(method, n, d):
    x, y = _problem(n, d, seed=n + d)
    p = assign(x, y, method)
    assert p.shape == (n,) and p.dtype == np.int64
    assert _is_perm(p)


def test_batched_result_is_permutation_per_item():
    x, y = _problem(64, 3, seed=1, batch=3)
    p = assign(x, y, "auction")
    assert p.shape == (3, 64)
    assert _is_perm(p)


def test_is_perm_detects_duplicates():  # the helper above must be able to fail
    assert not _is_perm(np.array([0, 1, 1, 3]))


# ---- optimality ---------------------------------------------------------------------------


# tail: 0 = pure auction, None = default (auction, then Hungarian searches), >= N = searches only
_CASES = [(16, 2, 0), (64, 3, 1), (128, 2, 2), (256, 3, 3)]


@pytest.mark.parametrize(
    "n,d,seed,tail",
    [c + (None,) for c in _CASES] + [c + (0,) for c in _CASES[:3]] + [c + (10_000,) for c in _CASES[:2]],
)
def test_auction_within_eps_bound(n, d, seed, tail):
    """cost <= optimum + N·ε for the ε of the last phase, and the dual bound is below the optimum."""
    x, y = _problem(n, d, seed)
    opt = _optimum(x, y)
    eps = 1e-3
    p, info = assign(x, y, "auction", eps=eps, tail=tail, return_info=True)
    cost = assignment_cost(x, y, p)
    assert cost <= opt + n * eps + 1e-6
    assert info.lower_bound[0] <= opt + 1e-4 * opt  # dual value (float32 bids)
    assert info.cost[0] == pytest.approx(cost, rel=1e-9)
    assert info.eps[0] == pytest.approx(eps, rel=1e-6)


@pytest.mark.parametrize(
    "n,d,seed,tail", [(16, 2, 0, 0), (100, 2, 1, 0), (16, 2, 0, None), (100, 2, 1, None), (200, 3, 2, None),
                      (16, 2, 0, 10_000), (64, 3, 1, 10_000)]
)
def test_auction_exact_on_integer_costs(n, d, seed, tail):
    """Integer costs and N·ε < 1: the ε-optimal assignment must be optimal."""
    x, y = _problem(n, d, seed, integer=True)
    opt = _optimum(x, y)
    p = assign(x, y, "auction", eps=0.9 / n, tail=tail)
    assert assignment_cost(x, y, p) == pytest.approx(opt, abs=1e-9)


def test_auction_rtol_is_certified():
    x, y = _problem(256, 3, seed=5)
    opt = _optimum(x, y)
    for rtol in (1e-2, 1e-3):
        p, info = assign(x, y, "auction", rtol=rtol, return_info=True)
        cost = assignment_cost(x, y, p)
        assert info.rel_gap[0] <= rtol
        assert cost <= opt * (1 + rtol) + 1e-9
        assert info.lower_bound[0] <= opt * (1 + 1e-5)


def test_auction_beats_identity_on_sphere_targets():
    """Gaussians -> Fibonacci sphere, the atlas' use: near-optimal and far better than no transport."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(512, 3))
    x /= np.linalg.norm(x, axis=1).max()
    y = fibonacci_sphere(512)
    opt = _optimum(x, y)
    p = assign(x, y, "auction")  # default rtol = 1e-3
    cost = assignment_cost(x, y, p)
    assert cost <= opt * (1 + 1e-3)
    assert cost < 0.9 * assignment_cost(x, y, np.arange(512))


def test_emd_equals_scipy():
    x, y = _problem(128, 3, seed=11)
    assert assignment_cost(x, y, assign(x, y, "emd")) == pytest.approx(_optimum(x, y), rel=1e-12)


# ---- batching -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["scipy", "emd", "auction"])
def test_batched_equals_per_item(method):
    x, y = _problem(48, 2, seed=3, batch=4, integer=True)
    kw = {"eps": 0.9 / 48} if method == "auction" else {}
    pb = assign(x, y, method, **kw)
    for b in range(4):
        pi = assign(x[b], y[b], method, **kw)
        # optimal costs agree exactly (integer costs); ties may pick other permutations
        assert assignment_cost(x[b], y[b], pb[b]) == pytest.approx(assignment_cost(x[b], y[b], pi), abs=1e-9)
        if method == "scipy":
            np.testing.assert_array_equal(pb[b], pi)


def test_shared_y_equals_repeated_y():
    x, _ = _problem(64, 3, seed=4, batch=3)
    y = fibonacci_sphere(64)
    p_shared = assign(x, y, "auction", eps=1e-4)
    p_rep = assign(x, np.broadcast_to(y, x.shape).copy(), "auction", eps=1e-4)
    np.testing.assert_array_equal(p_shared, p_rep)
    costs = assignment_cost(x, y, p_shared)
    assert costs.shape == (3,)
    for b in range(3):
        assert costs[b] <= _optimum(x[b], y) + 64 * 1e-4 + 1e-9


# ---- API contract -------------------------------------------------------------------------


def test_unknown_method_raises():
    x, y = _problem(8, 2, seed=0)
    with pytest.raises(ValueError) as e:
        assign(x, y, "hungarian")
    for m in METHODS:
        assert m in str(e.value)


def test_unknown_kernels_raises():
    x, y = _problem(8, 2, seed=0)
    with pytest.raises(ValueError) as e:
        assign(x, y, "auction", kernels="cuda")
    for k in KERNELS:
        assert k in str(e.value)


def test_importable_and_solves_without_triton():
    """With triton unimportable: the package imports, "auto" takes the torch steps, "triton" says why not."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import numpy as np, gaussian_atlas, gaussian_atlas.assign as a\n"
        "assert not a.triton_available()\n"
        "x = np.random.default_rng(0).normal(size=(32, 3))\n"
        "p = a.assign(x, a.fibonacci_sphere(32), 'auction', kernels='auto')\n"
        "assert sorted(p.tolist()) == list(range(32))\n"
        "try:\n"
        "    a.assign(x, a.fibonacci_sphere(32), 'auction', kernels='triton')\n"
        "except ImportError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    src = Path(__file__).resolve().parents[2] / "src"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(src)})
    assert r.returncode == 0, r.stderr[-2000:]


def test_bad_shapes_raise():
    x, y = _problem(8, 2, seed=0)
    with pytest.raises(ValueError):
        assign(x, y[:7], "auction")
    with pytest.raises(ValueError):
        assign(x, y[None].repeat(2, 0), "auction")  # batched y needs batched x


@pytest.mark.parametrize("method", ["scipy", "auction"])
def test_numpy_in_numpy_out_torch_in_torch_out(method):
    x, y = _problem(32, 3, seed=9)
    p_np = assign(x, y, method)
    assert isinstance(p_np, np.ndarray) and p_np.dtype == np.int64
    p_t = assign(torch.from_numpy(x).float(), torch.from_numpy(y).float(), method)
    assert isinstance(p_t, torch.Tensor) and p_t.dtype == torch.long and p_t.device.type == "cpu"
    assert _is_perm(p_t.numpy())


def test_tiny_problems():
    assert assign(np.zeros((1, 3)), np.ones((1, 3)), "auction").tolist() == [0]
    x = np.array([[0.0, 0.0], [1.0, 0.0]])
    assert assign(x, x[::-1].copy(), "auction").tolist() == [1, 0]


def test_assignment_cost_matches_definition():
    x, y = _problem(16, 3, seed=2)
    p = np.random.default_rng(0).permutation(16)
    assert assignment_cost(x, y, p) == pytest.approx(sum(((x[i] - y[p[i]]) ** 2).sum() for i in range(16)))


def test_fibonacci_sphere_points():
    s = fibonacci_sphere(2000)
    assert s.shape == (2000, 3)
    np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1.0, atol=1e-12)
    assert np.abs(s.mean(0)).max() < 2e-3  # uniform: centred
    # equal-area: every octant holds ~1/8 of the points
    octant = (s > 0).astype(int) @ np.array([1, 2, 4])
    assert np.bincount(octant, minlength=8).min() > 2000 / 8 * 0.95
    with pytest.raises(ValueError):
        fibonacci_sphere(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_cuda_auction_matches_cpu_bound(kernels):
    if kernels == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    x, y = _problem(1024, 3, seed=12)
    opt = _optimum(x, y)
    xt = torch.tensor(x, dtype=torch.float32, device="cuda")
    yt = torch.tensor(y, dtype=torch.float32, device="cuda")
    p = assign(xt, yt, "auction", eps=1e-5, kernels=kernels)
    assert p.device.type == "cuda" and _is_perm(p.cpu().numpy())
    assert assignment_cost(x, y, p.cpu().numpy()) <= opt + 1024 * 1e-5 + 1e-9
    # batched: independent solves on several streams
    xb = torch.stack([xt, xt.flip(0), xt * 0.5])
    pb = assign(xb, yt, "auction", eps=1e-5, streams=3, kernels=kernels)
    assert pb.shape == (3, 1024) and _is_perm(pb.cpu().numpy())
    for b in range(3):
        xb_np = xb[b].double().cpu().numpy()
        assert assignment_cost(xb_np, y, pb[b].cpu().numpy()) <= _optimum(xb_np, y) + 1024 * 1e-5 + 1e-6
    # batched: one solve over [3, N, 3] (per-item modes inside the kernels)
    pb1 = assign(xb, yt, "auction", eps=1e-5, streams=1, kernels=kernels)
    for b in range(3):
        xb_np = xb[b].double().cpu().numpy()
        assert _is_perm(pb1[b].cpu().numpy())
        assert assignment_cost(xb_np, y, pb1[b].cpu().numpy()) <= _optimum(xb_np, y) + 1024 * 1e-5 + 1e-6
