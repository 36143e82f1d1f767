"""Gaussian Atlas (paper Sec. 4): transports, the cached plane index, counting to N, round trips, renders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import gaussian_atlas.atlas as atlas_mod
from gaussian_atlas.assign import assign, assignment_cost, fibonacci_sphere
from gaussian_atlas.atlas import (
    ATLAS_CHANNELS,
    OPACITY_CHANNELS,
    AtlasConfig,
    atlas_figure,
    atlas_to_gaussians,
    build_atlases,
    channel_images,
    equirectangular,
    gaussians_to_atlas,
    grid_points,
    prepare_gaussians,
    sphere_grid_cache_path,
    sphere_to_grid,
)
from gaussian_atlas.cameras import look_at_c2w
from gaussian_atlas.gaussians import Gaussians, sh0_to_rgb
from gaussian_atlas.render import ALPHA_THRESHOLD, render

SIDE = 16
N = SIDE * SIDE


@pytest.fixture
def cfg(tmp_path) -> AtlasConfig:
    return AtlasConfig(side=SIDE, method="scipy", cache_dir=str(tmp_path / "cache"))


def _object(n: int, seed: int = 0, visibility: bool = False, center=(0.4, -1.0, 2.0), size: float = 0.7) -> Gaussians:
    """A random float32 object away from the origin, with distinct positions."""
    g = torch.Generator().manual_seed(seed)
    return Gaussians(
        means=size * torch.randn(n, 3, generator=g) + torch.tensor(center),
        quats=torch.randn(n, 4, generator=g),
        log_scales=torch.log(0.02 + 0.08 * torch.rand(n, 3, generator=g)),
        opacity_logits=2.0 * torch.randn(n, generator=g),
        sh0=torch.randn(n, 3, generator=g),
        visibility=torch.rand(n, generator=g) if visibility else None,
    )


def _match(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Rows ia, ib pairing points of ``a [n, 3]`` with points of ``b [m, 3]`` (each a's nearest b).

    Asserts the pairing is one-to-one and every pair is within ``tol``.
    """
    a64, b64 = a.double().numpy(), b.double().numpy()
    d = np.sqrt(((a64[:, None, :] - b64[None, :, :]) ** 2).sum(-1))  # [n, m]
    ib = d.argmin(1)
    assert len(np.unique(ib)) == len(ib), "two points matched the same one"
    assert d[np.arange(len(a64)), ib].max() < tol
    return np.arange(len(a64)), ib


def _quat_close(q1: torch.Tensor, q2: torch.Tensor) -> float:
    """Max distance between unit quaternions up to sign."""
    q1 = torch.nn.functional.normalize(q1.double(), dim=-1)
    q2 = torch.nn.functional.normalize(q2.double(), dim=-1)
    return float(torch.minimum((q1 - q2).abs().amax(-1), (q1 + q2).abs().amax(-1)).max())


def _cameras(n: int = 4, radius: float = 2.6, center=(0.0, 0.0, 0.0)):
    c = np.asarray(center, dtype=np.float64)
    eyes = [c + radius * np.array([math.cos(a), math.sin(a), 0.5])
            for a in np.linspace(0.0, 2 * math.pi, n, endpoint=False)]
    c2w = torch.from_numpy(np.stack([look_at_c2w(e, c) for e in eyes])).float()
    K = torch.tensor([[40.0, 0.0, 16.0], [0.0, 40.0, 16.0], [0.0, 0.0, 1.0]]).expand(n, 3, 3)
    return c2w, K


