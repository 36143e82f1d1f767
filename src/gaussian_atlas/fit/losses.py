"""The fitting loss (paper Eq. 2, plus λ_mask) and the image metrics of held-out views."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .config import FitConfig


def ssim(pred: Tensor, target: Tensor) -> Tensor:
    """Mean SSIM of ``[B, H, W, 3]`` images in [0, 1] (11×11 Gaussian window, torchmetrics)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(pred.permute(0, 3, 1, 2), target.permute(0, 3, 1, 2), data_range=1.0)


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """PSNR (dB) over all pixels of ``[B, H, W, 3]`` images in [0, 1]."""
    mse = torch.mean((pred - target) ** 2).clamp_min(1e-10)
    return -10.0 * torch.log10(mse)


def load_lpips(weights: str | None, device: torch.device) -> tuple[Callable[[Tensor, Tensor], Tensor] | None, str]:
    """LPIPS (VGG) from local weights, or ``(None, "skipped: ...")``. Never a random network.

    ``weights`` is the path of the LPIPS linear-layer weights (``vgg.pth`` of the
    ``lpips`` package); the VGG backbone comes from torchvision's local cache
    (``$TORCH_HOME``). Anything missing gives the reason instead of a model.
    """
    from pathlib import Path

    if not weights or not Path(weights).exists():
        return None, f"skipped: no weights at {weights}"
    try:
        import lpips  # needs torchvision
    except Exception as exc:  # torchvision missing or mismatched with torch
        return None, f"skipped: the lpips package cannot be imported ({type(exc).__name__}: {exc})"
    try:
        net = lpips.LPIPS(net="vgg", model_path=str(weights), pretrained=True, verbose=False).to(device).eval()
    except Exception as exc:  # backbone weights not in the local torchvision cache
        return None, f"skipped: cannot load LPIPS from {weights} ({type(exc).__name__}: {exc})"
    for p in net.parameters():
        p.requires_grad_(False)

    def fn(pred: Tensor, target: Tensor) -> Tensor:  # [B, H, W, 3] in [0, 1]
        return net(pred.permute(0, 3, 1, 2) * 2 - 1, target.permute(0, 3, 1, 2) * 2 - 1).mean()

    return fn, f"vgg from {weights}"



def photometric_loss(out: Any, gt_rgb: Tensor, gt_alpha: Tensor, scales: Tensor, cfg: FitConfig,
                     lpips_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The fitting loss (paper Eq. 2, plus λ_mask): returns ``(loss, l1)``.

    out : a :class:`~gaussian_atlas.render.RenderOutput` of ``[C, H, W, ...]`` images;
    gt_rgb ``[C, H, W, 3]``, gt_alpha ``[C, H, W]``; scales ``[N, 3]`` activated
    scales of the rendered Gaussians (the λ_reg term is their mean).
    """
    l1 = torch.abs(out.rgb - gt_rgb).mean()
    loss = cfg.lambda_rgb * l1
    if cfg.lambda_ssim > 0:
        loss = loss + cfg.lambda_ssim * (1.0 - ssim(out.rgb, gt_rgb))
    if lpips_fn is not None:
        loss = loss + cfg.lambda_lpips * lpips_fn(out.rgb, gt_rgb)
    if cfg.lambda_mask > 0:
        loss = loss + cfg.lambda_mask * torch.abs(out.alpha[..., 0] - gt_alpha).mean()
    if cfg.lambda_reg > 0 and scales.numel():
        loss = loss + cfg.lambda_reg * scales.mean()
    return loss, l1
