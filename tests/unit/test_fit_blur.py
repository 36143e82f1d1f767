"""The Triton blur of the SSIM window (gaussian_atlas.fit._blur_triton) against the conv2d passes of ``ssim``,
and the fused Triton SSIM (gaussian_atlas.fit._ssim_triton, ``kernels="fused"``) against the torch path.

Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, numpy on the CPU: slow, so
the problems are small). Without triton (CI) every test here is skipped but the last (``"auto"`` on
CPU tensors takes the torch path, triton or not).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():  # must be set before the kernel is decorated (first import of _blur_triton)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gaussian_atlas.fit import _blur_triton, _ssim_triton, losses  # noqa: E402
from gaussian_atlas.fit.losses import _blur_torch, _gaussian_1d, ssim  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not _blur_triton.available(),
                                  reason="triton is not installed (CI has none); the kernel needs it")


def _compile_for_sm90(module: str) -> dict:
    """``gaussian_atlas.fit.<module>.compile_check(90)`` in a child process without the interpreter (the interpreter
    neither types nor lowers a kernel): its {kernel: cubin bytes}."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"from gaussian_atlas.fit.{module} import compile_check; print(compile_check(90))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return eval(r.stdout.strip().splitlines()[-1])


def _reference(x: torch.Tensor) -> torch.Tensor:
    """[P, H + 10, W + 10] -> [P, H, W] through the conv2d passes of ssim."""
    return _blur_torch(x[:, None], _gaussian_1d(x.dtype, x.device))[:, 0]


@needs_triton
@pytest.mark.parametrize("shape", [(3, 27, 33), (2, 51, 81)])  # 17 x 23 interior; 41 x 71: several 32 x 64 tiles
def test_blur_valid_equals_conv2d_value_and_gradient(shape):
    """blur_valid [P, H + 10, W + 10] -> [P, H, W] and its adjoint backward equal the conv2d passes and autograd."""
    blur_valid = _blur_triton.blur_valid
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen).to(DEV)
    w = torch.randn(shape[0], shape[1] - 10, shape[2] - 10, generator=gen).to(DEV)  # upstream gradient
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours, ref = blur_valid(xa), _reference(xb)
    assert ours.shape == ref.shape == w.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    (ga,), (gb,) = torch.autograd.grad(ours, xa, w), torch.autograd.grad(ref, xb, w)
    assert ga.shape == x.shape
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


@needs_triton
def test_corr1d_full_is_the_adjoint_of_valid():
    """<valid(x), y> = <x, full(y)> along each axis (the transposes the backward uses); the self-test passes."""
    corr1d = _blur_triton.corr1d
    gen = torch.Generator().manual_seed(1)
    g = torch.rand(11, generator=gen).to(DEV)  # not symmetric: the adjoint needs the flipped taps (the caller flips)
    x = torch.randn(2, 19, 16, generator=gen).to(DEV)
    for axis in (0, 1):
        vx = corr1d(x, g, axis, False)
        y = torch.randn(vx.shape, generator=gen).to(DEV)
        lhs = (vx.double() * y.double()).sum()
        rhs = (x.double() * corr1d(y, g.flip(0), axis, True).double()).sum()
        torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)
        assert corr1d(y, g, axis, True).shape == x.shape
    _blur_triton.selftest(DEV)  # what "auto" runs once on CUDA before using the kernel
    with pytest.raises(ValueError):
        corr1d(x.double(), g, 0, False)


