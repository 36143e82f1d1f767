"""gsplat (CUDA) and the pure-torch renderer agree on a random scene.

Skipped without CUDA. The first gsplat call JIT-compiles its CUDA extension
(~100 s on a fresh machine) unless a prebuilt one is registered.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gaussian_atlas.cameras import look_at_c2w
from gaussian_atlas.gaussians import Gaussians
from gaussian_atlas.render import render

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

RES = 128


def _scene(n: int, seed: int, batch: tuple[int, ...] = ()) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    shp = batch + (n,)
    means = torch.randn(shp + (3,), generator=g)
    means = 0.8 * means / means.norm(dim=-1, keepdim=True).clamp_min(1.0)  # inside a ball of radius 0.8
    return Gaussians(
        means=means,
        quats=torch.randn(shp + (4,), generator=g),
        log_scales=torch.log(0.005 + 0.07 * torch.rand(shp + (3,), generator=g)),
        opacity_logits=2.0 * torch.randn(shp, generator=g),
        sh0=torch.randn(shp + (3,), generator=g),
    ).to("cuda")


def _cameras(n: int, radius: float = 2.8, fov_deg: float = 45.0) -> tuple[torch.Tensor, torch.Tensor]:
    c2w = np.stack([look_at_c2w(radius * np.array([math.cos(a), math.sin(a), 0.35]))
                    for a in np.linspace(0.0, 2 * math.pi, n, endpoint=False)])
    f = 0.5 * RES / math.tan(math.radians(fov_deg) / 2)
    K = torch.tensor([[f, 0.0, RES / 2], [0.0, f, RES / 2], [0.0, 0.0, 1.0]]).expand(n, 3, 3)
    return torch.tensor(c2w, dtype=torch.float32, device="cuda"), K.to("cuda")


def _both(g: Gaussians, c2w, K, **kw):
    a = render(g, c2w, K, RES, RES, backend="gsplat", **kw)
    b = render(g, c2w, K, RES, RES, backend="torch", **kw)
    return a, b


def test_auto_picks_gsplat_on_cuda():
    g = _scene(100, seed=0)
    c2w, K = _cameras(1)
    assert render(g, c2w, K, RES, RES).meta["backend"] == "gsplat"


def test_backends_agree_on_random_scene():
    g = _scene(4000, seed=1)
    # a few Gaussians behind the camera and beyond the far plane: both must cull them
    g.means[:20] = torch.tensor([3.5, 0.0, 1.0], device="cuda") + 0.1 * g.means[:20]
    g.means[20:40] = g.means[20:40] * 500.0
    c2w, K = _cameras(4)
    a, b = _both(g, c2w, K, background=(1.0, 1.0, 1.0))
    assert a.rgb.shape == b.rgb.shape == (4, RES, RES, 3)
    assert b.alpha.mean() > 0.1  # the scene covers a good part of the image
    d_rgb = (a.rgb - b.rgb).abs().mean().item()
    d_alpha = (a.alpha - b.alpha).abs().mean().item()
    print(f"mean |gsplat - torch|: rgb {d_rgb:.2e}, alpha {d_alpha:.2e}")
    assert d_rgb < 1e-3 and d_alpha < 1e-3


def test_backends_agree_batched_with_background_and_gradients():
    g = _scene(2000, seed=2, batch=(2,))
    c2w, K = _cameras(3)
    c2w, K = c2w.expand(2, 3, 4, 4), K.expand(2, 3, 3, 3)
    bg = torch.tensor([0.1, 0.5, 0.9], device="cuda")
    grads = []
    outs = []
    for backend in ("gsplat", "torch"):
        h = Gaussians(**{k: v.clone().requires_grad_(True) for k, v in g.as_dict().items()})
        out = render(h, c2w, K, RES, RES, background=bg, backend=backend)
        target = torch.rand(out.rgb.shape, generator=torch.Generator(device="cuda").manual_seed(3), device="cuda")
        ((out.rgb - target).square().mean() + out.alpha.mean()).backward()
        outs.append(out)
        grads.append({k: v.grad for k, v in h.as_dict().items()})
    a, b = outs
    assert a.rgb.shape == (2, 3, RES, RES, 3)
    assert (a.rgb - b.rgb).abs().mean().item() < 1e-3
    assert (a.alpha - b.alpha).abs().mean().item() < 1e-3
    for name in grads[0]:
        ga, gb = grads[0][name].flatten(), grads[1][name].flatten()
        cos = torch.nn.functional.cosine_similarity(ga, gb, dim=0).item()
        assert cos > 0.99, (name, cos)