def _sphere_index(atlas: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``[N]`` sphere index of each atlas pixel (row-major)."""
    inv = torch.empty_like(grid)
    inv[grid] = torch.arange(len(grid))
    return inv


# ---------------------------------------------------------------------------------------
# config, projection
# ---------------------------------------------------------------------------------------


def test_config_validation():
    assert AtlasConfig().n == 16_384
    with pytest.raises(ValueError, match="pad_opacity_logit"):
        AtlasConfig(pad_opacity_logit=-5.0)
    with pytest.raises(ValueError, match="unknown method"):
        AtlasConfig(method="hungarian")
    with pytest.raises(ValueError, match="side"):
        AtlasConfig(side=0)


def test_equirectangular_axes():
    pts = np.array([[0, 0, 1.0], [0, 0, -1.0], [1.0, 0, 0], [0, 1.0, 0], [-1.0, 0, 0]])
    uv = equirectangular(pts)
    assert uv[0, 1] == pytest.approx(0.0) and uv[1, 1] == pytest.approx(1.0)  # north pole on top
    np.testing.assert_allclose(uv[2], [0.5, 0.5])  # +X at the centre
    np.testing.assert_allclose(uv[3], [0.75, 0.5])  # +Y: a quarter turn counter-clockwise, to the right
    np.testing.assert_allclose(uv[4], [1.0, 0.5])  # longitude pi at the right edge
    q = grid_points(4)
    np.testing.assert_allclose(q[1], [0.375, 0.125])  # pixel (row 0, col 1)


# ---------------------------------------------------------------------------------------
# plane offsetting: once per N, cached
# ---------------------------------------------------------------------------------------


def test_sphere_to_grid_is_optimal_permutation_and_cached(cfg, monkeypatch):
    grid = sphere_to_grid(SIDE, "scipy", cfg.cache_dir)
    assert grid.dtype == torch.long and grid.shape == (N,)
    assert torch.equal(torch.sort(grid).values, torch.arange(N))
    p, q = equirectangular(fibonacci_sphere(N)), grid_points(SIDE)
    r, c = linear_sum_assignment(((p[:, None] - q[None]) ** 2).sum(-1))
    assert assignment_cost(p, q, grid.numpy()) == pytest.approx(((p[r] - q[c]) ** 2).sum(), rel=1e-12)
    # row follows the colatitude: the north pole is on top
    rows = grid.numpy() // SIDE
    assert np.corrcoef(rows, p[:, 1])[0, 1] > 0.99

    path = sphere_grid_cache_path(SIDE, "scipy", cfg.cache_dir)
    assert path.exists() and path.name.startswith("sphere2grid_") and path.suffix == ".npy"
    np.testing.assert_array_equal(np.load(path), grid.numpy())

    # the second call reads the file: no assignment may run
    def boom(*a, **k):
        raise AssertionError("assign called although the index is cached")

    monkeypatch.setattr(atlas_mod, "assign", boom)
    assert torch.equal(sphere_to_grid(SIDE, "scipy", cfg.cache_dir), grid)
    monkeypatch.undo()

    # a different N or method -> a different file
    other = sphere_to_grid(SIDE // 2, "scipy", cfg.cache_dir)
    assert other.shape == ((SIDE // 2) ** 2,)
    assert sphere_grid_cache_path(SIDE // 2, "scipy", cfg.cache_dir) != path
    assert sphere_grid_cache_path(SIDE, "emd", cfg.cache_dir) != path
    assert len(list(path.parent.glob("sphere2grid_*.npy"))) == 2
    assert not list(path.parent.glob(".*"))  # no temporary files left behind

    # a corrupt cache file is recomputed, not trusted
    np.save(path, np.zeros(N, dtype=np.int64))
    assert torch.equal(sphere_to_grid(SIDE, "scipy", cfg.cache_dir), grid)
    np.testing.assert_array_equal(np.load(path), grid.numpy())


# ---------------------------------------------------------------------------------------
# the atlas
# ---------------------------------------------------------------------------------------


def test_atlas_layout_channels(cfg):
    g = _object(N)
    atlas, meta = gaussians_to_atlas(g, cfg)
    assert atlas.shape == (ATLAS_CHANNELS, SIDE, SIDE) and atlas.dtype == torch.float32
    assert torch.isfinite(atlas).all()
    o = atlas[list(OPACITY_CHANNELS)]
    assert torch.equal(o[0], o[1]) and torch.equal(o[0], o[2])
    assert ((o > 0) & (o < 1)).all()
    q = atlas[12:16]
    torch.testing.assert_close(q.norm(dim=0), torch.ones(SIDE, SIDE), atol=1e-6, rtol=0)
    assert (q[0] >= 0).all()
    assert atlas[0:3].norm(dim=0).max() <= 2.0 + 1e-6  # both ends lie in the unit ball
    # the albedo (unclamped 0.5 + C0 sh0) and opacity values are the activated ones, as a set
    torch.testing.assert_close(torch.sort(atlas[4].reshape(-1)).values, torch.sort(sh0_to_rgb(g.sh0)[:, 0]).values)
    torch.testing.assert_close(torch.sort(o[0].reshape(-1)).values, torch.sort(g.opacities()).values)
    assert meta["n_real"] == N and meta["n_input"] == N


def test_normalisation_bbox_centre_unit_radius(cfg):
    g = _object(N, center=(3.0, -2.0, 5.0), size=4.0)
    gn, meta = prepare_gaussians(g, cfg)
    m = g.means.double()
    np.testing.assert_allclose(meta["center"], (0.5 * (m.amin(0) + m.amax(0))).numpy(), atol=1e-9)
    assert float(gn.means.norm(dim=-1).max()) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(gn.log_scales.numpy(), (g.log_scales.double() + math.log(meta["scale"])).numpy(),
                               atol=1e-12)


def test_sphere_assignment_is_optimal(cfg, monkeypatch):
    g = _object(N, seed=1)
    atlas, meta = gaussians_to_atlas(g, cfg)
    gn, _ = prepare_gaussians(g, cfg)
    sphere = fibonacci_sphere(N)
    grid = sphere_to_grid(SIDE, cfg.method, cfg.cache_dir)
    sidx = _sphere_index(atlas, grid).numpy()  # [N] sphere point of each pixel
    # the atlas holds each normalised Gaussian once, at a distinct sphere point
    dec = atlas[0:3].reshape(3, -1).T.double().numpy() + sphere[sidx]  # [N, 3] normalised centres
    _match(torch.from_numpy(dec), gn.means)
    # its total squared offset is the optimum of the transport
    x = gn.means.numpy()
    r, c = linear_sum_assignment(((x[:, None] - sphere[None]) ** 2).sum(-1))
    optimum = float(((x[r] - sphere[c]) ** 2).sum())
    total = float((atlas[0:3].double() ** 2).sum())
    assert total == pytest.approx(optimum, rel=1e-6)
    # cfg.method is what reaches the solver (the CPU auction is too slow for a unit test: spy on it)
    seen = []

    def spy(x, y, method="auto", **kw):
        seen.append(method)
        return assign(x, y, "scipy")

    monkeypatch.setattr(atlas_mod, "assign", spy)
    gaussians_to_atlas(g, AtlasConfig(side=SIDE, method="auction", cache_dir=cfg.cache_dir), grid=grid)
    assert seen == ["auction"]


def test_atlas_invariant_to_translation_and_scale(cfg):
    g = _object(N, seed=2)
    k, t = 3.5, torch.tensor([10.0, -4.0, 1.0])
    moved = Gaussians(means=g.means * k + t, quats=g.quats, log_scales=g.log_scales + math.log(k),
                      opacity_logits=g.opacity_logits, sh0=g.sh0)
    a1, m1 = gaussians_to_atlas(g, cfg)
    a2, m2 = gaussians_to_atlas(moved, cfg)
    torch.testing.assert_close(a1, a2, atol=1e-5, rtol=0)
    assert m2["scale"] == pytest.approx(m1["scale"] / k)


def test_gs2sphere_skips_the_assignment(cfg, monkeypatch):
    g = _object(N, seed=3)
    gn, _ = prepare_gaussians(g, cfg)
    perm = assign(gn.means.numpy(), fibonacci_sphere(N), "scipy")  # [N] sphere point of each Gaussian
    expected, _ = gaussians_to_atlas(g, cfg)
    monkeypatch.setattr(atlas_mod, "assign", lambda *a, **k: (_ for _ in ()).throw(AssertionError("assign ran")))
    got, _ = gaussians_to_atlas(g, cfg, gs2sphere=perm)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="permutation"):
        gaussians_to_atlas(g, cfg, gs2sphere=np.zeros(N, dtype=np.int64))
    with pytest.raises(ValueError, match="exactly N"):
        gaussians_to_atlas(_object(N - 1), cfg, gs2sphere=perm)


def test_round_trip_recovers_the_gaussians(cfg):
    g = _object(N, seed=4)
    atlas, meta = gaussians_to_atlas(g, cfg)
    back = atlas_to_gaussians(atlas, meta, cfg)
    assert len(back) == N and back.means.dtype == torch.float32
    ia, ib = _match(g.means, back.means, tol=1e-5)
    torch.testing.assert_close(back.rgb()[ib], g.rgb()[ia], atol=1e-5, rtol=0)
    torch.testing.assert_close(back.opacities()[ib], g.opacities()[ia], atol=1e-5, rtol=0)
    torch.testing.assert_close(back.log_scales[ib], g.log_scales[ia], atol=1e-5, rtol=0)
    assert _quat_close(back.quats[ib], g.quats[ia]) < 1e-5
    # without meta: the unit-sphere frame
    unit = atlas_to_gaussians(atlas, None, cfg)
    assert float(unit.means.norm(dim=-1).max()) <= 1.0 + 1e-5
    # decoding with another plane index than the atlas was built with is refused
    assert meta["grid"] == sphere_grid_cache_path(SIDE, "scipy", cfg.cache_dir).name
    with pytest.raises(ValueError, match="plane index"):
        atlas_to_gaussians(atlas, meta, AtlasConfig(side=SIDE, method="emd", cache_dir=cfg.cache_dir))


def test_render_round_trip(cfg):
    """Max abs difference of renders (4 views, 32², CPU compositor) before/after the round trip < 1e-4."""
    g = _object(N, seed=5, center=(0.0, 0.0, 0.0), size=0.35)
    atlas, meta = gaussians_to_atlas(g, cfg)
    back = atlas_to_gaussians(atlas, meta, cfg)
    c2w, K = _cameras()
    ref = render(g, c2w, K, 32, 32, backend="torch")
    out = render(back, c2w, K, 32, 32, backend="torch")
    assert ref.alpha.max() > 0.5  # the object is in view
    assert float((ref.rgb - out.rgb).abs().max()) < 1e-4
    assert float((ref.alpha - out.alpha).abs().max()) < 1e-4


def test_padding_is_invisible(cfg):
    n = 100
    g = _object(n, seed=6, center=(0.0, 0.0, 0.0), size=0.35)
    atlas, meta = gaussians_to_atlas(g, cfg)
    assert meta["n_real"] == n and meta["n_input"] == n
    back = atlas_to_gaussians(atlas, meta, cfg)
    assert len(back) == N
    # N - n transparent pads, sitting on real Gaussians' positions, with the tiny scale
    pads = back.opacities() < ALPHA_THRESHOLD * 0.01
    assert int(pads.sum()) == N - n
    assert float(back.opacities()[pads].max()) == pytest.approx(1 / (1 + math.exp(12.0)), rel=1e-3)
    d = torch.cdist(back.means[pads].double(), g.means.double())
    assert float(d.min(1).values.max()) < 1e-5
    torch.testing.assert_close(back.log_scales[pads], torch.full((N - n, 3), -9.0 - math.log(meta["scale"])),
                               atol=1e-5, rtol=0)
    _match(g.means, back.means[~pads])
    c2w, K = _cameras()
    ref = render(g, c2w, K, 32, 32, backend="torch")
    out = render(back, c2w, K, 32, 32, backend="torch")
    assert float((ref.rgb - out.rgb).abs().max()) < 1e-4
    assert float((ref.alpha - out.alpha).abs().max()) < 1e-4


@pytest.mark.parametrize("by", ["visibility", "opacity"])
def test_more_than_n_keeps_the_most_visible(cfg, by):
    n = N + 60
    g = _object(n, seed=7, visibility=(by == "visibility"))
    score = g.visibility if by == "visibility" else g.opacity_logits
    keep = torch.argsort(score, descending=True)[:N]
    atlas, meta = gaussians_to_atlas(g, cfg)
    assert meta["n_real"] == N and meta["n_input"] == n
    back = atlas_to_gaussians(atlas, meta, cfg)
    ia, ib = _match(g.means[keep], back.means)
    torch.testing.assert_close(back.opacities()[ib], g.opacities()[keep][ia], atol=1e-5, rtol=0)


@pytest.mark.parametrize("field,value,word", [("means", float("nan"), "means"),
                                              ("opacity_logits", float("inf"), "opacity_logits"),
                                              ("sh0", float("nan"), "sh0")])
def test_bad_input_raises(cfg, field, value, word):
    g = _object(50)
    getattr(g, field).view(-1)[7] = value
    with pytest.raises(ValueError, match=rf"{word} has 1 non-finite"):
        gaussians_to_atlas(g, cfg)
    with pytest.raises(ValueError, match=rf"object 1: .*{word}"):
        build_atlases([_object(50), g], cfg)


def test_empty_and_batched_input_raise(cfg):
    empty = _object(1).index(slice(0, 0))
    with pytest.raises(ValueError, match="zero Gaussians"):
        gaussians_to_atlas(empty, cfg)
    with pytest.raises(ValueError, match="batched"):
        gaussians_to_atlas(Gaussians.stack([_object(10), _object(10)]), cfg)
    with pytest.raises(ValueError, match="16"):
        atlas_to_gaussians(torch.zeros(3, SIDE, SIDE), None, cfg)
    bad = torch.zeros(16, SIDE, SIDE)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        atlas_to_gaussians(bad, None, cfg)


def test_build_atlases_matches_single_and_inverts_batched(cfg):
    gs = [_object(N, seed=10), _object(90, seed=11), _object(N + 30, seed=12, visibility=True)]
    atlases, metas = build_atlases(gs, cfg)
    assert atlases.shape == (3, ATLAS_CHANNELS, SIDE, SIDE)
    for b, g in enumerate(gs):
        a, m = gaussians_to_atlas(g, cfg)
        torch.testing.assert_close(atlases[b], a, atol=0, rtol=0)
        assert m == metas[b]
    back = atlas_to_gaussians(atlases, metas, cfg)  # [3, N, ...]
    assert back.batch_shape == (3,)
    for b, g in enumerate(gs):
        one = atlas_to_gaussians(atlases[b], metas[b], cfg)
        torch.testing.assert_close(back.means[b], one.means)
    # a precomputed index for one object of the batch
    gn, _ = prepare_gaussians(gs[0], cfg)
    perm = assign(gn.means.numpy(), fibonacci_sphere(N), "scipy")
    again, _ = build_atlases(gs, cfg, gs2sphere=[perm, None, None])
    torch.testing.assert_close(again, atlases, atol=0, rtol=0)
    with pytest.raises(ValueError, match="meta"):
        atlas_to_gaussians(atlases, metas[:2], cfg)


def test_generated_atlas_decodes_to_valid_gaussians(cfg):
    """Arbitrary model output (out-of-range opacity, zero quaternions) still decodes to valid Gaussians."""
    a = torch.randn(16, SIDE, SIDE, generator=torch.Generator().manual_seed(0)) * 2
    a[12:16, 0, 0] = 0.0
    g = atlas_to_gaussians(a, None, cfg)
    assert g.validate() == []
    assert float(g.unit_quats()[0, 0]) == 1.0


def test_channel_images(cfg):
    atlas, _ = gaussians_to_atlas(_object(N), cfg)
    imgs = channel_images(atlas)
    assert set(imgs) == {"offset", "albedo", "opacity", "scale", "rotation"}
    for im in imgs.values():
        assert im.shape == (SIDE, SIDE, 3) and im.dtype == np.uint8
        assert im.std() > 0  # not a blank picture
    expected = np.clip(np.rint(atlas[4:7].permute(1, 2, 0).numpy() * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(imgs["albedo"], expected)
    fig = atlas_figure(atlas, scale=2)
    assert fig.shape == (2 * SIDE, 5 * 2 * SIDE + 4 * 2, 3) and fig.dtype == np.uint8


# --------------------------------------------------------------------------- layouts and structure


def _surface(n: int, seed: int = 0) -> Gaussians:
    """Gaussians on a torus surface (a shape with 3D neighbourhoods worth keeping), small and opaque."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.rand(n, generator=g) * 2 * math.pi, torch.rand(n, generator=g) * 2 * math.pi
    means = torch.stack([(0.6 + 0.25 * v.cos()) * u.cos(), (0.6 + 0.25 * v.cos()) * u.sin(), 0.25 * v.sin()], 1)
    return Gaussians(means=means, quats=torch.randn(n, 4, generator=g), log_scales=torch.full((n, 3), -4.0),
                     opacity_logits=torch.full((n,), 3.0), sh0=torch.randn(n, 3, generator=g) * 0.3)


@pytest.mark.parametrize("layout", ["ot", "random", "morton"])
def test_every_layout_is_a_permutation_and_inverts_exactly(cfg, layout):
    from dataclasses import replace

    lc = replace(cfg, layout=layout)
    g = _object(N, seed=5)
    atlas, meta = gaussians_to_atlas(g, lc)
    back = atlas_to_gaussians(atlas, meta, lc)  # decoding does not need to know the layout
    ia, ib = _match(g.means, back.means, tol=1e-5)
    assert len(set(ia.tolist())) == N and len(set(ib.tolist())) == N  # every Gaussian, each in one pixel
    torch.testing.assert_close(back.rgb()[ib], g.rgb()[ia], atol=1e-5, rtol=0)
    torch.testing.assert_close(back.log_scales[ib], g.log_scales[ia], atol=1e-5, rtol=0)
    batched, _ = build_atlases([g, _object(N, seed=6)], lc)
    torch.testing.assert_close(batched[0], atlas)


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="layout"):
        AtlasConfig(side=4, layout="hilbert")


