"""Text -> Gaussian Atlas -> 3D Gaussians: sampling with DPM-Solver++ and classifier-free guidance (paper Sec. 6).

The paper samples with DPM-Solver++ and guidance 3.5. Here:

1. prompts -> text embeddings (conditional) and the empty prompt's (unconditional);
2. one noise tensor **per prompt from its own seed** (``seeds[i]``), so a sample does not
   depend on the batch it was drawn in and every result can be reproduced from its
   (prompt, seed) pair;
3. ``steps`` steps of diffusers' ``DPMSolverMultistepScheduler`` (``algorithm_type=
   "dpmsolver++"``, v-prediction as trained) with ``v = v_u + g (v_c - v_u)``;
4. de-normalise with the pixel-wise statistics and decode with the atlas grid
   (:func:`gaussian_atlas.atlas.atlas_to_gaussians`): Gaussians in the unit-ball frame the
   training atlases were normalised to.

A trained model folder (``stages/train.py``) holds ``unet/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, ``stats.npz``, ``sphere2grid.npy`` and ``atlas.json``;
:func:`load_atlas_model` reads it back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["SampleConfig", "AtlasModel", "load_atlas_model", "dpm_solver", "encode_prompts", "sample_atlases",
           "generate", "orbit_cameras", "render_views", "turntable", "write_gif", "sample_sheet"]


@dataclass(frozen=True)
class SampleConfig:
    """``params.yaml: evaluate.sample`` (also the training-time preview samples).

    steps : DPM-Solver++ steps (paper: DPM-Solver++; 20 is diffusers' usual).
    guidance : classifier-free guidance scale (paper: 3.5); 1 = no guidance (one UNet pass per step).
    batch_size : prompts per UNet batch.
    seed : prompt i gets seed ``seed + i`` unless seeds are given.
    frames, resolution, elevation_deg, radius, fov_deg : the turntable (object in the unit ball;
        the procedural renders use radius 2.8 and 45 degrees).
    """

    steps: int = 20
    guidance: float = 3.5
    batch_size: int = 16
    seed: int = 0
    frames: int = 24
    resolution: int = 128
    elevation_deg: float = 20.0
    radius: float = 2.8
    fov_deg: float = 45.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.guidance >= 1.0:
            raise ValueError(f"guidance must be >= 1 (1 = no guidance), got {self.guidance}")


@dataclass
class AtlasModel:
    """Everything sampling needs, on one device."""

    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any  # DPMSolverMultistepScheduler (dpmsolver++)
    mean: Tensor  # [16, S, S]
    std: Tensor  # [16, S, S]
    grid: Tensor  # [S*S] sphere point -> atlas pixel
    atlas_cfg: Any  # AtlasConfig
    path: Path | None = None


def dpm_solver(config: Any) -> Any:
    """A DPM-Solver++ scheduler with the training noise schedule (``config``: a scheduler config)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")


def load_atlas_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> AtlasModel:
    """Load a model folder written by the train stage (see the module docstring).

    ``dtype``: weights' dtype (default float32; bf16 halves memory on a GPU).
    Raises ``FileNotFoundError`` naming the first missing part.
    """
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from .atlas import AtlasConfig
    from .config import from_dict
    from .io import read_json
    from .normalize import RunningStats

    path = Path(path)
    for part in ("unet", "text_encoder", "tokenizer", "scheduler", "stats.npz", "sphere2grid.npy", "atlas.json"):
        if not (path / part).exists():
            raise FileNotFoundError(f"{path}: not a trained Gaussian Atlas model folder ({part} is missing; "
                                    f"run the train stage, which writes <out>/model)")
    dtype = dtype or torch.float32
    unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype).to(device).eval()
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_pretrained(path / "scheduler")
    stats = RunningStats.load(path / "stats.npz")
    atlas_cfg = from_dict(AtlasConfig, read_json(path / "atlas.json"), f"{path / 'atlas.json'}")
    grid = torch.from_numpy(np.load(path / "sphere2grid.npy").astype(np.int64))
    return AtlasModel(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                      mean=torch.from_numpy(stats.mean.astype(np.float32)),
                      std=torch.from_numpy(stats.std.astype(np.float32)), grid=grid, atlas_cfg=atlas_cfg, path=path)


@torch.no_grad()
def encode_prompts(text_encoder: Any, tokenizer: Any, prompts: Sequence[str], device: torch.device) -> Tensor:
    """``[B, T, D]`` last hidden states of the text encoder (padded to the tokenizer's max length)."""
    ids = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]


