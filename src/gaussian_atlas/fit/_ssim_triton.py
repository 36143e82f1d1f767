"""The whole SSIM of :func:`gaussian_atlas.fit.losses.ssim`, forward and backward, as two Triton kernels (``kernels="fused"``).

The ``"triton"`` path blurs five materialised maps (x, y, x², y², xy) and then runs ~20 torch
elementwise ops; most of its time is memory traffic. Here, on the reflect-padded planes
``xp, yp [P, H + 10, W + 10]`` (P = B·C, padded by torch, whose autograd maps the gradient back):

* ``_ssim_fwd_kernel``: one program per ``BLOCK_I x BLOCK_J`` output tile; the five window sums
  (11x11 window ``w[a, b] = g[a] g[b]``, valid mode) straight from xp and yp, the SSIM map ``S``,
  its per-program partial sum (summed by torch afterwards: deterministic, no atomics) and, when
  a gradient is needed, the three maps ``D1, D2, D3 [P, H, W]`` = dS/dmu_x, dS/dm_xx, dS/dm_xy
  (derivatives w.r.t. the raw window sums, y held fixed; dS/dm_xx is 0 where the variance clamp
  is active);
* ``_ssim_bwd_kernel``: for every padded position p, ``Gk[p] = sum_{a,b} w[a, b] Dk[p - (a, b)]``
  over the output pixels that exist (the 'full' correlation, the adjoint of the valid window) and
  ``grad_xp[p] = s (G1[p] + 2 xp[p] G2[p] + yp[p] G3[p])``, s = upstream gradient / (P·H·W).

:func:`ssim_padded` wraps both as an autograd function (gradient for ``xp`` only). The import of
triton is guarded: this module imports without it (CI); :func:`available` says whether it imported.
"""

from __future__ import annotations

import torch
from torch import Tensor

TAPS = 11  # the SSIM window (losses.SSIM_WINDOW)
_FWD_BLOCK_I, _FWD_BLOCK_J, _FWD_WARPS = 16, 64, 4  # output tile of the forward; not tuned on a GPU
_BWD_BLOCK_I, _BWD_BLOCK_J, _BWD_WARPS = 16, 64, 4  # padded-input tile of the backward; not tuned on a GPU


from ._ssim_window import SSIM_C1 as C1, SSIM_C2 as C2
from ._triton import available, tl, triton  # noqa: F401  (guarded: None without triton)


