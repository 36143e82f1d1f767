"""The separable Gaussian blur of :func:`gaussian_atlas.fit.losses.ssim` as a Triton kernel (``kernels="triton"``).

PyTorch runs the two grouped 1-D ``conv2d`` passes of the SSIM window with its generic depthwise
kernels, about 10x off memory bandwidth on the H200 (37 ms of a ~90 ms fitting step at 512 views
of 256²). Here one kernel, ``_corr1d_kernel``, correlates a contiguous float32 ``[P, H, W]``
stack with the 11 taps along one axis (rows or columns), with zero (masked) loads outside the
input:

* ``valid`` (SHIFT = 0): ``out[p, i, j] = sum_k g[k] x[p, i + k, j]``, length ``L - 10``;
* ``full`` (SHIFT = 10, the adjoint): ``out[p, i, j] = sum_k g[k] x[p, i + k - 10, j]``,
  length ``L + 10``, with the taps flipped (the Gaussian is symmetric: the same taps).

:func:`blur_valid` is the forward blur (valid along H then along W) as an autograd function whose
backward is the adjoint (full along W then full along H). The import of triton is guarded: this
module imports without it (CI); :func:`available` says whether it imported.
"""

from __future__ import annotations

import torch
from torch import Tensor

TAPS = 11  # the SSIM window (losses.SSIM_WINDOW)
_BLOCK_I, _BLOCK_J, _WARPS = 32, 64, 4  # output tile (rows x columns) and warps per program; not tuned on a GPU


from ._triton import available, tl, triton  # noqa: F401  (guarded: None without triton)


