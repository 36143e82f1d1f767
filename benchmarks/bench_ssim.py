"""The fit's SSIM loss (separable Gaussian window) against torchmetrics' SSIM, forward + backward, same run.

    python benchmarks/bench_ssim.py --json docs/bench/ssim_cpu.json                   # CPU: 32 images of 64²
    python benchmarks/bench_ssim.py --images 512 --side 256 --json ssim_h200.json     # GPU: a packed step's 512 views

Both compute the same SSIM (tests/unit/test_fit_layout.py checks value and gradient); median of ``--repeats``.
``separable_s`` is ``ssim(kernels="torch")`` (the two grouped conv2d passes). On CUDA the Triton blur
(``ssim(kernels="triton")``, tests/unit/test_fit_blur.py) is timed too: ``triton_s`` and
``triton_speedup`` = separable_s / triton_s, and the fused SSIM (``ssim(kernels="fused")``, forward and backward
in two Triton kernels): ``fused_s``, ``fused_speedup`` = separable_s / fused_s, ``fused_vs_triton`` =
triton_s / fused_s, and its value / gradient differences from the conv2d path. torchmetrics is timed only
when it imports.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write_record  # noqa: E402


def timed(fn, pred, target, repeats: int, dev) -> float:
    ts = []
    for _ in range(repeats + 1):
        p = pred.detach().requires_grad_(True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(p, target).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts[1:])[repeats // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    try:
        from torchmetrics.functional.image import structural_similarity_index_measure
    except ImportError:  # the GPU machine may not have it
        structural_similarity_index_measure = None

    from gaussian_atlas.fit.losses import ssim

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    target = torch.rand(args.images, args.side, args.side, 3, generator=g).to(dev)
    pred = (target + 0.1 * torch.randn(target.shape, generator=g).to(dev)).clamp(0, 1)

    def conv2d(p, t):
        return ssim(p, t, kernels="torch")

    ours = timed(conv2d, pred, target, args.repeats, dev)
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "images": args.images,
           "side": args.side, "separable_s": ours}
    print(f"SSIM forward+backward, {args.images} images of {args.side}²: separable (conv2d) {1e3 * ours:.1f} ms")
    if structural_similarity_index_measure is not None:
        def library(p, t):
            return structural_similarity_index_measure(p.permute(0, 3, 1, 2), t.permute(0, 3, 1, 2), data_range=1.0)

        base = timed(library, pred, target, args.repeats, dev)
        diff = abs(float(conv2d(pred, target)) - float(library(pred, target)))
        res |= {"torchmetrics_s": base, "ratio": base / ours, "abs_diff": diff}
        print(f"  torchmetrics {1e3 * base:.1f} ms -> separable {base / ours:.2f}x faster (|difference| {diff:.1e})")
    else:
        res["torchmetrics_s"] = "skipped: torchmetrics does not import"
    if dev.type == "cuda":
        def triton(p, t):
            return ssim(p, t, kernels="triton")

        tri = timed(triton, pred, target, args.repeats, dev)
        grads = []
        for fn in (conv2d, triton):
            p = pred.detach().requires_grad_(True)
            v = fn(p, target)
            grads.append((float(v), torch.autograd.grad(v, p)[0]))
        res |= {"triton_s": tri, "triton_speedup": ours / tri, "triton_abs_diff": abs(grads[0][0] - grads[1][0]),
                "triton_grad_max_diff": float((grads[0][1] - grads[1][1]).abs().max())}
        print(f"  triton blur {1e3 * tri:.1f} ms -> {ours / tri:.2f}x the conv2d passes (|difference| "
              f"{res['triton_abs_diff']:.1e}, gradient {res['triton_grad_max_diff']:.1e})")

        def fused(p, t):
            return ssim(p, t, kernels="fused")

        try:
            fus = timed(fused, pred, target, args.repeats, dev)
            p = pred.detach().requires_grad_(True)
            v = fused(p, target)
            gf = torch.autograd.grad(v, p)[0]
        except Exception as e:  # recorded: the session scripts then keep the Triton blur
            res["fused_error"] = f"{type(e).__name__}: {e}"[:500]
            print(f"  fused SSIM failed: {res['fused_error']}")
            write_record(args.json, res)
            return
        res |= {"fused_s": fus, "fused_speedup": ours / fus, "fused_vs_triton": tri / fus,
                "fused_abs_diff": abs(grads[0][0] - float(v)),
                "fused_grad_max_diff": float((grads[0][1] - gf).abs().max()),
                "grad_max_abs": float(grads[0][1].abs().max())}
        print(f"  fused SSIM {1e3 * fus:.1f} ms -> {ours / fus:.2f}x the conv2d passes, {tri / fus:.2f}x the triton "
              f"blur (|difference| {res['fused_abs_diff']:.1e}, gradient {res['fused_grad_max_diff']:.1e} of "
              f"max {res['grad_max_abs']:.1e})")
    write_record(args.json, res)


if __name__ == "__main__":
    main()