def test_neighbour_coherence_on_a_hand_made_atlas(cfg):
    """A 1-D chain of points laid out pixel by pixel along rows: right neighbours are 3D neighbours, a row's
    last and the next row's first are not; the numbers follow by counting."""
    from gaussian_atlas.atlas import neighbour_coherence, sphere_to_grid

    S = SIDE
    grid = sphere_to_grid(S, "scipy", cfg.cache_dir)
    sphere_at_pixel = torch.empty(S * S, 3, dtype=torch.float64)
    sphere_at_pixel[grid] = torch.from_numpy(__import__("gaussian_atlas.assign", fromlist=["x"]).fibonacci_sphere(S * S))
    pos = torch.zeros(S * S, 3, dtype=torch.float64)
    pos[:, 0] = torch.arange(S * S) * 0.01  # pixel k at x = 0.01 k: a straight chain in row-major order
    atlas = torch.zeros(16, S * S, dtype=torch.float64)
    atlas[0:3] = (pos - sphere_at_pixel).T
    atlas[[3, 7, 11]] = 0.9
    atlas[12] = 1.0
    c = neighbour_coherence(atlas.reshape(16, S, S).float(), cfg, grid=grid, k=2)
    # right pairs: S*(S-1), all 1 apart (among the 2 nearest); down pairs: S*(S-1), S apart (not, for S > 2)
    assert c["n_pairs"] == 2 * S * (S - 1)
    assert c["coherence"] == pytest.approx(0.5, abs=1e-6)
    assert c["distance_ratio"] > 1.0  # the median pair (halfway between 1 and S steps) is beyond the 2nd NN


