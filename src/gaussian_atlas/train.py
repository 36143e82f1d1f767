"""Fine-tuning the UNet on normalised Gaussian Atlases (paper Sec. 5, Eq. 4, Sec. 6).

A flat, commented loop in the style of diffusers' ``train_text_to_image.py``:
DDPM noise schedule with **v-prediction**, 20% caption dropout (for classifier-free
guidance), AdamW, EMA through ``diffusers.training_utils.EMAModel``, ``accelerate`` for
devices / bf16 / gradient accumulation / DDP, and the **rendering losses** of Eq. 4: the
predicted clean atlas is de-normalised, unpacked into Gaussians and rendered into a
reference view of its object (gsplat on CUDA, the torch compositor on CPU):
``L = L_v + λ_rgb·L1(rgb) + λ_mask·L1(alpha) [+ λ_lpips·LPIPS]``.

Checkpoints (``checkpoint-<step>/``: ``accelerator.save_state`` — model, optimizer, LR
scheduler, RNG states — plus EMA weights, the step and the batch sampler's generator) are
written every ``checkpoint_every`` steps; :func:`train` resumes from the newest one, so a
killed run continues with the same step, optimizer, scheduler, EMA and RNG state — but only
when the checkpoint's :func:`run_key` (settings and data content) matches: a rerun after the
atlases changed (e.g. ``dvc repro`` after a refit) trains afresh instead of reusing a model of
the old data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .model import ModelConfig

__all__ = ["TrainConfig", "TrainData", "load_train_data", "train", "latest_checkpoint", "package_model"]


@dataclass(frozen=True)
class TrainConfig:
    """``params.yaml: train``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-5  # paper: AdamW 5e-5
    lr_warmup: int = 0
    weight_decay: float = 1e-2
    text_dropout: float = 0.2  # paper: 20% for classifier-free guidance
    ema_decay: float = 0.999
    num_train_timesteps: int = 1000
    lambda_rgb: float = 0.1
    lambda_mask: float = 0.1
    lambda_lpips: float = 0.0  # needs weights on disk (see fit.load_lpips)
    lpips_weights: str | None = None
    render_every: int = 1  # rendering losses every k steps (0 = never)
    render_resolution: int = 32
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    mixed_precision: str = "auto"  # auto = bf16 on CUDA, no on CPU
    compile: bool = False  # torch.compile the UNet's training forward (GPU; pays off after a few hundred steps)
    compile_scope: str = "regional"  # regional (each UNet block; short warm-up) | full (one graph): model.compile_unet
    channels_last: bool = True  # NHWC UNet on CUDA (faster convolutions); ignored on the CPU
    data_on_device: str = "auto"  # auto | always | never: atlases resident on the GPU (auto: if < 1/4 of its memory)
    log_every: int = 1  # read the losses back every k steps (each read waits for the GPU)
    fast_attention: bool = True  # cuDNN fused attention first on Hopper GPUs (model.fast_attention)
    max_minutes: float = 0.0  # stop (checkpoint + final model) after this wall-clock budget; 0 = no limit
    snapshots: tuple[int, ...] = ()  # steps at which the EMA model is also saved, to out_dir/snapshots/step-<k>
    seed: int = 0
    # previews: every k steps, a few prompts sampled (EMA weights, DPM-Solver++) and rendered
    sample_every: int = 0  # 0 = never
    sample_prompts: tuple[str, ...] = ()  # () = the first 4 distinct training captions
    sample_steps: int = 20
    sample_guidance: float = 3.5
    sample_views: int = 4
    sample_resolution: int = 96

    def __post_init__(self) -> None:
        from .model import COMPILE_SCOPES

        if self.compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"train.compile_scope must be one of {', '.join(COMPILE_SCOPES)}, got {self.compile_scope!r}")


@dataclass
class TrainData:
    """Everything the loop reads, resident in memory (tensors on the CPU)."""

    atlases: torch.Tensor  # [M, 16, S, S] normalised
    captions: list[str]
    centers: torch.Tensor  # [M, 3]
    scales: torch.Tensor  # [M]
    ref_rgb: torch.Tensor  # [M, V, R, R, 3] on white
    ref_alpha: torch.Tensor  # [M, V, R, R]
    ref_c2w: torch.Tensor  # [M, V, 4, 4]
    ref_K: torch.Tensor  # [M, V, 3, 3] at resolution R
    mean: torch.Tensor  # [16, S, S]
    std: torch.Tensor  # [16, S, S]
    grid: torch.Tensor  # [S*S] sphere -> pixel index of the atlas


