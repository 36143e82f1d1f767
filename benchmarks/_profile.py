"""Where GPU time goes: CUDA kernel time by kind (attention, convolution, matmul, fused/elementwise), with the
FLOPs of each kind counted by ``torch.utils.flop_counter``, so each kind's achieved TFLOP/s can be read
against the GPU's matrix rate. Used by bench_sample.py and bench_train.py (``--profile``)."""

from __future__ import annotations

import re
from typing import Any, Callable

KINDS = (("attention", r"fmha|flash|attention|sdpa|attn"),
         ("convolution", r"conv|implicit|fprop|dgrad|wgrad|xmma_(?!gemm)"),
         ("matmul", r"gemm|nvjet|cutlass|matmul|cublas"),
         ("inductor fused (triton)", r"^triton_"),
         ("norm", r"norm"),
         ("optimizer", r"adam|multi_tensor|foreach"))
"""Kernel name patterns, first match wins; everything else is "other (elementwise, copies)"."""

FLOP_OPS = {"attention": ("_scaled_dot_product", "scaled_dot_product"), "convolution": ("convolution",),
            "matmul": ("mm", "addmm", "bmm", "baddbmm", "linear")}


def kind_of(kernel: str) -> str:
    k = kernel.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, k):
            return kind
    return "other (elementwise, copies)"


def flops_by_kind(fn: Callable[[], Any]) -> dict[str, float]:
    """FLOPs of one call of ``fn`` per kind (attention / convolution / matmul), counted on its aten ops."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    out = {k: 0.0 for k in FLOP_OPS}
    for op, n in fc.get_flop_counts().get("Global", {}).items():
        name = str(op).removeprefix("aten.").split(".")[0]  # "aten.convolution" / "aten.mm.default" -> the op
        for kind, names in FLOP_OPS.items():
            if any(name.startswith(x) or name == x for x in names):
                out[kind] += float(n)
                break
    return out


def kernel_breakdown(fn: Callable[[], Any], repeats: int = 2, flops: dict[str, float] | None = None,
                     top: int = 12) -> dict[str, Any]:
    """Profile ``repeats`` calls of ``fn`` (after one untimed call): milliseconds per call by kernel kind,
    their share of the GPU time, TFLOP/s per kind where ``flops`` (per call) is given, and the top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if t and e.device_type.name == "CUDA":
            per_kernel.setdefault(e.key, [0.0, 0])
            per_kernel[e.key][0] += t / 1e3 / repeats  # ms per call
            per_kernel[e.key][1] += e.count // repeats
    total = sum(v[0] for v in per_kernel.values())
    kinds: dict[str, dict[str, float]] = {}
    for name, (ms, n) in per_kernel.items():
        d = kinds.setdefault(kind_of(name), {"ms": 0.0, "kernels": 0})
        d["ms"] += ms
        d["kernels"] += n
    for kind, d in kinds.items():
        d["share"] = d["ms"] / total if total else 0.0
        if flops and flops.get(kind):
            d["tflop"] = flops[kind] / 1e12
            d["tflop_per_s"] = flops[kind] / (d["ms"] / 1e3) / 1e12
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    return {"gpu_ms_per_call": total, "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["ms"])),
            "top_kernels": [{"name": n[:120], "ms": v[0], "calls": v[1], "kind": kind_of(n)} for n, v in ranked]}


def print_breakdown(title: str, b: dict[str, Any]) -> None:
    print(f"{title}: {b['gpu_ms_per_call']:.1f} ms of GPU kernels per call", flush=True)
    for kind, d in b["kinds"].items():
        rate = f", {d['tflop']:.2f} TFLOP at {d['tflop_per_s']:.0f} TFLOP/s" if "tflop_per_s" in d else ""
        print(f"  {kind:28s} {d['ms']:8.2f} ms  {100 * d['share']:5.1f} %  ({d['kernels']} kernels{rate})",
              flush=True)