if triton is not None:

    @triton.jit
    def _corr1d_kernel(x_ptr, g_ptr, out_ptr, H_in, W_in, H_out, W_out, n_tj, n_tiles,
                       AXIS: tl.constexpr, SHIFT: tl.constexpr, NTAPS: tl.constexpr,
                       BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
        """out [P, H_out, W_out] = 1-D correlation of x [P, H_in, W_in] with g [NTAPS] along AXIS (0: H, 1: W)."""
        pid = tl.program_id(0)
        p = pid // n_tiles
        t = pid % n_tiles
        rows = (t // n_tj) * BLOCK_I + tl.arange(0, BLOCK_I)  # [BI] output rows
        cols = (t % n_tj) * BLOCK_J + tl.arange(0, BLOCK_J)  # [BJ] output columns
        x_base = x_ptr + p.to(tl.int64) * H_in * W_in
        out_base = out_ptr + p.to(tl.int64) * H_out * W_out
        out_mask = (rows < H_out)[:, None] & (cols < W_out)[None, :]
        acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        for k in tl.static_range(NTAPS):
            g = tl.load(g_ptr + k)
            if AXIS == 0:
                src = rows + (k - SHIFT)  # [BI] input rows
                m = out_mask & ((src >= 0) & (src < H_in))[:, None]
                v = tl.load(x_base + src[:, None] * W_in + cols[None, :], mask=m, other=0.0)
            else:
                src = cols + (k - SHIFT)  # [BJ] input columns
                m = out_mask & ((src >= 0) & (src < W_in))[None, :]
                v = tl.load(x_base + rows[:, None] * W_in + src[None, :], mask=m, other=0.0)
            acc += g * v
        tl.store(out_base + rows[:, None] * W_out + cols[None, :], acc, mask=out_mask)


def corr1d(x: Tensor, g: Tensor, axis: int, full: bool) -> Tensor:
    """x [P, H, W] float32, g [11] -> [P, H ∓ 10, W] (axis 0) or [P, H, W ∓ 10] (axis 1): valid (-) or full (+)."""
    if triton is None:
        raise ImportError("the Triton blur needs triton (pip install triton)")
    if x.dim() != 3 or x.dtype != torch.float32 or g.shape != (TAPS,):
        raise ValueError(f"the Triton blur takes x [P, H, W] float32 and g [{TAPS}], not {x.dtype} {tuple(x.shape)}"
                         f" and {tuple(g.shape)}")
    x, g = x.contiguous(), g.to(x.device, torch.float32).contiguous()
    P, H, W = x.shape
    d = TAPS - 1 if full else 1 - TAPS
    Ho, Wo = (H + d, W) if axis == 0 else (H, W + d)
    out = torch.empty((P, max(Ho, 0), max(Wo, 0)), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    n_ti, n_tj = triton.cdiv(Ho, _BLOCK_I), triton.cdiv(Wo, _BLOCK_J)
    _corr1d_kernel[(P * n_ti * n_tj,)](x, g, out, H, W, Ho, Wo, n_tj, n_ti * n_tj, AXIS=axis,
                                       SHIFT=TAPS - 1 if full else 0, NTAPS=TAPS, BLOCK_I=_BLOCK_I,
                                       BLOCK_J=_BLOCK_J, num_warps=_WARPS)
    return out


class _BlurValid(torch.autograd.Function):
    """[P, H + 10, W + 10] -> [P, H, W]: valid along H, then along W; backward: full along W, then along H."""

    @staticmethod
    def forward(ctx, x: Tensor, g: Tensor) -> Tensor:
        ctx.save_for_backward(g)
        return corr1d(corr1d(x, g, 0, False), g, 1, False)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (g,) = ctx.saved_tensors
        gf = g.flip(0)  # the adjoint of a correlation is the correlation with the flipped taps (here equal)
        return corr1d(corr1d(grad.contiguous(), gf, 1, True), gf, 0, True), None


def selftest(device: torch.device) -> None:
    """Build and run the four passes (valid and full, both axes) on a small ``[2, 20, 21]`` stack on ``device``;
    raises if triton cannot, or if the forward blur differs from the grouped ``conv2d`` passes."""
    from ._ssim_window import _gaussian_1d

    g = _gaussian_1d(torch.float32, device)
    x = torch.rand(2, 20, 21, device=device)
    with torch.no_grad():
        y = corr1d(corr1d(x, g, 0, False), g, 1, False)  # [2, 10, 11]
        back = corr1d(corr1d(y, g, 1, True), g, 0, True)  # [2, 20, 21]
        ref = torch.nn.functional.conv2d(x[:, None], g.view(1, 1, -1, 1))
        ref = torch.nn.functional.conv2d(ref, g.view(1, 1, 1, -1))[:, 0]
    if back.shape != x.shape or not torch.allclose(y, ref, rtol=1e-4, atol=1e-5):
        raise RuntimeError("the Triton blur's self-test gave wrong values")


def compile_check(arch: int = 90) -> dict[str, int]:
    """Compile the four passes ahead of time for CUDA ``sm_<arch>`` (front end, LLVM, ptxas), no GPU needed:
    catches what the interpreter cannot (typing, lowering). Run without ``TRITON_INTERPRET=1``. Cubin bytes per pass."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(x_ptr="*fp32", g_ptr="*fp32", out_ptr="*fp32", H_in="i32", W_in="i32", H_out="i32", W_out="i32",
               n_tj="i32", n_tiles="i32", AXIS="constexpr", SHIFT="constexpr", NTAPS="constexpr",
               BLOCK_I="constexpr", BLOCK_J="constexpr")
    out = {}
    for axis in (0, 1):
        for shift in (0, TAPS - 1):
            const = dict(AXIS=axis, SHIFT=shift, NTAPS=TAPS, BLOCK_I=_BLOCK_I, BLOCK_J=_BLOCK_J)
            k = triton.compile(ASTSource(_corr1d_kernel, sig, const), target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": _WARPS})
            out[f"axis{axis}_{'full' if shift else 'valid'}"] = len(k.asm["cubin"])
    return out


def blur_valid(x: Tensor, g: Tensor | None = None) -> Tensor:
    """x [P, H + 10, W + 10] float32 -> [P, H, W]: the separable Gaussian window (taps ``g`` [11], by default
    ``losses._gaussian_1d``), valid mode; differentiable in ``x``."""
    if g is None:
        from ._ssim_window import _gaussian_1d

        g = _gaussian_1d(torch.float32, x.device)
    return _BlurValid.apply(x, g)
