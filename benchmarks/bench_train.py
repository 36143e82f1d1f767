"""Training throughput at the paper shape: our loop vs a plain diffusers training loop, same model, same run.

    python benchmarks/bench_train.py --variants plain@8,plain@16,regional@16 --profile plain@8,regional@16 \
        --json docs/bench/train_h200.json
    python benchmarks/bench_train.py --size tiny --side 16 --batch 4 --steps 3 --warmup 1 --variants plain@2,eager@4 \
        --render-every 0   # a CPU smoke run

Baseline ("plain"): the loop of diffusers' ``examples/text_to_image/train_text_to_image.py``
reduced to what this task needs: a ``DataLoader`` over CPU tensors, ``accelerate`` bf16
autocast with fp32 master weights, the frozen text encoder run on every batch, noise and
timesteps drawn per batch, v-prediction MSE, ``torch.optim.AdamW`` (default settings),
gradient clipping, ``EMAModel`` (default settings), ``loss.item()`` every step.

Ours: :func:`gaussian_atlas.train.train`, **with the rendering losses of Eq. 4 in the measured loop**
(``--render-every``, default 1: every step, as on a GPU; the baseline has none, so it does less work):
atlases resident on the GPU, noise/timesteps from a device generator, text embeddings of the
frozen encoder computed once per caption, channels_last, cuDNN autotuning, cuDNN fused attention,
fused AdamW, foreach EMA, losses read back every few steps; "regional" / "full" add
``torch.compile`` (:func:`gaussian_atlas.model.compile_unet`: each UNet block, or one graph).

Variants are ``name@micro`` (``plain@8`` = the plain loop at micro-batch 8 with gradient accumulation
up to ``--batch``); names: plain, eager, regional, full. Without ``@``, the micro-batch is the
largest power of two whose eager forward+backward fits in 80% of the GPU's memory. All train the
same UNet (``unet_config(size)``, same seed) on the same random normalised atlases with the same
global batch, one after another in one process. Timed: the steps after ``--warmup`` (compilation
and autotuning excluded; their cost, from the start of the variant, is printed separately).
MFU = (UNet forward+backward FLOPs per sample, counted by ``torch.utils.flop_counter``) x samples/s
/ the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s). ``--profile``: CUDA kernel time of one
forward+backward at each variant's micro-batch, by kind (attention / convolution / matmul / fused /
norm / other), with each kind's TFLOP/s, for the variants it names — what bounds the speed. Raw JSON (device, versions,
commit, command, every timing) to ``--json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _prebuilt import use_prebuilt_gsplat  # noqa: E402
from _record import write_record  # noqa: E402

use_prebuilt_gsplat()  # the rendering losses use gsplat on CUDA

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def make_data(M: int, side: int, seed: int = 0, views: int = 4, res: int = 32):
    """``M`` random normalised atlases with captions and ``views`` white reference views at ``res``²
    from an orbit around the object (what the rendering losses compare against)."""
    from gaussian_atlas.sample import orbit_cameras
    from gaussian_atlas.train import TrainData

    g = torch.Generator().manual_seed(seed)
    shapes = ["cube", "sphere", "torus", "cone", "cylinder", "capsule", "pyramid", "ring"]
    colours = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple"]
    caps = [f"a {colours[i % 8]} {shapes[(i // 8) % 8]}" for i in range(M)]
    c2w, K = orbit_cameras(views, res)
    return TrainData(
        atlases=torch.randn(M, 16, side, side, generator=g), captions=caps, centers=torch.zeros(M, 3),
        scales=torch.ones(M), ref_rgb=torch.ones(M, views, res, res, 3), ref_alpha=torch.zeros(M, views, res, res),
        ref_c2w=c2w.expand(M, views, 4, 4).clone(), ref_K=K.expand(M, views, 3, 3).clone(),
        mean=torch.zeros(16, side, side), std=torch.ones(16, side, side), grid=torch.randperm(side * side))


def model_cfg(args):
    from gaussian_atlas.model import ModelConfig

    # frozen text encoder: as with a pretrained CLIP (paper); from config here (no weights on disk)
    return ModelConfig(size=args.size, sample_size=args.side, max_length=16, train_text_encoder=False)


def flops_per_sample(args, data, dev) -> float:
    """Forward + backward FLOPs of the UNet for one sample (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from gaussian_atlas.model import load_model

    torch.manual_seed(0)
    unet, te, tok = load_model(model_cfg(args), data.captions)
    unet, te = unet.to(dev), te.to(dev)
    ids = tok(data.captions[:1], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        ctx = te(ids.to(dev))[0]
    x = data.atlases[:1].to(dev)
    with FlopCounterMode(display=False) as fc, torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
        unet(x, torch.tensor([500], device=dev), encoder_hidden_states=ctx).sample.float().pow(2).mean().backward()
    del unet, te
    return float(fc.get_total_flops())


def fits(args, data, dev, micro: int) -> tuple[bool, float]:
    """Does an eager bf16 forward+backward (+ AdamW state) of ``micro`` samples fit in 80% of memory?"""
    from gaussian_atlas.model import load_model

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    unet = te = opt = None
    try:
        unet, te, tok = load_model(model_cfg(args), data.captions)
        unet, te = unet.to(dev), te.to(dev)
        opt = torch.optim.AdamW(unet.parameters())
        ids = tok(data.captions[:micro], padding="max_length", max_length=tok.model_max_length,
                  return_tensors="pt").input_ids.to(dev)
        with torch.autocast("cuda", torch.bfloat16):
            with torch.no_grad():
                ctx = te(ids)[0]
            loss = unet(data.atlases[:micro].to(dev), torch.full((micro,), 500, device=dev),
                        encoder_hidden_states=ctx).sample.float().pow(2).mean()
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(dev)
        return peak < 0.8 * torch.cuda.get_device_properties(dev).total_memory, peak / 2**30
    except torch.OutOfMemoryError:
        return False, float("inf")
    finally:
        del unet, te, opt
        gc.collect()
        torch.cuda.empty_cache()


def plain_loop(args, data, micro: int, accum: int) -> dict:
    """train_text_to_image.py's loop, reduced (see the module docstring)."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    from gaussian_atlas.model import load_model

    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no",
                              gradient_accumulation_steps=accum)
    dev = accelerator.device
    torch.manual_seed(0)
    unet, text_encoder, tokenizer = load_model(model_cfg(args), data.captions)
    text_encoder.requires_grad_(False)
    text_encoder.to(dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=5e-5, weight_decay=1e-2)
    ids = tokenizer(data.captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.atlases, ids), batch_size=micro,
                                         shuffle=True, drop_last=True)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    ema = EMAModel(accelerator.unwrap_model(unet).parameters(), model_cls=UNet2DConditionModel,
                   model_config=accelerator.unwrap_model(unet).config)
    ema.to(dev)
    total = args.warmup + args.steps
    step, t_start, times = 0, None, []
    t0 = time.perf_counter()
    while step < total:
        for latents, input_ids in loader:
            with accelerator.accumulate(unet):
                noise = torch.randn_like(latents)
                t = torch.randint(0, 1000, (latents.shape[0],), device=dev).long()
                noisy = noise_scheduler.add_noise(latents, noise, t)
                ehs = text_encoder(input_ids, return_dict=False)[0]
                target = noise_scheduler.get_velocity(latents, noise, t)
                pred = unet(noisy, t, ehs, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
                train_loss = accelerator.gather(loss.repeat(micro)).mean().item()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                ema.step(unet.parameters())
                step += 1
                times.append(time.perf_counter())
                if step == args.warmup:
                    t_start = times[-1]
                if step >= total:
                    break
    del train_loss
    seconds = times[-1] - t_start
    out = {"samples_per_s": args.steps * args.batch / seconds, "s_per_step": seconds / args.steps,
           "warmup_s": t_start - t0}
    if dev.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    del unet, optimizer, ema, text_encoder, loader, accelerator
    return out


def our_loop(args, data, micro: int, accum: int, compile: str | None) -> dict:
    from gaussian_atlas.atlas import AtlasConfig
    from gaussian_atlas.train import TrainConfig, train

    # steps + 1 with stop_after: no final checkpoint / model save (10+ GB of writes at SD size) after timing
    cfg = TrainConfig(model=model_cfg(args), steps=args.warmup + args.steps + 1, batch_size=micro, grad_accum=accum,
                      render_every=args.render_every, render_resolution=args.render_resolution,
                      checkpoint_every=10**9, keep_checkpoints=1, compile=compile is not None,
                      compile_scope=compile or "regional",
                      log_every=1 if args.warmup + args.steps < 8 else 2, sample_every=0)
    stamps = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        s = train(cfg, data, AtlasConfig(side=args.side), tmp, stop_after=args.warmup + args.steps,
                  log=lambda step, m: stamps.setdefault(step, time.perf_counter()))
    steps = sorted(stamps)
    first = min(k for k in steps if k >= args.warmup)
    last = steps[-1]
    seconds = stamps[last] - stamps[first]
    out = {"samples_per_s": (last - first) * args.batch / seconds, "s_per_step": seconds / (last - first),
           "warmup_s": stamps[first] - t0, "render_every": args.render_every,
           "render_resolution": args.render_resolution, "compile": compile or "off"}
    if "peak_memory_gb" in s:
        out["peak_memory_gb"] = s["peak_memory_gb"]
    return out


def step_closure(args, data, dev, micro: int, ours: bool, compile: str | None):
    """One bf16 forward+backward of a fresh UNet at ``micro`` (ours: channels_last, cuDNN attention, compiled
    as the variant; plain: as the baseline runs it). For the profiler."""
    import contextlib

    from _profile import flops_by_kind

    from gaussian_atlas.model import compile_unet, fast_attention, load_model

    torch.manual_seed(0)
    unet, te, tok = load_model(model_cfg(args), data.captions)
    unet, te = unet.to(dev).train(), te.to(dev)
    if ours:
        unet.to(memory_format=torch.channels_last)
    ids = tok(data.captions[:micro], padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids.to(dev)
    with torch.no_grad():
        ctx = te(ids)[0]
    x = data.atlases[:micro].to(dev)
    if ours:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.full((micro,), 500, device=dev)

    def step(model=unet):
        with torch.autocast("cuda", torch.bfloat16), (fast_attention(dev) if ours else contextlib.nullcontext()):
            loss = model(x, t, encoder_hidden_states=ctx).sample.float().pow(2).mean()
        loss.backward()
        unet.zero_grad(set_to_none=True)

    # FLOPs counted before compiling. In the H200 run of 2026-12-03 the compiled closure was first called under
    # FlopCounterMode (a dispatch mode) and its profile then showed only eager kernels (the suspected cause)
    flops = flops_by_kind(step)
    fwd = compile_unet(unet, compile) if (ours and compile) else unet
    return (lambda: step(fwd)), flops


def parse_variants(spec: str) -> list[tuple[str, int]]:
    """``"plain@8,regional@16,eager"`` -> ``[("plain", 8), ("regional", 16), ("eager", 0)]`` (0 = probe)."""
    out = []
    for item in [v for v in spec.split(",") if v]:
        name, _, micro = item.partition("@")
        if name not in ("plain", "eager", "regional", "full"):
            raise SystemExit(f"unknown variant {name!r} in --variants (plain, eager, regional, full)")
        out.append((name, int(micro) if micro else 0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="sd", choices=["tiny", "small", "sd"], help="UNet layout (default: %(default)s)")
    ap.add_argument("--side", type=int, default=128, help="atlas side (paper: 128)")
    ap.add_argument("--batch", type=int, default=16, help="global batch per optimiser step (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimiser steps")
    ap.add_argument("--warmup", type=int, default=4, help="untimed optimiser steps first (compilation)")
    ap.add_argument("--objects", type=int, default=256, help="random atlases in the dataset")
    ap.add_argument("--variants", default="plain,regional",
                    help="comma-separated name[@micro-batch]: plain (the baseline), eager (ours), regional / full "
                         "(ours + torch.compile of each block / of the whole UNet); default: %(default)s")
    ap.add_argument("--render-every", type=int, default=1, help="ours: rendering losses every k steps (0 = off)")
    ap.add_argument("--render-resolution", type=int, default=32, help="ours: rendering-loss views' side")
    ap.add_argument("--profile", default="", help="comma-separated variants (as in --variants) whose one forward+"
                    "backward is profiled: kernel time by kind")
    ap.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = ap.parse_args()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    data = make_data(args.objects, args.side, res=args.render_resolution)
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    print(f"device: {name}; UNet {args.size}, atlases 16x{args.side}x{args.side}, global batch {args.batch}", flush=True)
    variants = parse_variants(args.variants)
    if not cuda and any(n in ("regional", "full") for n, _ in variants):
        print("no CUDA device: torch.compile variants skipped (GPU only)", flush=True)
        variants = [(n, m) for n, m in variants if n not in ("regional", "full")]

    probed = None
    if any(m == 0 for _, m in variants):
        probed = args.batch
        while cuda and probed > 1:
            ok, peak = fits(args, data, dev, probed)
            print(f"  probe micro-batch {probed}: peak {peak:.1f} GiB -> {'fits' if ok else 'too large'}", flush=True)
            if ok:
                break
            probed //= 2

    fl = flops_per_sample(args, data, dev)
    print(f"UNet forward+backward: {fl / 1e12:.3f} TFLOP per sample", flush=True)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    res = {"device": name, "size": args.size, "side": args.side, "batch": args.batch, "steps": args.steps,
           "warmup_steps": args.warmup, "tflop_per_sample": fl / 1e12, "peak_bf16_flops": peak, "variants": {}}
    labels = {"plain": "plain diffusers loop", "eager": "ours, eager", "regional": "ours, compile (regional)",
              "full": "ours, compile (full)"}
    for vname, micro in variants:
        micro = micro or probed
        accum = max(1, args.batch // micro)
        label = f"{labels[vname]} @ micro-batch {micro} x {accum}"
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        if vname == "plain":
            r = plain_loop(args, data, micro, accum)
        else:
            r = our_loop(args, data, micro, accum, None if vname == "eager" else vname)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        r.update(variant=vname, micro_batch=micro, accum=accum)
        r["mfu"] = fl * r["samples_per_s"] / peak if peak else None
        res["variants"][f"{vname}@{micro}"] = r
        mfu = f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] else ""
        mem = f", peak {r['peak_memory_gb']:.1f} GiB" if "peak_memory_gb" in r else ""
        print(f"{label:48s} {r['samples_per_s']:8.2f} samples/s  {r['s_per_step'] * 1e3:8.1f} ms/step{mem}{mfu}"
              f"  (warm-up {r['warmup_s']:.0f} s)", flush=True)
        if cuda and f"{vname}@{micro}" in args.profile.split(","):
            from _profile import kernel_breakdown, print_breakdown

            step, flops = step_closure(args, data, dev, micro, vname != "plain",
                                       vname if vname in ("regional", "full") else None)
            r["profile_fwd_bwd"] = kernel_breakdown(step, repeats=2, flops=flops)
            print_breakdown(f"  profile, one forward+backward at micro-batch {micro} ({labels[vname]})",
                            r["profile_fwd_bwd"])
            del step
            gc.collect()
            torch.cuda.empty_cache()
    plains = {k: v for k, v in res["variants"].items() if v["variant"] == "plain"}
    for k, v in res["variants"].items():
        if v["variant"] != "plain":
            v["vs_plain"] = {pk: v["samples_per_s"] / pv["samples_per_s"] for pk, pv in plains.items()}
            for pk, ratio in v["vs_plain"].items():
                print(f"speed-up {k} vs {pk}: {ratio:.2f}x")
    write_record(args.json, res)


if __name__ == "__main__":
    main()