def _coherence_dense(atlas, cfg, grid, k):
    """neighbour_coherence's definition written out with dense distances (the k-d tree's reference)."""
    from gaussian_atlas.atlas import atlas_to_gaussians

    S = cfg.side
    g = atlas_to_gaussians(atlas, None, cfg, grid=grid)
    x, real = g.means.double(), torch.sigmoid(g.opacity_logits.double()) >= 1e-4
    idx = torch.arange(S * S).reshape(S, S)
    pairs = torch.cat([torch.stack([idx[:, :-1].reshape(-1), idx[:, 1:].reshape(-1)], 1),
                       torch.stack([idx[:-1, :].reshape(-1), idx[1:, :].reshape(-1)], 1)])
    pairs = pairs[real[pairs[:, 0]] & real[pairs[:, 1]]]
    rid = torch.nonzero(real).squeeze(1)
    d = ((x[rid][:, None] - x[rid][None]) ** 2).sum(-1).sqrt()  # exact pairwise distances [R, R]
    d.fill_diagonal_(float("inf"))
    vals, ids = torch.sort(d, dim=1, stable=True)
    nn = torch.full((S * S, k), -1, dtype=torch.long)
    nn[rid] = rid[ids[:, :k]]
    hit = (nn[pairs[:, 0]] == pairs[:, 1:2]).any(1)
    dist = (x[pairs[:, 0]] - x[pairs[:, 1]]).norm(dim=1)
    return float(hit.double().mean()), float(dist.median() / vals[:, k - 1].median()), len(pairs)


