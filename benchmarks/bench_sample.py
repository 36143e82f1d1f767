"""Seconds per 3D sample: 20 DPM-Solver++ steps with classifier-free guidance at the paper's UNet size.

    python benchmarks/bench_sample.py --json docs/bench/sample_h200.json      # GPU: SD-1.5-size UNet, 16x128x128
    python benchmarks/bench_sample.py --size tiny --side 16 --batches 1 2 --repeats 1 --variants baseline  # CPU smoke

A "3D sample" = prompt -> 20 DPM-Solver++ steps (guidance 3.5: conditional + unconditional
halves in one UNet batch) -> de-normalised atlas -> 16,384 Gaussians on the GPU
(:func:`gaussian_atlas.sample.generate`, the path of ``gatlas generate`` and the evaluate stage),
synchronised at the end. Weights are random (same cost as trained ones). Per batch size, one
untimed warm-up call at the same shape (its seconds are reported: compilation and graph capture are
paid there, once per process), then ``--repeats`` timed calls (median reported). Variants, each a
:class:`~gaussian_atlas.sample.SampleConfig` setting of the same model:

- **baseline**: fp32 weights, eager (what ``from_pretrained`` + the loop gives by default);
- **bf16**: bf16 weights, channels_last, eager;
- **graph**: bf16 + the whole denoising loop as one CUDA graph, no compile;
- **fast**: the default path on CUDA: bf16 + ``torch.compile`` (mode "default", static shapes) + the graph;
- **fast-max**: the same with inductor mode "max-autotune-no-cudagraphs" (long compile).

For every variant after bf16 the samples are compared with the bf16 eager samples of the same
prompts and seeds (max and RMS difference of the normalised atlases). ``--profile`` adds, per
batch, the CUDA kernel time of one UNet call by kind (attention / convolution / matmul / fused /
other) with each kind's TFLOP/s, for bf16 eager and for the compiled UNet. The raw JSON (device,
versions, commit, command, every timing) goes to ``--json``.
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

PROMPTS = ["a red torus", "a blue cube", "a green cone on top of a white cylinder"]
VARIANTS = {  # name: (label, SampleConfig fields)
    "baseline": ("fp32 eager", dict(dtype="float32", compile="off", cuda_graph="off")),
    "bf16": ("bf16 channels_last eager", dict(dtype="bfloat16", compile="off", cuda_graph="off")),
    "graph": ("bf16 + CUDA graph", dict(dtype="bfloat16", compile="off", cuda_graph="on")),
    "fast": ("bf16 + compile + CUDA graph (default)", dict(dtype="bfloat16", compile="default", cuda_graph="on")),
    "fast-max": ("bf16 + compile max-autotune + CUDA graph",
                 dict(dtype="bfloat16", compile="max-autotune-no-cudagraphs", cuda_graph="on")),
}


def build(args, dev):
    """A fresh fp32 model (the variant's SampleConfig prepares it)."""
    from diffusers import DDPMScheduler

    from gaussian_atlas.atlas import AtlasConfig
    from gaussian_atlas.model import ModelConfig, load_model
    from gaussian_atlas.sample import AtlasModel, dpm_solver

    torch.manual_seed(0)
    unet, te, tok = load_model(ModelConfig(size=args.size, sample_size=args.side, max_length=16), PROMPTS)
    S = args.side
    return AtlasModel(unet=unet.to(dev).eval(), text_encoder=te.to(dev).eval(), tokenizer=tok,
                      scheduler=dpm_solver(DDPMScheduler(prediction_type="v_prediction").config),
                      mean=torch.zeros(16, S, S), std=torch.ones(16, S, S) * 0.1, grid=torch.randperm(S * S),
                      atlas_cfg=AtlasConfig(side=S), path=None)


def timed(model, prompts, cfg, dev) -> tuple[float, torch.Tensor]:
    from gaussian_atlas.sample import generate

    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    atlas, g, _ = generate(model, prompts, cfg)
    g.means.sum().item()  # everything done
    return time.perf_counter() - t, atlas


def unet_call(model, unet, B: int, dev):
    """One guided UNet call at batch B (2B rows) of ``unet`` (``model.unet`` or its prepared form): a closure."""
    from gaussian_atlas.model import fast_attention
    from gaussian_atlas.sample import encode_prompts

    dtype = next(model.unet.parameters()).dtype
    C, S = model.unet.config.in_channels, model.unet.config.sample_size
    x = torch.randn(2 * B, C, S, S, device=dev, dtype=dtype)
    ctx = encode_prompts(model.text_encoder, model.tokenizer, [PROMPTS[0]] * 2 * B, dev).to(dtype)
    t = torch.tensor(500, device=dev)

    @torch.no_grad()
    def call():
        with fast_attention(dev):
            return unet(x, t, encoder_hidden_states=ctx).sample

    return call


def attention_backends(B: int, L: int, heads: int, hd: int, dev) -> dict:
    """Milliseconds of one self-attention ``[B, heads, L, hd]`` bf16 per SDPA backend (CUDA events, median of 5)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(B, heads, L, hd, device=dev, dtype=torch.bfloat16) for _ in range(3))
    flop = 4 * B * heads * L * L * hd
    out = {"shape": [B, heads, L, hd], "tflop": flop / 1e12}
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                torch.nn.functional.scaled_dot_product_attention(q, k, v)
                ts = []
                for _ in range(5):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    torch.nn.functional.scaled_dot_product_attention(q, k, v)
                    b.record()
                    b.synchronize()
                    ts.append(a.elapsed_time(b))
            ms = sorted(ts)[2]
            out[name] = {"ms": ms, "tflop_per_s": flop / ms / 1e9}
        except RuntimeError as exc:
            out[name] = {"error": str(exc).splitlines()[0][:160]}
        print(f"  SDPA {name:9s} {out[name]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="sd", choices=["tiny", "small", "sd"])
    ap.add_argument("--side", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per setting (the median is reported)")
    ap.add_argument("--variants", default="baseline,bf16,graph,fast", help=f"comma-separated subset of {', '.join(VARIANTS)}")
    ap.add_argument("--baseline-batches", type=int, nargs="+", default=None,
                    help="batch sizes for the (slow) fp32 baseline; default: --batches")
    ap.add_argument("--profile", action="store_true", help="kernel time by kind of one UNet call (bf16, fast)")
    ap.add_argument("--attention", action="store_true",
                    help="time the top level's self-attention (head size of the UNet) per SDPA backend")
    ap.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = ap.parse_args()
    from gaussian_atlas.sample import SampleConfig

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device: {name}; UNet {args.size}, atlases 16x{args.side}x{args.side}, {args.steps} DPM-Solver++ steps, "
          f"guidance {args.guidance}", flush=True)
    want = [v for v in args.variants.split(",") if v]
    bad = [v for v in want if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; known: {', '.join(VARIANTS)}")
    if dev.type != "cuda":
        skipped = [v for v in want if VARIANTS[v][1]["cuda_graph"] == "on" or VARIANTS[v][1]["dtype"] == "bfloat16"]
        if skipped:
            print(f"no CUDA device: skipping {', '.join(skipped)} (bf16 / CUDA graphs are GPU paths)", flush=True)
        want = [v for v in want if v not in skipped]
    res = {"device": name, "size": args.size, "side": args.side, "steps": args.steps, "guidance": args.guidance,
           "repeats": args.repeats, "variants": {}}
    if args.size == "sd":  # FLOPs of one UNet forward per sample, to turn seconds into a FLOP rate
        from _profile import flops_by_kind

        m = build(args, dev)
        fl = flops_by_kind(unet_call(m, m.unet, 1, dev))
        res["unet_forward_tflop_per_sample"] = sum(fl.values()) / 2 / 1e12  # the call has 2 rows (CFG)
        res["unet_forward_tflop_by_kind_per_sample"] = {k: v / 2 / 1e12 for k, v in fl.items()}
        print(f"UNet forward: {res['unet_forward_tflop_per_sample']:.2f} TFLOP per sample "
              f"({', '.join(f'{k} {v / 2e12:.2f}' for k, v in fl.items())})", flush=True)
        del m
    if args.attention and dev.type == "cuda":  # the top level: side² tokens, 320 channels in 8 heads (SD layout)
        heads = 8
        hd = {"sd": 320, "small": 128, "tiny": 32}[args.size] // heads
        for B in args.batches:
            print(f"self-attention at the top level, batch {2 * B} (CFG rows):", flush=True)
            res.setdefault("attention_backends", {})[2 * B] = attention_backends(2 * B, args.side ** 2, heads, hd, dev)
    ref: dict[int, torch.Tensor] = {}
    for v in want:
        label, fields = VARIANTS[v]
        model = build(args, dev)
        out = res["variants"][v] = {"label": label, "settings": fields, "batches": {}}
        batches = args.baseline_batches if (v == "baseline" and args.baseline_batches) else args.batches
        for B in batches:
            cfg = SampleConfig(steps=args.steps, guidance=args.guidance, batch_size=B, **fields)
            prompts = [PROMPTS[i % 3] for i in range(B)]
            warm, _ = timed(model, prompts, cfg, dev)  # compile + capture at this shape, paid once
            runs = [timed(model, prompts, cfg, dev) for _ in range(args.repeats)]
            ts = sorted(t for t, _ in runs)
            med = ts[len(ts) // 2]
            r = out["batches"][B] = {"s_per_call": med, "s_per_sample": med / B, "all_s": ts, "warmup_s": warm,
                                     "graph_warmup_s": model.runtime.get("graphs", {}).get("warmup_s"),
                                     "graph_disabled": model.runtime.get("graphs", {}).get("disabled")}
            if "unet_forward_tflop_per_sample" in res:
                r["tflop_per_s"] = res["unet_forward_tflop_per_sample"] * 2 * args.steps / (med / B)
            atlas = runs[0][1]
            if v == "bf16":
                ref[B] = atlas
            elif B in ref and v != "baseline":
                d = (atlas - ref[B]).float()
                r["vs_bf16_eager"] = {"max_abs": d.abs().max().item(), "rms": d.pow(2).mean().sqrt().item(),
                                      "rms_ref": ref[B].float().pow(2).mean().sqrt().item()}
            rate = f", {r['tflop_per_s']:.0f} TFLOP/s" if "tflop_per_s" in r else ""
            diff = (f", vs bf16 eager: max |d| {r['vs_bf16_eager']['max_abs']:.3g}, rms {r['vs_bf16_eager']['rms']:.3g}"
                    f" (samples' rms {r['vs_bf16_eager']['rms_ref']:.3g})") if "vs_bf16_eager" in r else ""
            print(f"{label:44s} batch {B:3d}: {med:7.3f} s per call, {med / B:7.3f} s per 3D sample{rate} "
                  f"(warm-up {warm:.1f} s){diff}", flush=True)
            if args.profile and dev.type == "cuda" and v in ("bf16", "fast"):
                from _profile import flops_by_kind, kernel_breakdown, print_breakdown

                from gaussian_atlas.sample import prepare_model

                fl = flops_by_kind(unet_call(model, model.unet, B, dev))  # counted on the eager module
                call = unet_call(model, prepare_model(model, cfg)[0], B, dev)
                r["profile_unet_call"] = kernel_breakdown(call, repeats=3, flops=fl)
                print_breakdown(f"  profile, one UNet call at batch {2 * B} ({label})", r["profile_unet_call"])
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    base = res["variants"].get("baseline", {}).get("batches", {})
    for B in args.batches:
        for v, out in res["variants"].items():
            if v != "baseline" and B in base and B in out["batches"]:
                out["batches"][B]["vs_baseline"] = base[B]["s_per_sample"] / out["batches"][B]["s_per_sample"]
                print(f"batch {B}: {out['label']} vs fp32 eager: {out['batches'][B]['vs_baseline']:.2f}x")
    write_record(args.json, res)


if __name__ == "__main__":
    main()