def load_train_data(atlas_dir: str | Path, stats_path: str | Path, ingested_dir: str | Path, atlas_cfg: Any,
                    render_resolution: int = 32, ref_views: int = 4) -> TrainData:
    """Normalised atlases, captions and a few reference views per object, in memory.

    Only the training split: objects of ``split == "ceiling"`` (rendered for held-out prompts) are left out.
    """
    import pandas as pd

    from .atlas import atlas_grid, training_rows
    from .data import load_manifest, load_object
    from .normalize import RunningStats, normalize

    atlas_dir = Path(atlas_dir)
    index = training_rows(pd.read_parquet(atlas_dir / "index.parquet"))  # never the held-out prompts' ceiling objects
    if not len(index):
        raise ValueError(f"{atlas_dir / 'index.parquet'} lists no atlases: nothing to train on")
    stats = RunningStats.load(stats_path)
    paths = dict(zip(*load_manifest(ingested_dir)[["id", "path"]].values.T))
    atlases, rgbs, alphas, c2ws, Ks = [], [], [], [], []
    for r in index.itertuples(index=False):
        with np.load(atlas_dir / r.path) as z:
            atlases.append(torch.from_numpy(np.asarray(normalize(z["atlas"], stats), dtype=np.float32)))
        o = load_object(Path(ingested_dir) / paths[r.id])
        V, H, W, _ = o["rgb"].shape
        pick = np.linspace(0, V - 1, min(ref_views, V)).round().astype(int)
        img = torch.from_numpy(np.concatenate([o["rgb"][pick], o["alpha"][pick][..., None]], -1)).permute(0, 3, 1, 2)
        img = F.interpolate(img, size=(render_resolution, render_resolution), mode="area").permute(0, 2, 3, 1)
        K = torch.from_numpy(o["K"][pick]).clone()
        K[:, 0] *= render_resolution / W
        K[:, 1] *= render_resolution / H
        rgbs.append(img[..., :3])
        alphas.append(img[..., 3])
        c2ws.append(torch.from_numpy(o["c2w"][pick]))
        Ks.append(K)
    return TrainData(
        atlases=torch.stack(atlases), captions=list(index["caption"].fillna("")),
        centers=torch.tensor(index[["center_x", "center_y", "center_z"]].values, dtype=torch.float32),
        scales=torch.tensor(index["scale"].values, dtype=torch.float32),
        ref_rgb=torch.stack(rgbs), ref_alpha=torch.stack(alphas), ref_c2w=torch.stack(c2ws), ref_K=torch.stack(Ks),
        mean=torch.from_numpy(stats.mean.astype(np.float32)), std=torch.from_numpy(stats.std.astype(np.float32)),
        grid=atlas_grid(atlas_cfg),
    )


def package_model(model_dir: str | Path, stats_path: str | Path, atlas_cfg: Any) -> Path:
    """Make a saved model folder self-contained for sampling: the normalisation statistics
    (``stats.npz``), the sphere->grid index (``sphere2grid.npy``) and the atlas settings
    (``atlas.json``) travel with the weights (:func:`gaussian_atlas.sample.load_atlas_model`)."""
    from .atlas import atlas_grid, atlas_grid_path
    from .config import to_dict
    from .io import write_json

    model_dir = Path(model_dir)
    shutil.copy2(stats_path, model_dir / "stats.npz")
    atlas_grid(atlas_cfg)  # cached (solved or taken from atlas.grid) if it was not yet
    shutil.copy2(atlas_grid_path(atlas_cfg), model_dir / "sphere2grid.npy")
    write_json(model_dir / "atlas.json", to_dict(atlas_cfg))
    return model_dir


# TrainConfig fields that do not change what a step computes: a run resumes across a change of these
_RESUMABLE_FIELDS = ("steps", "compile_scope", "checkpoint_every", "keep_checkpoints", "log_every", "max_minutes", "snapshots",
                     "sample_every", "sample_prompts", "sample_steps", "sample_guidance", "sample_views",
                     "sample_resolution")


def run_key(cfg: TrainConfig, data: TrainData) -> str:
    """What a checkpoint must match to be resumed: the settings that change a training step and the
    content of the data (atlases, captions, reference views, statistics). Not the number of steps
    (a longer run resumes a shorter one) nor logging, checkpointing or preview settings."""
    import dataclasses
    import hashlib
    import json

    d = dataclasses.asdict(cfg)
    for k in _RESUMABLE_FIELDS:
        d.pop(k, None)
    h = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode())
    for t in (data.atlases, data.ref_rgb, data.ref_alpha, data.ref_c2w, data.ref_K, data.mean, data.std, data.grid,
              data.centers, data.scales):
        h.update(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes())
    h.update("\n".join(data.captions).encode())
    return h.hexdigest()[:24]


