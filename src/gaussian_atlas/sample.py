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

**The fast path** (``SampleConfig.dtype / compile / cuda_graph``, all ``auto`` = on for CUDA, off on
the CPU): :func:`generate` prepares the model once per process, in place (bf16 weights,
channels_last, ``torch.compile`` of the UNet with static shapes), and runs the whole denoising
loop of a batch (20 UNet calls, the guidance mix and the scheduler's arithmetic) as **one CUDA
graph**: captured on the first call for that (batch size, steps, guidance), replayed afterwards with
no host work and no host syncs inside. The scheduler's per-step coefficients are Python numbers on
the host (diffusers keeps its sigmas on the CPU), so capture bakes them into the graph; its step
counter starts from ``set_begin_index(0)`` (no ``nonzero().item()`` sync). The first call pays
compilation, two eager passes (cuDNN autotuning, allocator) and the capture; ``model.runtime``
keeps the graphs and records that cost (``warmup_s``). The samples match the eager bf16 path to
bf16 rounding (``benchmarks/bench_sample.py`` measures the difference on the GPU).

A trained model folder (``stages/train.py``) holds ``unet/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, ``stats.npz``, ``sphere2grid.npy`` and ``atlas.json``;
:func:`load_atlas_model` reads it back.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["SampleConfig", "AtlasModel", "load_atlas_model", "dpm_solver", "encode_prompts", "sample_atlases",
           "fast_settings", "prepare_model", "generate", "orbit_cameras", "render_views", "turntable", "write_gif", "sample_sheet"]


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
"""Inductor modes ``SampleConfig.compile`` takes (the CUDA graph is ours: inductor's own would nest in it)."""


@dataclass(frozen=True)
class SampleConfig:
    """``params.yaml: evaluate.sample`` (also the training-time preview samples).

    steps : DPM-Solver++ steps (paper: DPM-Solver++; 20 is diffusers' usual).
    guidance : classifier-free guidance scale (paper: 3.5); 1 = no guidance (one UNet pass per step).
    batch_size : prompts per UNet batch.
    seed : prompt i gets seed ``seed + i`` unless seeds are given.
    frames, resolution, elevation_deg, radius, fov_deg : the turntable (object in the unit ball;
        the procedural renders use radius 2.8 and 45 degrees).
    dtype : "auto" (bfloat16 on CUDA, float32 elsewhere), "float32" or "bfloat16": the UNet's and text
        encoder's weights while sampling.
    compile : "auto" (``torch.compile`` mode "default" on CUDA, off elsewhere), "off", or an inductor
        mode ("default", "max-autotune-no-cudagraphs"); always ``dynamic=False`` (shapes are static).
    cuda_graph : "auto" (on CUDA: each batch's whole denoising loop is one captured CUDA graph), "on"
        (an error off CUDA) or "off".
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
    dtype: str = "auto"
    compile: str = "auto"
    cuda_graph: str = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"sample.dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.compile not in ("auto", "off", *COMPILE_MODES):
            raise ValueError(f"sample.compile must be auto, off or one of {', '.join(COMPILE_MODES)}, "
                             f"got {self.compile!r}")
        if self.cuda_graph not in ("auto", "on", "off"):
            raise ValueError(f"sample.cuda_graph must be auto, on or off, got {self.cuda_graph!r}")
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
    runtime: dict = field(default_factory=dict, repr=False)  # the fast path's state: compiled UNet, graphs, costs


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


def _denoise(unet: Any, scheduler: Any, x: Tensor, ctx: Tensor, guidance: float, dtype: torch.dtype,
             on_step: Any = None) -> Tensor:
    """DPM-Solver++ over ``scheduler.timesteps`` (set by the caller) from ``x`` ``[B, C, S, S]`` float32.

    ``ctx``: ``[2B, T, D]`` (unconditional half first) when ``guidance != 1``, else ``[B, T, D]``.
    No host syncs: safe to capture in a CUDA graph once the scheduler's step index starts from
    ``set_begin_index(0)``.
    """
    from .model import fast_attention

    for t in scheduler.timesteps:
        inp = torch.cat([x, x]) if guidance != 1.0 else x  # [2B, C, S, S]
        inp = scheduler.scale_model_input(inp, t).to(dtype)
        with fast_attention(x.device):
            v = unet(inp, t, encoder_hidden_states=ctx).sample.float()
        if guidance != 1.0:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance * (v_c - v_u)
        x = scheduler.step(v, t, x).prev_sample
        if on_step is not None:
            on_step()
    return x


def _graphed_denoise(graphs: dict, unet: Any, scheduler: Any, x: Tensor, ctx: Tensor, steps: int,
                     guidance: float, dtype: torch.dtype) -> Tensor | None:
    """:func:`_denoise` replayed from a CUDA graph cached in ``graphs`` per (shapes, steps, guidance).

    The first call for a key warms up on a side stream (two eager passes: compilation, cuDNN
    autotuning, the allocator) and captures the whole loop; its seconds are added to
    ``graphs["warmup_s"]``. ``x`` and ``ctx`` are copied into the graph's static inputs. Returns None
    (and sets ``graphs["disabled"]`` to the reason) when the capture fails: the caller samples eagerly.
    """
    key = ("graph", tuple(x.shape), tuple(ctx.shape), steps, float(guidance), dtype)
    if key not in graphs:
        t0 = time.perf_counter()
        sched = type(scheduler).from_config(scheduler.config)  # a private copy: its state is baked in

        def reset() -> None:
            sched.set_timesteps(steps, device=x.device)
            sched.set_begin_index(0)  # no index search (a host sync) inside the loop

        sx, sc = x.clone(), ctx.clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                reset()
                _denoise(unet, sched, sx, sc, guidance, dtype)
        torch.cuda.current_stream(x.device).wait_stream(side)
        reset()
        graph = torch.cuda.CUDAGraph()
        pool = graphs.setdefault("pool", torch.cuda.graph_pool_handle())
        try:
            with torch.cuda.graph(graph, pool=pool):
                out = _denoise(unet, sched, sx, sc, guidance, dtype)
            torch.cuda.synchronize(x.device)
        except RuntimeError as exc:  # e.g. a kernel that cannot be captured: sample eagerly, say why once
            graphs["disabled"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            print(f"sample: CUDA graph capture failed ({graphs['disabled']}); sampling without CUDA graphs")
            return None
        graphs[key] = (graph, sx, sc, out, sched)
        graphs["warmup_s"] = graphs.get("warmup_s", 0.0) + time.perf_counter() - t0
    graph, sx, sc, out, _ = graphs[key]
    sx.copy_(x)
    sc.copy_(ctx)
    graph.replay()
    return out.clone()


@torch.no_grad()
def sample_atlases(unet: Any, text_encoder: Any, tokenizer: Any, scheduler: Any, prompts: Sequence[str],
                   seeds: Sequence[int], *, steps: int = 20, guidance: float = 3.5, batch_size: int = 16,
                   progress: bool = False, graphs: dict | None = None) -> Tensor:
    """Normalised atlases ``[B, C, S, S]`` (float32, on the UNet's device) for ``prompts``.

    DPM-Solver++ (``scheduler``: a ``DPMSolverMultistepScheduler``, v-prediction) for
    ``steps`` steps with classifier-free guidance ``guidance`` (1 = off). Sample i starts
    from noise drawn with ``seeds[i]``; batches of ``batch_size`` prompts share a UNet call
    (conditional and unconditional halves concatenated). ``graphs`` (CUDA only): a dict that
    caches one captured CUDA graph of the whole loop per batch shape (:func:`_graphed_denoise`).
    """
    from tqdm.auto import tqdm

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    if graphs is not None and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device; the UNet is on {device}")
    C, S = unet.config.in_channels, unet.config.sample_size
    out = []
    bar = tqdm(total=len(prompts) * steps, desc="sample", unit="step", disable=not progress)
    uncond = None  # [1, T, D]: the empty prompt, encoded once
    for b0 in range(0, len(prompts), batch_size):
        p, s = list(prompts[b0:b0 + batch_size]), list(seeds[b0:b0 + batch_size])
        B = len(p)
        cond = encode_prompts(text_encoder, tokenizer, p, device)  # [B, T, D]
        if guidance != 1.0:
            if uncond is None:
                uncond = encode_prompts(text_encoder, tokenizer, [""], device)
            ctx = torch.cat([uncond.expand(B, -1, -1), cond]).to(dtype)  # [2B, T, D]
        else:
            ctx = cond.to(dtype)
        x = _noise(s, (C, S, S)).to(device)  # [B, C, S, S] float32 (init_noise_sigma is 1 for DPM-Solver++)
        x = x * scheduler.init_noise_sigma
        y = None
        if graphs is not None and "disabled" not in graphs:
            before = graphs.get("warmup_s", 0.0)
            y = _graphed_denoise(graphs, unet, scheduler, x, ctx, steps, guidance, dtype)
            if progress and graphs.get("warmup_s", 0.0) > before:
                bar.write(f"sample: compiled and captured the {steps}-step loop for batches of {B} in "
                          f"{graphs['warmup_s'] - before:.1f} s (once per process and batch size)")
        if y is not None:
            x = y
            bar.update(B * steps)
        else:
            scheduler.set_timesteps(steps, device=device)
            x = _denoise(unet, scheduler, x, ctx, guidance, dtype, on_step=lambda: bar.update(B))
        out.append(x.float())
    bar.close()
    return torch.cat(out)


def fast_settings(cfg: SampleConfig, device: torch.device) -> tuple[torch.dtype, str | None, bool]:
    """``(weights' dtype, inductor mode or None, CUDA graph?)`` that ``cfg`` means on ``device``."""
    cuda = device.type == "cuda"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.dtype,
                                                                       torch.bfloat16 if cuda else torch.float32)
    mode = None if cfg.compile == "off" or (cfg.compile == "auto" and not cuda) else (
        "default" if cfg.compile == "auto" else cfg.compile)
    if cfg.cuda_graph == "on" and not cuda:
        raise ValueError(f"sample.cuda_graph: on needs a CUDA device; the model is on {device}")
    return dtype, mode, cuda and cfg.cuda_graph != "off"


def prepare_model(model: AtlasModel, cfg: SampleConfig) -> tuple[Any, dict | None]:
    """Ready ``model`` for ``cfg`` in place, once per setting: ``(the UNet to call, CUDA graph cache or None)``.

    Casts the UNet and text encoder to the sampling dtype (channels_last on CUDA) and wraps the UNet
    in ``torch.compile`` (``dynamic=False``) when ``cfg`` asks for it; kept in ``model.runtime``.
    """
    device = next(model.unet.parameters()).device
    dtype, mode, graph = fast_settings(cfg, device)
    rt = model.runtime
    if rt.get("setting") != (dtype, mode):
        torch.nn.Module.to(model.unet, dtype=dtype)  # (diffusers' own .to warns about fp32-kept modules: none here)
        model.text_encoder.to(dtype=dtype)
        if device.type == "cuda":
            model.unet.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True  # static shapes: let cuDNN pick its fastest convolutions
        rt.clear()
        rt["setting"] = (dtype, mode)
        rt["unet"] = torch.compile(model.unet, mode=mode, dynamic=False) if mode else model.unet
    return rt["unet"], (rt.setdefault("graphs", {}) if graph else None)


def generate(model: AtlasModel, prompts: Sequence[str], cfg: SampleConfig = SampleConfig(),
             seeds: Sequence[int] | None = None, progress: bool = False) -> tuple[Tensor, Any, list[int]]:
    """``(atlases [B, 16, S, S] de-normalised, Gaussians [B, N] in the unit-ball frame, seeds)``.

    On CUDA (``cfg``'s defaults) the model is prepared in place for the fast path
    (:func:`prepare_model`); the first call per batch shape pays the compile and capture.
    """
    from .atlas import atlas_to_gaussians

    seeds = [cfg.seed + i for i in range(len(prompts))] if seeds is None else [int(s) for s in seeds]
    unet, graphs = prepare_model(model, cfg)
    x = sample_atlases(unet, model.text_encoder, model.tokenizer, model.scheduler, prompts, seeds,
                       steps=cfg.steps, guidance=cfg.guidance, batch_size=cfg.batch_size, progress=progress,
                       graphs=graphs)
    atlas = x * model.std.to(x.device) + model.mean.to(x.device)  # de-normalise
    g = atlas_to_gaussians(atlas, None, model.atlas_cfg, grid=model.grid.to(x.device))
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