@needs_triton
def test_ssim_triton_equals_torch_value_and_gradient():
    """ssim(kernels="triton") is ssim(kernels="torch"), value and gradient, on [4, 32, 32, 3] images."""
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(4, 32, 32, 3, generator=gen).to(DEV)
    pred = (target + 0.2 * torch.randn(target.shape, generator=gen).to(DEV)).clamp(0, 1)
    vals, grads = [], []
    for kernels in ("triton", "torch"):
        p = pred.clone().requires_grad_(True)
        v = ssim(p, target, kernels=kernels)
        vals.append(v)
        grads.append(torch.autograd.grad(v, p)[0])
    torch.testing.assert_close(vals[0], vals[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-8)


def test_ssim_auto_on_cpu_uses_torch(monkeypatch):
    """kernels="auto" on CPU tensors never touches the Triton blur nor the fused SSIM (no triton needed); unknown
    names are refused."""
    def fail(*args, **kwargs):
        raise AssertionError("the Triton blur was used on a CPU tensor")

    monkeypatch.setattr(losses, "_blur_triton", fail)
    monkeypatch.setattr(losses, "_ssim_fused", fail)
    gen = torch.Generator().manual_seed(2)
    target = torch.rand(2, 16, 16, 3, generator=gen)
    pred = target.clone().requires_grad_(True)
    auto = ssim(pred, target)
    auto.backward()
    assert float(auto.detach()) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(auto, ssim(pred, target, kernels="torch"))
    with pytest.raises(ValueError):
        ssim(pred, target, kernels="cuda")


def test_ssim_auto_falls_back_to_torch_once_after_a_triton_failure(monkeypatch):
    """Under "auto", a Triton blur that raises warns once and leaves every later call on the torch path."""
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no compiler")

    monkeypatch.setattr(losses, "_TRITON_BLUR_OK", None)
    monkeypatch.setattr(losses, "_triton_blur_usable", lambda device: losses._TRITON_BLUR_OK is not False)
    monkeypatch.setattr(losses, "_blur_triton", broken)
    gen = torch.Generator().manual_seed(3)
    target = torch.rand(2, 16, 16, 3, generator=gen)
    pred = (target + 0.1 * torch.randn(target.shape, generator=gen)).clamp(0, 1)
    with pytest.warns(UserWarning, match="Triton blur failed"):
        first = ssim(pred, target)
    assert losses._TRITON_BLUR_OK is False and len(calls) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = ssim(pred, target)
    assert len(calls) == 1
    assert torch.equal(first, second) and torch.equal(first, ssim(pred, target, kernels="torch"))
    with pytest.raises(RuntimeError):  # a forced "triton" does not fall back
        ssim(pred, target, kernels="triton")


@needs_triton
def test_kernel_compiles_for_sm90():
    """The interpreter does not type or lower the kernel: compile its four passes for an H100/H200 (sm_90) here."""
    sizes = _compile_for_sm90("_blur_triton")  # {pass: cubin bytes}
    assert len(sizes) == 4 and min(sizes.values()) > 0


def _ssim_case(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred, target) [2, 20, 24, 3] in [0, 1]: "noisy" (pred = target + noise), or "flat": constant areas in the
    target and pred == target over regions that hold them (variances ~0, clamped by rounding; S ~1)."""
    gen = torch.Generator().manual_seed(7 if kind == "noisy" else 8)
    target = torch.rand(2, 20, 24, 3, generator=gen)
    if kind == "flat":
        target[0, :10] = 0.5
        target[1, :, :12] = 0.0
        target[1, 15:, 12:] = 1.0
    pred = (target + 0.2 * torch.randn(target.shape, generator=gen)).clamp(0, 1)
    if kind == "flat":
        pred[0, :12] = target[0, :12]
        pred[1, :, :14] = target[1, :, :14]
    return pred.to(DEV), target.to(DEV)


@needs_triton
@pytest.mark.parametrize("kind", ["noisy", "flat"])
def test_ssim_fused_equals_torch_value_and_gradient(kind):
    """ssim(kernels="fused") is ssim(kernels="torch"), value and gradient w.r.t. pred (upstream gradient -2.5), to
    float32 rounding. Where the variances are ~0 (flat areas, pred == target) both float32 paths round the clamp and
    1 / (2 cov + c2) differently: there the fused gradient must be as close to float64 as the torch one (2x)."""
    pred, target = _ssim_case(kind)
    up = torch.tensor(-2.5, device=DEV)
    vals, grads = [], []
    for kernels, dtype in (("fused", torch.float32), ("torch", torch.float32), ("torch", torch.float64)):
        p = pred.to(dtype).requires_grad_(True)
        v = ssim(p, target.to(dtype), kernels=kernels)
        vals.append(v.detach().double())
        grads.append(torch.autograd.grad(v, p, up.to(dtype))[0].double())
    assert grads[0].shape == pred.shape
    torch.testing.assert_close(vals[0], vals[1], rtol=1e-5, atol=0.0)
    scale = float(grads[2].abs().max())
    err_fused, err_torch = float((grads[0] - grads[2]).abs().max()), float((grads[1] - grads[2]).abs().max())
    if kind == "noisy":
        torch.testing.assert_close(grads[0], grads[1], rtol=0.0, atol=5e-6 * scale)
        assert err_fused < 5e-6 * scale
    else:
        torch.testing.assert_close(grads[0], grads[1], rtol=0.0, atol=1e-4 * scale)
        assert err_fused < 2 * err_torch + 1e-6 * scale, (err_fused, err_torch, scale)
    assert abs(float(vals[0]) - float(vals[2])) < 1e-6


@needs_triton
def test_ssim_fused_selftest_no_grad_and_target_gradient_refused():
    """The self-test ("auto" runs it once on CUDA) passes; without a gradient (the kernel without the D maps) the
    value is the same; a target that needs a gradient is refused by "fused" (and "auto" leaves it to the blur)."""
    _ssim_triton.selftest(DEV)
    pred, target = _ssim_case("noisy")
    pred, target = pred[:1, :12, :14], target[:1, :12, :14]
    with torch.no_grad():
        torch.testing.assert_close(ssim(pred, target, kernels="fused"), ssim(pred, target, kernels="torch"),
                                   rtol=1e-5, atol=0.0)
    with pytest.raises(ValueError, match="no gradient for the target"):
        ssim(pred, target.clone().requires_grad_(True), kernels="fused")
    with pytest.raises(ValueError):
        _ssim_triton.ssim_padded(pred[..., 0].double(), target[..., 0].double())


def test_ssim_auto_falls_back_from_fused_once(monkeypatch):
    """Under "auto", a fused SSIM that raises warns once and leaves every later call on the blur path (here torch);
    a forced "fused" does not fall back."""
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no compiler")

    monkeypatch.setattr(losses, "_FUSED_SSIM_OK", None)
    monkeypatch.setattr(losses, "AUTO_PREFERS_FUSED", True)
    monkeypatch.setattr(losses, "_fused_ssim_usable", lambda device: losses._FUSED_SSIM_OK is not False)
    monkeypatch.setattr(losses, "_triton_blur_usable", lambda device: False)
    monkeypatch.setattr(losses, "_ssim_fused", broken)
    pred, target = _ssim_case("noisy")
    pred, target = pred.cpu(), target.cpu()
    with pytest.warns(UserWarning, match="fused Triton SSIM failed"):
        first = ssim(pred, target)
    assert losses._FUSED_SSIM_OK is False and len(calls) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = ssim(pred, target)
    assert len(calls) == 1
    assert torch.equal(first, second) and torch.equal(first, ssim(pred, target, kernels="torch"))
    with pytest.raises(RuntimeError):
        ssim(pred, target, kernels="fused")


@needs_triton
def test_fused_ssim_kernels_compile_for_sm90():
    """Compile the fused SSIM's kernels (forward with and without the D maps, backward) for sm_90, as above."""
    sizes = _compile_for_sm90("_ssim_triton")  # {kernel: cubin bytes}
    assert set(sizes) == {"forward", "forward_grad", "backward"} and min(sizes.values()) > 0