def _load_safe(ckpt: Path, load: Callable[[], Any]) -> Any:
    """Run ``load`` (a ``weights_only=True`` load of checkpoint files); a file holding pickled code or
    objects is refused with a one-line reason instead of being executed."""
    import pickle

    try:
        return load()
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"checkpoint {ckpt} refused: a file in it holds pickled objects other than tensors and "
                         f"plain data, which are never loaded (weights_only=True): {first}") from None


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = sorted(Path(out_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    ckpts = [c for c in ckpts if (c / "extra.pt").exists()]  # complete ones only
    return ckpts[-1] if ckpts else None


def _render_loss(x0: torch.Tensor, idx: torch.Tensor, data: TrainData, atlas_cfg: Any, rng: torch.Generator,
                 R: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """L1 on RGB and alpha of one random reference view per object, rendered from predicted atlases.

    Returns ``(l_rgb, l_mask, rendered rgb [B, R, R, 3], reference rgb [B, R, R, 3])``.
    """
    from .atlas import atlas_to_gaussians
    from .render import render

    dev = x0.device
    atlas = x0.float() * data.std.to(dev) + data.mean.to(dev)  # de-normalise [B, 16, S, S]
    metas = [{"center": data.centers[i].tolist(), "scale": float(data.scales[i])} for i in idx.tolist()]
    g = atlas_to_gaussians(atlas, metas, atlas_cfg, grid=data.grid)  # [B, N, ...] in object frames
    V = data.ref_c2w.shape[1]
    v = torch.randint(0, V, (len(idx),), generator=rng)
    c2w = data.ref_c2w[idx, v][:, None].to(dev)  # [B, 1, 4, 4]
    K = data.ref_K[idx, v][:, None].to(dev)
    out = render(g.to(dev, torch.float32), c2w, K, R, R, background=1.0)
    ref = data.ref_rgb[idx, v].to(dev)  # [B, R, R, 3]
    l_rgb = torch.abs(out.rgb[:, 0] - ref).mean()
    l_mask = torch.abs(out.alpha[:, 0, ..., 0] - data.ref_alpha[idx, v].to(dev)).mean()
    return l_rgb, l_mask, out.rgb[:, 0], ref


def train(cfg: TrainConfig, data: TrainData, atlas_cfg: Any, out_dir: str | Path, *,
          log: Callable[[int, dict[str, float]], None] | None = None, stop_after: int | None = None,
          progress: bool = False, images: Callable[[int, np.ndarray], None] | None = None) -> dict[str, Any]:
    """Train (or resume training) and save the final model under ``out_dir/model``.

    ``log(step, metrics)``: called on the main process after every optimisation step.
    ``images(step, sheet)``: every ``cfg.sample_every`` steps (and at the last step), a uint8
    ``[H, W, 3]`` picture of preview samples (a row of ``cfg.sample_views`` renders per prompt).
    ``stop_after``: return after this many steps of *this call* (simulates a killed run in tests).
    Returns a summary (final step, seconds, last losses, samples/s).
    """
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from .model import compile_unet, fast_attention, load_model

    out_dir = Path(out_dir)
    cuda = torch.cuda.is_available()
    mp = ("bf16" if cuda else "no") if cfg.mixed_precision == "auto" else cfg.mixed_precision
    # launched by torchrun on a machine without CUDA: accelerate joins the gloo process group only when
    # told cpu=True (else every rank would train alone, each its own main process, racing on out_dir)
    cpu = not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mp, cpu=cpu)
    dev = accelerator.device
    torch.manual_seed(cfg.seed)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolutions

    # 1. model, text side, noise schedule (v-prediction), optimizer, LR schedule, EMA
    unet, text_encoder, tokenizer = load_model(cfg.model, data.captions)
    train_text = any(p.requires_grad for p in text_encoder.parameters())
    channels_last = cfg.channels_last and dev.type == "cuda"
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    noise_scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, prediction_type="v_prediction")
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=dev.type == "cuda")
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.lr_warmup,
                                 num_training_steps=cfg.steps)
    unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
    # the training forward (previews run eager: torch.compiler.set_stance in _preview). Regional: compiled in
    # place, so the prepared (possibly DDP-wrapped) module calls the compiled blocks; full: a compiled wrapper.
    unet_fwd = unet
    if cfg.compile and cfg.compile_scope == "full":
        unet_fwd = compile_unet(unet, "full")
    elif cfg.compile:
        compile_unet(accelerator.unwrap_model(unet), cfg.compile_scope)
    ema = EMAModel(accelerator.unwrap_model(unet).parameters(), decay=cfg.ema_decay, foreach=dev.type == "cuda",
                   model_cls=UNet2DConditionModel, model_config=accelerator.unwrap_model(unet).config)
    ema.to(dev)
    # batches (indices, caption dropout) from a CPU generator; noise and timesteps from one on the device
    # (a [B, 16, S, S] randn on the CPU costs more than a UNet step on a GPU). Both are checkpointed.
    batch_rng = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
    noise_rng = (torch.Generator(device=dev).manual_seed(cfg.seed + 7919 * (1 + accelerator.process_index))
                 if dev.type == "cuda" else batch_rng)
    gens = [batch_rng] if noise_rng is batch_rng else [batch_rng, noise_rng]

    # the data on the device once, unless it is too large for that (then batches are copied per step)
    on_dev = dev.type == "cuda" and (cfg.data_on_device == "always" or (
        cfg.data_on_device == "auto" and data.atlases.numel() * 4 < 0.25 * torch.cuda.get_device_properties(dev).total_memory))
    atlases = data.atlases.to(dev) if on_dev else data.atlases  # [M, 16, S, S]
    if on_dev:
        data = replace(data, ref_rgb=data.ref_rgb.to(dev), ref_alpha=data.ref_alpha.to(dev),
                       ref_c2w=data.ref_c2w.to(dev), ref_K=data.ref_K.to(dev))

    # 2. resume from the newest complete checkpoint, if it was made from the same settings and data
    step = 0
    key = run_key(cfg, data)
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None and _load_safe(ckpt, lambda: torch.load(ckpt / "extra.pt", weights_only=True)).get(
            "run_key") != key:
        if accelerator.is_main_process:
            print(f"train: the checkpoints in {out_dir} were made from other settings or data: starting afresh")
            for old in out_dir.glob("checkpoint-*"):
                shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(out_dir / "snapshots", ignore_errors=True)
        accelerator.wait_for_everyone()
        ckpt = None
    if ckpt is not None:
        _load_safe(ckpt, lambda: accelerator.load_state(str(ckpt)))  # accelerate loads with weights_only=True
        extra = _load_safe(ckpt, lambda: torch.load(ckpt / "extra.pt", weights_only=True))
        step = int(extra["step"])
        ema.load_state_dict(extra["ema"])
        states = extra.get("rng_states") or [[r] for r in (extra.get("batch_rngs") or [extra["batch_rng"]])]
        if accelerator.process_index < len(states):  # else (more ranks than saved): keep the fresh seeds
            for g, st in zip(gens, states[accelerator.process_index]):
                g.set_state(st)

    def encode(captions: list[str]) -> torch.Tensor:
        ids = tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids.to(dev)
        return text_encoder(ids)[0]  # [B, T, D]

    # a frozen text encoder gives the same embedding for a caption every time: compute each once
    emb_table = cap_index = None
    if not train_text:
        uniq = ["", *dict.fromkeys(data.captions)]
        with torch.no_grad(), accelerator.autocast():
            emb_table = torch.cat([encode(uniq[i:i + 256]) for i in range(0, len(uniq), 256)])  # [U, T, D]
        pos = {c: i for i, c in enumerate(uniq)}
        cap_index = torch.tensor([pos[c] for c in data.captions], device=dev)  # [M]

    lpips_fn = None
    if cfg.lambda_lpips > 0:
        from .fit import load_lpips

        lpips_fn, lpips_note = load_lpips(cfg.lpips_weights, dev)
        if lpips_fn is None:
            print(f"train: LPIPS rendering loss {lpips_note}")

    def attention():  # a fresh context per use (sdpa_kernel's is single-use)
        return fast_attention(dev) if cfg.fast_attention else contextlib.nullcontext()

    M = len(data.atlases)
    t0, done, last, pending = time.perf_counter(), 0, {}, {}
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not progress)
    out_of_time = False
    t_log, step_log = t0, step  # throughput window between two logged steps
    unet.train()
    while step < cfg.steps and not out_of_time and (stop_after is None or done < stop_after):
        with accelerator.accumulate(unet):
            # 3. a batch: atlases, captions (20% dropped to "" for CFG), noise, timesteps
            idx = torch.randint(0, M, (cfg.batch_size,), generator=batch_rng)
            x0 = atlases[idx.to(atlases.device)].to(dev, non_blocking=True)  # [B, 16, S, S]
            drop = torch.rand(cfg.batch_size, generator=batch_rng) < cfg.text_dropout
            noise = torch.randn(x0.shape, generator=noise_rng, device=noise_rng.device).to(dev)
            t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=noise_rng,
                              device=noise_rng.device).to(dev)
            xt = noise_scheduler.add_noise(x0, noise, t)
            if channels_last:
                xt = xt.contiguous(memory_format=torch.channels_last)
            if emb_table is not None:
                ctx = emb_table[torch.where(drop.to(dev), 0, cap_index[idx.to(dev)])]  # [B, T, D]
            else:
                ctx = encode(["" if d else data.captions[i] for d, i in zip(drop.tolist(), idx.tolist())])

            # 4. v-prediction loss
            with accelerator.autocast(), attention():
                v_pred = unet_fwd(xt, t, encoder_hidden_states=ctx).sample
            v_target = noise_scheduler.get_velocity(x0, noise, t)
            loss_v = F.mse_loss(v_pred.float(), v_target.float())
            loss = loss_v
            terms = {"loss_v": loss_v.detach()}  # tensors: read back only when logged (no sync per step)

            # 5. rendering losses (Eq. 4): predicted x0 -> Gaussians -> reference views
            if cfg.render_every and step % cfg.render_every == 0 and (
                    cfg.lambda_rgb > 0 or cfg.lambda_mask > 0 or lpips_fn is not None):
                ac = noise_scheduler.alphas_cumprod.to(dev)[t].view(-1, 1, 1, 1)
                x0_pred = ac.sqrt() * xt.float() - (1 - ac).sqrt() * v_pred.float()  # x0 from v
                l_rgb, l_mask, rgb, ref = _render_loss(x0_pred, idx, data, atlas_cfg, batch_rng,
                                                       cfg.render_resolution)
                loss = loss + cfg.lambda_rgb * l_rgb + cfg.lambda_mask * l_mask
                terms.update(loss_rgb=l_rgb.detach(), loss_mask=l_mask.detach())
                if lpips_fn is not None:
                    l_lpips = lpips_fn(rgb, ref)
                    loss = loss + cfg.lambda_lpips * l_lpips
                    terms["loss_lpips"] = l_lpips.detach()

            # 6. step
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        if accelerator.sync_gradients:
            ema.step(accelerator.unwrap_model(unet).parameters())
            step += 1
            done += 1
            bar.update(1)
            pending = {**terms, "loss": loss.detach()}
            if cfg.max_minutes and step % cfg.log_every == 0:  # the main process decides for every rank
                from accelerate.utils import broadcast_object_list

                flag = [time.perf_counter() - t0 > 60.0 * cfg.max_minutes]
                out_of_time = bool(broadcast_object_list(flag)[0]) if accelerator.num_processes > 1 else flag[0]
            final = step == cfg.steps or out_of_time
            if step % cfg.log_every == 0 or final:
                last = {k: float(v) for k, v in pending.items()}  # (reading them back waits for the GPU)
                last["lr"] = lr_scheduler.get_last_lr()[0]
                now = time.perf_counter()
                last["samples_per_second"] = ((step - step_log) * cfg.batch_size * cfg.grad_accum *
                                              accelerator.num_processes / max(now - t_log, 1e-9))
                t_log, step_log = now, step
                if dev.type == "cuda":
                    last["gpu_memory_gb"] = torch.cuda.memory_allocated(dev) / 2**30
                    last["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
                if log is not None and accelerator.is_main_process:
                    log(step, last)
            # 7. checkpoint: accelerate state + EMA + step + generators
            if step % cfg.checkpoint_every == 0 or final:
                _save_checkpoint(accelerator, ema, gens, step, out_dir, cfg.keep_checkpoints, key)
            # 7b. snapshots: the EMA model at chosen steps, for scores over training (paper Fig. 8)
            if step in cfg.snapshots and accelerator.is_main_process:
                _save_model(accelerator, unet, text_encoder, tokenizer, ema, noise_scheduler,
                            out_dir / "snapshots" / f"step-{step}", keep_training=True)
            # 8. previews (main process only; no collective calls inside)
            if (images is not None and cfg.sample_every and accelerator.is_main_process
                    and (step % cfg.sample_every == 0 or final)):
                images(step, _preview(cfg, accelerator, unet, text_encoder, tokenizer, ema, noise_scheduler, data,
                                      atlas_cfg))
    bar.close()
    if pending and not last:
        last = {k: float(v) for k, v in pending.items()}
    seconds = time.perf_counter() - t0
    summary = {"step": step, "seconds": seconds, "samples_per_second": done * cfg.batch_size * cfg.grad_accum *
               accelerator.num_processes / max(seconds, 1e-9), **{f"last_{k}": v for k, v in last.items()}}
    if dev.type == "cuda":
        summary["peak_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    summary["stopped"] = "steps" if step >= cfg.steps else ("max_minutes" if out_of_time else "stop_after")
    if (step >= cfg.steps or out_of_time) and accelerator.is_main_process:
        _save_model(accelerator, unet, text_encoder, tokenizer, ema, noise_scheduler, out_dir / "model")
    accelerator.wait_for_everyone()
    return summary


@torch.no_grad()
def _preview(cfg: TrainConfig, accelerator: Any, unet: Any, text_encoder: Any, tokenizer: Any, ema: Any,
             noise_scheduler: Any, data: TrainData, atlas_cfg: Any) -> np.ndarray:
    """Sample ``cfg.sample_prompts`` with the EMA weights and render them: uint8 ``[H, W, 3]``."""
    from .atlas import atlas_to_gaussians
    from .sample import dpm_solver, orbit_cameras, render_views, sample_atlases, sample_sheet

    prompts = list(cfg.sample_prompts) or list(dict.fromkeys(c for c in data.captions if c))[:4]
    net, te = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    ema.store(net.parameters())
    ema.copy_to(net.parameters())
    te_was_training = te.training
    net.eval()
    te.eval()
    eager = torch.compiler.set_stance("force_eager") if cfg.compile else contextlib.nullcontext()
    try:
        with accelerator.autocast(), eager:  # previews: other shapes, no grad: no recompiles for them
            x = sample_atlases(net, te, tokenizer, dpm_solver(noise_scheduler.config), prompts,
                               [cfg.seed + i for i in range(len(prompts))], steps=cfg.sample_steps,
                               guidance=cfg.sample_guidance, batch_size=len(prompts))
        atlas = x.float() * data.std.to(x.device) + data.mean.to(x.device)  # [P, 16, S, S] de-normalised
        g = atlas_to_gaussians(atlas, None, atlas_cfg, grid=data.grid)
        views = render_views(g, *orbit_cameras(cfg.sample_views, cfg.sample_resolution), cfg.sample_resolution)
    finally:
        ema.restore(net.parameters())
        net.train()
        te.train(te_was_training)
    return sample_sheet(views, prompts)


def _save_checkpoint(accelerator: Any, ema: Any, gens: list[torch.Generator], step: int, out_dir: Path,
                     keep: int, key: str = "") -> None:
    ckpt = out_dir / f"checkpoint-{step}"
    accelerator.save_state(str(ckpt))
    from accelerate.utils import gather_object

    # every rank's generators (a collective: also waits until every rank has saved its state)
    states = gather_object([[g.get_state() for g in gens]])
    if accelerator.is_main_process:
        # extra.pt is written last and atomically: its presence marks a complete checkpoint
        from .io import atomic_path

        with atomic_path(ckpt / "extra.pt", suffix=".pt") as tmp:
            torch.save({"step": step, "ema": ema.state_dict(), "rng_states": states, "run_key": key}, tmp)
        old = sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-max(1, keep)]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)


def _save_model(accelerator: Any, unet: Any, text_encoder: Any, tokenizer: Any, ema: Any, scheduler: Any,
                path: Path, keep_training: bool = False) -> None:
    """The model as a diffusers-style folder, with the EMA weights in the UNet.

    ``keep_training``: the training weights are put back afterwards (a snapshot mid-run);
    otherwise the UNet keeps the EMA weights (the final save). Written under a temporary
    name and renamed, so a folder that exists is complete.
    """
    import tempfile

    from diffusers import DPMSolverMultistepScheduler

    unet = accelerator.unwrap_model(unet)
    if keep_training:
        ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        unet.save_pretrained(tmp / "unet")
        accelerator.unwrap_model(text_encoder).save_pretrained(tmp / "text_encoder")
        tokenizer.save_pretrained(tmp / "tokenizer")
        DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type="dpmsolver++").save_pretrained(
            tmp / "scheduler")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if keep_training:
            ema.restore(unet.parameters())
        shutil.rmtree(tmp, ignore_errors=True)
