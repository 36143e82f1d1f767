"""The SSIM window shared by the loss (:mod:`.losses`) and its Triton kernels (:mod:`._blur_triton`,
:mod:`._ssim_triton`): the taps, the conv2d blur, and the names of the ways SSIM can run. Imports nothing of
the package, so the kernels' modules and the config can use it without an import circle."""

from __future__ import annotations

import torch
from torch import Tensor

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # torchmetrics' defaults (Wang et al. 2004)
SSIM_KERNELS = ("auto", "torch", "triton", "fused")  # fit.ssim_kernels (see losses.ssim)
SSIM_C1, SSIM_C2 = 0.01 ** 2, 0.03 ** 2  # stabilising constants (K1 = 0.01, K2 = 0.03, data range 1)


def _gaussian_1d(dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[11]`` normalised Gaussian taps (σ = 1.5), as torchmetrics builds its window."""
    d = torch.arange((1 - SSIM_WINDOW) / 2, (1 + SSIM_WINDOW) / 2, 1.0, dtype=dtype, device=device)
    g = torch.exp(-0.5 * (d / SSIM_SIGMA) ** 2)
    return g / g.sum()


def _blur_torch(maps: Tensor, g: Tensor) -> Tensor:
    """[N, C, H + 10, W + 10] -> [N, C, H, W]: the window as two grouped 1-D ``conv2d`` passes (valid)."""
    C = maps.shape[1]
    maps = torch.nn.functional.conv2d(maps, g.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)  # down the columns
    return torch.nn.functional.conv2d(maps, g.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)  # along the rows


def ssim_of_moments(mu_x: Tensor, mu_y: Tensor, xx: Tensor, yy: Tensor, xy: Tensor) -> Tensor:
    """Mean SSIM from the windowed moments (blurred x, y, x², y², xy; any equal shapes): variances clamped at 0."""
    mu_xx, mu_yy, mu_xy = mu_x.pow(2), mu_y.pow(2), mu_x * mu_y
    var_x, var_y = torch.clamp(xx - mu_xx, min=0.0), torch.clamp(yy - mu_yy, min=0.0)
    cov = xy - mu_xy
    s = ((2 * mu_xy + SSIM_C1) * (2 * cov + SSIM_C2)) / ((mu_xx + mu_yy + SSIM_C1) * (var_x + var_y + SSIM_C2))
    return s.mean()
