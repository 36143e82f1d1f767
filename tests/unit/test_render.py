"""The pure-torch renderer: analytic cases, conventions, order invariance, batching, chunking, gradients."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from gaussian_atlas.cameras import look_at_c2w
from gaussian_atlas.gaussians import Gaussians
from gaussian_atlas.render import (
    ALPHA_THRESHOLD,
    MAX_ALPHA,
    T_STOP,
    project_gaussians,
    render,
    viewmats_from_c2w,
)

W = H = 64
F = 100.0


def _K(f: float = F, cx: float = W / 2 + 0.5, cy: float = H / 2 + 0.5) -> torch.Tensor:
    return torch.tensor([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _c2w(eye, target=(0.0, 0.0, 0.0)) -> torch.Tensor:
    return torch.from_numpy(look_at_c2w(eye, target))


def _iso(means, sigma, opac, rgb) -> tuple[torch.Tensor, ...]:
    """Activated tensors of isotropic Gaussians."""
    means = torch.as_tensor(means, dtype=torch.float64).reshape(-1, 3)
    n = means.shape[0]
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64).expand(n, 4)
    scales = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1).expand(n, 3)
    opac = torch.as_tensor(opac, dtype=torch.float64).reshape(-1).expand(n)
    rgb = torch.as_tensor(rgb, dtype=torch.float64).reshape(n, 3)
    return means, quats, scales, opac, rgb


def _random_scene(n: int, seed: int, batch: tuple[int, ...] = (), dtype=torch.float64) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    shp = batch + (n,)
    return Gaussians(
        means=0.5 * torch.randn(shp + (3,), generator=g, dtype=dtype),
        quats=torch.randn(shp + (4,), generator=g, dtype=dtype),
        log_scales=torch.log(0.01 + 0.06 * torch.rand(shp + (3,), generator=g, dtype=dtype)),
        opacity_logits=2.0 * torch.randn(shp, generator=g, dtype=dtype),
        sh0=torch.randn(shp + (3,), generator=g, dtype=dtype),
    )


def _ring_cameras(n: int, radius: float = 3.0) -> torch.Tensor:
    return torch.stack([_c2w(radius * np.array([math.cos(a), math.sin(a), 0.4]))
                        for a in np.linspace(0.0, 2 * math.pi, n, endpoint=False)])


def _reference_render(g: Gaussians, c2w, K, width, height, background):
    """Dense brute-force compositor (all pixels x all Gaussians, float64) on the same projection."""
    means, quats, scales, opac, rgb = g.means, g.quats, g.scales(), g.opacities(), g.rgb()
    C = c2w.shape[0]
    p = project_gaussians(means[None], quats[None], scales[None], opac[None], viewmats_from_c2w(c2w)[None],
                          K[None], width, height)
    out_rgb, out_a = [], []
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                            torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
    pix = torch.stack([xs, ys], -1).reshape(-1, 2)  # [P, 2]
    for c in range(C):
        valid = (p["radii"][0, c] > 0).any(-1)
        idx = torch.nonzero(valid)[:, 0]
        idx = idx[torch.argsort(p["depths"][0, c, idx], stable=True)]
        d = pix[:, None, :] - p["means2d"][0, c, idx][None]  # [P, M, 2]
        a, b, cc = p["conics"][0, c, idx].unbind(-1)
        sigma = 0.5 * (a * d[..., 0] ** 2 + cc * d[..., 1] ** 2) + b * d[..., 0] * d[..., 1]
        alpha = torch.clamp(opac[idx] * torch.exp(-sigma), max=MAX_ALPHA)
        alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_THRESHOLD), alpha, torch.zeros_like(alpha))
        col = torch.zeros(pix.shape[0], 3, dtype=torch.float64)
        T = torch.ones(pix.shape[0], dtype=torch.float64)
        done = torch.zeros(pix.shape[0], dtype=torch.bool)
        zero = torch.zeros_like(T)
        for m in range(len(idx)):  # the literal per-pixel loop of gsplat's kernel, vectorised over pixels
            nT = T * (1 - alpha[:, m])
            done = done | (nT <= T_STOP)
            col += torch.where(done, zero, alpha[:, m] * T)[:, None] * rgb[idx[m]]
            T = torch.where(done, T, nT)
        out_rgb.append((col + T[:, None] * torch.as_tensor(background, dtype=torch.float64)).reshape(height, width, 3))
        out_a.append((1 - T).reshape(height, width, 1))
    return torch.stack(out_rgb), torch.stack(out_a)


# ---- conventions -------------------------------------------------------------

def test_viewmats_flip_opengl_to_opencv():
    c2w = _c2w([3.0, 0.0, 0.0])  # on +X, looking at the origin, world +Z up
    vm = viewmats_from_c2w(c2w)
    assert torch.allclose(vm @ c2w @ torch.diag(torch.tensor([1.0, -1, -1, 1], dtype=torch.float64)),
                          torch.eye(4, dtype=torch.float64), atol=1e-12)
    p = vm @ torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(p[:3], torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64))  # in front: +z (OpenCV)
    up = vm @ torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    assert up[1] < 0  # world up is image up: OpenCV y points down


def test_image_orientation_up_and_right():
    # Camera on +X looking at the origin: world +Z is up in the image, world +Y is to the right.
    c2w, K = _c2w([3.0, 0.0, 0.0])[None], _K()[None]
    for pos, axis, sign in (([0, 0, 0.5], 1, -1), ([0, 0.5, 0], 0, +1)):
        out = render(_iso([pos], 0.05, 0.9, [[1, 0, 0]]), c2w, K, W, H)
        a = out.alpha[0, ..., 0]
        v, u = np.unravel_index(int(torch.argmax(a)), a.shape)
        centre = (u + 0.5, v + 0.5)[axis] - (W / 2 + 0.5)
        assert sign * centre > 10, (pos, u, v)


# ---- analytic single Gaussian ------------------------------------------------------

def test_single_isotropic_gaussian_matches_analytic_blob():
    sigma, opac, z = 0.05, 0.8, 3.0
    rgb = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    out = render(_iso([[0, 0, 0]], sigma, opac, rgb[None]), _c2w([z, 0, 0])[None], _K()[None], W, H,
                 background=(1.0, 1.0, 1.0))
    a = out.alpha[0, ..., 0]
    # peak at the principal point (pixel 32's centre is 32.5), value = opacity
    assert tuple(np.unravel_index(int(torch.argmax(a)), a.shape)) == (32, 32)
    assert a[32, 32].item() == pytest.approx(opac, abs=1e-9)
    # width: screen std s = sigma f / z, widened by the 0.3 px² low-pass
    s2 = (sigma * F / z) ** 2 + 0.3
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5,
                            indexing="ij")
    expect = opac * torch.exp(-((xs - 32.5) ** 2 + (ys - 32.5) ** 2) / (2 * s2))
    expect = torch.where(expect >= 1 / 255, expect, torch.zeros_like(expect))
    assert torch.allclose(a, expect, atol=1e-9)
    # the 1/255 cut-off leaves a disc of radius s sqrt(2 ln(255 o))
    r = math.sqrt(2 * s2 * math.log(255 * opac))
    assert int((a > 0).sum()) == int((((xs - 32.5) ** 2 + (ys - 32.5) ** 2) <= r * r).sum())
    # colour composited over white
    assert torch.allclose(out.rgb[0], rgb * a[..., None] + (1 - a[..., None]), atol=1e-9)


def test_background_where_nothing_is():
    bg = (0.2, 0.4, 0.6)
    out = render(_iso([[0, 0, 0]], 0.05, 0.9, [[1, 0, 0]]), _c2w([3, 0, 0])[None], _K()[None], W, H, background=bg)
    assert torch.equal(out.alpha[0, 0, 0], torch.zeros(1, dtype=torch.float64))
    assert torch.allclose(out.rgb[0, 0, 0], torch.tensor(bg, dtype=torch.float64))
    # per-camera backgrounds [C, 3]
    c2w = torch.stack([_c2w([3, 0, 0]), _c2w([0, 3, 0])])
    bgs = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    out = render(_iso([[0, 0, 0]], 0.05, 0.9, [[1, 0, 0]]), c2w, _K().expand(2, 3, 3), W, H, background=bgs)
    assert torch.allclose(out.rgb[:, 0, 0], bgs)


def test_empty_and_culled_scenes_render_background():
    c2w, K = _c2w([3, 0, 0])[None], _K()[None]
    empty = _iso(torch.zeros(0, 3), torch.zeros(0), torch.zeros(0), torch.zeros(0, 3))
    out = render(empty, c2w, K, W, H, background=0.5)
    assert torch.equal(out.alpha, torch.zeros(1, H, W, 1, dtype=torch.float64))
    assert torch.equal(out.rgb, torch.full((1, H, W, 3), 0.5, dtype=torch.float64))
    # behind the camera, beyond far, and below the 1/255 opacity floor: all culled
    for pos, opac in (([5, 0, 0], 0.9), ([-200, 0, 0], 0.9), ([0, 0, 0], 0.5 / 255)):
        out = render(_iso([pos], 0.3, opac, [[1, 0, 0]]), c2w, K, W, H)
        assert out.alpha.abs().max().item() == 0.0, pos
        assert int((out.meta["radii"] > 0).sum()) == 0



@pytest.mark.parametrize("backend", ["torch", "gsplat"])
def test_no_gaussian_is_never_handed_to_a_rasteriser(backend):
    """N = 0 returns the background before any backend runs (gsplat is not even imported: a zero-size
    launch is the suspect of the anchor fitter's SIGFPE in gsplat_cuda.so), batch shape kept."""
    c2w, K = _c2w([3, 0, 0])[None].expand(2, 1, 4, 4), _K()[None].expand(2, 1, 3, 3)
    empty = (torch.zeros(2, 0, 3), torch.zeros(2, 0, 4), torch.zeros(2, 0, 3), torch.zeros(2, 0), torch.zeros(2, 0, 3))
    out = render(empty, c2w, K, W, H, background=(0.2, 0.4, 0.6), backend=backend)
    assert out.meta["backend"] == "empty"
    assert out.rgb.shape == (2, 1, H, W, 3) and out.alpha.shape == (2, 1, H, W, 1)
    assert torch.equal(out.rgb[1, 0, 3, 5], torch.tensor([0.2, 0.4, 0.6])) and not out.alpha.any()

# ---- depth order --------------------------------------------------------------------

def test_nearer_gaussian_dominates_and_list_order_is_irrelevant():
    red, blue = [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]
    c2w, K = _c2w([3, 0, 0])[None], _K()[None]
    # camera on +X: the Gaussian at x=+0.5 is nearer
    a = render(_iso([[0.5, 0, 0], [-0.5, 0, 0]], 0.1, 0.9, [red, blue]), c2w, K, W, H)
    b = render(_iso([[-0.5, 0, 0], [0.5, 0, 0]], 0.1, 0.9, [blue, red]), c2w, K, W, H)
    assert torch.equal(a.rgb, b.rgb) and torch.equal(a.alpha, b.alpha)
    px = a.rgb[0, 32, 32]
    # exact front-to-back compositing at the peak: 0.9 red, 0.9 * 0.1 blue, 0.01 white
    assert torch.allclose(px, torch.tensor([0.9 + 0.01, 0.01, 0.09 + 0.01], dtype=torch.float64), atol=1e-9)
    assert a.alpha[0, 32, 32, 0].item() == pytest.approx(1 - 0.1 * 0.1, abs=1e-12)


def test_matches_brute_force_reference_including_early_stop():
    g = _random_scene(300, seed=3)
    g.opacity_logits = g.opacity_logits + 4.0  # mostly opaque: many pixels hit the 1e-4 stop
    c2w, K = _ring_cameras(2), _K().expand(2, 3, 3)
    out = render(g, c2w, K, W, H, background=(0.3, 0.3, 0.3))
    ref_rgb, ref_a = _reference_render(g, c2w, K, W, H, (0.3, 0.3, 0.3))
    assert (ref_a > 1 - 1.5e-4).any()  # the stop rule is exercised
    assert torch.allclose(out.rgb, ref_rgb, atol=1e-9)
    assert torch.allclose(out.alpha, ref_a, atol=1e-9)


def test_projection_matches_gsplat_torch_reference():
    impl = pytest.importorskip("gsplat.cuda._torch_impl")
    g = _random_scene(200, seed=5, dtype=torch.float32)
    c2w = _ring_cameras(3).float()
    K = _K().float().expand(3, 3, 3)
    vm = viewmats_from_c2w(c2w)
    p = project_gaussians(g.means[None], g.quats[None], g.scales()[None], g.opacities()[None], vm[None], K[None],
                          W, H)
    covars, _ = impl._quat_scale_to_covar_preci(g.quats, g.scales(), compute_preci=False)
    radii, means2d, depths, conics, _ = impl._fully_fused_projection(g.means, covars, vm, K, W, H, eps2d=0.3)
    both = (p["radii"][0] > 0).all(-1) & (radii > 0).all(-1)
    assert both.sum() > 100
    assert torch.allclose(p["means2d"][0][both], means2d[both], atol=1e-3)
    assert torch.allclose(p["depths"][0], depths, atol=1e-5)
    assert torch.allclose(p["conics"][0][both], conics[both], rtol=1e-4, atol=1e-6)
    # opacity-aware boxes are never larger than gsplat's 3.33-sigma ones
    assert (p["radii"][0][both] <= radii[both]).all()
    assert "gsplat.cuda._backend" not in sys.modules  # nothing tried to build CUDA code


# ---- batching and chunking ----------------------------------------------------------

def test_batched_objects_equal_one_by_one():
    g = _random_scene(150, seed=7, batch=(2,))
    c2w = torch.stack([_ring_cameras(3), _ring_cameras(3, radius=2.5)])  # [2, 3, 4, 4]
    K = _K().expand(2, 3, 3, 3)
    out = render(g, c2w, K, W, H)
    assert out.rgb.shape == (2, 3, H, W, 3) and out.alpha.shape == (2, 3, H, W, 1)
    assert out.meta["means2d"].shape == (2, 3, 150, 2)
    for b, gb in enumerate(g.unstack()):
        one = render(gb, c2w[b], K[b], W, H)
        assert torch.allclose(out.rgb[b], one.rgb, atol=1e-12)
        assert torch.allclose(out.alpha[b], one.alpha, atol=1e-12)
    # one set of cameras broadcast over the batch
    shared = render(g, c2w[0], K[0], W, H)
    assert torch.allclose(shared.rgb[1], render(g.unstack()[1], c2w[0], K[0], W, H).rgb, atol=1e-12)


@pytest.mark.parametrize("tile_size,max_pairs,checkpoint",
                         [(8, 1, False), (4, 1 << 13, False), (8, 1 << 15, True), (16, 1 << 30, False)])
def test_chunking_does_not_change_image_or_gradients(tile_size, max_pairs, checkpoint):
    def run(**kw):
        g = _random_scene(200, seed=11)
        for t in g.as_dict().values():
            t.requires_grad_(True)
        out = render(g, _ring_cameras(2), _K().expand(2, 3, 3), 50, 40, **kw)  # not a multiple of the tile
        (out.rgb.square().sum() + out.alpha.sum()).backward()
        return out, g

    ref, g_ref = run(tile_size=8, max_pairs=1 << 30)
    out, g = run(tile_size=tile_size, max_pairs=max_pairs, checkpoint=checkpoint)
    assert out.rgb.shape == (2, 40, 50, 3)
    assert torch.allclose(out.rgb, ref.rgb, atol=1e-9) and torch.allclose(out.alpha, ref.alpha, atol=1e-9)
    for name, t in g.as_dict().items():
        assert torch.allclose(t.grad, getattr(g_ref, name).grad, rtol=1e-6, atol=1e-9), name


# ---- gradients ------------------------------------------------------------------------

def test_gradients_reach_every_parameter():
    g = _random_scene(100, seed=13, dtype=torch.float32)
    for t in g.as_dict().values():
        t.requires_grad_(True)
    out = render(g, _ring_cameras(2).float(), _K().float().expand(2, 3, 3), W, H)
    out.meta["means2d"].retain_grad()
    target = torch.rand_like(out.rgb, generator=torch.Generator().manual_seed(0))
    ((out.rgb - target).abs().mean() + out.alpha.mean()).backward()
    for name, t in g.as_dict().items():
        assert t.grad is not None and torch.isfinite(t.grad).all(), name
        assert t.grad.abs().sum() > 0, name
    assert torch.isfinite(out.meta["means2d"].grad).all() and out.meta["means2d"].grad.abs().sum() > 0


def test_gradients_finite_with_culled_gaussians():
    means, quats, scales, opac, rgb = _iso([[0, 0, 0], [3, 0, 0], [5, 0, 0]], 0.1, 0.9, torch.rand(3, 3))
    means = means.clone().requires_grad_(True)  # one at the camera centre (z = 0), one behind it
    out = render((means, quats, scales, opac, rgb), _c2w([3, 0, 0])[None], _K()[None], W, H)
    out.rgb.sum().backward()
    assert torch.isfinite(means.grad).all() and means.grad[0].abs().sum() > 0
    assert means.grad[1:].abs().sum() == 0


def test_gaussians_and_activated_tuple_agree():
    g = _random_scene(50, seed=17)
    c2w, K = _ring_cameras(1), _K()[None]
    a = render(g, c2w, K, W, H)
    b = render((g.means, g.quats, g.scales(), g.opacities(), g.rgb()), c2w, K, W, H)
    assert torch.equal(a.rgb, b.rgb)


def test_any_channel_count_with_scalar_background():
    g = _random_scene(80, seed=19)
    c2w, K = _ring_cameras(2), _K().expand(2, 3, 3)
    ones = torch.ones(80, 1, dtype=torch.float64)
    one = render((g.means, g.quats, g.scales(), g.opacities(), ones), c2w, K, W, H, background=0.0)
    assert one.rgb.shape == (2, H, W, 1)
    assert torch.allclose(one.rgb, one.alpha, atol=1e-12)  # white Gaussians over black = alpha
    feats = torch.rand(80, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    five = render((g.means, g.quats, g.scales(), g.opacities(), feats), c2w, K, W, H, background=0.25)
    three = render((g.means, g.quats, g.scales(), g.opacities(), feats[:, 1:4]), c2w, K, W, H, background=0.25)
    assert torch.allclose(five.rgb[..., 1:4], three.rgb, atol=1e-12)


def test_bad_arguments_raise():
    g = _random_scene(5, seed=1)
    c2w, K = _ring_cameras(1), _K()[None]
    with pytest.raises(ValueError, match="unknown backend"):
        render(g, c2w, K, W, H, backend="opengl")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            render(g, c2w, K, W, H, backend="gsplat")
    with pytest.raises(ValueError, match="broadcast"):
        render(_random_scene(5, seed=1, batch=(2,)), c2w.expand(3, 1, 4, 4), K.expand(3, 1, 3, 3), W, H)
    with pytest.raises(ValueError, match="channels"):
        render(g, c2w, K, W, H, background=(1.0, 1.0))
