"""The fit's SSIM loss (separable Gaussian window) against torchmetrics' SSIM, forward + backward, same run.

    python benchmarks/bench_ssim.py --json docs/bench/ssim_cpu.json                   # CPU: 32 images of 64²
    python benchmarks/bench_ssim.py --images 128 --side 256 --json ssim_h200.json     # GPU: a packed step's 128 views

Both compute the same SSIM (tests/unit/test_fit_layout.py checks value and gradient); median of ``--repeats``.
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
    from torchmetrics.functional.image import structural_similarity_index_measure

    from gaussian_atlas.fit.losses import ssim

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    target = torch.rand(args.images, args.side, args.side, 3, generator=g).to(dev)
    pred = (target + 0.1 * torch.randn(target.shape, generator=g).to(dev)).clamp(0, 1)

    def library(p, t):
        return structural_similarity_index_measure(p.permute(0, 3, 1, 2), t.permute(0, 3, 1, 2), data_range=1.0)

    base = timed(library, pred, target, args.repeats, dev)
    ours = timed(ssim, pred, target, args.repeats, dev)
    diff = abs(float(ssim(pred, target)) - float(library(pred, target)))
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "images": args.images,
           "side": args.side, "torchmetrics_s": base, "separable_s": ours, "ratio": base / ours, "abs_diff": diff}
    print(f"SSIM forward+backward, {args.images} images of {args.side}²: torchmetrics {1e3 * base:.1f} ms, "
          f"separable {1e3 * ours:.1f} ms -> {base / ours:.2f}x (|difference| {diff:.1e})")
    write_record(args.json, res)


if __name__ == "__main__":
    main()