if triton is not None:

    @triton.jit
    def _ssim_fwd_kernel(xp_ptr, yp_ptr, g_ptr, part_ptr, d1_ptr, d2_ptr, d3_ptr, H, W, n_tj, n_tiles,
                         C1: tl.constexpr, C2: tl.constexpr, NTAPS: tl.constexpr, GRAD: tl.constexpr,
                         BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
        """xp, yp [P, H + NTAPS - 1, W + NTAPS - 1] -> part [P * n_tiles] (sum of S over the tile) and, if GRAD,
        D1, D2, D3 [P, H, W]."""
        pid = tl.program_id(0)
        p = pid // n_tiles
        t = pid % n_tiles
        rows = (t // n_tj) * BLOCK_I + tl.arange(0, BLOCK_I)  # [BI] output rows
        cols = (t % n_tj) * BLOCK_J + tl.arange(0, BLOCK_J)  # [BJ] output columns
        Wp = W + NTAPS - 1
        in_base = p.to(tl.int64) * (H + NTAPS - 1) * Wp
        mask = (rows < H)[:, None] & (cols < W)[None, :]
        mu_x = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        mu_y = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        m_xx = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        m_yy = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        m_xy = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        for a in range(NTAPS):  # a runtime loop: 121 unrolled taps made ~1 MB cubins
            ga = tl.load(g_ptr + a)
            row_off = in_base + (rows + a)[:, None] * Wp  # [BI, 1]
            for b in tl.static_range(NTAPS):
                w = ga * tl.load(g_ptr + b)
                off = row_off + (cols + b)[None, :]
                xv = tl.load(xp_ptr + off, mask=mask, other=0.0)
                yv = tl.load(yp_ptr + off, mask=mask, other=0.0)
                wx = w * xv
                wy = w * yv
                mu_x += wx
                mu_y += wy
                m_xx += wx * xv
                m_yy += wy * yv
                m_xy += wx * yv
        mu_xx = mu_x * mu_x
        mu_yy = mu_y * mu_y
        mu_xy = mu_x * mu_y
        vx_raw = m_xx - mu_xx
        var_x = tl.maximum(vx_raw, 0.0)
        var_y = tl.maximum(m_yy - mu_yy, 0.0)
        cov = m_xy - mu_xy
        a1 = 2.0 * mu_xy + C1
        a2 = 2.0 * cov + C2
        b1 = mu_xx + mu_yy + C1
        b2 = var_x + var_y + C2
        s = (a1 * a2) / (b1 * b2)
        s = tl.where(mask, s, 0.0)
        tl.store(part_ptr + pid, tl.sum(tl.sum(s, axis=1), axis=0))
        if GRAD:
            d_a1 = s / a1
            d_b1 = -s / b1
            d_vx = tl.where(vx_raw >= 0.0, -s / b2, 0.0)  # torch.clamp(min=0) passes the gradient at >= 0
            d_cov = 2.0 * s / a2
            d1 = d_a1 * 2.0 * mu_y + d_b1 * 2.0 * mu_x - d_vx * 2.0 * mu_x - d_cov * mu_y
            out = p.to(tl.int64) * H * W + rows[:, None] * W + cols[None, :]
            tl.store(d1_ptr + out, d1, mask=mask)
            tl.store(d2_ptr + out, d_vx, mask=mask)
            tl.store(d3_ptr + out, d_cov, mask=mask)

    @triton.jit
    def _ssim_bwd_kernel(xp_ptr, yp_ptr, g_ptr, d1_ptr, d2_ptr, d3_ptr, scale_ptr, gx_ptr, H, W, n_tj, n_tiles,
                         NTAPS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
        """D1, D2, D3 [P, H, W], xp, yp [P, H + NTAPS - 1, W + NTAPS - 1], scale [1] -> gx (shape of xp):
        gx = scale (G1 + 2 xp G2 + yp G3), Gk the full correlation of Dk with the window."""
        pid = tl.program_id(0)
        p = pid // n_tiles
        t = pid % n_tiles
        Hp = H + NTAPS - 1
        Wp = W + NTAPS - 1
        rows = (t // n_tj) * BLOCK_I + tl.arange(0, BLOCK_I)  # [BI] padded rows
        cols = (t % n_tj) * BLOCK_J + tl.arange(0, BLOCK_J)  # [BJ] padded columns
        d_base = p.to(tl.int64) * H * W
        g1 = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        g2 = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        g3 = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        for a in range(NTAPS):  # a runtime loop: 121 unrolled taps made ~1 MB cubins
            ga = tl.load(g_ptr + a)
            src_r = rows - a  # [BI] output rows whose window holds this padded row at tap a
            row_ok = (src_r >= 0) & (src_r < H)
            row_off = d_base + src_r[:, None] * W
            for b in tl.static_range(NTAPS):
                w = ga * tl.load(g_ptr + b)
                src_c = cols - b
                m = row_ok[:, None] & ((src_c >= 0) & (src_c < W))[None, :]
                off = row_off + src_c[None, :]
                g1 += w * tl.load(d1_ptr + off, mask=m, other=0.0)
                g2 += w * tl.load(d2_ptr + off, mask=m, other=0.0)
                g3 += w * tl.load(d3_ptr + off, mask=m, other=0.0)
        in_mask = (rows < Hp)[:, None] & (cols < Wp)[None, :]
        in_off = p.to(tl.int64) * Hp * Wp + rows[:, None] * Wp + cols[None, :]
        xv = tl.load(xp_ptr + in_off, mask=in_mask, other=0.0)
        yv = tl.load(yp_ptr + in_off, mask=in_mask, other=0.0)
        scale = tl.load(scale_ptr)
        tl.store(gx_ptr + in_off, scale * (g1 + 2.0 * xv * g2 + yv * g3), mask=in_mask)


def _check(xp: Tensor, yp: Tensor) -> tuple[int, int, int]:
    if triton is None:
        raise ImportError("the fused SSIM needs triton (pip install triton)")
    if (xp.dim() != 3 or xp.shape != yp.shape or xp.dtype != torch.float32 or yp.dtype != torch.float32
            or xp.shape[1] < TAPS or xp.shape[2] < TAPS):
        raise ValueError(f"the fused SSIM takes xp, yp [P, H + {TAPS - 1}, W + {TAPS - 1}] float32, not "
                         f"{xp.dtype} {tuple(xp.shape)} and {yp.dtype} {tuple(yp.shape)}")
    P, Hp, Wp = xp.shape
    return P, Hp - TAPS + 1, Wp - TAPS + 1


def ssim_forward(xp: Tensor, yp: Tensor, g: Tensor, grad: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
    """xp, yp [P, H + 10, W + 10] float32 contiguous, g [11] -> (mean S (0-dim), (D1, D2, D3) [P, H, W] each
    if ``grad`` else ())."""
    P, H, W = _check(xp, yp)
    n_ti, n_tj = triton.cdiv(H, _FWD_BLOCK_I), triton.cdiv(W, _FWD_BLOCK_J)
    part = torch.empty(P * n_ti * n_tj, dtype=torch.float32, device=xp.device)  # [programs]
    ds = tuple(torch.empty((P, H, W), dtype=torch.float32, device=xp.device) for _ in range(3)) if grad else ()
    d1, d2, d3 = ds if grad else (part, part, part)  # unused pointers without GRAD
    _ssim_fwd_kernel[(P * n_ti * n_tj,)](xp, yp, g, part, d1, d2, d3, H, W, n_tj, n_ti * n_tj, C1=C1, C2=C2,
                                         NTAPS=TAPS, GRAD=grad, BLOCK_I=_FWD_BLOCK_I, BLOCK_J=_FWD_BLOCK_J,
                                         num_warps=_FWD_WARPS)
    mean = (part.double().sum() / (P * H * W)).float()  # float64 over the partials: deterministic, no atomics
    return mean, ds


def ssim_backward(xp: Tensor, yp: Tensor, g: Tensor, ds: tuple[Tensor, ...], scale: Tensor) -> Tensor:
    """D1, D2, D3 [P, H, W] (of :func:`ssim_forward`), scale [1] float32 (upstream gradient / (P H W)) ->
    the gradient w.r.t. xp [P, H + 10, W + 10]."""
    P, H, W = _check(xp, yp)
    Hp, Wp = xp.shape[1:]
    gx = torch.empty_like(xp)
    n_ti, n_tj = triton.cdiv(Hp, _BWD_BLOCK_I), triton.cdiv(Wp, _BWD_BLOCK_J)
    _ssim_bwd_kernel[(P * n_ti * n_tj,)](xp, yp, g, *ds, scale, gx, H, W, n_tj, n_ti * n_tj, NTAPS=TAPS,
                                         BLOCK_I=_BWD_BLOCK_I, BLOCK_J=_BWD_BLOCK_J, num_warps=_BWD_WARPS)
    return gx


class _SsimPadded(torch.autograd.Function):
    """xp, yp [P, H + 10, W + 10] -> mean S (0-dim); backward: the gradient w.r.t. xp only."""

    @staticmethod
    def forward(ctx, xp: Tensor, yp: Tensor, g: Tensor) -> Tensor:
        grad = ctx.needs_input_grad[0]
        mean, ds = ssim_forward(xp, yp, g, grad)
        if grad:
            ctx.save_for_backward(xp, yp, g, *ds)
            ctx.n = ds[0].numel()
        return mean

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        xp, yp, g, *ds = ctx.saved_tensors
        scale = (grad.reshape(1) / ctx.n).to(torch.float32).contiguous()  # stays on the device: no sync
        return ssim_backward(xp, yp, g, tuple(ds), scale), None, None


def ssim_padded(xp: Tensor, yp: Tensor, g: Tensor | None = None) -> Tensor:
    """Mean SSIM of the reflect-padded planes xp (pred), yp (target) [P, H + 10, W + 10] float32 -> 0-dim tensor;
    differentiable in ``xp`` (``yp`` must not need a gradient). ``g`` [11]: the taps, by default ``losses._gaussian_1d``."""
    if yp.requires_grad:
        raise ValueError("the fused SSIM gives no gradient for the target: detach it, or use kernels='triton'")
    if g is None:
        from ._ssim_window import _gaussian_1d

        g = _gaussian_1d(torch.float32, xp.device)
    return _SsimPadded.apply(xp.contiguous(), yp.contiguous(), g.to(xp.device, torch.float32).contiguous())


def _torch_reference(xp: Tensor, yp: Tensor) -> Tensor:
    """The torch path of ``losses.ssim`` on padded planes [P, H + 10, W + 10] -> mean S (for the self-test)."""
    from ._ssim_window import _blur_torch, _gaussian_1d, ssim_of_moments

    g = _gaussian_1d(xp.dtype, xp.device)
    maps = _blur_torch(torch.stack((xp, yp, xp * xp, yp * yp, xp * yp), 1), g)  # [P, 5, H, W]
    return ssim_of_moments(*maps.unbind(1))


def selftest(device: torch.device) -> None:
    """Run both kernels on small ``[2, 24, 30]`` padded planes on ``device`` (several tiles); raises if triton
    cannot, or if the value or the gradient differs from the torch path's."""
    gen = torch.Generator().manual_seed(0)
    yp = torch.rand(2, 24, 30, generator=gen)
    xp = (yp + 0.1 * torch.randn(yp.shape, generator=gen)).clamp(0, 1)
    yp, xp = yp.to(device), xp.to(device)
    xa, xb = xp.clone().requires_grad_(True), xp.clone().requires_grad_(True)
    ours, ref = ssim_padded(xa, yp), _torch_reference(xb, yp)
    (ga,), (gb,) = torch.autograd.grad(ours, xa), torch.autograd.grad(ref, xb)
    if not torch.allclose(ours, ref, rtol=1e-5, atol=1e-6):
        raise RuntimeError(f"the fused SSIM's self-test gave a wrong value ({float(ours)} != {float(ref)})")
    if not torch.allclose(ga, gb, rtol=1e-4, atol=1e-4 * float(gb.abs().max())):
        raise RuntimeError(f"the fused SSIM's self-test gave a wrong gradient (max |difference| "
                           f"{float((ga - gb).abs().max()):.3e}, scale {float(gb.abs().max()):.3e})")


def compile_check(arch: int = 90) -> dict[str, int]:
    """Compile the forward (with and without the D maps) and the backward ahead of time for CUDA ``sm_<arch>``
    (front end, LLVM, ptxas), no GPU needed. Run without ``TRITON_INTERPRET=1``. Cubin bytes per kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    out = {}
    sig = dict(xp_ptr="*fp32", yp_ptr="*fp32", g_ptr="*fp32", part_ptr="*fp32", d1_ptr="*fp32", d2_ptr="*fp32",
               d3_ptr="*fp32", H="i32", W="i32", n_tj="i32", n_tiles="i32", C1="constexpr", C2="constexpr",
               NTAPS="constexpr", GRAD="constexpr", BLOCK_I="constexpr", BLOCK_J="constexpr")
    for grad in (False, True):
        const = dict(C1=C1, C2=C2, NTAPS=TAPS, GRAD=grad, BLOCK_I=_FWD_BLOCK_I, BLOCK_J=_FWD_BLOCK_J)
        k = triton.compile(ASTSource(_ssim_fwd_kernel, sig, const), target=target, options={"num_warps": _FWD_WARPS})
        out[f"forward{'_grad' if grad else ''}"] = len(k.asm["cubin"])
    sig = dict(xp_ptr="*fp32", yp_ptr="*fp32", g_ptr="*fp32", d1_ptr="*fp32", d2_ptr="*fp32", d3_ptr="*fp32",
               scale_ptr="*fp32", gx_ptr="*fp32", H="i32", W="i32", n_tj="i32", n_tiles="i32", NTAPS="constexpr",
               BLOCK_I="constexpr", BLOCK_J="constexpr")
    const = dict(NTAPS=TAPS, BLOCK_I=_BWD_BLOCK_I, BLOCK_J=_BWD_BLOCK_J)
    k = triton.compile(ASTSource(_ssim_bwd_kernel, sig, const), target=target, options={"num_warps": _BWD_WARPS})
    out["backward"] = len(k.asm["cubin"])
    return out
