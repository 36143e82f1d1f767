"""Seconds per 3D sample: 20 DPM-Solver++ steps with classifier-free guidance at the paper's UNet size.

    python benchmarks/bench_sample.py                 # GPU: SD-1.5-size UNet, atlases 16x128x128
    python benchmarks/bench_sample.py --size tiny --side 16 --batches 1 2 --repeats 1   # CPU smoke run

A "3D sample" = prompt -> 20 DPM-Solver++ steps (guidance 3.5: conditional + unconditional
halves in one UNet batch) -> de-normalised atlas -> 16,384 Gaussians
(:func:`gaussian_atlas.sample.generate`), synchronised at the end. Weights are random
(same cost as trained ones). Timed per batch size (1 and 16), after one untimed warm-up call:

- **baseline**: fp32 weights, eager (what ``from_pretrained`` + the loop gives by default);
- **bf16**: bf16 weights, channels_last;
- **bf16 + compile**: the same with ``torch.compile`` of the UNet (compilation in the warm-up).

The paper reports < 5 s per sample on an A100; the goal here is <= 1 s on an H100.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def build(args, dtype, compile_: bool, dev):
    from diffusers import DDPMScheduler

    from gaussian_atlas.atlas import AtlasConfig
    from gaussian_atlas.model import ModelConfig, load_model
    from gaussian_atlas.sample import AtlasModel, dpm_solver

    torch.manual_seed(0)
    caps = ["a red torus", "a blue cube", "a green cone on top of a white cylinder"]
    unet, te, tok = load_model(ModelConfig(size=args.size, sample_size=args.side, max_length=16), caps)
    unet = unet.to(dev, dtype).eval()
    te = te.to(dev, dtype).eval()
    if dtype != torch.float32 and dev.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    if compile_:
        unet = torch.compile(unet)
    S = args.side
    return AtlasModel(unet=unet, text_encoder=te, tokenizer=tok,
                      scheduler=dpm_solver(DDPMScheduler(prediction_type="v_prediction").config),
                      mean=torch.zeros(16, S, S), std=torch.ones(16, S, S) * 0.1, grid=torch.randperm(S * S),
                      atlas_cfg=AtlasConfig(side=S), path=None)


def timed(model, prompts, cfg, dev) -> float:
    from gaussian_atlas.sample import generate

    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    _, g, _ = generate(model, prompts, cfg)
    g.means.sum().item()  # everything done
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="sd", choices=["tiny", "small", "sd"])
    ap.add_argument("--side", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per setting (the median is reported)")
    ap.add_argument("--variants", default="baseline,bf16,compile",
                    help="comma-separated subset of baseline (fp32 eager), bf16 (bf16 channels_last), compile")
    ap.add_argument("--baseline-batches", type=int, nargs="+", default=None,
                    help="batch sizes for the (slow) fp32 baseline; default: --batches")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from gaussian_atlas.sample import SampleConfig

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device: {name}; UNet {args.size}, atlases 16x{args.side}x{args.side}, {args.steps} DPM-Solver++ steps, "
          f"guidance {args.guidance}", flush=True)
    want = set(args.variants.split(","))
    settings = [("baseline fp32 eager", torch.float32, False)] if "baseline" in want else []
    if dev.type == "cuda":
        settings += [s for k, s in (("bf16", ("bf16 channels_last", torch.bfloat16, False)),
                                    ("compile", ("bf16 + torch.compile", torch.bfloat16, True))) if k in want]
    res = {"device": name, "size": args.size, "side": args.side, "steps": args.steps, "guidance": args.guidance}
    for label, dtype, comp in settings:
        model = build(args, dtype, comp, dev)
        batches = args.baseline_batches if (dtype == torch.float32 and args.baseline_batches) else args.batches
        for B in batches:
            cfg = SampleConfig(steps=args.steps, guidance=args.guidance, batch_size=B)
            prompts = [["a red torus", "a blue cube", "a green cone on top of a white cylinder"][i % 3]
                       for i in range(B)]
            # warm-up: compilation / cuDNN set-up depend on the batch shape, not on the number of steps
            warm = timed(model, prompts, SampleConfig(steps=2, guidance=args.guidance, batch_size=B), dev)
            ts = sorted(timed(model, prompts, cfg, dev) for _ in range(args.repeats))
            med = ts[len(ts) // 2]
            res[f"{label} | batch {B}"] = {"s_per_call": med, "s_per_sample": med / B, "warmup_s": warm}
            print(f"{label:24s} batch {B:3d}: {med:7.3f} s per call, {med / B:7.3f} s per 3D sample "
                  f"(warm-up {warm:.1f} s)", flush=True)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for B in args.batches:
        if f"baseline fp32 eager | batch {B}" not in res:
            continue
        base = res[f"baseline fp32 eager | batch {B}"]["s_per_sample"]
        for label, _, _ in settings[1:]:
            if f"{label} | batch {B}" not in res:
                continue
            print(f"batch {B}: {label} vs baseline: {base / res[f'{label} | batch {B}']['s_per_sample']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