def _noise(seeds: Sequence[int], shape: tuple[int, ...]) -> Tensor:
    """``[B, *shape]`` float32 on the CPU: sample i from ``torch.Generator().manual_seed(seeds[i])``."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample_atlases(unet: Any, text_encoder: Any, tokenizer: Any, scheduler: Any, prompts: Sequence[str],
                   seeds: Sequence[int], *, steps: int = 20, guidance: float = 3.5, batch_size: int = 16,
                   progress: bool = False) -> Tensor:
    """Normalised atlases ``[B, C, S, S]`` (float32, on the UNet's device) for ``prompts``.

    DPM-Solver++ (``scheduler``: a ``DPMSolverMultistepScheduler``, v-prediction) for
    ``steps`` steps with classifier-free guidance ``guidance`` (1 = off). Sample i starts
    from noise drawn with ``seeds[i]``; batches of ``batch_size`` prompts share a UNet call
    (conditional and unconditional halves concatenated).
    """
    from tqdm.auto import tqdm

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    from .model import fast_attention

    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    C, S = unet.config.in_channels, unet.config.sample_size
    out = []
    bar = tqdm(total=len(prompts) * steps, desc="sample", unit="step", disable=not progress)
    for b0 in range(0, len(prompts), batch_size):
        p, s = list(prompts[b0:b0 + batch_size]), list(seeds[b0:b0 + batch_size])
        B = len(p)
        cond = encode_prompts(text_encoder, tokenizer, p, device)  # [B, T, D]
        if guidance != 1.0:
            uncond = encode_prompts(text_encoder, tokenizer, [""], device).expand(B, -1, -1)
            ctx = torch.cat([uncond, cond]).to(dtype)  # [2B, T, D]
        else:
            ctx = cond.to(dtype)
        scheduler.set_timesteps(steps, device=device)
        x = _noise(s, (C, S, S)).to(device) * scheduler.init_noise_sigma  # [B, C, S, S] float32
        for t in scheduler.timesteps:
            inp = torch.cat([x, x]) if guidance != 1.0 else x
            inp = scheduler.scale_model_input(inp, t).to(dtype)
            with fast_attention(device):
                v = unet(inp, t, encoder_hidden_states=ctx).sample.float()
            if guidance != 1.0:
                v_u, v_c = v.chunk(2)
                v = v_u + guidance * (v_c - v_u)
            x = scheduler.step(v, t, x).prev_sample
            bar.update(B)
        out.append(x.float())
    bar.close()
    return torch.cat(out)


def generate(model: AtlasModel, prompts: Sequence[str], cfg: SampleConfig = SampleConfig(),
             seeds: Sequence[int] | None = None, progress: bool = False) -> tuple[Tensor, Any, list[int]]:
    """``(atlases [B, 16, S, S] de-normalised, Gaussians [B, N] in the unit-ball frame, seeds)``."""
    from .atlas import atlas_to_gaussians

    seeds = [cfg.seed + i for i in range(len(prompts))] if seeds is None else [int(s) for s in seeds]
    x = sample_atlases(model.unet, model.text_encoder, model.tokenizer, model.scheduler, prompts, seeds,
                       steps=cfg.steps, guidance=cfg.guidance, batch_size=cfg.batch_size, progress=progress)
    atlas = x * model.std.to(x.device) + model.mean.to(x.device)  # de-normalise
    g = atlas_to_gaussians(atlas, None, model.atlas_cfg, grid=model.grid)
    return atlas, g, seeds


def orbit_cameras(n: int, resolution: int = 128, elevation_deg: float = 20.0, radius: float = 2.8,
                  fov_deg: float = 45.0, start_deg: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(c2w [n, 4, 4], K [n, 3, 3])``: n cameras evenly around +Z (world up), looking at the origin."""
    from .cameras import look_at_c2w, spherical_to_cartesian

    c2w = np.stack([look_at_c2w(spherical_to_cartesian(start_deg + 360.0 * i / n, elevation_deg, radius))
                    for i in range(n)])
    f = 0.5 * resolution / math.tan(0.5 * math.radians(fov_deg))
    K = np.array([[f, 0, 0.5 * resolution], [0, f, 0.5 * resolution], [0, 0, 1]])
    return torch.from_numpy(c2w).float(), torch.from_numpy(np.broadcast_to(K, (n, 3, 3)).copy()).float()


@torch.no_grad()
def render_views(g: Any, c2w: Tensor, K: Tensor, resolution: int, device: str | torch.device | None = None,
                 chunk: int = 8) -> np.ndarray:
    """uint8 ``[B, V, H, W, 3]`` renders on white of Gaussians ``[B, N]`` from cameras ``[V]``."""
    from .render import render

    device = device or g.means.device
    out = []
    for b in range(g.means.shape[0]):
        gb = g._map(lambda t: t[b]).to(device, torch.float32)  # object b: [N, ...]
        frames = []
        for v0 in range(0, len(c2w), chunk):
            r = render(gb, c2w[v0:v0 + chunk].to(device), K[v0:v0 + chunk].to(device), resolution, resolution,
                       background=1.0)
            frames.append(r.rgb.clamp(0, 1).cpu())
        out.append(torch.cat(frames))
    return (torch.stack(out).numpy() * 255.0 + 0.5).astype(np.uint8)


def turntable(g: Any, cfg: SampleConfig = SampleConfig(), device: str | torch.device | None = None) -> np.ndarray:
    """uint8 ``[B, F, H, W, 3]``: ``cfg.frames`` views around each object."""
    c2w, K = orbit_cameras(cfg.frames, cfg.resolution, cfg.elevation_deg, cfg.radius, cfg.fov_deg)
    return render_views(g, c2w, K, cfg.resolution, device)


def write_gif(path: str | Path, frames: np.ndarray, fps: float = 12.0) -> Path:
    """Write ``[F, H, W, 3]`` uint8 frames as a looping GIF, atomically."""
    import imageio.v3 as iio

    from .io import atomic_path

    with atomic_path(path, suffix=".gif") as tmp:
        iio.imwrite(tmp, np.asarray(frames), extension=".gif", duration=1000.0 / fps, loop=0)
    return Path(path)


def sample_sheet(views: np.ndarray, prompts: Sequence[str], max_label: int = 40) -> np.ndarray:
    """One image: a row of views per prompt (``views``: uint8 ``[B, V, H, W, 3]``), labelled."""
    from .viz import contact_sheet

    B, V = views.shape[:2]
    labels = [(p[:max_label] if v == 0 else "") for p in prompts for v in range(V)]
    return contact_sheet([views[b, v] for b in range(B) for v in range(V)], labels, ncols=V)