@pytest.mark.parametrize("k", [1, 8])
def test_neighbour_coherence_equals_the_dense_definition(cfg, k):
    """The k-d tree gives the same numbers as the dense distances, on a fitted-like layout with transparent
    padding and with exactly repeated centres (oneself then need not be the first neighbour listed)."""
    from dataclasses import replace

    from gaussian_atlas.atlas import atlas_grid, neighbour_coherence

    lc = replace(cfg, method="scipy")
    g = _surface(200, seed=3)
    g.means[150:170] = g.means[100:120]  # 20 duplicated centres
    atlas, _ = gaussians_to_atlas(g, lc)
    grid = atlas_grid(lc)
    c = neighbour_coherence(atlas, lc, grid=grid, k=k)
    coh, ratio, n_pairs = _coherence_dense(atlas, lc, grid, k)
    assert c["n_pairs"] == n_pairs > 0
    # a duplicate's two copies tie at distance 0: either may be listed first, so allow that many pairs to differ
    assert c["coherence"] == pytest.approx(coh, abs=20 / n_pairs)
    assert c["distance_ratio"] == pytest.approx(ratio, rel=1e-6)
    without = neighbour_coherence(gaussians_to_atlas(_surface(200, seed=3), lc)[0], lc, grid=grid, k=k)
    assert without["coherence"] == pytest.approx(_coherence_dense(gaussians_to_atlas(_surface(200, seed=3), lc)[0],
                                                                  lc, grid, k)[0], abs=1e-12)


def test_ot_layout_is_more_coherent_than_the_controls(tmp_path):
    """On a torus the paper's layout keeps far more pixel neighbours as 3D neighbours than the Z-order
    control, which keeps more than a random layout (the control that has no structure at all)."""
    from dataclasses import replace

    from gaussian_atlas.atlas import neighbour_coherence

    base = AtlasConfig(side=16, method="scipy", cache_dir=str(tmp_path / "c"))
    g = _surface(256)
    coh = {}
    for layout in ("ot", "morton", "random"):
        lc = replace(base, layout=layout)
        atlas, _ = gaussians_to_atlas(g, lc)
        coh[layout] = neighbour_coherence(atlas, lc)
    assert coh["ot"]["coherence"] > coh["morton"]["coherence"] > coh["random"]["coherence"]
    assert coh["random"]["coherence"] < 0.1 and coh["ot"]["coherence"] > 0.3
    assert coh["ot"]["distance_ratio"] < coh["random"]["distance_ratio"]
