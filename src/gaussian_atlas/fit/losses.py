"""The fitting loss (paper Eq. 2, plus λ_mask) and the image metrics of held-out views."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ._ssim_window import (SSIM_C1, SSIM_C2, SSIM_KERNELS, SSIM_SIGMA, SSIM_WINDOW, _blur_torch,  # noqa: F401
                           _gaussian_1d, ssim_of_moments)
from .config import FitConfig


_TRITON_BLUR_OK: bool | None = None  # None: not tried; False: unavailable or failed once ("auto" then uses torch)
_FUSED_SSIM_OK: bool | None = None  # the same for the fused SSIM ("auto" then uses the Triton blur, or torch)
# Whether "auto" tries the fused SSIM before the Triton blur. On since it was measured on a GPU: 512 images of 256²,
# forward + backward, fused 24.3 ms vs the blur 39.2 ms vs conv2d 63.5 ms on an H100 (sm_90, as the H200), value
# within 6e-8 and gradient within 2.3e-13 of conv2d (docs/bench/ssim_h100.json; benchmarks/bench_ssim.py).
AUTO_PREFERS_FUSED = True


def _blur_triton(maps: Tensor, g: Tensor) -> Tensor:
    """[N, C, H + 10, W + 10] float32 -> [N, C, H, W]: the blur of :func:`_blur_torch`, one Triton kernel a pass."""
    from ._blur_triton import blur_valid

    N, C, Hp, Wp = maps.shape
    return blur_valid(maps.reshape(N * C, Hp, Wp), g).view(N, C, Hp - SSIM_WINDOW + 1, Wp - SSIM_WINDOW + 1)


def _ssim_fused(x: Tensor, y: Tensor, g: Tensor) -> Tensor:
    """Padded x (pred), y (target) [B, C, H + 10, W + 10] float32 -> mean SSIM (0-dim): the fused Triton kernels."""
    from ._ssim_triton import ssim_padded

    B, C, Hp, Wp = x.shape
    return ssim_padded(x.reshape(B * C, Hp, Wp).contiguous(), y.reshape(B * C, Hp, Wp).contiguous(), g)


def _probe(flag: str, load: Callable[[], tuple[Callable, Callable]], device: torch.device,
           disable: Callable[[Exception], None]) -> bool:
    """Whether ``kernels="auto"`` may use a Triton path on ``device`` (CUDA): its module's ``(available, selftest)``
    (``load()``) say triton imported and the self-test runs; the outcome is kept in the module flag ``flag`` (None: not tried), and a failure
    warns once through ``disable`` and sends every later call elsewhere."""
    if device.type != "cuda" or globals()[flag] is False:
        return False
    if globals()[flag] is None:
        try:
            available, selftest = load()
            if not available():  # no triton: nothing to warn about
                globals()[flag] = False
                return False
            selftest(device)
            globals()[flag] = True
        except Exception as e:  # a triton that cannot build the kernels here, or a wrong result
            disable(e)
    return bool(globals()[flag])


def _load_blur() -> tuple[Callable, Callable]:
    from ._blur_triton import available, selftest

    return available, selftest


def _load_fused() -> tuple[Callable, Callable]:
    from ._ssim_triton import available, selftest

    return available, selftest


def _triton_blur_usable(device: torch.device) -> bool:
    """The Triton blur (self-test: forward and adjoint passes on a small stack); a failure: torch from then on."""
    return _probe("_TRITON_BLUR_OK", _load_blur, device, _disable_triton_blur)


def _fused_ssim_usable(device: torch.device) -> bool:
    """The fused SSIM (self-test: value and gradient against the torch path on small planes); a failure: the
    Triton blur (or torch) from then on."""
    return _probe("_FUSED_SSIM_OK", _load_fused, device, _disable_fused_ssim)


def _disable(flag: str, what: str, instead: str, e: Exception) -> None:
    """Warn once (later "auto" calls no longer try ``what``) and clear ``flag``."""
    import warnings

    globals()[flag] = False
    warnings.warn(f"ssim: the {what} failed ({e!r:.300}); using {instead} from now on", stacklevel=4)


def _disable_triton_blur(e: Exception) -> None:
    _disable("_TRITON_BLUR_OK", "Triton blur", "torch's conv2d", e)


def _disable_fused_ssim(e: Exception) -> None:
    _disable("_FUSED_SSIM_OK", "fused Triton SSIM", "the blur path", e)


def ssim(pred: Tensor, target: Tensor, kernels: str = "auto") -> Tensor:
    """Mean SSIM of ``[B, H, W, 3]`` images in [0, 1] (11×11 Gaussian window, σ 1.5, reflect padding).

    The same computation as torchmetrics' ``structural_similarity_index_measure(data_range=1)``
    (tested equal), with the Gaussian window applied as two 1-D passes (11 + 11 taps instead of
    121): the window is separable. On the H200 the 2-D depthwise convolution was the largest GPU
    cost of a packed fitting step (``benchmarks/profile_fit.py``), and the two 1-D grouped
    ``conv2d`` passes still ran ~10x off memory bandwidth there.

    kernels : ``"torch"``: the passes as grouped ``conv2d``. ``"triton"``: one Triton kernel a
        pass (``fit._blur_triton``; float32; on a CPU tensor only under ``TRITON_INTERPRET=1``,
        i.e. tests). ``"fused"``: the whole SSIM, forward and backward, in two Triton kernels on
        the padded images (``fit._ssim_triton``; float32; no gradient for ``target``; CPU as for
        "triton"). ``"auto"``: the Triton blur for float32 CUDA tensors when triton imports and its
        self-test passes, else torch (with ``AUTO_PREFERS_FUSED``, on since the fused kernels were
        measured faster on a GPU: fused first, when ``target`` needs no gradient); the first failure
        of either warns once and falls back from then on.
    """
    if kernels not in SSIM_KERNELS:
        raise ValueError(f"kernels must be one of {SSIM_KERNELS}, not {kernels!r}")
    x, y = pred.permute(0, 3, 1, 2), target.permute(0, 3, 1, 2)  # [B, C, H, W]
    B = x.shape[0]
    p = SSIM_WINDOW // 2
    x = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect")
    y = torch.nn.functional.pad(y, (p, p, p, p), mode="reflect")
    g = _gaussian_1d(x.dtype, x.device)
    auto = kernels == "auto"
    f32 = x.dtype == torch.float32 and y.dtype == torch.float32
    if auto and AUTO_PREFERS_FUSED and f32 and not target.requires_grad and _fused_ssim_usable(x.device):
        try:
            return _ssim_fused(x, y, g)
        except Exception as e:  # the probe ran but this shape did not build; the blur path from now on
            _disable_fused_ssim(e)
    elif kernels == "fused":
        return _ssim_fused(x, y, g)
    maps = torch.cat((x, y, x * x, y * y, x * y))  # [5B, C, H + 2p, W + 2p]
    if auto:
        kernels = "triton" if f32 and _triton_blur_usable(maps.device) else "torch"
    try:
        maps = _blur_triton(maps, g) if kernels == "triton" else _blur_torch(maps, g)  # [5B, C, H, W]
    except Exception as e:  # "auto" only: the probe ran but this shape did not build; torch from now on
        if not (auto and kernels == "triton"):
            raise
        _disable_triton_blur(e)
        maps = _blur_torch(maps, g)
    return ssim_of_moments(*maps.split(B))  # mu_x, mu_y, xx, yy, xy [B, C, H, W] each


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
        loss = loss + cfg.lambda_ssim * (1.0 - ssim(out.rgb, gt_rgb, kernels=cfg.ssim_kernels))
    if lpips_fn is not None:
        loss = loss + cfg.lambda_lpips * lpips_fn(out.rgb, gt_rgb)
    if cfg.lambda_mask > 0:
        loss = loss + cfg.lambda_mask * torch.abs(out.alpha[..., 0] - gt_alpha).mean()
    if cfg.lambda_reg > 0 and scales.numel():
        loss = loss + cfg.lambda_reg * scales.mean()
    return loss, l1
